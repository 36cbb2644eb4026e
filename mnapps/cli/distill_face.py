"""Distil a FaceNet teacher into a MobileNetV1 face embedder (paper Sec. 4.7, squared-L2 loss).

With no arguments it runs the offline demo, a smoke run of the mechanics (no face-quality
target): a seeded random InceptionResnetV1 teacher (its embedding BatchNorm statistics
re-estimated on the crops) distilled on the embedded generated faces, reporting the mean
student-teacher cosine on held-out identities beside the best constant prediction's. For real
use pass aligned face folders (``--data``, see ``tools/align_faces.py``) and a teacher:
``--teacher-weights PATH`` (a local InceptionResnetV1 state dict) or ``--teacher
vggface2|casia-webface`` (facenet-pytorch downloads it on a connected machine); with few faces,
``configs/face_mnv1_a100_r160_fewshot_casia.yaml`` is the recipe. Checkpoints (``last.pt``,
``best.pt``), ``config.yaml`` and ``distill_summary.json`` go to ``--output-dir``; an output
folder that already holds checkpoints is refused unless ``--resume`` (continue) or
``--overwrite`` (start over) is given; ``torchrun --nproc_per_node=N tools/distill_face.py ...``
trains with DDP.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from mnapps.choices import PRETRAINED_TEACHER_NAMES
from mnapps.config import CONFIG_DIR, ConfigError, config_arg

DEFAULT_CONFIG = CONFIG_DIR / "face_mnv1_a050_r160_synthetic.yaml"

EXAMPLES = """examples:
  python tools/distill_face.py                       # offline smoke run: random teacher, generated faces
  python tools/distill_face.py --config configs/face_mnv1_a100_r160_fewshot_casia.yaml \\
      --teacher-weights facenet_casia_webface \\
      --weights-backbone mobilenet_v1_1.0_224_imagenet --output-dir runs/face_fewshot
  python tools/distill_face.py --config configs/face_mnv1_a100_r160.yaml --data aligned/vggface2 \\
      --val-data aligned/val --teacher vggface2 --output-dir runs/face_vggface2
  python tools/distill_face.py --set train.epochs=5 --set loss.relational_weight=1.0 --overwrite
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=config_arg, default=None,
                        help=f"YAML experiment, a file or a shipped config's name (default: {DEFAULT_CONFIG.stem})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=0.001 (repeatable)")
    parser.add_argument("--data", nargs="+", default=None, metavar="DIR", help="folders of aligned face crops")
    parser.add_argument("--val-data", default=None, metavar="DIR", help="folder of held-out crops")
    parser.add_argument("--teacher", choices=list(PRETRAINED_TEACHER_NAMES) + ["random"], default=None,
                        help="teacher weights to use (vggface2/casia-webface download on a connected machine)")
    parser.add_argument("--teacher-weights", default=None, metavar="PATH",
                        help="local InceptionResnetV1 state dict, e.g. "
                             "path/to/20180408-102900-casia-webface-features.pt")
    parser.add_argument("--weights-backbone", "--backbone-weights", default=None, metavar="CKPT",
                        help="mnapps checkpoint whose MobileNetV1 trunk initialises the student "
                             "(default: model.backbone.weights)")
    parser.add_argument("--epochs", type=int, default=None, help="shortcut for --set train.epochs=N")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/face_distill"))
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an OUTPUT_DIR that already holds checkpoints (replaces them)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in OUTPUT_DIR and --overwrite starts it over: give one of them")
    return args


def _overrides(args: argparse.Namespace) -> list[str]:
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
    return overrides


def _report(result: FaceResult) -> str:
    throughput, reference, spread = result.throughput, result.reference, result.final_spread
    smoke = ("\n(a random teacher: this run checks the mechanics and measures no face quality; compare the cosine "
             "with the best constant prediction's, not with any target)" if result.teacher.startswith("random")
             else "")
    targets = ("targets: cached teacher embeddings" if throughput.targets == "cached"
               else f"teacher in the step: {100 * throughput.teacher_share:.0f}% of it")
    start, constant, teacher_spread = ((reference.start_cosine, reference.constant_baseline_cosine,
                                        reference.teacher_val_spread_cosine) if reference else (math.nan,) * 3)
    return (
        f"held-out mean student-teacher cosine: {result.final_cosine:.4f} (best {result.best_cosine:.4f}; "
        f"untrained student {start:.4f}, best constant prediction "
        f"{constant:.4f}) over {result.val_images} crops; "
        f"pairwise-similarity agreement with the teacher {result.final_pair_agreement:.4f}; "
        f"embedding spread: mean pairwise cosine {spread.mean_pairwise_cosine:.4f} "
        f"(teacher {teacher_spread:.4f}), effective rank "
        f"{spread.effective_rank:.2f}\n"
        f"throughput: {throughput.images_per_s:.1f} images/s per training step "
        f"({targets}); checkpoint {result.fit.best_checkpoint}{smoke}"
    )


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them.

    ``argv``, the command line as given, is repeated in the resume hint printed after Ctrl-C.
    """
    from mnapps.engine.distributed import resolve_device
    from mnapps.engine.loop import NonFiniteLossError
    from mnapps.engine.run_lock import claim_run_folder, report_interrupt
    from mnapps.tasks.face import distill_face, load_distill_config
    from mnapps.tasks.face.distill.teacher import TeacherWeightsError

    config_path = args.config if args.config is not None else DEFAULT_CONFIG
    try:
        resolve_device(args.device)
        if args.output_dir.exists() and not args.output_dir.is_dir():
            raise ValueError(f"--output-dir {args.output_dir} is an existing file; give a folder for the run")
        cfg = load_distill_config(config_path, _overrides(args))
        with claim_run_folder(args.output_dir, resume=args.resume or None, overwrite=args.overwrite) as claim:
            result = distill_face(cfg, output_dir=args.output_dir, resume=args.resume or None, device=args.device,
                                  weights_backbone=args.weights_backbone, overwrite=claim.overwrite)
    except (ConfigError, FileNotFoundError, ValueError, TeacherWeightsError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return report_interrupt(args.output_dir, "tools/distill_face.py", argv)
    print(_report(result))
    return 0
