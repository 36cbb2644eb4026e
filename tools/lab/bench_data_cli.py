"""Measure the COCO data path at full size: mnapps' dataset beside torchvision's, in one run.

Writes COCO-format annotation files with COCO 2017 train's statistics (default 10,000, 50,000
and 118,287 images; the 80 real category ids, ~7.3 boxes per image with COCO's small/medium/
large spread, ~1% crowd regions, ~1% images without boxes, a polygon per object so the file is
as big as the real one) over a small pool of real JPEGs (../shared/data/coco8 when present,
else generated shapes images), then measures, each figure in a fresh process:

  first parse      mnapps' first dataset construction (JSON, validation, index, cache) beside
                   pycocotools' COCO() load, with peak RSS;
  start-up         time to first batch (mnapps with its cached index; torchvision parses);
  memory           PSS and USS (/proc/<pid>/smaps_rollup) of the main process and summed over
                   the workers, at each --workers count, after the first and after the last
                   of --passes passes of --batches random batches (persistent workers);
  speed            loader images/s (and per worker) with the SSD300 training transforms, and
                   the engine's SSD300 training step (MobileNetV1 1.0, 91 classes) in images/s;
  epoch            after the passes, fresh workers read every sample's annotations once (no
                   pixels): their PSS/USS at its start and end show copy-on-read growth.

It prints the tables, the memory extrapolated to 8 workers from the measured slope, and the
acceptance checks (first batch <= 5 s at the largest size; summed worker PSS within
10% between the first and last pass; loader at 2 workers >= the training step). The machine
must be otherwise quiet for the speeds to mean anything. The default run took 12 minutes on 2
busy cores (most of it torchvision parsing the JSON once per process) and needs about 7 GiB of
memory at peak, for torchvision's annotation epoch with 4 workers (--no-annotation-epoch:
about 4 GiB, the first parse of the 450 MB file).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import mnapps
from lab.coco_sim import COCO_TRAIN2017_IMAGES
from lab.data_path import IMPLEMENTATIONS, ScaleSettings, run_scale_benchmark
from lab.data_report import check_acceptance, format_report, plot_report
from lab.engine_step import detector_loss, time_engine_steps
from lab.models import COCO_CLASSES
from mnapps.config import TrainConfig
from mnapps.data.coco import CocoDetection
from mnapps.data.transforms import build_det_transforms
from mnapps.heads.ssd import SSDConfig, build_ssd

EXAMPLES = f"""examples:
  python tools/bench_data.py                                  # 10k, 50k, {COCO_TRAIN2017_IMAGES} images, both datasets
  python tools/bench_data.py --sizes 10000 --workers 0 2      # a quick look
  python tools/bench_data.py --plot runs/data_path.png --json runs/data_path.json
