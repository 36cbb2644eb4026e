"""The CPU's arithmetic upper bound, worked out from what the CPU says about itself.

This module owns the figure the benchmark holds every row against. A timed ``torch.mm`` is
only a lower bound on what the cores can do (ONNX Runtime once ran at 2.56x such a "peak"),
so the bound is analytic instead::

    GFLOP/s <= cores used x clock (GHz) x FMA units per core x vector lanes x 2 FLOPs per FMA

The lanes come from the instruction-set flags (``avx512f``: 16 fp32 lanes; ``avx2`` with
``fma``: 8). How many FMA units a core has cannot be read from lscpu or /proc/cpuinfo (Intel
parts with one AVX-512 unit and AMD Zen 4, which splits AVX-512 into two 256-bit halves, show the
same flags as parts with two), so the architectural maximum of 2 is taken: the bound can only be
too high, never too low. The clock is lscpu's "CPU max MHz" where it is given, else the highest
"cpu MHz" in /proc/cpuinfo, and the bound says which it used: the latter is the clock the
kernel was told (under a hypervisor usually the nominal one), and a core running a turbo clock
above it is the one way a row could pass the bound. int8 rows are held against their own bound:
4 int8 multiply-adds per 32-bit lane (VNNI's dot product) or, with AMX, 1024 per core and cycle.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VectorUnits", "CpuBound", "VECTOR_UNITS", "cpu_bound", "bound_from_text", "vector_units"]

# The architectural maximum of FMA units per core on x86 (not readable from the flags).
MAX_FMA_UNITS = 2
# int8 multiply-adds per 32-bit lane of one fused dot-product instruction (VPDPBUSD).
INT8_MACS_PER_LANE = 4
# int8 multiply-adds per core and cycle of an AMX tile unit (Intel: 2048 int8 ops/cycle/core).
AMX_INT8_MACS_PER_CYCLE = 1024


@dataclass(frozen=True)
class VectorUnits:
    """One instruction set's float32 width and FMA units, and the flags that announce it."""

    name: str
    flags: frozenset[str]  # all must be present
    fp32_lanes: int
    fma_units: int  # per core; a separate multiply and add port count as one FMA unit


# Widest first: the first entry whose flags the CPU has is its vector unit.
VECTOR_UNITS = (
    VectorUnits("avx512f", frozenset({"avx512f"}), 16, MAX_FMA_UNITS),
    VectorUnits("avx2+fma", frozenset({"avx2", "fma"}), 8, MAX_FMA_UNITS),
    # AVX and SSE have no FMA: one multiply and one add port give 2 FLOPs per lane and cycle.
    VectorUnits("avx", frozenset({"avx"}), 8, 1),
    VectorUnits("sse2", frozenset({"sse2"}), 4, 1),
    # Arm NEON: 4 fp32 lanes; the widest cores (Neoverse V1/V2, Apple) have 4 FMA pipes.
    VectorUnits("asimd", frozenset({"asimd"}), 4, 4),
)


def vector_units(flags: set[str]) -> VectorUnits:
    """The widest entry of :data:`VECTOR_UNITS` whose flags are all in ``flags``."""
    for units in VECTOR_UNITS:
        if units.flags <= flags:
            return units
    raise ValueError(f"no known vector unit among the CPU flags; expected one of {[u.name for u in VECTOR_UNITS]}")


