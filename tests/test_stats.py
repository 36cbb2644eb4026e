"""Measured parameters and multiply-adds of the backbone rows against the paper's tables."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from lab import paper_tables as stats
from lab.paper_tables import StatsRow, measure
from mnapps.stats import count_macs, count_params

# Typed from arXiv 1704.04861 (millions): Table 6 (width), Table 7 (resolution), Table 4
# (Conv MobileNet), Table 5 (Shallow MobileNet). (name, Mult-Adds M, Parameters M).
PAPER = [
    ("mobilenet_v1_1.0_224", 569, 4.2),
    ("mobilenet_v1_0.75_224", 325, 2.6),
    ("mobilenet_v1_0.5_224", 149, 1.3),
    ("mobilenet_v1_0.25_224", 41, 0.5),
    ("mobilenet_v1_1.0_192", 418, 4.2),
    ("mobilenet_v1_1.0_160", 290, 4.2),
    ("mobilenet_v1_1.0_128", 186, 4.2),
    ("conv_mobilenet_224", 4866, 29.3),
    ("shallow_mobilenet_224", 307, 2.9),
]
ROOT = Path(__file__).resolve().parents[1]


def _row(name: str) -> StatsRow:
    return next(r for r in stats.ROWS if r.name == name)


@pytest.mark.parametrize("name,paper_macs_m,paper_params_m", PAPER, ids=[p[0] for p in PAPER])
def test_backbone_rows_match_paper(name, paper_macs_m, paper_params_m):
    measured = measure(_row(name))
    # The tolerances: MACs within 1%, parameters within 0.05 M.
    assert measured["macs"] == pytest.approx(paper_macs_m * 1e6, rel=0.01)
    assert abs(measured["params"] - paper_params_m * 1e6) <= 0.05e6
    assert isinstance(measured["macs"], int) and isinstance(measured["params"], int)


def test_rows_carry_the_paper_values():
    for name, macs_m, params_m in PAPER:
        row = _row(name)
        assert row.paper_macs == pytest.approx(macs_m * 1e6)
        assert row.paper_params == pytest.approx(params_m * 1e6)


def test_counters_on_a_hand_computed_model():
    import torch
    from torch import nn

    # conv 3->8, 3x3, no bias, on 10x10 with padding 1: 8*3*9 weights, 8*3*9*100 MACs;
    # linear 8->2 with bias: 16+2 params, 16 MACs.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    assert count_params(model) == 8 * 3 * 9 + 16 + 2
    assert count_macs(model, torch.zeros(1, 3, 10, 10)) == 8 * 3 * 9 * 100 + 16


def _load_tool():
    module = importlib.import_module("lab.model_stats_cli")
    return module


def test_tool_json_and_table(capsys):
    tool = _load_tool()
    assert tool.main(["--json", "--only", "mobilenet_v1_0.25_224"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["mobilenet_v1_0.25_224"]
    assert abs(rows[0]["params"] - 0.5e6) <= 0.05e6 and set(rows[0]) == {"name", "params", "macs"}
    assert tool.main(["--only", "mobilenet_v1_0.25_224"]) == 0
    table = capsys.readouterr().out
    assert "mobilenet_v1_0.25_224" in table and "OK" in table and "41.00" in table


def test_tool_survives_rows_whose_head_is_missing(monkeypatch, capsys):
    tool = _load_tool()

    def missing_head():
        raise ImportError("No module named 'mnapps.heads.not_yet'")

    rows = [_row("mobilenet_v1_0.25_224"), StatsRow("future_head", missing_head, 1e6, 1e6)]
    monkeypatch.setattr(stats, "ROWS", rows)  # the table run() reads
    assert tool.main(["--json"]) == 0
    captured = capsys.readouterr()
    assert [r["name"] for r in json.loads(captured.out)] == ["mobilenet_v1_0.25_224"]
    assert "skipped future_head" in captured.err


def test_tool_rejects_unknown_row(capsys):
    assert _load_tool().main(["--only", "mobilenet_v9"]) == 2
    assert "unknown row" in capsys.readouterr().err
