"""lab.models (tools/benchmark.py): the CPU's bound worked out from its flags and clock, every
row of a real run under it, ratios to the peer and to the bound, the targets, the timer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lab.cpu_bound import bound_from_text
from lab.engine_step import time_engine_steps
from lab.models import BenchRow, BenchSettings, _fill_ratios, check_targets, format_table, run_benchmark, time_call
from mnapps.config import TrainConfig

EPYC_LSCPU = """Architecture:                            x86_64
CPU(s):                                  2
Model name:                              AMD EPYC 9R14 96-Core Processor
CPU max MHz:                             3700.0000
CPU min MHz:                             1500.0000
Flags:                                   fpu sse2 avx fma avx2 avx512f avx512_vnni
"""
# Two processors of a KVM guest, as /proc/cpuinfo lists them (no lscpu installed).
GUEST_CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: 2599.998
flags\t\t: fpu sse2 avx fma avx2
processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: 2800.000
flags\t\t: fpu sse2 avx fma avx2
"""


def test_bound_is_cores_clock_fma_units_lanes_and_two_flops():
    epyc = bound_from_text(EPYC_LSCPU, "", threads=2, cpus_available=2)
    # 2 cores x 3.7 GHz x 2 FMA units x 16 lanes x 2 = 473.6; int8: 2 x 16 x 4 = 128 MACs/cycle.
    assert epyc.fp32_gflops == pytest.approx(473.6)
    assert epyc.int8_gops == pytest.approx(2 * 3.7 * 128 * 2)
    assert epyc.model == "AMD EPYC 9R14 96-Core Processor" and epyc.clock_source == "lscpu CPU max MHz"
    assert "2 FMA units/core (architectural maximum" in epyc.describe() and "avx512f" in epyc.describe()

    guest = bound_from_text("", GUEST_CPUINFO, threads=8, cpus_available=4)
    # 8 threads on 4 CPUs use 4 cores; the highest cpu MHz; avx2+fma: 8 lanes.
    assert guest.cores == 4 and guest.mhz == 2800.0 and guest.units.name == "avx2+fma"
    assert guest.fp32_gflops == pytest.approx(4 * 2.8 * 2 * 8 * 2)  # 358.4
    assert guest.int8_gops == pytest.approx(4 * 2.8 * 64 * 2)  # 1433.6
    assert guest.clock_source.startswith("/proc/cpuinfo cpu MHz")

    amx = bound_from_text("CPU max MHz: 2000\nFlags: avx512f avx2 fma amx_int8\n", "", threads=1, cpus_available=2)
    assert amx.fp32_gflops == pytest.approx(1 * 2.0 * 2 * 16 * 2)  # 128
    assert amx.int8_gops == pytest.approx(1 * 2.0 * 1024 * 2)  # 4096: the AMX tile unit

    # AVX without FMA: a multiply port and an add port, 8 lanes: 3 GHz x 8 x 2 = 48 per core.
    avx = bound_from_text("", "cpu MHz : 3000\nflags : sse2 avx\n", threads=1, cpus_available=1)
    assert avx.fp32_gflops == pytest.approx(48.0)

    with pytest.raises(ValueError, match="no known vector unit"):
        bound_from_text("", "cpu MHz : 3000\nflags : fpu\n", threads=1, cpus_available=1)
    with pytest.raises(ValueError, match="gives the clock"):
        bound_from_text("", "flags : avx2 fma\n", threads=1, cpus_available=1)


@pytest.mark.slow
def test_no_row_of_a_real_run_passes_the_stated_bound():
    """The classifier rows (eager, fused, ONNX Runtime fp32 and int8) of a short real run: ORT
    fp32 once ran at 2.56x a torch.mm "peak"; no row may pass the analytic bound."""
    settings = BenchSettings(sections=("classifier",), batches=(4,), warmup=1, repeats=2, compile=False, mm_size=512)
    result = run_benchmark(settings)
    bound = result["bounds"]["cpu"]
    rows = {row["name"]: row for row in result["rows"]}
    assert {"mnapps eager NCHW", "mnapps fused channels_last", "mnapps ORT fp32", "mnapps ORT int8"} <= set(rows)
    for row in result["rows"]:
        limit = bound["int8_gops"] if row["precision"] == "int8" else bound["fp32_gflops"]
        assert 0 < row["gflops_per_s"] <= limit, row
        assert row["fraction_of_bound"] == pytest.approx(row["gflops_per_s"] / limit)
    assert rows["mnapps ORT int8"]["precision"] == "int8" and rows["mnapps ORT fp32"]["precision"] == "fp32"
    table = format_table(result)
    assert "fp32 bound" in table and "% bound" in table and "ABOVE THE BOUND" not in table


