"""Label photos with a teacher detector: write its boxes as a COCO annotation file.

Runs an mnapps detection checkpoint (a train_det best.pt, or a detector imported with
tools/import_weights.py --kind ssd) over the photos of IMAGES (sub-folders included; or only the
photos named in --list) and writes every detection scoring at least --score-threshold as a COCO
annotation. The file lists every readable photo with its real size, a photo without a detection
as an image without boxes, one category per class of the teacher, and in "info" the teacher
checkpoint (path, sha256) and the threshold. It goes as it is to train_det --train-ann (with
--train-images IMAGES) and to eval_det --val-ann (with --val-images IMAGES). An existing
--output is refused unless --overwrite; unreadable photos are skipped and counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnapps.weights import weights_arg

EXAMPLES = """examples:
  python tools/pseudo_label.py my_photos --checkpoint runs/weights/faceapi_ssd.pt --output runs/labels/faces.json
  python tools/pseudo_label.py path/to/data --list train.txt --checkpoint runs/weights/faceapi_ssd.pt \\
      --score-threshold 0.5 --output runs/labels/train.json
  python tools/train_det.py --head ssd --train-ann runs/labels/train.json --train-images path/to/data ...
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", type=Path, metavar="IMAGES", help="folder of photos (file names are relative to it)")
    parser.add_argument("--checkpoint", type=weights_arg, required=True, metavar="F",
                        help="teacher detection checkpoint (.pt), or a weights name (mnapps weights list)")
    parser.add_argument("--output", type=Path, required=True, metavar="F", help="COCO annotation JSON to write")
    parser.add_argument("--list", type=Path, metavar="F",
                        help="label only these photos: a text file of paths relative to IMAGES, one per line")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="keep detections scoring at least this (default 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--batch-size", type=int, default=4, help="photos per forward pass (default 4)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.score_threshold <= 1.0:
        parser.error(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    from mnapps.engine.distributed import resolve_device
    from mnapps.tasks.detection.pseudo_labels import select_photos, write_pseudo_labels

    try:
        device = resolve_device(args.device)
        if not args.images.is_dir():
            raise FileNotFoundError(f"IMAGES {args.images} is not a folder; give the folder that holds the photos")
        paths = select_photos(args.images, args.list)
        path, coco, unreadable = write_pseudo_labels(
            args.checkpoint, paths, args.images, args.output, overwrite=args.overwrite,
            score_threshold=args.score_threshold, device=device, batch_size=args.batch_size,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for message in unreadable:
        print(f"warning: {message}", file=sys.stderr)
    images = coco["images"]
    with_boxes = len({a["image_id"] for a in coco["annotations"]})
    names = ", ".join(c["name"] for c in coco["categories"])
    print(
        f"wrote {path}: {len(images)} image(s), {len(coco['annotations'])} box(es) >= {args.score_threshold:g} "
        f"({names}), {len(images) - with_boxes} image(s) without a box"
        + (f"; skipped {len(unreadable)} unreadable" if unreadable else "")
    )
    if not images:
        print(f"error: none of the {len(paths)} photo(s) could be read", file=sys.stderr)
        return 2
    return 0
