"""Face pipeline side by side: the SSD face detector (MobileNetV1) against MTCNN, in one run.

On every photo under --photos (default: DATA/faces and DATA/facenet_test_images) both detectors
find faces (SSD: --detector-weights, e.g. face-api.js's detector imported by
tools/import_weights.py --kind ssd, boxes scoring >= --min-score; MTCNN: facenet-pytorch's, its
default settings). It prints the faces each found, the faces one found and the other missed
(matched by IoU >= --match-iou), the photos/s of each (detect + crop, after decoding; --threads
torch threads) and their ratio, and the median geometry of MTCNN's box relative to the SSD's (what
the SSD crop preset "mtcnn" reproduces). Then it cuts the selected (largest) face of every photo
the pair list uses with each pipeline - MTCNN's own crop, the SSD box cut as MTCNN would have
("mtcnn" geometry) and as a square - and scores the CASIA FaceNet teacher on the pairs (default
DATA/faces/deepface/master.csv) with each set of crops: 10-fold accuracy, ROC AUC, EER. A photo
where a pipeline finds no face is fed to the teacher whole (counted as a fallback).
Writes the crops under OUT/crops/<pipeline>/ and every figure to OUT/face_pipeline.json.

With --embedder (a face-embedding student from tools/distill_face.py) each pipeline also embeds
every face it found, inside the timed pass: MTCNN + the CASIA teacher (InceptionResnetV1) against
the SSD + the student, and the pair scores add the whole small pipeline (the student on the SSD's
crops, "mtcnn" geometry) and the student on MTCNN's crops. --detector-onnx / --embedder-onnx run
the SSD and the student from their tools/export.py files in ONNX Runtime instead of PyTorch (the
pair scores then use those runtimes too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mnapps.data.image_io import list_images
from mnapps.files import atomic_write, check_output_path
from mnapps.weights import weights_arg

if TYPE_CHECKING:  # annotations only: torch itself is imported after the arguments are parsed
    from torch import nn

    from mnapps.data.box_crops import BoxFaceAligner

EXAMPLES = """example (figures in docs/tf_od_api.md):
  mnapps weights get faceapi_ssd_mobilenetv1
  python tools/face_pipeline_bench.py --detector-weights faceapi_ssd_mobilenetv1 --out runs/face_pipeline
"""
CASIA_TEACHER = Path("facenet_casia") / "20180408-102900-casia-webface-features.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1] + "\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--detector-weights", type=weights_arg, required=True, metavar="CKPT",
                        help="mnapps detection checkpoint of a face detector (label 1 = face)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"),
                        help="shared data folder (default ../shared/data)")
    parser.add_argument("--photos", type=Path, nargs="+", metavar="DIR",
                        help="photo folders or files to detect on (default DATA/faces DATA/facenet_test_images)")
    parser.add_argument("--pairs", type=Path, help="pair list (default DATA/faces/deepface/master.csv)")
    parser.add_argument("--pair-images", type=Path, metavar="DIR",
                        help="folder of the photos the pairs name (default: the pair list's folder)")
    parser.add_argument("--teacher-weights", type=weights_arg, help=f"FaceNet state dict (default DATA/{CASIA_TEACHER})")
    parser.add_argument("--embedder", type=Path, metavar="CKPT",
                        help="face-embedding student (tools/distill_face.py): time and score SSD + it as a pipeline")
    parser.add_argument("--detector-onnx", type=Path, metavar="F",
                        help="run the SSD from this tools/export.py file of --detector-weights (ONNX Runtime)")
    parser.add_argument("--embedder-onnx", type=Path, metavar="F",
                        help="run the student from this tools/export.py file of --embedder (ONNX Runtime)")
    parser.add_argument("--out", type=Path, default=Path("runs") / "face_pipeline", help="output folder")
    parser.add_argument("--min-score", type=float, default=0.5,
                        help="SSD boxes scoring below are not faces (default 0.5, face-api.js's)")
    parser.add_argument("--margin", type=int, default=0,
                        help="crop margin in pixels of the 160 crop, both pipelines (default 0)")
    parser.add_argument("--match-iou", type=float, default=0.4,
                        help="IoU at which two boxes are the same face (default 0.4)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    args = parser.parse_args(argv)
    if args.embedder_onnx is not None and args.embedder is None:
        parser.error("--embedder-onnx needs --embedder (the checkpoint it was exported from)")
    if not 0 <= args.min_score <= 1 or not 0 < args.match_iou <= 1:
        parser.error("--min-score must be in [0, 1] and --match-iou in (0, 1]")
    args.photos = args.photos or [args.data / "faces", args.data / "facenet_test_images"]
    args.pairs = args.pairs or args.data / "faces" / "deepface" / "master.csv"
    args.pair_images = args.pair_images or args.pairs.parent
    args.teacher_weights = args.teacher_weights or args.data / CASIA_TEACHER
    return args


def _photos(args: argparse.Namespace) -> list[Path]:
    """Every photo to detect on, the pair list's included, each once."""
    seen, photos = set(), []
    for path in list_images(list(args.photos) + [args.pair_images]):
        if path.resolve() not in seen:
            seen.add(path.resolve())
            photos.append(path)
    return photos


