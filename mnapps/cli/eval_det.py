"""Evaluate a detector checkpoint, or an existing COCO results file, with pycocotools' COCOeval.

Two modes:

* --results F --val-ann F: score a COCO results JSON
  ([{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...], original category ids)
  against an annotation file; no model is needed.
* --checkpoint F [--config F] [--val-ann F --val-images D]: load an mnapps detector checkpoint
  (its stored config, or --config instead), run it over the validation set and score it; the
  validation data default to those named in the config.

Both print COCO's standard 12-line summary (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs,
ARm, ARl; -1 means no ground truth in that area range) and a per-class AP@[.5:.95] table, and
write eval_metrics.json (those 12 keys at top level, plus per_class_AP), and for --checkpoint
eval_pr_curves.png (per-class precision-recall) and eval_val_predictions.png (ground truth beside
prediction), into --out-dir, by
default the folder of the checkpoint or results file, or the current folder when that one is
read-only. It never touches the training run's own metrics.json, and an existing eval_metrics.json
(an earlier evaluation, e.g. of best.pt before last.pt) is only replaced with --overwrite.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from mnapps.config import config_arg
from mnapps.files import check_output_path, check_writable_folder, refuse_existing_outputs
from mnapps.weights import weights_arg

#: The file evaluation writes; a training run's own record is metrics.json, never replaced here.
METRICS_FILE = "eval_metrics.json"

EXAMPLES = """examples:
  python tools/eval_det.py --results runs/coco8/drawn/results.json --val-ann coco8/instances_val.json \\
      --out-dir runs/coco8/eval
  python tools/eval_det.py --checkpoint runs/ssd_mnv1_a050_r192_shapes/best.pt
  python tools/eval_det.py --checkpoint runs/ssd_mnv1_a050_r192_shapes/best.pt --val-ann my/val.json --val-images my/images \\
      --device cuda
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_argument_group("what to evaluate (exactly one of)")
    source.add_argument("--results", type=Path, metavar="F", help="COCO results JSON to score (needs --val-ann)")
    source.add_argument("--checkpoint", type=weights_arg, metavar="F", help="mnapps detector checkpoint (.pt) to run")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--val-ann", type=Path, metavar="F", help="COCO annotation JSON (with --checkpoint: default the config's)"
    )
    data.add_argument(
        "--val-images", type=Path, metavar="D", help="image folder for --checkpoint (default: the config's)"
    )
    model = parser.add_argument_group("checkpoint mode")
    model.add_argument(
        "--config", type=config_arg, metavar="F",
        help="YAML config (a file or a shipped config's name) to use instead of the one stored in the checkpoint"
    )
    model.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    model.add_argument("--batch-size", type=int, help="images per forward pass (default: data.eval_batch_size)")
    model.add_argument("--workers", type=int, help="data-loading worker processes (default: train.num_workers)")
    model.add_argument(
        "--max-images", type=int, metavar="N", help="score only the first N images (COCOeval is restricted to them)"
    )
    parser.add_argument(
        "--out-dir", type=Path, metavar="D",
        help=f"where {METRICS_FILE} goes (default: beside the checkpoint/results)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {METRICS_FILE}")
    args = parser.parse_args(argv)
    if (args.results is None) == (args.checkpoint is None):
        parser.error("pass exactly one of --results F (with --val-ann F) or --checkpoint F")
    if args.results is not None and args.val_ann is None:
        parser.error("--results needs --val-ann F, the annotation file the results refer to")
    if args.results is not None and (args.config or args.val_images):
        parser.error("--config and --val-images only apply to --checkpoint")
    for flag, path in (("--results", args.results), ("--checkpoint", args.checkpoint),
                       ("--val-ann", args.val_ann), ("--config", args.config)):  # fmt: skip
        if path is not None and not path.is_file():
            parser.error(f"{flag}: file not found: {path}")
    if args.val_images is not None and not args.val_images.is_dir():
        parser.error(f"--val-images: folder not found: {args.val_images}")
    if args.out_dir is not None and args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"--out-dir {args.out_dir} is an existing file; give a folder")
    for flag, value, lowest in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                                ("--max-images", args.max_images, 1)):  # fmt: skip
        if value is not None and value < lowest:
            parser.error(f"{flag} must be >= {lowest}, got {value}")
    return args


def _writable(folder: Path) -> bool:
    # Mode bits too: root may write anywhere, yet a folder marked read-only (shared data) should stay so.
    return folder.is_dir() and os.access(folder, os.W_OK) and bool(folder.stat().st_mode & stat.S_IWUSR)


def _evaluate_checkpoint(args: argparse.Namespace, report_dir: Path):
    import torch
    from mnapps.engine.distributed import resolve_device
    from mnapps.tasks.table import EvalRequest, evaluate_checkpoint

    device = resolve_device(args.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    request = EvalRequest(device, config=args.config, val_ann=args.val_ann, val_images=args.val_images,
                          batch_size=args.batch_size, workers=args.workers, max_images=args.max_images,
                          progress=not args.no_progress, report_dir=report_dir)
    result = evaluate_checkpoint(args.checkpoint, request)
    return result.metrics, result.per_class, result.summary, result.extra


def _metrics_path(args: argparse.Namespace, source: Path) -> Path:
    out_dir = args.out_dir
    if out_dir is None:
        out_dir = source.resolve().parent
        if not _writable(out_dir):
            print(f"{out_dir} is read-only; writing {METRICS_FILE} to the current folder instead")
            out_dir = Path.cwd()
    inputs = [p for p in (args.results, args.checkpoint, args.val_ann, args.config) if p is not None]
    path = check_output_path(out_dir / METRICS_FILE, inputs, what="metrics file")
    check_writable_folder(out_dir, flag="--out-dir")
    refuse_existing_outputs([path], flag="--out-dir", overwrite=args.overwrite)  # an earlier evaluation's record
    return path


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    from mnapps.eval.coco import evaluate_results, format_per_class_table, write_metrics_json

    try:
        # Where the metrics go is settled before the evaluation, so a refusal costs nothing.
        path = _metrics_path(args, args.results if args.results is not None else args.checkpoint)
        if args.results is not None:
            metrics, per_class, summary = evaluate_results(args.val_ann, args.results)
            extra = {"results": str(args.results), "val_ann": str(args.val_ann)}
        else:
            # eval_pr_curves.png, eval_val_predictions.png beside the metrics (a run's own pictures stay)
            metrics, per_class, summary, extra = _evaluate_checkpoint(args, path.parent)
    except (FileNotFoundError, ValueError) as err:  # the library's messages already name the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary, end="")
    print()
    print(format_per_class_table(per_class), end="")
    path = write_metrics_json(path, metrics, per_class, extra)
    print(f"wrote {path}")
    return 0
