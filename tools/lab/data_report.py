"""The data-path benchmark's result as numbers to check, a text report and a plot.

This module owns reading :func:`lab.data_path.run_scale_benchmark`'s result: memory
per worker extrapolated to 8 workers (:func:`extrapolate_workers`, :func:`summarise`), the
acceptance checks (:func:`check_acceptance`), and :func:`format_report` / :func:`plot_report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from .data_path import IMPLEMENTATIONS

__all__ = ["extrapolate_workers", "summarise", "check_acceptance", "format_report", "plot_report"]

_MB = 1 << 20

# ------------------------------------------------------------------------------------------
# analysis


def extrapolate_workers(points: dict[int, float], target: int = 8) -> tuple[float, float]:
    """Least-squares line through ``{workers: bytes}``; returns ``(bytes per worker, bytes at target)``.

    Raises:
        ValueError: fewer than two worker counts.
    """
    if len(points) < 2:
        raise ValueError(f"need memory at two or more worker counts to extrapolate, got {sorted(points)}")
    xs = np.array(sorted(points), dtype=np.float64)
    ys = np.array([points[int(k)] for k in xs], dtype=np.float64)
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(slope), float(intercept + slope * target)


def _total_pss(run: dict[str, Any], when: str = "after_last") -> int:
    return run[when]["main_pss"] + run[when]["workers_pss"]


def _runs(entry: dict[str, Any], impl: str) -> dict[int, dict[str, Any]]:
    return {run["workers"]: run for run in entry["loaders"] if run["impl"] == impl}


def _growth(run: dict[str, Any], key: str = "workers_pss") -> float | None:
    first, last = run["after_first"][key], run["after_last"][key]
    return None if first == 0 else last / first - 1.0


def summarise(result: dict[str, Any], target_workers: int = 8) -> list[dict[str, Any]]:
    """Per (size, implementation): the figures the tables and checks use."""
    rows = []
    for entry in result["sizes"]:
        sim = entry["simulation"]
        for impl in result["settings"]["impls"]:
            runs = _runs(entry, impl)
            if not runs:
                continue
            first_batch_workers = 2 if 2 in runs else max(runs)
            most = max(runs)
            row = {
                "images": sim["num_images"], "impl": impl, "json_bytes": sim["json_bytes"],
                # torchvision's dataset parses with pycocotools' COCO(), so that is its first parse.
                "first_parse_s": entry["first_parse"].get("mnapps" if impl == "mnapps" else "pycocotools",
                                                          {}).get("seconds"),
                "first_batch_workers": first_batch_workers,
                "first_batch_s": runs[first_batch_workers]["first_batch_s"],
                "max_workers": most,
                "workers_pss_first": runs[most]["after_first"]["workers_pss"],
                "workers_pss_last": runs[most]["after_last"]["workers_pss"],
                "workers_pss_growth": _growth(runs[most]),
                "workers_uss_growth": _growth(runs[most], "workers_uss"),
                "total_pss": {w: _total_pss(r) for w, r in sorted(runs.items())},
                "images_per_s": {w: r["images_per_s"] for w, r in sorted(runs.items())},
            }
            if len(runs) >= 2:
                row["pss_per_worker"], row[f"total_pss_{target_workers}_workers"] = extrapolate_workers(
                    row["total_pss"], target_workers)
            epochs = {w: r["annotation_epoch"] for w, r in sorted(runs.items()) if r.get("annotation_epoch")}
            if epochs:
                row["epoch_uss_growth"] = {w: e["at_end"]["workers_uss"] - e["at_start"]["workers_uss"]
                                           for w, e in epochs.items()}
                row["epoch_total_pss"] = {w: e["at_end"]["main_pss"] + e["at_end"]["workers_pss"]
                                          for w, e in epochs.items()}
                if 0 in runs:  # without workers nothing is shared, so reading cannot copy pages
                    row["epoch_total_pss"] = {0: _total_pss(runs[0]), **row["epoch_total_pss"]}
                if len(row["epoch_total_pss"]) >= 2:
                    row["epoch_pss_per_worker"], row[f"epoch_total_pss_{target_workers}_workers"] = \
                        extrapolate_workers(row["epoch_total_pss"], target_workers)
            rows.append(row)
    return rows


def check_acceptance(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets at the largest size measured, for mnapps (torchvision shown beside).

    Returns:
        ``[{"name", "mnapps", "torchvision", "target", "ok"}]``; ``ok`` is None when the figure
        is missing (e.g. no 2-worker run, no training step measured).
    """
    rows = summarise(result)
    largest = max(r["images"] for r in rows)
    at = {r["impl"]: r for r in rows if r["images"] == largest}
    mn, tv = at.get("mnapps"), at.get("torchvision")
    checks = []

    def add(name: str, key: Callable[[dict[str, Any]], float | None], target: str, ok: Callable[[float], bool]):
        mine = key(mn) if mn else None
        checks.append({"name": name, "mnapps": mine, "torchvision": key(tv) if tv else None, "target": target,
                       "ok": None if mine is None else bool(ok(mine))})

    add(f"time to first batch at {largest} images, s", lambda r: r["first_batch_s"], "<= 5 s", lambda v: v <= 5.0)
    add(f"summed worker PSS, last pass vs first, {mn['max_workers'] if mn else '?'} workers",
        lambda r: r["workers_pss_growth"], "within +-10%", lambda v: abs(v) <= 0.10)
    step = result.get("step", {}).get("images_per_s")
    add("loader images/s at 2 workers / SSD300 training step images/s",
        lambda r: None if step is None or 2 not in r["images_per_s"] else r["images_per_s"][2] / step,
        ">= 1", lambda v: v >= 1.0)
    return checks


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / _MB:,.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def format_report(result: dict[str, Any]) -> str:
    """The measured tables as text (MiB = 2^20 bytes; PSS after the last pass unless stated)."""
    lines = []
    s = result["settings"]
    machine = result.get("machine", {})
    if machine:
        start, end = (machine.get(k) or ["?"] for k in ("load_average_start", "load_average_end"))
        lines.append(f"machine: {machine.get('model_name', '?')}, {machine.get('cpus')} CPUs; load average "
                     f"(1 min) {start[0]} at the start, {end[0]} at the end")
    lines.append(f"passes: {s['passes']} x {s['batches_per_pass']} random batches of {s['batch_size']} "
                 f"(SSD training transforms, {s['input_size']} px); persistent workers; each row its own process")
    lines.append("")
    lines.append("first parse of the JSON (cold, own process)")
    lines.append(f"{'images':>8} {'boxes':>8} {'JSON MiB':>9} {'mnapps s':>9} {'peak MiB':>9} "
                 f"{'COCO() s':>9} {'peak MiB':>9} {'index MiB':>10}")
    for entry in result["sizes"]:
        sim, fp = entry["simulation"], entry["first_parse"]
        mn, pc = fp.get("mnapps"), fp["pycocotools"]
        mn_s = f"{mn['seconds']:.1f}" if mn else "-"
        lines.append(f"{sim['num_images']:>8} {sim['num_annotations']:>8} {sim['json_bytes'] / _MB:>9.0f} "
                     f"{mn_s:>9} {_mib(mn and mn['peak_rss']):>9} "
                     f"{pc['seconds']:>9.1f} {_mib(pc['peak_rss']):>9} {_mib(mn and mn['index_bytes']):>10}")
    lines.append("")
    lines.append("loader start-up and memory (MiB; 'p1' after the first pass, 'pN' after the last)")
    lines.append(f"{'images':>8} {'impl':<12} {'workers':>7} {'1st batch s':>11} {'main PSS p1/pN':>15} "
                 f"{'workers PSS p1/pN':>18} {'growth':>7} {'workers USS p1/pN':>18} {'img/s':>6} {'img/s/worker':>12}")
    for entry in result["sizes"]:
        for run in entry["loaders"]:
            a, b = run["after_first"], run["after_last"]
            per_worker = run["images_per_s"] / max(1, run["workers"])
            lines.append(
                f"{entry['simulation']['num_images']:>8} {run['impl']:<12} {run['workers']:>7} "
                f"{run['first_batch_s']:>11.2f} {_mib(a['main_pss']) + ' / ' + _mib(b['main_pss']):>15} "
                f"{_mib(a['workers_pss']) + ' / ' + _mib(b['workers_pss']):>18} {_pct(_growth(run)):>7} "
                f"{_mib(a['workers_uss']) + ' / ' + _mib(b['workers_uss']):>18} {run['images_per_s']:>6.1f} "
                f"{per_worker:>12.1f}")
    _report_epochs(result, lines)
    rows = summarise(result)
    _report_growth(rows, lines)
    _report_step_and_acceptance(result, rows, lines)
    return "\n".join(lines)