def test_benchmark_ratios_and_targets_from_rows():
    macs = 569_000_000
    rows = [
        BenchRow("timm mobilenetv1_100 eager", 32, 20.0, 2 * macs * 20.0 / 1e9, "cpu", "classifier"),
        BenchRow("mnapps fused channels_last", 32, 46.0, 2 * macs * 46.0 / 1e9, "cpu", "classifier",
                 peer="timm mobilenetv1_100 eager"),
        BenchRow("mnapps ORT fp32", 32, 100.0, 2 * macs * 100.0 / 1e9, "cpu", "classifier",
                 peer="timm mobilenetv1_100 eager"),
        BenchRow("mnapps ORT int8", 32, 140.0, 2 * macs * 140.0 / 1e9, "cpu", "classifier",
                 peer="timm mobilenetv1_100 eager", precision="int8"),
    ]
    bounds = {"cpu": {"fp32_gflops": 200.0, "int8_gops": 150.0, "description": "test bound"}}
    _fill_ratios(rows, bounds)
    assert rows[1].ratio_to_peer == pytest.approx(2.3)
    # ORT fp32: 100 img/s x 1.138 GFLOP = 113.8 GFLOP/s of a 200 GFLOP/s bound.
    assert rows[2].fraction_of_bound == pytest.approx(113.8 / 200.0)
    # int8 is held against its own bound: 159.32 GOP/s of 150 (made too low here on purpose).
    assert rows[3].fraction_of_bound == pytest.approx(159.32 / 150.0)
    result = {"mm_gflops": {"cpu": 135.0}, "bounds": bounds, "threads": 2, "rows": [r.as_json() for r in rows]}
    checks = {c["row"]: c for c in check_targets(result)}
    assert checks["mnapps fused channels_last"]["met"]  # 2.3 >= 2.2
    assert not checks["mnapps ORT fp32"]["met"]  # against the torch.mm rate: 113.8 / 135 = 0.843 < 0.85
    assert checks["mnapps ORT fp32"]["value"] == pytest.approx(0.843, abs=1e-3)
    assert not checks["mnapps ORT int8"]["met"]  # 1.4 < 1.5
    assert "mnapps torch.compile" not in checks  # not measured, not judged
    table = format_table(result)
    assert "NOT met" in table and "torch.mm-implied rate" in table
    assert "ABOVE THE BOUND: mnapps ORT int8 @ batch 32 (cpu) runs at 106%" in table
    assert table.count("ABOVE THE BOUND") == 1
    calls = []
    assert time_call(lambda: calls.append(1), warmup=2, repeats=3) >= 0 and len(calls) == 5


def test_engine_step_timing_runs_fits_own_steps_with_the_configs_optimiser():
    """time_engine_steps must run exactly warmup + repeats steps of fit's step with the config's
    optimiser: plain SGD on a least-squares line, worked out here step by step in float64."""
    x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0], [-1.0, 1.0]])
    t = np.array([1.0, -2.0, 3.0, 0.5])
    w = np.array([0.3, -0.2])
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w[None]).float())

    def loss_fn(net, batch, device):
        inputs, targets = batch
        return {"loss_l2": ((net(inputs.to(device)).squeeze(1) - targets.to(device)) ** 2).mean()}

    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0, schedule="constant",
                      channels_last=False, num_threads=1)
    batch = (torch.tensor(x, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    seconds = time_engine_steps(model, batch, loss_fn, cfg, images=4, warmup=2, repeats=3)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    for _ in range(5):  # 2 warm-up + 3 timed steps
        w = w - 0.05 * 2 / len(t) * x.T @ (x @ w - t)
    np.testing.assert_allclose(model.weight.detach().double().numpy()[0], w, rtol=1e-5)
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_engine_steps(model, batch, loss_fn, cfg, images=4, repeats=0)