"""
_SHARED_POOL = Path(mnapps.__file__).resolve().parents[1].parent / "shared" / "data" / "coco8" / "images"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ScaleSettings()
    parser = argparse.ArgumentParser(
        prog="bench_data.py", description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", metavar="N", default=list(defaults.sizes),
                        help=f"images in each simulated file (default: {' '.join(map(str, defaults.sizes))})")
    parser.add_argument("--workers", type=int, nargs="+", metavar="W", default=list(defaults.workers),
                        help="DataLoader worker counts (default: 0 2 4)")
    parser.add_argument("--impl", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
                        help="datasets to measure (default: both)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="loader batch (default: 16)")
    parser.add_argument("--batches", type=int, default=defaults.batches_per_pass,
                        help="random batches per pass (default: 8)")
    parser.add_argument("--passes", type=int, default=defaults.passes,
                        help="passes per loader run; memory is read after the first and the last (default: 3)")
    parser.add_argument("--input-size", type=int, default=defaults.input_size,
                        help="SSD input side for the transforms and the training step (default: 300)")
    parser.add_argument("--pool", type=Path, metavar="DIR",
                        help=f"folder of JPEGs the entries reuse (default: {_SHARED_POOL} when present, "
                             "else generated shapes images)")
    parser.add_argument("--no-annotation-epoch", action="store_true",
                        help="skip the epoch of annotation reads (saves torchvision's copy-on-read memory)")
    parser.add_argument("--no-polygons", action="store_true",
                        help="leave segmentations out of the simulated files (3x smaller, quicker to parse)")
    parser.add_argument("--step-batch", type=int, default=16, help="SSD300 training-step batch (default: 16)")
    parser.add_argument("--no-step", action="store_true", help="skip the SSD300 training-step measurement")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="device of the training step (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"CPU threads of the training step (default: {torch.get_num_threads()})")
    parser.add_argument("--seed", type=int, default=0, help="simulation and sampling seed (default: 0)")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="where the simulated files go, kept afterwards (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write the scaling plot here")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every measurement as JSON")
    return parser.parse_args(argv)


def measure_training_step(ann_file: Path, image_dir: Path, *, batch: int, device: str, threads: int,
                          input_size: int) -> dict[str, Any]:
    """Images/s of the engine's SSD300 training step (``fit``'s step, SGD) on a real loader batch."""
    dataset = CocoDetection(ann_file, image_dir, build_det_transforms(True, input_size, "ssd"))
    torch.manual_seed(0)
    samples = [sample for sample in (dataset[i] for i in range(min(len(dataset), 4 * batch))) if sample][:batch]
    images = [image for image, _ in samples]
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in samples]
    model = build_ssd(SSDConfig(size=input_size), num_classes=COCO_CLASSES)
    cfg = TrainConfig(optimizer="sgd", lr=1e-3, momentum=0.9, num_threads=threads)
    steps = time_engine_steps(model, (images, targets), detector_loss, cfg, images=len(images), device=device,
                              warmup=1, repeats=3)
    seconds = statistics.median(steps)
    return {"images_per_s": len(images) / seconds, "batch": len(images), "device": device, "threads": threads,
            "num_classes": COCO_CLASSES, "seconds_per_step": seconds}


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        settings = ScaleSettings(sizes=tuple(args.sizes), workers=tuple(sorted(set(args.workers))),
                                 impls=tuple(args.impl), batch_size=args.batch_size, batches_per_pass=args.batches,
                                 passes=args.passes, input_size=args.input_size, polygons=not args.no_polygons,
                                 annotation_epoch=not args.no_annotation_epoch, seed=args.seed)
    except ValueError as err:
        _fail(str(err))
    if args.step_batch < 1:
        _fail(f"--step-batch must be >= 1, got {args.step_batch}")
    if args.threads < 1:
        _fail(f"--threads must be >= 1, got {args.threads}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda was asked for but torch.cuda.is_available() is False; use --device cpu")
    if args.pool is not None and not args.pool.is_dir():
        _fail(f"--pool {args.pool} is not a folder; pass a folder of JPEG photos")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and path.is_dir():
            _fail(f"{option} {path} is an existing folder; give a file name")
    if args.workdir is not None and args.workdir.exists() and not args.workdir.is_dir():
        _fail(f"--workdir {args.workdir} is a file; pass a folder")
    pool = args.pool if args.pool is not None else (_SHARED_POOL if _SHARED_POOL.is_dir() else None)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mnapps_bench_data_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_scale_benchmark(settings, workdir, pool, log=lambda line: print(line, file=sys.stderr, flush=True))
        if not args.no_step:
            smallest = result["sizes"][0]["simulation"]
            print(f"SSD300 training step, batch {args.step_batch}, {device} ...", file=sys.stderr, flush=True)
            result["step"] = measure_training_step(Path(smallest["ann_file"]), Path(smallest["image_dir"]),
                                                   batch=args.step_batch, device=device, threads=args.threads,
                                                   input_size=args.input_size)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.workdir is None:
            print(f"kept {workdir}", file=sys.stderr)

    print(format_report(result))
    result["acceptance"] = check_acceptance(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot is not None:
        print(f"wrote {plot_report(result, args.plot)}")
