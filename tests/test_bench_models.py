"""lab.models (tools/benchmark.py): ratios to the peer and to the machine's peak, the
targets judged from them, and the timer."""

from __future__ import annotations

import pytest

from lab.models import BenchRow, _fill_ratios, check_targets, format_table, time_call


def test_benchmark_ratios_and_targets_from_rows():
    macs = 569_000_000
    rows = [
        BenchRow("timm mobilenetv1_100 eager", 32, 20.0, 2 * macs * 20.0 / 1e9, "cpu", "classifier"),
        BenchRow("mnapps fused channels_last", 32, 46.0, 2 * macs * 46.0 / 1e9, "cpu", "classifier",
                 peer="timm mobilenetv1_100 eager"),
        BenchRow("mnapps ORT fp32", 32, 100.0, 2 * macs * 100.0 / 1e9, "cpu", "classifier",
                 peer="timm mobilenetv1_100 eager"),
        BenchRow("mnapps ORT int8", 32, 140.0, 2 * macs * 140.0 / 1e9, "cpu", "classifier",
                 peer="timm mobilenetv1_100 eager"),
    ]
    peaks = {"cpu": 135.0}
    _fill_ratios(rows, peaks)
    assert rows[1].ratio_to_peer == pytest.approx(2.3)
    # ORT fp32: 100 img/s x 1.138 GFLOP = 113.8 GFLOP/s of a 135 GFLOP/s peak.
    assert rows[2].fraction_of_peak == pytest.approx(113.8 / 135.0)
    result = {"peak_gflops": peaks, "threads": 2, "rows": [r.as_json() for r in rows]}
    checks = {c["row"]: c for c in check_targets(result)}
    assert checks["mnapps fused channels_last"]["met"]  # 2.3 >= 2.2
    assert not checks["mnapps ORT fp32"]["met"]  # 113.8 / 135 = 0.843 < 0.85
    assert checks["mnapps ORT fp32"]["value"] == pytest.approx(0.843, abs=1e-3)
    assert not checks["mnapps ORT int8"]["met"]  # 1.4 < 1.5
    assert "mnapps torch.compile" not in checks  # not measured, not judged
    assert "NOT met" in format_table(result)
    calls = []
    assert time_call(lambda: calls.append(1), warmup=2, repeats=3) >= 0 and len(calls) == 5
