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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mnapps.data.image_io import ImageReadError, list_images, load_rgb
from mnapps.files import atomic_write, check_output_path
from mnapps.weights import weights_arg

if TYPE_CHECKING:  # annotations only: torch itself is imported after the arguments are parsed
    from torch import nn

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


@dataclass
class PhotoResult:
    """Both detectors on one photo: boxes, scores, and the selected face's crops per pipeline."""

    path: Path
    mtcnn_boxes: np.ndarray
    mtcnn_scores: np.ndarray
    ssd_boxes: np.ndarray
    ssd_scores: np.ndarray
    crops: dict[str, np.ndarray] = field(default_factory=dict)


def _photos(args: argparse.Namespace) -> list[Path]:
    """Every photo to detect on, the pair list's included, each once."""
    seen, photos = set(), []
    for path in list_images(list(args.photos) + [args.pair_images]):
        if path.resolve() not in seen:
            seen.add(path.resolve())
            photos.append(path)
    return photos


def _timed(clock: dict[str, float], key: str, fn):
    started = time.perf_counter()
    value = fn()
    clock[key] += time.perf_counter() - started
    return value


def _detect_all(photos: list[Path], mtcnn: FaceAligner, ssd: BoxFaceAligner,
                embedders: dict[str, nn.Module | None]) -> tuple[list[PhotoResult], dict]:
    """Run both pipelines on every readable photo, interleaved; times cover detect + crop, and
    embedding every face found by a pipeline that has an embedder (``embedders[name]``)."""
    results, unreadable = [], []
    clock = {"mtcnn": 0.0, "ssd": 0.0, "mtcnn_embed": 0.0, "ssd_embed": 0.0}
    warm = True  # the first photo runs once untimed: one-off costs (allocations, ORT set-up) are not per photo
    for path in photos:
        try:
            image = load_rgb(path)
        except ImageReadError as exc:
            unreadable.append(str(exc))
            continue
        for _ in range(2 if warm else 1):
            run_clock = clock if not warm else dict.fromkeys(clock, 0.0)
            found_m = _timed(run_clock, "mtcnn", lambda: mtcnn.detect(image, keep_all=True))
            if embedders["mtcnn"] is not None:
                _timed(run_clock, "mtcnn_embed", lambda: embed_crops(embedders["mtcnn"], [f.crop for f in found_m]))
            found_s = _timed(run_clock, "ssd", lambda: ssd.detect(image, keep_all=True))
            if embedders["ssd"] is not None:
                _timed(run_clock, "ssd_embed", lambda: embed_crops(embedders["ssd"], [f.crop for f in found_s]))
            warm = False
        result = PhotoResult(
            path,
            np.array([f.box for f in found_m]).reshape(-1, 4), np.array([f.probability for f in found_m]),
            np.array([f.box for f in found_s]).reshape(-1, 4), np.array([f.probability for f in found_s]),
        )
        if found_m:
            result.crops["mtcnn"] = found_m[0].crop
        if found_s:
            result.crops["ssd_mtcnn"] = found_s[0].crop
            result.crops["ssd_square"] = cut_crop(
                image, crop_region(found_s[0].box, CROP_GEOMETRIES["square"]), ssd.image_size, ssd.margin
            )
        results.append(result)
        print(f"  {path.name}: MTCNN {len(found_m)}, SSD {len(found_s)}", flush=True)
    return results, {"seconds": clock, "unreadable": unreadable}


def _compare(results: list[PhotoResult], match_iou: float, root: Path) -> dict:
    """Faces found by each detector, matched per photo; misses; MTCNN-vs-SSD box geometry."""
    misses: dict[str, list[str]] = {"ssd_missed": [], "mtcnn_missed": []}
    geometry, matched = [], 0
    for r in results:
        m, s = torch.as_tensor(r.mtcnn_boxes, dtype=torch.float64), torch.as_tensor(r.ssd_boxes, dtype=torch.float64)
        iou = box_iou(m, s) if len(m) and len(s) else torch.zeros(len(m), len(s), dtype=torch.float64)
        pairs = []
        while iou.numel() and iou.max() >= match_iou:  # greedy, best overlap first
            i, j = divmod(int(iou.argmax()), iou.shape[1])
            pairs.append((i, j))
            iou[i, :], iou[:, j] = -1, -1
        matched += len(pairs)
        name = _relative(r.path, root)
        for i in sorted(set(range(len(m))) - {p[0] for p in pairs}):
            misses["ssd_missed"].append(f"{name} box {_box_text(r.mtcnn_boxes[i])} MTCNN p={r.mtcnn_scores[i]:.3f}")
        for j in sorted(set(range(len(s))) - {p[1] for p in pairs}):
            misses["mtcnn_missed"].append(f"{name} box {_box_text(r.ssd_boxes[j])} SSD score={r.ssd_scores[j]:.3f}")
        for i, j in pairs:
            (mx1, my1, mx2, my2), (sx1, sy1, sx2, sy2) = r.mtcnn_boxes[i], r.ssd_boxes[j]
            longer = max(sx2 - sx1, sy2 - sy1)
            geometry.append([(mx2 - mx1) / (sx2 - sx1), (my2 - my1) / (sy2 - sy1),
                             ((mx1 + mx2) - (sx1 + sx2)) / 2 / longer, ((my1 + my2) - (sy1 + sy2)) / 2 / longer])
    medians = np.median(np.array(geometry), axis=0) if geometry else np.full(4, np.nan)
    keys = ("width_ratio", "height_ratio", "shift_x", "shift_y")
    return {"matched": matched, **misses, "geometry_faces": len(geometry),
            "geometry_median": {k: float(v) for k, v in zip(keys, medians)}}


