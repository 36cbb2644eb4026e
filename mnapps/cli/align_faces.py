"""Detect and crop the face of every photo under SRC into DST with MTCNN or an SSD (resumable).

The layout is mirrored (``SRC/person/a.jpg`` -> ``DST/person/a.png``, 160x160 by default).
Images where MTCNN finds no face are listed in ``DST/no_face.txt`` (unreadable files in
``DST/unreadable.txt``) instead of being dropped silently. Running the same command again
continues where it stopped: crops that exist and images already reported are skipped. Two photos
that differ only by extension (``x.jpg``, ``x.png``) get crops that keep it (``x.jpg.png``,
``x.png.png``) and are reported; pair lists naming either find the right crop.

--detector ssd crops with an mnapps SSD face detector instead of MTCNN (the default), e.g.
face-api.js's MobileNetV1 SSD imported by ``tools/import_weights.py --kind ssd``, so detection
and embedding both run on MobileNetV1. Its boxes are moved onto where MTCNN's would be
(``--crop mtcnn``, the geometry measured by tools/face_pipeline_bench.py) or squared
(``--crop square``); boxes scoring below ``--min-score`` are not faces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mnapps.choices import CROP_GEOMETRY_NAMES, DEFAULT_MIN_FACE_SCORE, MTCNN_CROP
from mnapps.weights import weights_arg

if TYPE_CHECKING:  # annotations only: run() imports torch and the tasks after the arguments are parsed
    from mnapps.data.box_crops import BoxFaceAligner
    from mnapps.tasks.face.data.align import FaceAligner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="examples:\n  python tools/align_faces.py ../shared/data/faces/deepface runs/aligned/deepface\n"
        "  python tools/align_faces.py ../shared/data/faces/deepface runs/aligned/deepface_ssd --detector ssd "
        "--detector-weights faceapi_ssd_mobilenetv1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", type=Path, help="folder of photos (identity sub-folders optional)")
    parser.add_argument("dst", type=Path, help="output folder of face crops")
    parser.add_argument("--image-size", type=int, default=160, help="crop side in pixels (default 160, FaceNet's)")
    parser.add_argument("--detector", choices=["mtcnn", "ssd"], default="mtcnn",
                        help="face detector: facenet-pytorch's MTCNN (default) or an mnapps SSD (--detector-weights)")
    parser.add_argument("--detector-weights", type=weights_arg, metavar="CKPT",
                        help="mnapps detection checkpoint of the SSD face detector (for --detector ssd)")
    parser.add_argument("--min-score", type=float, default=0.5,
                        help="SSD boxes scoring below this are not faces (default 0.5, face-api.js's)")
    parser.add_argument("--crop", choices=list(CROP_GEOMETRY_NAMES), default=MTCNN_CROP,
                        help="SSD crop region: the box moved onto where MTCNN's box would be (mtcnn, default) "
                        "or the square around it")
    parser.add_argument("--margin", type=int, default=0, help="extra pixels around the box in the crop (default 0)")
    parser.add_argument("--min-face-size", type=int, default=20, help="smallest face MTCNN looks for (default 20)")
    parser.add_argument("--select", choices=["largest", "probability"], default="largest",
                        help="which face to keep when a photo has several (default: largest)")
    parser.add_argument("--keep-all", action="store_true", help="write every face found (extra ones as NAME_1.png, ...)")
    parser.add_argument("--min-face-score", type=float, default=DEFAULT_MIN_FACE_SCORE,
                        help="drop a detection whose crop MTCNN, looking again at the crop alone, scores below this "
                             f"(background patches, a cat; default {DEFAULT_MIN_FACE_SCORE}, 0 keeps every detection)")
    parser.add_argument("--resize-shorter", type=int, default=None, metavar="N",
                        help="resize photos so the shorter side is N pixels before detection "
                             "(512 reproduces facenet-pytorch's CI preprocessing)")
    parser.add_argument("--no-resume", action="store_true", help="redo every image instead of skipping finished ones")
    parser.add_argument("--device", default="cpu", help="device for MTCNN: cpu, cuda or cuda:N (default cpu)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.min_face_score <= 1.0:
        parser.error(f"--min-face-score must be in [0, 1], got {args.min_face_score}")
    if not 0.0 <= args.min_score <= 1.0:
        parser.error(f"--min-score must be in [0, 1], got {args.min_score}")
    return args


def build_aligner(args: argparse.Namespace, device) -> FaceAligner | BoxFaceAligner:
    """The aligner the arguments ask for (MTCNN, or the SSD of --detector-weights)."""
    from mnapps.data.box_crops import CROP_GEOMETRIES, BoxFaceAligner
    from mnapps.tasks.detection import box_detector, load_detector
    from mnapps.tasks.face.data.align import FaceAligner

    if args.detector == "mtcnn":
        return FaceAligner(args.image_size, margin=args.margin, min_face_size=args.min_face_size,
                           select=args.select, resize_shorter=args.resize_shorter, device=device or "cpu")
    if args.detector_weights is None:
        raise ValueError("--detector ssd needs --detector-weights CKPT (an SSD face detector, e.g. "
                         "tools/import_weights.py --kind ssd path/to/faceapi_ssd_mobilenetv1)")
    if args.resize_shorter is not None:
        raise ValueError("--resize-shorter is for --detector mtcnn; the SSD resizes every photo to its own input")
    model, cfg = load_detector(args.detector_weights, device=device or "cpu")
    names = list(cfg.model.class_names)
    label = names.index("face") if "face" in names else 1
    return BoxFaceAligner(box_detector(model, label=label, device=device or "cpu"), image_size=args.image_size,
                          margin=args.margin, min_score=args.min_score, geometry=CROP_GEOMETRIES[args.crop],
                          select=args.select)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    from mnapps.engine.distributed import resolve_device
    from mnapps.tasks.face.data.align import NO_FACE_REPORT, align_folder
    from mnapps.tasks.face.data.face_check import FaceCheck, FaceCheckingAligner

    try:
        device = resolve_device(args.device)
        if args.dst.exists() and not args.dst.is_dir():
            raise ValueError(f"the destination {args.dst} is an existing file; give a folder for the crops")
        aligner = build_aligner(args, device)
        if args.min_face_score > 0:
            aligner = FaceCheckingAligner(aligner, FaceCheck(args.min_face_score, device=device or "cpu"))
        report = align_folder(args.src, args.dst, aligner=aligner, keep_all=args.keep_all, resume=not args.no_resume)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    if isinstance(aligner, FaceCheckingAligner):
        print(f"{aligner.dropped} detection(s) dropped as not faces (crop re-detection score < {args.min_face_score:g})")
    if report.no_face:
        print(f"no face found in {len(report.no_face)} image(s), listed in {args.dst / NO_FACE_REPORT}:")
        for name in report.no_face:
            print(f"  {name}")
    return 0