@dataclass(frozen=True)
class CpuBound:
    """The upper bound on arithmetic throughput of ``cores`` cores, and how it was worked out.

    Attributes:
        model: the CPU's model name as lscpu or /proc/cpuinfo gives it.
        cores: the cores the benchmark's threads can use: ``min(threads, CPUs this process may run on)``.
        mhz: the clock used, in MHz.
        clock_source: where ``mhz`` came from (lscpu's max MHz, or /proc/cpuinfo's cpu MHz).
        units: the vector unit read from the flags.
        amx_int8: whether the flags announce AMX int8 tiles.
    """

    model: str
    cores: int
    mhz: float
    clock_source: str
    units: VectorUnits
    amx_int8: bool = False

    @property
    def fp32_gflops(self) -> float:
        """cores x GHz x FMA units x fp32 lanes x 2 FLOPs per FMA."""
        return self.cores * self.mhz / 1e3 * self.units.fma_units * self.units.fp32_lanes * 2

    @property
    def int8_gops(self) -> float:
        """cores x GHz x int8 multiply-adds per core and cycle x 2 operations each."""
        per_cycle = self.units.fma_units * self.units.fp32_lanes * INT8_MACS_PER_LANE
        if self.amx_int8:
            per_cycle = max(per_cycle, AMX_INT8_MACS_PER_CYCLE)
        return self.cores * self.mhz / 1e3 * per_cycle * 2

    def describe(self) -> str:
        """The bound and every factor of it, with where each factor came from."""
        units = self.units
        lines = [
            f"fp32 bound {self.fp32_gflops:.1f} GFLOP/s = {self.cores} cores x {self.mhz / 1e3:.3f} GHz "
            f"({self.clock_source}) x {units.fma_units} FMA units/core (architectural maximum, not readable "
            f"from the flags) x {units.fp32_lanes} fp32 lanes ({units.name}) x 2 FLOPs/FMA",
            f"int8 bound {self.int8_gops:.1f} GOP/s = the same cores and clock x "
            + (f"{AMX_INT8_MACS_PER_CYCLE} int8 MACs/cycle/core (amx_int8)" if self.amx_int8 else
               f"{units.fma_units} x {units.fp32_lanes} lanes x {INT8_MACS_PER_LANE} int8 MACs/lane")
            + " x 2 ops/MAC",
        ]
        return f"{self.model}\n  " + "\n  ".join(lines)


def _field(text: str, name: str) -> str | None:
    """The value of the first ``name: value`` line of lscpu or /proc/cpuinfo text."""
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*?)\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    return match.group(1) if match and match.group(1) else None


def bound_from_text(lscpu: str, cpuinfo: str, *, threads: int, cpus_available: int) -> CpuBound:
    """Work the bound out from lscpu's and /proc/cpuinfo's text (either may be empty).

    Args:
        lscpu: the output of ``lscpu`` ("" when it is not installed).
        cpuinfo: the text of /proc/cpuinfo ("" when there is none).
        threads: the threads the benchmark runs with.
        cpus_available: the CPUs this process may run on.
    """
    if threads < 1 or cpus_available < 1:
        raise ValueError(f"threads and cpus_available must be >= 1, got {threads} and {cpus_available}")
    flags_text = _field(lscpu, "Flags") or _field(cpuinfo, "flags") or _field(cpuinfo, "Features") or ""
    flags = set(flags_text.split())
    max_mhz = _field(lscpu, "CPU max MHz")
    if max_mhz is not None:
        mhz, source = float(max_mhz), "lscpu CPU max MHz"
    else:
        current = [float(v) for v in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, flags=re.MULTILINE)]
        if not current:
            raise ValueError("neither lscpu's 'CPU max MHz' nor /proc/cpuinfo's 'cpu MHz' gives the clock")
        mhz, source = max(current), "/proc/cpuinfo cpu MHz; a turbo clock above it is not visible there"
    model = _field(lscpu, "Model name") or _field(cpuinfo, "model name") or "unknown CPU"
    return CpuBound(model=model, cores=min(threads, cpus_available), mhz=mhz, clock_source=source,
                    units=vector_units(flags), amx_int8="amx_int8" in flags)


def _lscpu_text() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                              env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def cpu_bound(threads: int) -> CpuBound:
    """The bound of this machine for a run on ``threads`` threads."""
    cpuinfo = Path("/proc/cpuinfo")
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return bound_from_text(_lscpu_text(), cpuinfo.read_text() if cpuinfo.is_file() else "",
                           threads=threads, cpus_available=available)
