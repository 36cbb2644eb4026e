"""Measure mnapps inference and training speed side by side with its peers, in one run.

Rows (images/s at each --batch, warm-up then the median of repeats, --threads threads):
  MobileNetV1-224: timm mobilenetv1_100 eager (the peer), mnapps eager NCHW, mnapps fused
    channels_last, mnapps torch.compile, mnapps ONNX Runtime fp32 and int8;
  SSD300 end to end (resize + network + decoding/NMS, 480x640 images): torchvision
    ssdlite320_mobilenet_v3_large eager (peer), mnapps eager, mnapps ONNX Runtime;
  one SSD300 training step (batch --train-batch), the engine's own step, vs torchvision SSDLite's.
Prints the CPU's upper bound, worked out from lscpu and /proc/cpuinfo (cores x clock x 2 FMA
units, the architectural maximum, x vector lanes x 2 FLOPs), and a measured torch.mm beside it
as a reference; then, per row, the ratio to the peer, the achieved GFLOP/s (multiply-adds
counted by mnapps.stats.count_macs) and its share of the bound, then the speed targets. All
models have random weights (speed does not depend on them; accuracy after export is measured
by tools/export.py --evaluate).
Run it on a quiet machine: other processes on the cores make every figure meaningless.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from lab.models import SECTIONS as BENCH_SECTIONS
from mnapps.files import atomic_write

EXAMPLES = """examples:
  python tools/benchmark.py                          # everything, CPU (and CUDA when present)
  python tools/benchmark.py --quick                  # smoke run: batches 1 and 4, 3 repeats
  python tools/benchmark.py --sections classifier --batch 32 --json runs/bench.json
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", choices=BENCH_SECTIONS, default=list(BENCH_SECTIONS),
                        help="what to measure (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run: batches 1 and 4, training batch 4, 1 warm-up, 3 repeats")
    parser.add_argument("--batch", type=int, nargs="+", metavar="N", help="inference batch sizes (default: 1 32)")
    parser.add_argument("--train-batch", type=int, metavar="N", help="training-step batch (default: 16)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch and ONNX Runtime (default: 2)")
    parser.add_argument("--warmup", type=int, metavar="N", help="untimed calls before timing (default: 3)")
    parser.add_argument("--repeats", type=int, metavar="N", help="timed calls, median reported (default: 10)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="where to run (default: all = CPU, plus CUDA when available)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to compile)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every row, the bound and the torch.mm rate as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    import torch
    from mnapps.engine.distributed import resolve_device
    from lab.models import BenchSettings, check_targets, format_table, run_benchmark

    if args.device == "all":
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    else:
        devices = (args.device,)
    try:
        for device in devices:
            resolve_device(device)
        if args.json is not None and args.json.is_dir():
            raise ValueError(f"--json {args.json} is an existing folder; give a file name")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    changes = {"sections": tuple(args.sections), "threads": args.threads, "devices": devices,
               "compile": not args.no_compile, "onnx": not args.no_onnx}
    for key, value in (("batches", tuple(args.batch) if args.batch else None), ("train_batch", args.train_batch),
                       ("warmup", args.warmup), ("repeats", args.repeats)):
        if value is not None:
            changes[key] = value
    settings = BenchSettings.quick(**changes) if args.quick else BenchSettings(**changes)
    try:
        result = run_benchmark(settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        result["targets"] = check_targets(result)
        atomic_write(args.json, lambda handle: handle.write(json.dumps(result, indent=2).encode()))
        print(f"wrote {args.json}")
    return 0


