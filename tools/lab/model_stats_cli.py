"""Print parameter and multiply-add counts of every model in ``lab.paper_tables.ROWS``.

Each model is built and run once (counts are measured, not computed from formulas) and shown
beside the paper's figure with its deviation and whether it is within tolerance. ``--json``
prints only ``[{"name", "params", "macs"}, ...]`` for scripts. A row whose model needs an
optional package that is not installed (facenet-pytorch for the FaceNet teacher) is listed as
skipped instead of breaking the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:  # the table builds models, so it is imported (with torch) only when a run needs it
    from lab.paper_tables import StatsRow


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="exit status 1 when a row is over its tolerance (table mode). "
        "example: python tools/model_stats.py --only mobilenet_v1_1.0_224 --json",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON list of {name, params, macs}")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="measure only these rows (see the table for names)")
    parser.add_argument("--notes", action="store_true", help="print each row's note (input size, what is counted) under the table")
    return parser.parse_args(argv)


def _deviation(measured: int, paper: float | None) -> str:
    return "" if paper is None else f"{(measured - paper) / paper:+.2%}"


def _verdict(row: StatsRow, params: int, macs: int) -> str:
    checks = []
    if row.paper_macs is not None:
        checks.append(abs(macs - row.paper_macs) <= row.macs_tolerance * row.paper_macs)
    if row.paper_params is not None:
        checks.append(abs(params - row.paper_params) <= row.params_tolerance)
    if not checks:
        return "-"
    return "OK" if all(checks) else "OVER TOLERANCE"


def _tolerance(row: StatsRow) -> str:
    params = "any" if row.params_tolerance == float("inf") else f"{row.params_tolerance / 1e6:g}M"
    return f"{row.macs_tolerance:.0%}/{params}"


def _millions(value: float | None) -> str:
    return "" if value is None else f"{value / 1e6:.2f}"


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    from lab.paper_tables import ROWS, measure

    rows = ROWS
    if args.only:
        known = {row.name for row in ROWS}
        unknown = [name for name in args.only if name not in known]
        if unknown:
            print(f"unknown row(s) {unknown}; choose from {sorted(known)}", file=sys.stderr)
            return 2
        rows = [row for row in ROWS if row.name in args.only]

    results, skipped = [], []
    for row in tqdm(rows, desc="measuring", unit="model", file=sys.stderr, disable=None):
        try:
            results.append((row, measure(row)))
        except ImportError as exc:  # an optional package (facenet-pytorch) is missing
            skipped.append((row.name, f"{type(exc).__name__}: {exc}"))

    if args.json:
        print(json.dumps([{k: m[k] for k in ("name", "params", "macs")} for _, m in results], indent=1))
        for name, why in skipped:
            print(f"skipped {name}: {why}", file=sys.stderr)
        return 0

    header = ("name", "params M", "paper", "dev", "MACs M", "paper", "dev", "tolerance", "check")
    lines = [header]
    failures = 0
    for row, m in results:
        verdict = _verdict(row, m["params"], m["macs"])
        failures += verdict == "OVER TOLERANCE"
        lines.append((
            row.name,
            _millions(m["params"]), _millions(row.paper_params), _deviation(m["params"], row.paper_params),
            _millions(m["macs"]), _millions(row.paper_macs), _deviation(m["macs"], row.paper_macs),
            _tolerance(row), verdict,
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    print("tolerance: MACs relative / params absolute, checked only where the paper gives a figure")
    if args.notes:
        for row, _ in results:
            if row.note:
                print(f"- {row.name}: {row.note}")
    return 1 if failures else 0