# (crops, embedder) scored on the pairs; the student's rows only with --embedder.
VERIFIED = (("mtcnn", "teacher"), ("ssd_mtcnn", "teacher"), ("ssd_square", "teacher"),
            ("ssd_mtcnn", "student"), ("mtcnn", "student"))


def _verify(args: argparse.Namespace, crops_root: Path, device, embedders: dict[str, nn.Module]) -> dict[str, dict]:
    from mnapps.tasks.face import evaluate_face_verification
    from mnapps.tasks.face.evaluation import read_pairs

    pairs = read_pairs(args.pairs)
    scores = {}
    for pipeline in ("mtcnn", "ssd_mtcnn", "ssd_square"):
        models = {name: embedders[name] for crops, name in VERIFIED if crops == pipeline and name in embedders}
        result = evaluate_face_verification(pairs, crops_root / pipeline, models, device=device or "cpu")
        for name in models:
            metrics = result.results[name]
            key = pipeline if name == "teacher" else f"{pipeline}+{name}"
            scores[key] = {k: metrics[k] for k in ("pairs", "accuracy", "accuracy_std", "auc", "eer", "eer_threshold")}
    return scores


def _print_detection(report: dict, n_photos: int) -> None:
    seconds, found = report["timing"]["seconds"], report["faces_found"]
    print(f"\n{n_photos} photos read ({len(report['timing']['unreadable'])} unreadable)")
    print(f"{'detector':<34}{'faces':>7}{'photos with a face':>20}{'s/photo':>10}{'photos/s':>10}")
    for key, label in (("mtcnn", "MTCNN (facenet-pytorch defaults)"), ("ssd", f"SSD (score >= {report['min_score']:g})")):
        rate = n_photos / seconds[key] if seconds[key] else float("nan")
        print(f"{label:<34}{found[key]:>7}{report['photos_with_face'][key]:>20}{seconds[key] / n_photos:>10.3f}{rate:>10.2f}")
    print(f"SSD is {seconds['mtcnn'] / seconds['ssd']:.2f}x the speed of MTCNN (photos/s ratio)")
    if report["embedders"]:
        _print_pipelines(report, n_photos)
    compared = report["comparison"]
    print(f"same face in both (IoU >= {report['match_iou']:g}): {compared['matched']}; "
          f"found by MTCNN only: {len(compared['ssd_missed'])}; by SSD only: {len(compared['mtcnn_missed'])}")
    for key, title in (("ssd_missed", "SSD missed (MTCNN found)"), ("mtcnn_missed", "MTCNN missed (SSD found)")):
        for line in compared[key]:
            print(f"  {title}: {line}")
    g = compared["geometry_median"]
    print(f"MTCNN box / SSD box over {compared['geometry_faces']} matched faces (medians): width x{g['width_ratio']:.3f}, "
          f"height x{g['height_ratio']:.3f}, centre shift ({g['shift_x']:+.3f}, {g['shift_y']:+.3f}) of the SSD box's longer side")


def _print_pipelines(report: dict, n_photos: int) -> None:
    """Whole pipelines (detect + crop + embed every face found), photos per second and the ratio."""
    seconds, names = report["timing"]["seconds"], report["embedders"]
    print(f"{'pipeline: detect + crop + embed':<72}{'embedded':>9}{'detect s':>10}{'embed s':>9}{'s/photo':>9}{'photos/s':>10}")
    totals = {}
    for key in ("mtcnn", "ssd"):
        totals[key] = seconds[key] + seconds[f"{key}_embed"]
        label = f"MTCNN + {names[key]}" if key == "mtcnn" else f"SSD ({names['detector']}) + {names[key]}"
        print(f"{label:<72}{report['faces_found'][key]:>9}{seconds[key]:>10.1f}{seconds[f'{key}_embed']:>9.1f}"
              f"{totals[key] / n_photos:>9.3f}{n_photos / totals[key]:>10.2f}")
    print(f"the SSD + student pipeline is {totals['mtcnn'] / totals['ssd']:.2f}x the photos/s of MTCNN + the teacher")


def _print_verification(report: dict) -> None:
    print(f"\n{report['pairs_file']} ({report['verification']['mtcnn']['pairs']} pairs), "
          f"crops {report['image_size']}x{report['image_size']}, margin {report['margin']}:")
    print(f"{'crops, embedder':<36}{'accuracy':>10}{'+-':>8}{'AUC':>9}{'EER':>9}{'no-face fallbacks':>20}")
    labels = {"mtcnn": "MTCNN", "ssd_mtcnn": "SSD, mtcnn geometry", "ssd_square": "SSD, square"}
    for crops, name in VERIFIED:
        key = crops if name == "teacher" else f"{crops}+{name}"
        if key not in report["verification"]:
            continue
        m = report["verification"][key]
        print(f"{labels[crops] + ', ' + name:<36}{m['accuracy']:>10.4f}{m['accuracy_std']:>8.4f}{m['auc']:>9.4f}"
              f"{m['eer']:>9.4f}{report['fallbacks'][crops]:>20}")


