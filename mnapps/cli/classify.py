"""Print the top-5 labels of each IMAGE (a file, or every image in a folder) with an mnapps
classification checkpoint.

Make the ImageNet checkpoint once with
  python tools/import_weights.py mobilenet_v1_1.0_224_tfslim.npz
(written to runs/weights/mobilenet_v1_1.0_224_imagenet.pt, the default here), or pass a
checkpoint from tools/train_cls.py. Images are resized (PIL bilinear) to the checkpoint's
resolution and scaled to [-1, 1]. Unreadable images are skipped and counted; when none could be
read the exit status is 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnapps.data.image_io import IMAGE_EXTENSIONS, list_images
from mnapps.weights import weights_arg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--checkpoint", type=weights_arg, help="classification checkpoint (default: runs/weights/mobilenet_v1_1.0_224_imagenet.pt)")
    parser.add_argument("--resolution", type=int, help="input size (default: the checkpoint's)")
    parser.add_argument("--topk", type=int, default=5, help="labels per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    args = parser.parse_args(argv)
    for flag, value in (("--resolution", args.resolution), ("--topk", args.topk), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    from mnapps.engine.distributed import resolve_device
    from mnapps.tasks.classification import classify_files, default_imagenet_checkpoint, load_classifier

    checkpoint = args.checkpoint or default_imagenet_checkpoint()
    if not checkpoint.is_file():
        how = (
            "create it with: python tools/import_weights.py mobilenet_v1_1.0_224_tfslim.npz"
            if args.checkpoint is None else "check the path"
        )
        print(f"error: no classification checkpoint at {checkpoint}; {how} (or pass --checkpoint)", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        paths = list_images(args.images, recursive=False)
        if not paths:
            raise FileNotFoundError(f"{' '.join(map(str, args.images))}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        model, cfg, names = load_classifier(checkpoint, device)
        results, unreadable = classify_files(
            model, paths, names, resolution=args.resolution or cfg.model.resolution, topk=args.topk,
            device=device, batch_size=args.batch_size,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for image, predictions in results:
        print(f"{image}:")
        for rank, p in enumerate(predictions, start=1):
            print(f"  {rank}. {p.label:<30s} {p.probability:7.2%}  (class {p.index})")
    for error in unreadable:
        print(f"skipped: {error}", file=sys.stderr)
    if not results:
        print(f"error: none of the {len(paths)} image(s) could be read", file=sys.stderr)
        return 2
    if unreadable:
        print(f"classified {len(results)} image(s), skipped {len(unreadable)} unreadable")
    return 0