def _box_text(box: np.ndarray) -> str:
    return str(np.round(box).astype(int).tolist())


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _write_crops(results: list[PhotoResult], pair_files: set[Path], pair_root: Path, out: Path) -> dict[str, int]:
    """Crops of the pair photos per pipeline under ``out/<pipeline>/``; the fallback count per pipeline."""
    # Absolute but not symlink-resolved, as align_folder names crops.
    root = Path(os.path.abspath(pair_root))
    chosen = [r for r in results if Path(os.path.abspath(r.path)) in pair_files]
    relative = {id(r): Path(os.path.abspath(r.path)).relative_to(root).as_posix() for r in chosen}
    names = crop_names(list(relative.values()))
    fallbacks = {}
    for pipeline in ("mtcnn", "ssd_mtcnn", "ssd_square"):
        fallbacks[pipeline] = 0
        for r in chosen:
            crop = r.crops.get(pipeline)
            if crop is None:  # no face: the whole photo, as the teacher would otherwise see nothing
                fallbacks[pipeline] += 1
                crop = np.asarray(Image.fromarray(load_rgb(r.path)).resize((160, 160), Image.BILINEAR))
            target = out / pipeline / names[relative[id(r)]]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).save(target)
    return fallbacks


# (crops, embedder) scored on the pairs; the student's rows only with --embedder.
VERIFIED = (("mtcnn", "teacher"), ("ssd_mtcnn", "teacher"), ("ssd_square", "teacher"),
            ("ssd_mtcnn", "student"), ("mtcnn", "student"))


def _verify(args: argparse.Namespace, crops_root: Path, device, embedders: dict[str, nn.Module]) -> dict[str, dict]:
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


def _run(args: argparse.Namespace, device) -> dict:
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
    results, timing = _detect_all(photos, mtcnn, ssd, timed)
    report = {"embedders": names if "student" in embedders else {},
        "photos": len(results), "min_score": args.min_score, "match_iou": args.match_iou, "margin": args.margin,
        "image_size": ssd.image_size, "threads": args.threads, "pairs_file": str(args.pairs), "timing": timing,
        "faces_found": {"mtcnn": int(sum(len(r.mtcnn_boxes) for r in results)),
                        "ssd": int(sum(len(r.ssd_boxes) for r in results))},
        "photos_with_face": {"mtcnn": sum(len(r.mtcnn_boxes) > 0 for r in results),
                             "ssd": sum(len(r.ssd_boxes) > 0 for r in results)},
        "comparison": _compare(results, args.match_iou, args.data),
    }
    _print_detection(report, len(results))
    report["fallbacks"] = _write_crops(results, pair_files, args.pair_images, args.out / "crops")
    report["verification"] = _verify(args, args.out / "crops", device, {"teacher": teacher, **embedders})
    _print_verification(report)
    return report


def _import_heavy() -> None:
    """Import torch and the tasks, after the arguments are parsed: --help answers at once."""
    global torch, box_iou, FaceAligner, crop_names, CROP_GEOMETRIES, BoxFaceAligner, crop_region, cut_crop, TeacherWeightsError, build_teacher, resolve_device, read_pairs, resolve_pairs, box_detector, load_detector, evaluate_face_verification
    global OrtEmbedder, embed_crops, ort_box_detector, load_face_embedder
    import torch
    from torchvision.ops import box_iou
    from mnapps.data.align import FaceAligner, crop_names
    from mnapps.data.box_crops import CROP_GEOMETRIES, BoxFaceAligner, crop_region, cut_crop
    from mnapps.distill.teacher import TeacherWeightsError, build_teacher
    from mnapps.engine.distributed import resolve_device
    from mnapps.eval.face import read_pairs, resolve_pairs
    from mnapps.tasks.detection import box_detector, load_detector
    from mnapps.tasks.face import evaluate_face_verification
    from mnapps.bench.face_pipeline import OrtEmbedder, embed_crops, ort_box_detector
    from mnapps.tasks.face import load_face_embedder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _import_heavy()
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
        report = _run(args, device)
    except (ValueError, FileNotFoundError, TeacherWeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = args.out / "face_pipeline.json"
    atomic_write(path, lambda handle: handle.write(json.dumps(report, indent=2, default=str).encode()))
    print(f"wrote {path}")
    return 0