def _small_pipeline(args: argparse.Namespace, device) -> tuple[BoxFaceAligner, dict[str, nn.Module], dict[str, str]]:
    """The SSD (PyTorch or ONNX Runtime), the student embedder if any, and how each runs."""
    from lab.face_pipeline import OrtEmbedder, ort_box_detector
    from mnapps.data.box_crops import BoxFaceAligner
    from mnapps.tasks.detection import box_detector, load_detector
    from mnapps.tasks.face import load_face_embedder

    model, _ = load_detector(args.detector_weights, device=device or "cpu")
    if args.detector_onnx is not None:
        detect, ssd_name = ort_box_detector(args.detector_onnx, threads=args.threads), f"ONNX Runtime {args.detector_onnx.name}"
    else:
        detect, ssd_name = box_detector(model, device=device or "cpu"), "PyTorch"
    ssd = BoxFaceAligner(detect, margin=args.margin, min_score=args.min_score)
    names = {"mtcnn": "CASIA teacher (InceptionResnetV1, PyTorch)", "detector": ssd_name}
    if args.embedder is None:
        return ssd, {}, names
    student = load_face_embedder(args.embedder, device=device or "cpu")[0].eval()
    if args.embedder_onnx is not None:
        student, how = OrtEmbedder(args.embedder_onnx, threads=args.threads), f"ONNX Runtime {args.embedder_onnx.name}"
    else:
        how = "PyTorch"
    names["ssd"] = f"student ({args.embedder.name}, {how})"
    return ssd, {"student": student}, names


def _measure(args: argparse.Namespace, device) -> dict:
    """Detect with both detectors, time the pipelines, cut the pair crops and score them."""
    import torch

    from lab.face_pipeline import compare_boxes, detect_all, write_pair_crops
    from mnapps.tasks.face.data.align import FaceAligner
    from mnapps.tasks.face.distill.teacher import build_teacher
    from mnapps.tasks.face.evaluation import read_pairs, resolve_pairs

    torch.set_num_threads(args.threads)
    # Every input file is read before the long detection pass, so a bad one fails in seconds.
    teacher = build_teacher(weights=args.teacher_weights, device=device or "cpu")
    ssd, embedders, names = _small_pipeline(args, device)
    mtcnn = FaceAligner(margin=args.margin, device=device or "cpu")
    photos = _photos(args)
    if not photos:
        raise ValueError(f"no photos under {', '.join(map(str, args.photos))}")
    pair_files = {Path(os.path.abspath(p)) for pair in resolve_pairs(read_pairs(args.pairs), args.pair_images) for p in pair}
    print(f"detecting faces on {len(photos)} photos with MTCNN and the SSD ...", flush=True)
    timed = {"mtcnn": teacher if "student" in embedders else None, "ssd": embedders.get("student")}
    results, timing = detect_all(photos, mtcnn, ssd, timed, log=lambda line: print(line, flush=True))
    report = {"embedders": names if "student" in embedders else {},
        "photos": len(results), "min_score": args.min_score, "match_iou": args.match_iou, "margin": args.margin,
        "image_size": ssd.image_size, "threads": args.threads, "pairs_file": str(args.pairs), "timing": timing,
        "faces_found": {"mtcnn": int(sum(len(r.mtcnn_boxes) for r in results)),
                        "ssd": int(sum(len(r.ssd_boxes) for r in results))},
        "photos_with_face": {"mtcnn": sum(len(r.mtcnn_boxes) > 0 for r in results),
                             "ssd": sum(len(r.ssd_boxes) > 0 for r in results)},
        "comparison": compare_boxes(results, args.match_iou, args.data),
    }
    _print_detection(report, len(results))
    report["fallbacks"] = write_pair_crops(results, pair_files, args.pair_images, args.out / "crops")
    report["verification"] = _verify(args, args.out / "crops", device, {"teacher": teacher, **embedders})
    _print_verification(report)
    return report


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    from mnapps.engine.distributed import resolve_device
    from mnapps.tasks.face.distill.teacher import TeacherWeightsError

    try:
        device = resolve_device(args.device)
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} is an existing file; give a folder")
        check_output_path(args.out, [*args.photos, args.pair_images], what="--out folder")
        for path, option in ((args.detector_weights, "--detector-weights"), (args.pairs, "--pairs"),
                             (args.teacher_weights, "--teacher-weights"), (args.embedder, "--embedder"),
                             (args.detector_onnx, "--detector-onnx"), (args.embedder_onnx, "--embedder-onnx")):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{option} {path} does not exist")
        report = _measure(args, device)
    except (ValueError, FileNotFoundError, TeacherWeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = args.out / "face_pipeline.json"
    atomic_write(path, lambda handle: handle.write(json.dumps(report, indent=2, default=str).encode()))
    print(f"wrote {path}")
    return 0
