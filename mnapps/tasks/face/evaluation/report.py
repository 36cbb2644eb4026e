"""Reporting verification results: the ROC plot and the side-by-side text table.

This module owns how :func:`mnapps.tasks.face.evaluation.metrics.verification_metrics` results are shown:
:func:`plot_roc` writes the ROC curves as a PNG (matplotlib Agg), and
:func:`format_verification_table` prints one column per model, with the collapse guard's rows
and notes where a FAR cannot be measured.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .metrics import roc_auc

__all__ = ["plot_roc", "format_verification_table"]


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, *, title: str = "ROC") -> Path:
    """Write ROC curves (TAR against FAR, one per model) to a PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for label, (far, tar) in curves.items():
        axis.step(far, tar, where="post", label=f"{label} (AUC {roc_auc(far, tar):.4f})")
    axis.plot([0, 1], [0, 1], color="0.8", linestyle="--", linewidth=0.8)
    axis.set_xlabel("false accept rate (different-person pairs accepted)")
    axis.set_ylabel("true accept rate (same-person pairs accepted)")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def format_verification_table(
    results: dict[str, dict], *, agreement: float | None = None, spreads: dict[str, dict] | None = None
) -> str:
    """A side-by-side text table of :func:`verification_metrics` results (one column per model).

    ``spreads`` (label -> :func:`embedding_spread`) adds the collapse guard's two rows;
    ``agreement`` the mean student-teacher cosine under the first column."""
    labels = list(results)
    first = results[labels[0]]
    rows: list[tuple[str, list[str]]] = [
        (f"{first['pairs']} pairs ({first['same_pairs']} same / {first['different_pairs']} different)", [""] * len(labels)),
        (f"accuracy, {len(first['fold_accuracies'])}-fold (mean ± std)",
         [f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}" for r in results.values()]),
    ]
    rows.append((f"accuracy of always answering {first['majority_answer']!r}",
                 [f"{r['majority_accuracy']:.4f}" for r in results.values()]))
    if "accuracy_at_threshold" in first:
        rows.append((f"accuracy at distance < {first['threshold']:g}",
                     [f"{r['accuracy_at_threshold']:.4f}" for r in results.values()]))
    rows += [
        ("ROC AUC", [f"{r['auc']:.4f}" for r in results.values()]),
        ("EER (threshold)", [f"{r['eer']:.4f} ({r['eer_threshold']:.3f})" for r in results.values()]),
    ]
    notes = []
    for key in first["tar_at_far"]:
        values = [r["tar_at_far"][key] for r in results.values()]
        if all(v is None for v in values):
            rows.append((f"TAR @ FAR={key}", ["n/a"] * len(labels)))
            notes.append(f"TAR @ FAR={key}: {first['tar_at_far_notes'][key]}")
        else:
            rows.append((f"TAR @ FAR={key}", ["n/a" if v is None else f"{v:.4f}" for v in values]))
    if spreads:
        rows.append(("spread: mean pairwise cosine",
                     [f"{spreads[k]['mean_pairwise_cosine']:.4f}" if k in spreads else "" for k in labels]))
        rows.append(("spread: effective rank",
                     [f"{spreads[k]['effective_rank']:.2f}" if k in spreads else "" for k in labels]))
    if agreement is not None:
        rows.append(("mean student-teacher cosine", [f"{agreement:.4f}"] + [""] * (len(labels) - 1)))
    width = max(len(name) for name, _ in rows) + 2
    columns = [max(len(label), *(len(v[i]) for _, v in rows)) + 2 for i, label in enumerate(labels)]
    lines = ["".ljust(width) + "".join(label.rjust(c) for label, c in zip(labels, columns))]
    lines += [name.ljust(width) + "".join(v.rjust(c) for v, c in zip(values, columns)) for name, values in rows]
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)