def _report_epochs(result: dict[str, Any], lines: list[str]) -> None:
    epochs = [(entry, run) for entry in result["sizes"] for run in entry["loaders"] if run.get("annotation_epoch")]
    if epochs:
        lines.append("")
        lines.append("one epoch of annotation reads (every image, no pixels, fresh workers): memory at its start "
                     "and end (MiB)")
        lines.append(f"{'images':>8} {'impl':<12} {'workers':>7} {'seconds':>7} {'workers PSS start/end':>22} "
                     f"{'workers USS start/end':>22} {'USS growth per worker':>22}")
        for entry, run in epochs:
            e = run["annotation_epoch"]
            a, b = e["at_start"], e["at_end"]
            lines.append(f"{entry['simulation']['num_images']:>8} {run['impl']:<12} {run['workers']:>7} "
                         f"{e['seconds']:>7.1f} {_mib(a['workers_pss']) + ' / ' + _mib(b['workers_pss']):>22} "
                         f"{_mib(a['workers_uss']) + ' / ' + _mib(b['workers_uss']):>22} "
                         f"{_mib((b['workers_uss'] - a['workers_uss']) / run['workers']):>22}")


def _report_growth(rows: list[dict[str, Any]], lines: list[str]) -> None:
    lines.append("")
    for title, key, slope, at8 in (
        ("after the last pass", "total_pss", "pss_per_worker", "total_pss_8_workers"),
        ("after one epoch of annotation reads (0 workers: after the last pass)", "epoch_total_pss",
         "epoch_pss_per_worker", "epoch_total_pss_8_workers"),
    ):
        table = [r for r in rows if key in r]
        if not table:
            continue
        workers = sorted({w for r in table for w in r[key]})
        lines.append(f"how memory grows: main + workers PSS {title} (MiB), extrapolated to 8 workers")
        lines.append(f"{'images':>8} {'impl':<12} " + " ".join(f"{f'{w} workers':>10}" for w in workers)
                     + f" {'per worker':>10} {'8 workers':>10}")
        for r in table:
            lines.append(f"{r['images']:>8} {r['impl']:<12} "
                         + " ".join(f"{_mib(r[key].get(w)):>10}" for w in workers)
                         + f" {_mib(r.get(slope)):>10} {_mib(r.get(at8)):>10}")
        lines.append("")
    lines.pop()


