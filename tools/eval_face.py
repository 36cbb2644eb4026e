#!/usr/bin/env python
"""Face verification on an LFW-style benchmark: 10-fold accuracy, ROC AUC, EER, TAR@FAR.

Pairs come from LFW's ``pairs.txt`` (``name n1 n2`` / ``name1 n1 name2 n2``) or a CSV such as
deepface's ``master.csv`` (``file_x,file_y,Decision``); ``--images`` is the folder of face
crops they refer to (``tools/align_faces.py`` makes them; ``--align`` does it here, into
``OUT/aligned``). Evaluates a distilled student (``--checkpoint``), the teacher
(``--teacher-weights`` / ``--teacher``), or both side by side with ``--compare-teacher``
(plus the mean student-teacher cosine over the images). Writes ``OUT/metrics.json`` and
``OUT/roc.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mnapps.data.align import FaceAligner, align_folder  # noqa: E402
from mnapps.distill.teacher import PRETRAINED_TEACHERS, TeacherWeightsError, build_teacher  # noqa: E402
from mnapps.eval.face import (  # noqa: E402
    format_verification_table,
    embed_files,
    pair_distances,
    plot_roc,
    read_pairs,
    resolve_pairs,
    roc_curve,
    verification_metrics,
)
from mnapps.heads.face_embedding import load_face_embedder  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=(
            "example: python tools/eval_face.py --pairs ../shared/data/faces/deepface/master.csv "
            "--images ../shared/data/faces/deepface --align --checkpoint runs/face/best.pt "
            "--teacher-weights ../shared/data/facenet_casia/20180408-102900-casia-webface-features.pt --compare-teacher"
        ),
    )
    parser.add_argument("--pairs", type=Path, required=True, help="pairs.txt (LFW format) or a CSV pair list")
    parser.add_argument("--images", type=Path, required=True, help="folder of (aligned) face images the pairs name")
    parser.add_argument("--align", action="store_true",
                        help="align the photos the pairs use with MTCNN first (into OUT/aligned)")
    parser.add_argument("--resize-shorter", type=int, default=None, metavar="N",
                        help="with --align: resize photos to shorter side N before detection")
    parser.add_argument("--checkpoint", type=Path, help="student checkpoint (best.pt) from tools/distill_face.py")
    parser.add_argument("--teacher-weights", type=Path, help="local InceptionResnetV1 state dict of the teacher")
    parser.add_argument("--teacher", choices=sorted(PRETRAINED_TEACHERS), help="facenet-pytorch's pretrained teacher")
    parser.add_argument("--compare-teacher", action="store_true", help="evaluate the teacher beside the student")
    parser.add_argument("--flip-tta", action="store_true", help="embed image + mirrored image (normalised sum)")
    parser.add_argument("--threshold", type=float, default=None, help="also report accuracy at this L2 distance")
    parser.add_argument("--folds", type=int, default=None, help="number of folds (default: the file's, else 10)")
    parser.add_argument("--far", type=float, nargs="+", default=[1e-3, 1e-4], help="FAR targets for TAR@FAR")
    parser.add_argument("--image-size", type=int, default=160, help="side the crops are resized to (default 160)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("runs/eval_face"), help="output folder (default runs/eval_face)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    has_teacher = args.teacher_weights is not None or args.teacher is not None
    if args.checkpoint is None and not has_teacher:
        print("error: give a student --checkpoint, a teacher (--teacher-weights / --teacher), or both", file=sys.stderr)
        return 2
    if args.compare_teacher and not (args.checkpoint and has_teacher):
        print("error: --compare-teacher needs --checkpoint and --teacher-weights (or --teacher)", file=sys.stderr)
        return 2
    try:
        pairs = read_pairs(args.pairs, n_folds=args.folds)
        images = args.images
        if args.align:
            # Only the photos the pairs use are aligned (into OUT/aligned, resumable).
            used = sorted({p for pair in resolve_pairs(pairs, args.images) for p in pair})
            images = args.out / "aligned"
            print(align_folder(args.images, images, aligner=FaceAligner(resize_shorter=args.resize_shorter), files=used))
        resolved = resolve_pairs(pairs, images)
        files = sorted({p for pair in resolved for p in pair})
        position = {path: i for i, path in enumerate(files)}
        index_pairs = [(position[a], position[b]) for a, b in resolved]
        models = {}
        if args.checkpoint is not None:
            models["student"], _ = load_face_embedder(args.checkpoint, device)
        if has_teacher and (args.compare_teacher or args.checkpoint is None):
            models["teacher"] = build_teacher(args.teacher, weights=args.teacher_weights, device=device)
    except (FileNotFoundError, ValueError, TeacherWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    results, curves, embeddings = {}, {}, {}
    for label, model in models.items():
        embeddings[label] = embed_files(model, files, image_size=args.image_size, batch_size=args.batch_size,
                                        device=device, flip_tta=args.flip_tta, desc=f"embedding ({label})")
        distances = pair_distances(embeddings[label], index_pairs)
        results[label] = verification_metrics(distances, pairs.issame, n_folds=pairs.n_folds, fars=args.far,
                                              threshold=args.threshold)
        far, tar, _ = roc_curve(distances, pairs.issame)
        curves[label] = (far, tar)
    agreement = None
    if len(embeddings) == 2:
        agreement = float((embeddings["student"] * embeddings["teacher"]).sum(1).mean())

    print(f"{pairs.path} ({len(files)} images{', flip TTA' if args.flip_tta else ''})")
    print(format_verification_table(results, agreement=agreement))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"pairs_file": str(args.pairs), "images": str(images), "unique_images": len(files),
               "flip_tta": args.flip_tta, "models": results}
    if agreement is not None:
        summary["student_teacher_cosine"] = agreement
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2))
    roc_path = plot_roc(curves, args.out / "roc.png", title=f"ROC on {args.pairs.name}")
    print(f"wrote {args.out / 'metrics.json'} and {roc_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
