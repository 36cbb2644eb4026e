#!/usr/bin/env python
"""Distil a FaceNet teacher into a MobileNetV1 face embedder (paper Sec. 4.7, squared-L2 loss).

With no arguments it runs the offline demo: a seeded random InceptionResnetV1 teacher (its
BatchNorm statistics re-estimated on the crops) distilled on the embedded generated faces,
reporting the mean student-teacher cosine on held-out identities. For real use pass aligned
face folders (``--data``, see ``tools/align_faces.py``) and a teacher: ``--teacher-weights
PATH`` (a local InceptionResnetV1 state dict) or ``--teacher vggface2|casia-webface``
(facenet-pytorch downloads it on a connected machine). Checkpoints (``last.pt``, ``best.pt``),
``config.yaml`` and ``distill_summary.json`` go to ``--output-dir``; ``--resume`` continues an
interrupted run; ``torchrun --nproc_per_node=N tools/distill_face.py ...`` trains with DDP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnapps.config import ConfigError  # noqa: E402
from mnapps.distill.teacher import PRETRAINED_TEACHERS, TeacherWeightsError  # noqa: E402
from mnapps.distill.train import distill_face, load_distill_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "face_mnv1_a050_r160_synthetic.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=(
            "examples:\n"
            "  python tools/distill_face.py                       # offline demo, random teacher\n"
            "  python tools/distill_face.py --config configs/face_mnv1_a100_r160.yaml --data aligned/vggface2 \\\n"
            "      --val-data aligned/val --teacher vggface2 --output-dir runs/face_vggface2\n"
            "  python tools/distill_face.py --set train.epochs=5 --set loss.cosine_weight=1.0"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None,
                        help=f"YAML experiment (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=0.001 (repeatable)")
    parser.add_argument("--data", nargs="+", default=None, metavar="DIR", help="folders of aligned face crops")
    parser.add_argument("--val-data", default=None, metavar="DIR", help="folder of held-out crops")
    parser.add_argument("--teacher", choices=sorted(PRETRAINED_TEACHERS) + ["random"], default=None,
                        help="teacher weights to use (vggface2/casia-webface download on a connected machine)")
    parser.add_argument("--teacher-weights", default=None, metavar="PATH",
                        help="local InceptionResnetV1 state dict, e.g. ../shared/data/facenet_casia/"
                             "20180408-102900-casia-webface-features.pt")
    parser.add_argument("--weights-backbone", default=None, metavar="CKPT",
                        help="mnapps checkpoint whose MobileNetV1 trunk initialises the student")
    parser.add_argument("--epochs", type=int, default=None, help="shortcut for --set train.epochs=N")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/face_distill"))
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    if args.data:
        overrides.append(f"data.roots={list(args.data)!r}")
    if args.val_data:
        overrides.append(f"data.val_root={args.val_data!r}")
    if args.teacher:  # a named teacher replaces any weights file the config names
        overrides += [f"teacher.name={args.teacher}", "teacher.weights=None"]
    if args.teacher_weights:
        overrides.append(f"teacher.weights={args.teacher_weights!r}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    config_path = args.config if args.config is not None else DEFAULT_CONFIG
    try:
        cfg = load_distill_config(config_path, overrides)
        summary = distill_face(cfg, output_dir=args.output_dir, resume=args.resume or None, device=args.device,
                               weights_backbone=args.weights_backbone)
    except (ConfigError, FileNotFoundError, ValueError, TeacherWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"held-out mean student-teacher cosine: {summary['final_cosine']:.4f} (best {summary['best_cosine']:.4f}; "
        f"untrained student {summary.get('start_cosine', float('nan')):.4f}, best constant prediction "
        f"{summary.get('constant_baseline_cosine', float('nan')):.4f}) over {summary['val_images']} crops; "
        f"checkpoint {summary['best_checkpoint']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
