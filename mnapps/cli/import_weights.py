"""Convert Google's TF-slim MobileNetV1 ImageNet weights into an mnapps classification checkpoint.

SOURCE is an .npz of TF-slim tensors (name -> array, e.g. mobilenet_v1_1.0_224_tfslim.npz,
the official checkpoint's tensors saved with numpy) or the official
checkpoint prefix mobilenet_v1_1.0_224.ckpt (reading that needs TensorFlow). The result
records TF padding, ReLU6 and BN epsilon 1e-3 in its config; tools/classify.py uses it, and
any head starts from its trunk with load_backbone_weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnapps.files import check_output_path
from mnapps.tasks.classification import import_tf_slim_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("source", type=Path, help="TF-slim .npz or .ckpt prefix")
    parser.add_argument(
        "--output", type=Path, default=Path("runs") / "weights" / "mobilenet_v1_1.0_224_imagenet.pt",
        help="checkpoint to write (default: runs/weights/mobilenet_v1_1.0_224_imagenet.pt, "
        "where tools/classify.py looks first)",
    )
    parser.add_argument(
        "--keep-background", action="store_true",
        help="keep TF's 1001 logits (index 0 = background) instead of the usual 1000 ImageNet classes",
    )
    parser.add_argument("--resolution", type=int, default=224, help="input size the weights were trained at (default 224)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.output.is_dir():
            raise ValueError(f"--output {args.output} is an existing folder; give the checkpoint's file name (.pt)")
        check_output_path(args.output, [args.source], what="--output file")
        path, info = import_tf_slim_checkpoint(
            args.source, args.output, keep_background=args.keep_background, resolution=args.resolution
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    classes = f"{info.num_classes} classes" + (" (background logit dropped)" if info.background_dropped else "")
    print(f"wrote {path}: MobileNetV1 width {info.width_mult:g}, {classes}, {info.mapped} TF tensors mapped")
    if info.skipped:
        print(f"skipped {len(info.skipped)} non-weight tensor(s): {', '.join(info.skipped[:5])}")
    return 0


