"""Train a MobileNetV1 classifier on an ImageFolder (train/ and val/ of class folders).

With no arguments it trains on the embedded shapes dataset (generated and cached on first
use) with configs/cls_mnv1_a050_r64_shapes.yaml and prints the validation top-1/top-5.
The checkpoints (output_dir/last.pt, best.pt) load into any head's backbone with
mnapps.backbones.trunk.load_backbone_weights. An output folder that already holds checkpoints
is refused unless --resume (continue it) or --overwrite (start over) is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnapps.config import CONFIG_DIR, ConfigError, config_arg, load_config

DEFAULT_CONFIG = CONFIG_DIR / "cls_mnv1_a050_r64_shapes.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python tools/train_cls.py                      # embedded shapes dataset, ~2 min on a CPU\n"
            "  python tools/train_cls.py --config configs/cls_mnv1_a100_r224_imagenet.yaml \\\n"
            "      --train-dir /data/imagenet/train --val-dir /data/imagenet/val --device cuda\n"
            "  python tools/train_cls.py --set train.lr=0.02 --set model.backbone.width_mult=0.25"
        ),
    )
    parser.add_argument("--config", type=config_arg, default=DEFAULT_CONFIG,
                        help=f"YAML config: a file, or a shipped config's name (default {DEFAULT_CONFIG.stem})")
    parser.add_argument("--train-dir", help="training ImageFolder (class folders); default: the config's, else the embedded shapes set")
    parser.add_argument("--val-dir", help="validation ImageFolder with the same class folders")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--batch-size", type=int, help="override train.batch_size (whole batch over all processes)")
    parser.add_argument("--output-dir", type=Path, help="where config.yaml, last.pt and best.pt go (default runs/<config name>)")
    parser.add_argument("--resume", nargs="?", const="last", help="continue from a checkpoint (no value: OUTPUT_DIR/last.pt)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output folder that already holds checkpoints (replaces them)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key, e.g. train.lr=0.01 (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them.

    ``argv``, the command line as given, is repeated in the resume hint printed after Ctrl-C.
    """
    from mnapps.engine.distributed import resolve_device
    from mnapps.engine.loop import NonFiniteLossError
    from mnapps.engine.run_lock import claim_run_folder, report_interrupt
    from mnapps.tasks.classification import ClsConfig, train_classifier

    overrides = list(args.set)
    for flag, key in ((args.train_dir, "data.train_dir"), (args.val_dir, "data.val_dir"),
                      (args.epochs, "train.epochs"), (args.batch_size, "train.batch_size")):
        if flag is not None:
            overrides.append(f"{key}={flag!r}" if isinstance(flag, str) else f"{key}={flag}")
    output_dir = args.output_dir
    try:
        resolve_device(args.device)
        cfg = load_config(args.config, ClsConfig, overrides)
        output_dir = args.output_dir or Path("runs") / args.config.stem
        resume = True if args.resume == "last" else args.resume
        with claim_run_folder(output_dir, resume=resume, overwrite=args.overwrite) as claim:
            result = train_classifier(cfg, output_dir=output_dir, resume=resume, device=args.device,
                                      overwrite=claim.overwrite)
    except (ValueError, ConfigError, FileNotFoundError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return report_interrupt(output_dir, "tools/train_cls.py", argv)
    metrics = result.metrics
    if "top1" in metrics:
        print(
            f"validation top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%} "
            f"on {int(metrics['num_images'])} images; checkpoints in {output_dir}"
        )
    return 0
