#!/usr/bin/env python
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXAMPLES = """examples:
  python tools/export.py --checkpoint runs/ssd_mnv1_a050_r192_shapes/best.pt --format onnx
  python tools/export.py --checkpoint runs/ssd_mnv1_a050_r192_shapes/best.pt --int8 --evaluate
  python tools/export.py --checkpoint runs/imagenet.pt --int8 \\
      --calib-images ../shared/data/coco8/images ../shared/data/faces --images ../shared/data/mobilenet_v1_tfslim/photos
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="F", help="mnapps checkpoint (.pt)")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mnapps.export.onnx import ParityError
    from mnapps.export.pipeline import evaluate_export, export_checkpoint, load_export_spec

    out = args.out or args.checkpoint.with_suffix(".onnx")
    try:
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
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "fp32": str(result.fp32_path),
        "int8": str(result.int8_path) if result.int8_path else None,
        "parity": [{"name": r.name, "passed": r.passed, **r.figures} for r in result.reports],
    }
    if args.evaluate:
        accuracy = evaluate_export(
            spec, result.fp32_path, result.int8_path, threads=args.threads, max_images=args.max_eval_images
        )
        summary["accuracy"] = accuracy
        for backend, metrics in accuracy.items():
            print(f"{backend:>10}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