def _report_step_and_acceptance(result: dict[str, Any], rows: list[dict[str, Any]], lines: list[str]) -> None:
    step = result.get("step")
    if step:
        lines.append("")
        lines.append(f"SSD300 training step (MobileNetV1 1.0, {step['num_classes']} classes, batch {step['batch']}, "
                     f"{step['device']}, {step['threads']} threads): {step['images_per_s']:.1f} images/s")
        largest = max(r["images"] for r in rows)
        for r in rows:
            if r["images"] == largest and 2 in r["images_per_s"]:
                lines.append(f"  {r['impl']} loader at 2 workers: {r['images_per_s'][2]:.1f} images/s, "
                             f"loader/step ratio {r['images_per_s'][2] / step['images_per_s']:.2f}")
    lines.append("")
    lines.append("acceptance (largest size)")
    for c in check_acceptance(result):
        fmt = (lambda v: "-" if v is None else (_pct(v) if "PSS" in c["name"] else f"{v:.2f}"))
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[c["ok"]]
        lines.append(f"  {verdict:<4} {c['name']}: mnapps {fmt(c['mnapps'])} (target {c['target']}), "
                     f"torchvision {fmt(c['torchvision'])}")
    largest = [r for r in rows if r["images"] == max(x["images"] for x in rows) and r.get("epoch_uss_growth")]
    if largest:
        lines.append("  also: workers' USS growth over one epoch of annotation reads, per worker: " + ", ".join(
            f"{r['impl']} {_mib(r['epoch_uss_growth'][w] / w)} MiB ({w} workers)"
            for r in largest for w in sorted(r["epoch_uss_growth"])))


def plot_report(result: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG: total PSS (measured and extrapolated to 8 workers) and start-up time against images."""
    # matplotlib is needed only for --plot; importing it costs every measurement process a second.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(result)
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, colour in zip(IMPLEMENTATIONS, ("tab:blue", "tab:orange")):
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["images"])
        if not mine:
            continue
        images = [r["images"] for r in mine]
        most = mine[0]["max_workers"]
        # After an epoch of reads when measured: that is where copy-on-read has done its work.
        key = "epoch_total_pss" if all("epoch_total_pss" in r for r in mine) else "total_pss"
        ax_mem.plot(images, [r[key][most] / _MB for r in mine], "o-", color=colour,
                    label=f"{impl}, {most} workers (measured)")
        if all(f"{key}_8_workers" in r for r in mine):
            ax_mem.plot(images, [r[f"{key}_8_workers"] / _MB for r in mine], "s--", color=colour,
                        label=f"{impl}, 8 workers (extrapolated)")
        ax_time.plot(images, [r["first_batch_s"] for r in mine], "o-", color=colour,
                     label=f"{impl}: first batch ({mine[0]['first_batch_workers']} workers)")
    for what, style, colour in (("pycocotools", "^:", "gray"), ("mnapps", "v:", "tab:blue")):
        parse = sorted((e["simulation"]["num_images"], e["first_parse"][what]["seconds"])
                       for e in result["sizes"] if what in e["first_parse"])
        label = "pycocotools COCO() load" if what == "pycocotools" else "mnapps first parse (builds the cache)"
        if parse:
            ax_time.plot([p[0] for p in parse], [p[1] for p in parse], style, color=colour, label=label)
    ax_mem.set(xlabel="images in the annotation file", ylabel="main + workers PSS (MiB)",
               title="memory after one epoch of annotation reads")
    ax_time.set(xlabel="images in the annotation file", ylabel="seconds", title="start-up")
    for ax in (ax_mem, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
