"""Train a MobileNetV1 detector (SSD, SSDLite, ...) on COCO-format data and print COCO metrics.

With no arguments it trains SSD on the embedded shapes dataset (generated and cached on first
use) with the head's default config and prints COCOeval's summary of the validation split.
Every epoch it writes OUTPUT_DIR/last.pt (and best.pt at the best validation AP); at the end
OUTPUT_DIR/metrics.json and the resolved OUTPUT_DIR/config.yaml. An OUTPUT_DIR that already holds
checkpoints is refused unless --resume (continue it) or --overwrite (start over) is given.

--weights CKPT fine-tunes a whole detector (a train_det checkpoint, or a TF OD API SSD made by
tools/import_weights.py --kind ssd): its model settings replace the config's model section
(--set model.* still applies), every tensor that fits is loaded, and when the data has another
number of classes the class predictors are re-initialised (one printed line names their shapes).
Works under torchrun:
  torchrun --nproc_per_node 2 tools/train_det.py --config configs/ssd_mnv1_a100_r300_coco.yaml ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mnapps.choices import DEFAULT_HEAD, HEAD_NAMES
from mnapps.config import CONFIG_DIR, ConfigError, config_arg, load_config
from mnapps.weights import weights_arg

if TYPE_CHECKING:  # annotations only: run() imports torch and the tasks after the arguments are parsed
    from mnapps.tasks.detection import DetConfig

EXAMPLES = """examples:
  python tools/train_det.py --head ssd                 # embedded shapes dataset, a few minutes on a CPU
  python tools/train_det.py --config configs/ssd_mnv1_a100_r300_coco.yaml \\
      --train-ann coco/annotations/instances_train2017.json --train-images coco/train2017 \\
      --val-ann coco/annotations/instances_val2017.json --val-images coco/val2017 \\
      --weights-backbone mobilenet_v1_1.0_224_imagenet --device cuda
  python tools/train_det.py --head ssd --resume          # continue runs/<config>/last.pt
  python tools/train_det.py --head ssd --overwrite       # start runs/<config> over
  python tools/train_det.py --weights faceapi_ssd_mobilenetv1 --train-ann faces/train.json \
      --train-images faces/train --val-ann faces/val.json --val-images faces/val --output-dir runs/faces_ft
  python tools/train_det.py --head ssd --set train.lr=0.05 --set model.backbone.width_mult=0.25
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--head", help=f"detector head, one of {list(HEAD_NAMES)} (default: the config's, else {DEFAULT_HEAD.name})"
    )
    parser.add_argument("--config", type=config_arg,
                        help="YAML config: a file, or a shipped config's name such as ssd_mnv1_a100_r300_coco "
                        "(default: the head's config for the embedded dataset)")
    parser.add_argument("--train-ann", metavar="F", help="COCO-format training annotation JSON")
    parser.add_argument("--train-images", metavar="D", help="folder of the training images")
    parser.add_argument("--val-ann", metavar="F", help="COCO-format validation annotation JSON")
    parser.add_argument("--val-images", metavar="D", help="folder of the validation images")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--batch-size", type=int, help="override train.batch_size (whole batch over all processes)")
    parser.add_argument("--output-dir", type=Path, help="run folder (default runs/<config name>)")
    parser.add_argument(
        "--resume", nargs="?", const=True, metavar="PATH", help="continue from a checkpoint (no value: OUTPUT_DIR/last.pt)"
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an OUTPUT_DIR that already holds checkpoints (replaces them)")
    parser.add_argument("--weights-backbone", "--backbone-weights", type=weights_arg, metavar="PATH",
                        help="mnapps checkpoint whose MobileNetV1 trunk initialises the model (e.g. ImageNet); "
                        "default model.backbone.weights")
    parser.add_argument("--weights", type=weights_arg, metavar="PATH",
                        help="mnapps detection checkpoint to fine-tune (its model settings are used; class "
                        "predictors are re-initialised when the class count differs)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. train.lr=0.01 or model.ssd.size=256 (repeatable)")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace, weights: Checkpoint | None = None) -> tuple[DetConfig, Path | None]:
    """Load the config the arguments ask for; raises ValueError/ConfigError with a clear message.

    ``weights`` is the ``--weights`` checkpoint, already read (its model section is the config's).
    """
    from mnapps.heads import head_spec
    from mnapps.tasks.detection import DetConfig, fine_tune_config

    spec = head_spec(args.head or DEFAULT_HEAD.name)
    config_path = args.config if args.config is not None else CONFIG_DIR / spec.default_config
    overrides = []
    if args.head is not None:
        overrides.append(f"model.head={args.head}")
    for value, key in (
        (args.train_ann, "data.train_ann"),
        (args.train_images, "data.train_images"),
        (args.val_ann, "data.val_ann"),
        (args.val_images, "data.val_images"),
        (args.epochs, "train.epochs"),
        (args.batch_size, "train.batch_size"),
    ):
        if value is not None:
            overrides.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    overrides += args.set
    if weights is not None:
        return fine_tune_config(weights, config_path, overrides, config_is_default=args.config is None), config_path
    return load_config(config_path, DetConfig, overrides), config_path


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them.

    ``argv``, the command line as given, is repeated in the resume hint printed after Ctrl-C.
    """
    from mnapps.engine.distributed import resolve_device
    from mnapps.engine.loop import NonFiniteLossError
    from mnapps.engine.run_lock import claim_run_folder, report_interrupt
    from mnapps.checkpoint import read_checkpoint
    from mnapps.tasks.detection import train_detector

    output_dir = args.output_dir
    try:
        resolve_device(args.device)
        weights = read_checkpoint(args.weights) if args.weights is not None else None  # read once: config and weights
        cfg, config_path = resolve_config(args, weights)
        output_dir = args.output_dir or Path("runs") / config_path.stem
        with claim_run_folder(output_dir, resume=args.resume, overwrite=args.overwrite) as claim:
            train_detector(
                cfg,
                output_dir=output_dir,
                resume=args.resume,
                weights_backbone=args.weights_backbone,
                weights=weights,
                device=args.device,
                overwrite=claim.overwrite,
            )
    except (ValueError, ConfigError, FileNotFoundError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return report_interrupt(output_dir, "tools/train_det.py", argv)
    return 0
