"""Export an mnapps checkpoint to ONNX (optionally int8) and check it against PyTorch.

Rebuilds the model from the checkpoint's task/head/config (classifier, SSD/SSDLite detector
or face embedder), folds BatchNorm into the convolutions, exports one self-describing .onnx
file and runs the parity check on real images: ONNX Runtime vs the PyTorch model in eval mode
(max abs difference of logits / embeddings / raw SSD outputs, and for detectors the agreement
of the final detections after the shared post-processing of mnapps/export/postprocess.py).
A failed check exits with status 1.

With --int8 it also writes OUT.int8.onnx: static post-training quantization (QDQ, per-channel
int8 weights, uint8 activations, bias correction) calibrated on --calib-images, checked with
int8-sized limits. --evaluate then prints top-1 (classifier) or AP50 (SSD) of PyTorch, ONNX
Runtime fp32 and int8 on the validation set of the checkpoint's config (the embedded shapes
sets unless it names other data).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mnapps.files import atomic_write, check_output_path
from mnapps.weights import weights_arg

EXAMPLES = """examples:
  python tools/export.py --checkpoint runs/ssd_mnv1_a050_r192_shapes/best.pt --format onnx
  python tools/export.py --checkpoint runs/ssd_mnv1_a050_r192_shapes/best.pt --int8 --evaluate
  python tools/export.py --checkpoint mobilenet_v1_1.0_224_imagenet --int8 \\
      --calib-images coco/val2017 --images my_photos
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=weights_arg, required=True, metavar="F", help="mnapps checkpoint (.pt)")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    parser.add_argument("--out", type=Path, metavar="F", help="output .onnx file (default: next to the checkpoint)")
    parser.add_argument("--int8", action="store_true", help="also write a static-int8 model OUT.int8.onnx")
    parser.add_argument(
        "--calib-images", type=Path, nargs="+", metavar="D",
        help="folders (or files) of calibration images for --int8 (default: the training images of the "
        "checkpoint's data)",
    )
    parser.add_argument(
        "--images", type=Path, nargs="+", metavar="D",
        help="folders (or files) of images for the parity check (default: the validation images of the "
        "checkpoint's data)",
    )
    parser.add_argument(
        "--dense-weight-bits", choices=["auto", "7", "8"], default="auto",
        help="int8 weight range of the dense (non-depthwise) convolutions: 7 avoids the int16 "
        "saturation of ONNX Runtime's AVX2 kernels on x86 CPUs without VNNI; auto (default) picks "
        "7 on such a CPU, 8 elsewhere. Choose for the CPU that will run the model.",
    )
    parser.add_argument("--num-calib", type=int, default=32, help="calibration images used (default: 32)")
    parser.add_argument("--num-parity", type=int, default=16, help="parity-check images used (default: 16)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default: 2)")
    parser.add_argument(
        "--evaluate", action="store_true",
        help="print top-1 / AP50 of PyTorch, ONNX fp32 and int8 on the validation set",
    )
    parser.add_argument("--max-eval-images", type=int, metavar="N", help="evaluate on N images only")
    parser.add_argument("--json", type=Path, metavar="F", help="write parity figures and accuracies as JSON")
    return parser.parse_args(argv)


def _check_outputs(args: argparse.Namespace, out: Path) -> None:
    """Outputs that are folders, or the checkpoint itself, are refused before any work.

    The image folders are not checked: nothing written here has an image's name.
    """
    inputs = [args.checkpoint]
    int8 = out.with_suffix(".int8.onnx") if args.int8 else None
    for flag, path in (("--out", out), ("--out (int8)", int8), ("--json", args.json)):
        if path is None:
            continue
        if path.is_dir():
            raise ValueError(f"{flag} {path} is an existing folder; give a file name")
        check_output_path(path, inputs, what=f"{flag} file")


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    from mnapps.export.onnx import ParityError
    from mnapps.export.pipeline import evaluate_export, export_checkpoint, load_export_spec

    out = args.out or args.checkpoint.with_suffix(".onnx")
    try:
        _check_outputs(args, out)
        spec = load_export_spec(args.checkpoint)
        result = export_checkpoint(
            spec,
            out,
            int8=args.int8,
            calib_images=args.calib_images,
            parity_images=args.images,
            num_calib=args.num_calib,
            num_parity=args.num_parity,
            threads=args.threads,
            reduce_range=None if args.dense_weight_bits == "auto" else args.dense_weight_bits == "7",
        )
        summary = {
            "fp32": str(result.fp32_path),
            "int8": str(result.int8_path) if result.int8_path else None,
            "parity": [{"name": r.name, "passed": r.passed, **r.figures} for r in result.reports],
        }
        if args.evaluate:
            summary["accuracy"] = evaluate_export(
                spec, result.fp32_path, result.int8_path, threads=args.threads, max_images=args.max_eval_images
            )
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for backend, metrics in summary.get("accuracy", {}).items():
        print(f"{backend:>10}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))
    if args.json:
        atomic_write(args.json, lambda handle: handle.write(json.dumps(summary, indent=2).encode()))
        print(f"wrote {args.json}")
    return 0
