"""What every training run leaves in its folder as it goes: metrics.csv, TensorBoard, results.png.

Task-agnostic: it reads only :func:`mnapps.engine.loop.fit`'s history, a list of
:class:`mnapps.engine.result.EpochRecord` (loss terms, lr, speed and time, then the metrics).
:func:`log_epoch` is called on rank 0 after each epoch with the whole history, and rewrites
``metrics.csv`` (one row per epoch: losses, lr, speed, every validation metric) and
``results.png`` (one panel per column) from it, so a resumed run's files hold every epoch
exactly once. When the optional ``tensorboard`` package is installed, the epoch's scalars also
go to TensorBoard event files in ``tensorboard/``; the first call says where (or how to get them).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from mnapps.engine.result import EpochRecord
from mnapps.files import atomic_write

__all__ = ["log_epoch", "history_rows", "write_metrics_csv", "plot_results"]

METRICS_CSV = "metrics.csv"
RESULTS_PNG = "results.png"
TENSORBOARD_DIR = "tensorboard"

_writers: dict[Path, Any] = {}  # one TensorBoard writer per run folder and process


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars
        except (TypeError, ValueError):
            return None
    return float(value)


def history_rows(history: Sequence[EpochRecord]) -> tuple[list[str], list[dict[str, float]]]:
    """The CSV's columns and rows: ``epoch``, ``train/<term>``, ``lr``, ``images_per_s``, ``time_s``, ``val/<metric>``."""
    columns: dict[str, None] = {"epoch": None}
    rows = []
    for entry in history:
        row: dict[str, float] = {"epoch": entry.epoch}
        for key, value in entry.train.to_dict().items():
            name = key if key in ("lr", "images_per_s", "time_s") else f"train/{key}"
            if (number := _number(value)) is not None:
                row[name] = number
        for key, value in entry.metrics.items():
            if (number := _number(value)) is not None:
                row[f"val/{key}"] = number
        columns.update(dict.fromkeys(row))
        rows.append(row)
    return list(columns), rows


def write_metrics_csv(path: Path, history: Sequence[EpochRecord]) -> Path:
    """Rewrite ``path`` from the whole history (blank where an epoch has no such value)."""
    columns, rows = history_rows(history)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if k != "epoch" else int(v)) for k, v in row.items()})
    return atomic_write(path, lambda handle: handle.write(text.getvalue().encode("utf-8")))


def _panel(column: str) -> str:
    """The panel a column is drawn in: every train loss together, AP50/APs/... with AP, AR1/ARs/... with AR."""
    if column.startswith("train/"):
        return "train losses"
    if column.startswith("val/"):
        base = re.sub(r"(\d+|(?<=[A-Z])[sml]|_\w+)$", "", column[4:])
        return "val/" + (base if len(base) > 1 else column[4:])  # l2 stays l2
    return column


def plot_results(history: Sequence[EpochRecord], path: Path) -> Path:
    """Losses, lr, speed and validation metrics against the epoch, related curves in one panel."""
    columns, rows = history_rows(history)
    panels: dict[str, list[str]] = {}
    for column in columns:
        if column not in ("epoch", "time_s"):
            panels.setdefault(_panel(column), []).append(column)
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    figure = Figure(figsize=(3.6 * ncols, 2.8 * nrows), dpi=100, layout="constrained")
    for index, (title, names) in enumerate(panels.items()):
        axes = figure.add_subplot(nrows, ncols, index + 1)
        for name in names:
            points = [(row["epoch"], row[name]) for row in rows if name in row]
            label = name.split("/", 1)[-1]
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label,
                      linewidth=2.0 if label in ("loss", "AP", "AR1") else 1.2)  # fmt: skip
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("epoch", fontsize=8)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if len(names) > 1:
            axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        if title == "lr":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def _tensorboard(folder: Path, history: Sequence[EpochRecord], log: Callable[[str], None]) -> None:
    if folder not in _writers:
        if importlib.util.find_spec("tensorboard") is None:
            _writers[folder] = None
            log(f"run log: {folder / METRICS_CSV}, {folder / RESULTS_PNG} (pip install tensorboard for TensorBoard "
                f"event files too)")  # fmt: skip
            return
        # Imported only here: tensorboard is optional, and it takes a while to import.
        from torch.utils.tensorboard import SummaryWriter

        _writers[folder] = SummaryWriter(str(folder / TENSORBOARD_DIR))
        log(f"run log: {folder / METRICS_CSV}, {folder / RESULTS_PNG}; TensorBoard: "
            f"tensorboard --logdir {folder / TENSORBOARD_DIR}")  # fmt: skip
    writer = _writers[folder]
    if writer is None:
        return
    columns, rows = history_rows(history[-1:])
    for name in columns[1:]:
        writer.add_scalar(name, rows[0][name], global_step=int(rows[0]["epoch"]))
    writer.flush()


def log_epoch(output_dir: str | Path, history: Sequence[EpochRecord], log: Callable[[str], None] = tqdm.write):
    """Bring the run folder's metrics.csv, results.png and TensorBoard events up to ``history``."""
    if not history:
        return
    folder = Path(output_dir)
    write_metrics_csv(folder / METRICS_CSV, history)
    _tensorboard(folder, history, log)
    plot_results(history, folder / RESULTS_PNG)
