"""Detect and crop the face of every photo under SRC into DST with MTCNN (resumable).

The layout is mirrored (``SRC/person/a.jpg`` -> ``DST/person/a.png``, 160x160 by default).
Images where MTCNN finds no face are listed in ``DST/no_face.txt`` (unreadable files in
``DST/unreadable.txt``) instead of being dropped silently. Running the same command again
continues where it stopped: crops that exist and images already reported are skipped. Two photos
that differ only by extension (``x.jpg``, ``x.png``) get crops that keep it (``x.jpg.png``,
``x.png.png``) and are reported; pair lists naming either find the right crop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnapps.data.align import NO_FACE_REPORT, FaceAligner, align_folder
from mnapps.engine.distributed import resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="example: python tools/align_faces.py ../shared/data/faces/deepface runs/aligned/deepface",
    )
    parser.add_argument("src", type=Path, help="folder of photos (identity sub-folders optional)")
    parser.add_argument("dst", type=Path, help="output folder of face crops")
    parser.add_argument("--image-size", type=int, default=160, help="crop side in pixels (default 160, FaceNet's)")
    parser.add_argument("--margin", type=int, default=0, help="extra pixels around the box in the crop (default 0)")
    parser.add_argument("--min-face-size", type=int, default=20, help="smallest face MTCNN looks for (default 20)")
    parser.add_argument("--select", choices=["largest", "probability"], default="largest",
                        help="which face to keep when a photo has several (default: largest)")
    parser.add_argument("--keep-all", action="store_true", help="write every face found (extra ones as NAME_1.png, ...)")
    parser.add_argument("--resize-shorter", type=int, default=None, metavar="N",
                        help="resize photos so the shorter side is N pixels before detection "
                             "(512 reproduces facenet-pytorch's CI preprocessing)")
    parser.add_argument("--no-resume", action="store_true", help="redo every image instead of skipping finished ones")
    parser.add_argument("--device", default="cpu", help="device for MTCNN: cpu, cuda or cuda:N (default cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        if args.dst.exists() and not args.dst.is_dir():
            raise ValueError(f"the destination {args.dst} is an existing file; give a folder for the crops")
        aligner = FaceAligner(args.image_size, margin=args.margin, min_face_size=args.min_face_size,
                              select=args.select, resize_shorter=args.resize_shorter, device=device or "cpu")
        report = align_folder(args.src, args.dst, aligner=aligner, keep_all=args.keep_all, resume=not args.no_resume)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    if report.no_face:
        print(f"no face found in {len(report.no_face)} image(s), listed in {args.dst / NO_FACE_REPORT}:")
        for name in report.no_face:
            print(f"  {name}")
    return 0


