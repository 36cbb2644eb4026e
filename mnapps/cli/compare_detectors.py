"""Compare detection checkpoints side by side on one COCO annotation file: MACs, parameters,
milliseconds per photo in PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8 (interleaved in
one run), and COCO AP / AP50 / recall at IoU 0.5 of each runtime's detections.

Each CHECKPOINT is NAME=PATH (an SSD detection checkpoint). Every model is exported to ONNX fp32
and int8 into --work-dir (int8 calibrated on --calib photos, which should be training photos, not
the evaluation ones). Prints a Markdown table; --json writes every figure, --plot draws AP50
against MACs (log scale), one point per model. Existing output files are refused unless
--overwrite.

--val-ann (with --val-images) chooses each model's operating point on validation photos, never on
the compared ones: the score threshold at which its PyTorch model is expected to find
--target-recall of new faces at IoU 0.5. The default --threshold-rule conformal takes the m-th
lowest validation face score, m = floor((n + 1)(1 - target)) for n validation faces, which a new
face clears with probability at least the target (split-conformal); val-recall takes the highest
threshold keeping the target share of the validation faces themselves, which on few faces keeps
less than that of new ones (14 faces, 0.9: 0.867 expected). The table then adds the threshold and
the recall and precision at IoU 0.5 it gives on the compared photos; use the threshold as the
model's --min-score in align_faces / face_pipeline_bench (or infer_det's --score-threshold).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mnapps.choices import THRESHOLD_RULE_NAMES
from mnapps.data.image_io import list_images
from mnapps.files import atomic_write

EXAMPLES = """example:
  python tools/compare_detectors.py teacher=runs/weights/faceapi_ssd.pt a100_r256=runs/faces/a100_r256/best.pt \\
      --ann runs/labels/heldout.json --images path/to/data --calib path/to/data --calib-list train.txt \\
      --work-dir runs/compare --json runs/compare/table.json --plot runs/compare/ap50_vs_macs.png
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+", metavar="NAME=PATH", help="detection checkpoints to compare")
    parser.add_argument("--ann", type=Path, required=True, metavar="F", help="COCO annotation file (ground truth)")
    parser.add_argument("--images", type=Path, required=True, metavar="D", help="folder its file_name entries are under")
    parser.add_argument("--calib", type=Path, required=True, metavar="D", help="photos for int8 calibration")
    parser.add_argument("--calib-list", type=Path, metavar="F", help="only these photos of --calib (relative paths)")
    parser.add_argument("--work-dir", type=Path, required=True, metavar="D", help="folder for the ONNX files")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default 1)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="operating point for the thresholded recall (default 0.5)")
    parser.add_argument("--val-ann", type=Path, metavar="F",
                        help="validation COCO file to choose each model's score threshold on (not --ann's photos)")
    parser.add_argument("--val-images", type=Path, metavar="D", help="folder of --val-ann's photos (default --images)")
    parser.add_argument("--target-recall", "--min-val-recall", dest="target_recall", type=float, default=0.9,
                        help="recall at IoU 0.5 the chosen threshold aims at (default 0.9)")
    parser.add_argument("--threshold-rule", choices=THRESHOLD_RULE_NAMES, default=THRESHOLD_RULE_NAMES[0],
                        help="conformal: expected recall on new photos >= the target (default); "
                             "val-recall: the validation photos' own recall >= the target")
    parser.add_argument("--json", type=Path, metavar="F", help="write every figure here")
    parser.add_argument("--plot", type=Path, metavar="F", help="draw AP50 against MACs into this PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --json / --plot files")
    args = parser.parse_args(argv)
    if not 0.0 < args.target_recall <= 1.0:
        parser.error(f"--target-recall must be in (0, 1], got {args.target_recall}")
    if args.val_ann is not None and args.val_ann.resolve() == args.ann.resolve():
        parser.error(f"--val-ann {args.val_ann} is --ann itself: choose thresholds on other photos")
    pairs = {}
    for item in args.checkpoints:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"checkpoint {item!r} is not NAME=PATH")
        pairs[name] = Path(path)
    args.pairs = pairs
    return args


def format_table(rows: list[dict]) -> str:
    head = ("| model | width | input | MACs (M) | params (M) | PyTorch ms | ORT fp32 ms | ORT int8 ms "
            "| AP | AP50 | recall@0.5 | recall@0.5, score>=t | int8 AP50 |")
    with_val = all("val" in r for r in rows)
    if with_val:
        head += " val threshold | recall@0.5 there | precision@0.5 there |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (
            f"| {r['name']} | {r['width_mult']:g} | {r['size']} | {r['macs'] / 1e6:.0f} | {r['params'] / 1e6:.2f} "
            f"| {r['torch_fp32_ms']:.0f} | {r['ort_fp32_ms']:.0f} | {r['ort_int8_ms']:.0f} | {r['torch_fp32_AP']:.3f} "
            f"| {r['torch_fp32_AP50']:.3f} | {r['torch_fp32_recall50']:.3f} | {r['torch_fp32_recall50_at_threshold']:.3f} "
            f"| {r['ort_int8_AP50']:.3f} |"
        )
        if with_val:
            at = r["torch_fp32_at_val"]
            line += (f" {r['val']['threshold']:.3f}{'' if r['val']['reached'] else ' (not reached)'} "
                     f"| {at['recall50']:.3f} | {at['precision50']:.3f} |")
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for r in rows:
        ax.scatter(r["macs"] / 1e6, r["torch_fp32_AP50"], s=40, marker="*" if r["name"].startswith("teacher") else "o")
        # slanted labels: models of one width at neighbouring sizes sit side by side
        ax.annotate(r["name"], (r["macs"] / 1e6, r["torch_fp32_AP50"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8, rotation=30)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("multiply-adds per photo (millions, log scale)")
    ax.set_ylabel("AP50 against the teacher's faces")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_ylim(-0.03, 1.2)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    from mnapps.export.det_compare import BACKENDS, compare_detectors
    from mnapps.tasks.detection.pseudo_labels import read_photo_list

    try:
        for out in (args.json, args.plot):
            if out is not None and out.exists() and not args.overwrite:
                raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        calib = read_photo_list(args.calib_list, args.calib) if args.calib_list else list_images(args.calib)
        val = (args.val_ann, args.val_images or args.images) if args.val_ann is not None else None
        rows = compare_detectors(args.pairs, args.ann, args.images, calib, args.work_dir, threads=args.threads,
                                 score_threshold=args.score_threshold, val=val, target_recall=args.target_recall,
                                 threshold_rule=args.threshold_rule)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"(ms per photo, mean over {args.ann}'s photos, {args.threads} thread(s); backends {', '.join(BACKENDS)})")
    if val is not None:
        print(f"(val threshold: {args.threshold_rule} rule for recall {args.target_recall:g} at IoU 0.5, "
              f"chosen on {args.val_ann}'s photos)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, lambda handle: handle.write(json.dumps(rows, indent=1).encode()))
        print(f"wrote {args.json}")
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot, f"AP50 against multiply-adds, {args.ann.name} ({len(rows)} models)")
        print(f"wrote {args.plot}")
    return 0
