#!/usr/bin/env python
"""Print the top-5 labels of each IMAGE with an mnapps classification checkpoint.

Make the ImageNet checkpoint once with
  python tools/import_weights.py ../shared/data/mobilenet_v1_tfslim/mobilenet_v1_1.0_224_tfslim.npz
(written to runs/weights/mobilenet_v1_1.0_224_imagenet.pt, the default here), or pass a
checkpoint from tools/train_cls.py. Images are resized (PIL bilinear) to the checkpoint's
resolution and scaled to [-1, 1].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mnapps.classify import classify_images, default_imagenet_checkpoint, load_classifier  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("--checkpoint", type=Path, help="classification checkpoint (default: runs/weights/mobilenet_v1_1.0_224_imagenet.pt)")
    parser.add_argument("--resolution", type=int, help="input size (default: the checkpoint's)")
    parser.add_argument("--topk", type=int, default=5, help="labels per image (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint = args.checkpoint or default_imagenet_checkpoint(ROOT)
    if not checkpoint.is_file():
        how = (
            "create it with: python tools/import_weights.py "
            "../shared/data/mobilenet_v1_tfslim/mobilenet_v1_1.0_224_tfslim.npz"
            if args.checkpoint is None else "check the path"
        )
        print(f"error: no classification checkpoint at {checkpoint}; {how} (or pass --checkpoint)", file=sys.stderr)
        return 2
    try:
        model, cfg, names = load_classifier(checkpoint, args.device)
        resolution = args.resolution or cfg.model.resolution
        results = classify_images(model, args.images, names, resolution=resolution, topk=args.topk, device=args.device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for image, predictions in zip(args.images, results):
        print(f"{image}:")
        for rank, p in enumerate(predictions, start=1):
            print(f"  {rank}. {p.label:<30s} {p.probability:7.2%}  (class {p.index})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
