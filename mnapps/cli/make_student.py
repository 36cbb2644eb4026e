"""Make the starting checkpoint of a smaller student of a detector, for train_det --weights.

Rebuilds the teacher detector (an mnapps detection checkpoint, e.g. face-api.js's detector made by
tools/import_weights.py --kind ssd) at another input size (--size: SSD anchors follow the feature
maps) and/or a smaller width (--width-mult: the strongest channels of every layer are kept), then
recalibrates every BatchNorm on real photos (--photos, or only those named in --list) so that
training in train mode starts from the teacher's function: imported TF models carry BatchNorm
folded into their convolutions, and without this step fine-tuning starts from a broken model.
The eval-mode output of the rebuilt model is unchanged by the recalibration. An existing
--output is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnapps.weights import weights_arg

EXAMPLES = """examples:
  python tools/make_student.py runs/weights/faceapi_ssd.pt --size 256 --photos my_photos --output runs/weights/student_r256.pt
  python tools/make_student.py runs/weights/faceapi_ssd.pt --size 256 --width-mult 0.5 --photos path/to/data \\
      --list train.txt --output runs/weights/student_a050_r256.pt
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("teacher", type=weights_arg, metavar="TEACHER",
                        help="mnapps detection checkpoint (.pt), or a weights name (mnapps weights list)")
    parser.add_argument("--output", type=Path, required=True, metavar="F", help="student checkpoint to write (.pt)")
    parser.add_argument("--photos", type=Path, required=True, metavar="D",
                        help="folder of real photos to recalibrate BatchNorm on (the student's training photos)")
    parser.add_argument("--list", type=Path, metavar="F", help="use only these photos: paths relative to --photos")
    parser.add_argument("--size", type=int, help="the student's input side (default: the teacher's)")
    parser.add_argument("--width-mult", type=float, help="the student's width multiplier (default: the teacher's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    if args.size is not None and args.size < 32:
        parser.error(f"--size must be >= 32, got {args.size}")
    if args.width_mult is not None and not 0 < args.width_mult <= 4:
        parser.error(f"--width-mult must be in (0, 4], got {args.width_mult}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    from mnapps.tasks.detection.students import student_checkpoint
    from mnapps.tasks.detection.pseudo_labels import select_photos

    try:
        photos = select_photos(args.photos, args.list)
        path, report = student_checkpoint(
            args.teacher, args.output, photos, size=args.size, width_mult=args.width_mult, overwrite=args.overwrite
        )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = report["config"].model
    print(
        f"wrote {path}: {model.head} on MobileNetV1 x{model.backbone.width_mult:g}, input {model.head_settings.size}, "
        f"{report['recalibrated']} BatchNorms recalibrated on {len(photos)} photos"
    )
    return 0
