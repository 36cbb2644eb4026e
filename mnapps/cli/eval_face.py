"""Face verification on an LFW-style benchmark: 10-fold accuracy, ROC AUC, EER, TAR@FAR.

Pairs come from LFW's ``pairs.txt`` (``name n1 n2`` / ``name1 n1 name2 n2``) or a CSV such as
deepface's ``master.csv`` (``file_x,file_y,Decision``); ``--images`` is the folder of face
crops they refer to (``tools/align_faces.py`` makes them; ``--align`` does it here, into
``OUT/aligned``). Scores a distilled student (``--checkpoint``), the teacher
(``--teacher-weights`` / ``--teacher``; beside the student with ``--compare-teacher``) and the
no-distillation baseline (``--trunk CKPT``: the pooled features of a checkpoint's MobileNetV1
trunk, e.g. the ImageNet import a student starts from), side by side. Beside the 10-fold
accuracy it prints the accuracy of always giving the more common answer, and for every model
the spread of its embeddings (a collapsed model is reported loudly). With ``--train-data`` (the
student's training crops: folders, or the ``train_crops.txt`` its run wrote) it also counts the
pairs that involve a person seen in training (by name where the files say it, else by the
teacher's distance to the nearest training crop, below ``--same-threshold``) and scores the
unseen pairs and the seen pairs separately: the unseen figures are the ones that say whether a
student generalises. Writes ``OUT/metrics.json`` and ``OUT/roc.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from mnapps.choices import PRETRAINED_TEACHER_NAMES, SAME_PERSON_DISTANCE
from mnapps.files import atomic_write, check_output_path
from mnapps.weights import weights_arg

if TYPE_CHECKING:  # annotations only: run() imports torch and the tasks after the arguments are parsed
    import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=(
            "example: python tools/eval_face.py --pairs path/to/faces/deepface/master.csv "
            "--images path/to/faces/deepface --align --checkpoint runs/face/best.pt "
            "--teacher-weights path/to/20180408-102900-casia-webface-features.pt --compare-teacher "
            "--trunk mobilenet_v1_1.0_224_imagenet"
        ),
    )
    parser.add_argument("--pairs", type=Path, required=True, help="pairs.txt (LFW format) or a CSV pair list")
    parser.add_argument("--images", type=Path, required=True, help="folder of (aligned) face images the pairs name")
    parser.add_argument("--align", action="store_true",
                        help="align the photos the pairs use with MTCNN first (into OUT/aligned)")
    parser.add_argument("--resize-shorter", type=int, default=None, metavar="N",
                        help="with --align: resize photos to shorter side N before detection")
    parser.add_argument("--checkpoint", type=weights_arg, help="student checkpoint (best.pt) from tools/distill_face.py")
    parser.add_argument("--teacher-weights", type=weights_arg, help="local InceptionResnetV1 state dict of the teacher")
    parser.add_argument("--teacher", choices=list(PRETRAINED_TEACHER_NAMES), help="facenet-pytorch's pretrained teacher")
    parser.add_argument("--compare-teacher", action="store_true", help="evaluate the teacher beside the student")
    parser.add_argument("--trunk", type=weights_arg, metavar="CKPT",
                        help="also score the pooled features of this checkpoint's trunk (no distillation), "
                             "e.g. mobilenet_v1_1.0_224_imagenet")
    parser.add_argument("--train-data", type=Path, nargs="+", metavar="PATH",
                        help="the student's training crops (folders, or OUTPUT_DIR/train_crops.txt of its run): "
                             "score pairs of people unseen in training separately (needs the teacher)")
    parser.add_argument("--same-threshold", type=float, default=SAME_PERSON_DISTANCE,
                        help="teacher L2 distance below which an image shows a person of the training crops "
                             f"(default {SAME_PERSON_DISTANCE})")
    parser.add_argument("--flip-tta", action="store_true", help="embed image + mirrored image (normalised sum)")
    parser.add_argument("--threshold", type=float, default=None, help="also report accuracy at this L2 distance")
    parser.add_argument("--folds", type=int, default=None, help="number of folds (default: the file's, else 10)")
    parser.add_argument("--far", type=float, nargs="+", default=[1e-3, 1e-4], help="FAR targets for TAR@FAR")
    parser.add_argument("--image-size", type=int, default=160, help="side the crops are resized to (default 160)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("runs/eval_face"), help="output folder (default runs/eval_face)")
    return parser.parse_args(argv)


def _check_arguments(args: argparse.Namespace) -> None:
    """Raise ValueError for a combination that cannot work or an output that would clobber an input."""
    has_teacher = args.teacher_weights is not None or args.teacher is not None
    if args.checkpoint is None and not has_teacher and args.trunk is None:
        raise ValueError("give a student --checkpoint, a teacher (--teacher-weights / --teacher), a --trunk, or several")
    if args.compare_teacher and not (args.checkpoint and has_teacher):
        raise ValueError("--compare-teacher needs --checkpoint and --teacher-weights (or --teacher)")
    if args.train_data and not has_teacher:
        raise ValueError("--train-data needs the teacher (--teacher-weights or --teacher) to tell who is in each image")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is an existing file; give a folder for metrics.json and roc.png")
    inputs = [p for p in (args.pairs, args.checkpoint, args.teacher_weights, args.trunk) if p is not None]
    check_output_path(args.out, [args.images], what="--out folder")
    for name in ("metrics.json", "roc.png"):
        check_output_path(args.out / name, inputs, what=f"--out {name}")


def _models(args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    from mnapps.tasks.face import load_face_embedder, load_trunk_embedder
    from mnapps.tasks.face.distill.teacher import build_teacher

    models: dict[str, torch.nn.Module] = {}
    has_teacher = args.teacher_weights is not None or args.teacher is not None
    if args.checkpoint is not None:
        models["student"], _ = load_face_embedder(args.checkpoint, device)
    if has_teacher and (args.compare_teacher or args.checkpoint is None):
        models["teacher"] = build_teacher(args.teacher, weights=args.teacher_weights, device=device)
    if args.trunk is not None:
        models["trunk"] = load_trunk_embedder(args.trunk, device, input_size=args.image_size)
    return models


def _mark_seen(args: argparse.Namespace, pairs, result, device: torch.device):
    """Which pairs involve a person of the training crops (the teacher says who is who)."""
    from mnapps.tasks.face.distill.protocol import mark_seen
    from mnapps.tasks.face.distill.teacher import build_teacher

    teacher = build_teacher(args.teacher, weights=args.teacher_weights, device=device)
    return mark_seen(pairs, result.files, result.index_pairs, args.train_data, teacher,
                     image_embeddings=result.embeddings.get("teacher"), threshold=args.same_threshold,
                     image_size=args.image_size, batch_size=args.batch_size, device=device)


def _seen_unseen(args: argparse.Namespace, pairs, result, seen) -> dict:
    """Print the seen/unseen counts and a table per part; return them for metrics.json."""
    from mnapps.tasks.face.distill.protocol import score_subsets
    from mnapps.tasks.face.evaluation import format_verification_table

    print(seen)
    parts = score_subsets(result.distances, pairs.issame, seen, n_folds=pairs.n_folds, fars=args.far,
                          threshold=args.threshold)
    for part, results in parts.items():
        print(f"-- pairs of people {'NOT ' if part == 'unseen' else ''}seen in training ({part}):")
        print(format_verification_table(results))
    return {"seen_in_training": seen.summary(), "by_seen": parts}


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    import torch

    from mnapps.engine.distributed import resolve_device
    from mnapps.tasks.face import align_pair_images, evaluate_face_verification
    from mnapps.tasks.face.distill.teacher import TeacherWeightsError
    from mnapps.tasks.face.evaluation import collapse_warning, format_verification_table, plot_roc, read_pairs

    try:
        _check_arguments(args)
        device = resolve_device(args.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            pairs = read_pairs(args.pairs, n_folds=args.folds)
            images = args.images
            if args.align:
                images = args.out / "aligned"
                print(align_pair_images(pairs, args.images, images, resize_shorter=args.resize_shorter))
            models = _models(args, device)
            result = evaluate_face_verification(
                pairs, images, models, image_size=args.image_size, batch_size=args.batch_size, device=device,
                flip_tta=args.flip_tta, fars=args.far, threshold=args.threshold,
            )
            seen = _mark_seen(args, pairs, result, device) if args.train_data else None
        for warning in {str(w.message) for w in caught if issubclass(w.category, UserWarning)}:
            print(f"warning: {warning}", file=sys.stderr)
    except (FileNotFoundError, ValueError, TeacherWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    print(f"{pairs.path} ({len(result.files)} images{', flip TTA' if args.flip_tta else ''})")
    print(format_verification_table(result.results, agreement=result.agreement, spreads=result.spreads))
    subsets = _seen_unseen(args, pairs, result, seen) if seen is not None else None
    for label, spread in result.spreads.items():
        warning = collapse_warning(label, spread)
        if warning:
            print(warning, file=sys.stderr)
    summary = {**result.summary(), "flip_tta": args.flip_tta, **(subsets or {})}
    atomic_write(args.out / "metrics.json", lambda handle: handle.write(json.dumps(summary, indent=2).encode()))
    roc_path = plot_roc(result.curves, args.out / "roc.png", title=f"ROC on {args.pairs.name}")
    print(f"wrote {args.out / 'metrics.json'} and {roc_path}")
    return 0
