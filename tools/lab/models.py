"""Side-by-side speed measurements of the mnapps inference and training paths and their peers.

This module owns what ``tools/benchmark.py`` runs: one process measures, with the same
thread count, warm-up and median-of-repeats rule,

* the rate of a large float32 ``torch.mm`` (a lower bound on what the cores can do, kept as a
  reference), beside the CPU's analytic upper bound (:mod:`lab.cpu_bound`), which no row may pass;
* MobileNetV1-224 classification at batch 1 and 32: mnapps eager NCHW (the training
  model), fused channels_last (:class:`~mnapps.export.predict.Predictor`), ``torch.compile``,
  ONNX Runtime fp32 and int8, and timm's ``mobilenetv1_100`` eager (the same network, the
  peer; random weights, ``pretrained=False``);
* SSD300 end to end (resize + network + decoding/NMS) on 480x640 images: mnapps eager
  (torchvision ``SSD`` in eval mode), mnapps through ONNX Runtime with the shared
  post-processing, and torchvision's ``ssdlite320_mobilenet_v3_large`` eager (peer);
* one SSD300 training step at batch 16 against the same step of torchvision's SSDLite, both
  through the engine's own step (:func:`lab.engine_step.time_engine_steps` runs ``fit``).

Random weights make a detector's scores flat, so every (anchor, class) pair would pass the
score threshold and NMS would dominate the timing, unlike a trained detector. Each detector's
background logit bias is therefore set (once, by bisection on the benchmark images) so that
:data:`SSD_CANDIDATES_PER_IMAGE` pairs per image pass its threshold, the same workload for all.

Each row reports images/s, GFLOP/s (multiply-adds counted by :func:`mnapps.stats.count_macs`,
2 FLOPs each; int8 rows count 2 operations per int8 multiply-add) and its share of the bound of
its precision; :func:`format_table` marks any row above it, since that would mean the bound is
wrong. :func:`check_targets` compares ratios with the issue's targets. Timings are only
comparable within one run on a quiet machine.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from tqdm import tqdm

from lab.cpu_bound import CpuBound, cpu_bound
from lab.engine_step import detector_loss, time_engine_steps
from mnapps.backbones import MobileNetV1
from mnapps.config import TrainConfig
from mnapps.heads.ssd import SSDConfig, build_ssd
from mnapps.stats import count_macs

from mnapps.export.detection import split_ssd
from mnapps.export.fuse import fold_batchnorm
from mnapps.export.onnx import OrtSSD, export_onnx, make_session
from mnapps.export.postprocess import preprocess_images
from mnapps.export.predict import Predictor, SSDPredictor
from mnapps.export.quantize import quantize_onnx

__all__ = [
    "BenchSettings",
    "BenchRow",
    "SECTIONS",
    "measure_mm_rate",
    "time_call",
    "run_benchmark",
    "check_targets",
    "rows_above_bound",
    "format_table",
    "SSD_CANDIDATES_PER_IMAGE",
    "COCO_CLASSES",
]

SECTIONS = ("classifier", "ssd", "train")
SSD_CANDIDATES_PER_IMAGE = 200
COCO_CLASSES = 91  # torchvision's and the TF API's COCO label space, background included


@dataclass
class BenchSettings:
    """How long and what to measure."""

    sections: tuple[str, ...] = SECTIONS
    batches: tuple[int, ...] = (1, 32)
    train_batch: int = 16
    threads: int = 2
    warmup: int = 3
    repeats: int = 10
    devices: tuple[str, ...] = ("cpu",)
    compile: bool = True
    onnx: bool = True
    mm_size: int = 2048

    @classmethod
    def quick(cls, **changes: Any) -> "BenchSettings":
        """A smoke run: small batches, one warm-up, three repeats."""
        base = dict(batches=(1, 4), train_batch=4, warmup=1, repeats=3, mm_size=1024)
        base.update(changes)
        return cls(**base)


@dataclass
class BenchRow:
    """One measured configuration."""

    name: str
    batch: int
    images_per_s: float
    gflops_per_s: float | None
    device: str
    section: str
    peer: str | None = None  # name of the row this one is compared with (same batch)
    ratio_to_peer: float | None = None
    fraction_of_bound: float | None = None  # of the bound of this row's precision; None without one
    note: str = ""
    precision: str = "fp32"  # "int8": GFLOP/s counts int8 operations, held against the int8 bound

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------
# timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], *, warmup: int, repeats: int, device: str = "cpu") -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_mm_rate(device: str = "cpu", size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a ``size x size`` float32 ``torch.mm`` (2 size^3 FLOPs), median of repeats.

    A reference, not a bound: it is what torch's BLAS reaches, which other kernels may pass.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    seconds = time_call(lambda: torch.mm(a, b), warmup=2, repeats=repeats, device=device)
    return 2 * size**3 / seconds / 1e9


# ------------------------------------------------------------------------------------------
# helpers


def _flops_per_s(macs: int | None, images_per_s: float) -> float | None:
    return None if macs is None else 2.0 * macs * images_per_s / 1e9


def _inference(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        with torch.inference_mode():
            return fn()

    return run


def _calibration_images(count: int, size: int, seed: int = 0) -> Tensor:
    """Smooth random images in [-1, 1] (calibration for the speed rows only; accuracy of int8
    is measured on real data by ``tools/export.py --evaluate``)."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(count, 3, 16, 16, generator=generator)
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


def _set_background_bias(model: nn.Module, images: list[Tensor], target: int) -> float:
    """Shift the background logit bias of a torchvision SSD so that about ``target``
    (anchor, class) pairs per image pass ``model.score_thresh``; returns the shift."""
    network, params = split_ssd(model)
    with torch.inference_mode():
        batch, _ = preprocess_images(images, params.size, params.preprocess)
        _, logits, _ = network(batch)
    logits = logits.double()

    def passing(shift: float) -> float:
        shifted = logits.clone()
        shifted[..., 0] += shift
        scores = torch.softmax(shifted, dim=-1)[..., 1:]
        return float((scores > model.score_thresh).sum()) / len(images)

    low, high = -20.0, 40.0
    for _ in range(50):
        middle = (low + high) / 2
        if passing(middle) > target:
            low = middle
        else:
            high = middle
    shift = (low + high) / 2
    num_classes = logits.shape[-1]
    with torch.no_grad():
        for branch in model.head.classification_head.module_list:
            conv = [m for m in branch.modules() if isinstance(m, nn.Conv2d)][-1]
            conv.bias[0::num_classes] += shift
    return shift


def _detection_images(count: int, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(count, 3, 30, 40, generator=generator)
    return list(torch.nn.functional.interpolate(small, size=(480, 640), mode="bilinear", align_corners=False))


def _detection_targets(count: int, num_classes: int, size: tuple[int, int], seed: int = 0) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    targets = []
    height, width = size
    for _ in range(count):
        n = int(torch.randint(1, 6, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        wh = (0.1 + 0.2 * torch.rand(n, 2, generator=generator)) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, num_classes, (n,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


# ------------------------------------------------------------------------------------------
# sections


class _Runner:
    def __init__(self, settings: BenchSettings, device: str, workdir: Path) -> None:
        self.settings = settings
        self.device = device
        self.workdir = workdir
        self.rows: list[BenchRow] = []
        self.bar = tqdm(desc=f"benchmark {device}", unit="row", disable=None)

    def add(self, section: str, name: str, batch: int, fn: Callable[[], Any], macs: int | None, *,
            peer: str | None = None, note: str = "", precision: str = "fp32") -> BenchRow:
        """Time ``fn`` (one call = ``batch`` images) and record its row."""
        s = self.settings
        repeats = s.repeats if batch > 1 else max(s.repeats, 2 * s.repeats)
        seconds = time_call(fn, warmup=s.warmup, repeats=repeats, device=self.device)
        return self.record(section, name, batch, seconds, macs, peer=peer, note=note, precision=precision)

    def record(self, section: str, name: str, batch: int, seconds: float, macs: int | None, *,
               peer: str | None = None, note: str = "", precision: str = "fp32") -> BenchRow:
        """Record a row whose call of ``batch`` images took ``seconds``."""
        row = BenchRow(name, batch, batch / seconds, _flops_per_s(macs, batch / seconds), self.device, section,
                       peer=peer, note=note, precision=precision)
        self.rows.append(row)
        self.bar.set_postfix_str(f"{name} b{batch}: {row.images_per_s:.1f} img/s")
        self.bar.update()
        return row

    # --- MobileNetV1-224 ---------------------------------------------------------------
    def classifier(self) -> None:
        device, s = self.device, self.settings
        torch.manual_seed(0)
        model = MobileNetV1(1.0, 1000).eval().to(device)
        macs = count_macs(model, torch.zeros(1, 3, 224, 224, device=device))
        peer_name = "timm mobilenetv1_100 eager"
        peer = None
        try:
            import timm

            peer = timm.create_model("mobilenetv1_100", pretrained=False).eval().to(device)
            peer_macs = count_macs(peer, torch.zeros(1, 3, 224, 224, device=device))
        except ImportError:
            peer_name = None
        fused = Predictor(model, channels_last=True)
        compiled = Predictor(model, channels_last=True, compile=True) if s.compile else None
        sessions = self._classifier_sessions(model) if (s.onnx and device == "cpu") else []
        for batch in s.batches:
            x = torch.rand(batch, 3, 224, 224, device=device) * 2 - 1
            if peer is not None:
                self.add("classifier", peer_name, batch, _inference(lambda: peer(x)), peer_macs)
            self.add("classifier", "mnapps eager NCHW", batch, _inference(lambda: model(x)), macs, peer=peer_name)
            x_cl = fused.prepare(x)
            self.add("classifier", "mnapps fused channels_last", batch, lambda: fused(x_cl), macs, peer=peer_name)
            if compiled is not None:
                self.add("classifier", "mnapps torch.compile", batch, lambda: compiled(x_cl), macs, peer=peer_name,
                         note="fused, channels_last, Inductor (freezing on CPU)")
            for name, precision, session in sessions:
                feed = {session.get_inputs()[0].name: x.cpu().numpy()}
                self.add("classifier", name, batch, lambda: session.run(None, feed), macs, peer=peer_name,
                         precision=precision)

    def _classifier_sessions(self, model: nn.Module) -> list[tuple[str, str, Any]]:
        """(row name, precision, ONNX Runtime session) of the fp32 and the int8 classifier."""
        fp32 = export_onnx(fold_batchnorm(model).cpu(), torch.rand(2, 3, 224, 224) * 2 - 1,
                           self.workdir / "mobilenet_v1.onnx", output_names=("logits",))
        int8 = quantize_onnx(fp32, self.workdir / "mobilenet_v1.int8.onnx", list(_calibration_images(8, 224).split(1)))
        threads = self.settings.threads
        return [
            ("mnapps ORT fp32", "fp32", make_session(fp32, threads=threads, providers=["CPUExecutionProvider"])),
            ("mnapps ORT int8", "int8", make_session(int8, threads=threads, providers=["CPUExecutionProvider"])),
        ]

    # --- SSD300 end to end --------------------------------------------------------------
    def ssd(self) -> None:
        device, s = self.device, self.settings
        torch.manual_seed(0)
        model = build_ssd(SSDConfig(size=300), num_classes=COCO_CLASSES).eval()
        peer = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=COCO_CLASSES).eval()
        calibration = _detection_images(4, seed=1)
        _set_background_bias(model, calibration, SSD_CANDIDATES_PER_IMAGE)
        _set_background_bias(peer, calibration, SSD_CANDIDATES_PER_IMAGE)
        network, params = split_ssd(model)
        macs = count_macs(network, torch.zeros(1, 3, 300, 300))
        fast = SSDPredictor(model, channels_last=True, device=device)
        peer_network, _ = split_ssd(peer)
        peer_macs = count_macs(peer_network, torch.zeros(1, 3, 320, 320))
        model, peer = model.to(device), peer.to(device)
        detector = None
        if s.onnx and device == "cpu":
            path = export_onnx(fold_batchnorm(network), torch.rand(2, 3, 300, 300), self.workdir / "ssd300.onnx",
                               output_names=("bbox_regression", "cls_logits", "anchors"),
                               metadata={"ssd_postprocess": params.to_json()})
            detector = OrtSSD(path, threads=s.threads, providers=["CPUExecutionProvider"])
        peer_name = "torchvision ssdlite320_mobilenet_v3_large eager"
        for batch in s.batches:
            images = [image.to(device) for image in _detection_images(batch)]
            self.add("ssd", peer_name, batch, _inference(lambda: peer(images)), peer_macs,
                     note="end to end, 480x640 images")
            self.add("ssd", "mnapps SSD300 eager", batch, _inference(lambda: model(images)), macs, peer=peer_name,
                     note="end to end, 480x640 images")
            self.add("ssd", "mnapps SSD300 fused channels_last", batch, lambda: fast(images), macs, peer=peer_name,
                     note="resize + Predictor network + shared post-processing")
            if detector is not None:
                cpu_images = [image.cpu() for image in images]
                self.add("ssd", "mnapps SSD300 ORT fp32", batch, lambda: detector(cpu_images), macs, peer=peer_name,
                         note="resize + ORT + shared post-processing")

    # --- SSD300 training step -----------------------------------------------------------
    def train(self) -> None:
        """Both detectors through the engine's step (``fit``), with the engine's default
        settings (channels_last; AMP on CUDA) and SGD at a small lr, so random weights stay finite."""
        device, s = self.device, self.settings
        torch.manual_seed(0)
        batch = s.train_batch
        models = {
            "torchvision ssdlite320_mobilenet_v3_large train step": ssdlite320_mobilenet_v3_large(
                weights=None, weights_backbone=None, num_classes=COCO_CLASSES),
            "mnapps SSD300 train step": build_ssd(SSDConfig(size=300), num_classes=COCO_CLASSES),
        }
        images = [torch.rand(3, 300, 300) for _ in range(batch)]
        targets = _detection_targets(batch, COCO_CLASSES, (300, 300))
        cfg = TrainConfig(optimizer="sgd", lr=1e-3, momentum=0.9, num_threads=s.threads)
        peer_name = next(iter(models))
        for name, model in models.items():
            steps = time_engine_steps(model, (images, targets), detector_loss, cfg, images=batch, device=device,
                                      warmup=s.warmup, repeats=max(2, s.repeats // 2))
            self.record("train", name, batch, statistics.median(steps), None,
                        peer=None if name == peer_name else peer_name, note="the engine's step (fit)")


def run_benchmark(settings: BenchSettings) -> dict[str, Any]:
    """Run the selected sections on each device.

    Returns:
        ``{"threads", "mm_gflops": {device: measured torch.mm GFLOP/s}, "bounds": {device: the
        CPU's bound as a dict (``fp32_gflops``, ``int8_gops``, ``description``), or None on a
        GPU}, "rows": [BenchRow as a dict]}``.
    """
    unknown = sorted(set(settings.sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown benchmark section(s) {unknown}; choose from {list(SECTIONS)}")
    torch.set_num_threads(settings.threads)
    mm_rates: dict[str, float] = {}
    bounds: dict[str, dict[str, Any] | None] = {}
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="mnapps-bench-") as workdir:
        for device in settings.devices:
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"device {device!r} requested but CUDA is not available")
            bounds[device] = _bound_json(cpu_bound(settings.threads)) if device == "cpu" else None
            mm_rates[device] = measure_mm_rate(device, settings.mm_size)
            runner = _Runner(settings, device, Path(workdir))
            try:
                for section in settings.sections:
                    getattr(runner, section)()
            finally:
                runner.bar.close()
            rows.extend(runner.rows)
    _fill_ratios(rows, bounds)
    return {"threads": settings.threads, "mm_gflops": mm_rates, "bounds": bounds,
            "rows": [r.as_json() for r in rows]}


def _bound_json(bound: CpuBound) -> dict[str, Any]:
    return {"fp32_gflops": bound.fp32_gflops, "int8_gops": bound.int8_gops, "description": bound.describe()}


def _bound_of(bounds: dict[str, dict[str, Any] | None], device: str, precision: str) -> float | None:
    """The bound a row of ``precision`` on ``device`` is held against; None where there is none."""
    bound = bounds.get(device)
    if bound is None:
        return None
    return bound["int8_gops"] if precision == "int8" else bound["fp32_gflops"]


def _fill_ratios(rows: list[BenchRow], bounds: dict[str, dict[str, Any] | None]) -> None:
    by_key = {(r.name, r.batch, r.device): r for r in rows}
    for row in rows:
        if row.peer is not None and (row.peer, row.batch, row.device) in by_key:
            row.ratio_to_peer = row.images_per_s / by_key[(row.peer, row.batch, row.device)].images_per_s
        limit = _bound_of(bounds, row.device, row.precision)
        if row.gflops_per_s is not None and limit is not None:
            row.fraction_of_bound = row.gflops_per_s / limit


# ------------------------------------------------------------------------------------------
# reporting

# (row, reference row or "mm", minimum ratio, batch): the speed targets the benchmark checks.
# "mm" is the rate a measured torch.mm implies (torch.mm GFLOP/s / (2 x MACs)): the targets were
# set against it, and it is a reference, not a limit, so a target above 1 is not a contradiction.
TARGETS = (
    ("mnapps fused channels_last", "timm mobilenetv1_100 eager", 2.2, 32),
    ("mnapps torch.compile", "timm mobilenetv1_100 eager", 3.0, 32),
    ("mnapps ORT fp32", "mm", 0.85, 32),
    ("mnapps ORT int8", "mnapps ORT fp32", 1.5, 32),
    ("mnapps SSD300 ORT fp32", "mnapps SSD300 eager", 2.0, 32),
)


def _target_value(row: dict[str, Any], reference: str, device_rows: list[dict[str, Any]],
                  mm_gflops: float) -> float | None:
    if reference == "mm":
        return None if row["gflops_per_s"] is None else row["gflops_per_s"] / mm_gflops
    ref = next((r for r in device_rows if r["name"] == reference and r["batch"] == row["batch"]), None)
    return None if ref is None else row["images_per_s"] / ref["images_per_s"]


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's speed targets, evaluated on ``result`` (rows present in it only).

    The ORT fp32 target is relative to the rate a measured ``torch.mm`` implies,
    ``mm GFLOP/s / (2 x MACs)``. Batch 32 targets use the largest measured batch when 32 was not run.
    """
    rows = result["rows"]
    checks = []
    for device, mm_gflops in result["mm_gflops"].items():
        device_rows = [r for r in rows if r["device"] == device]
        if not device_rows:
            continue
        largest = max(r["batch"] for r in device_rows)
        for name, reference, minimum, batch in TARGETS:
            batch = batch if any(r["batch"] == batch for r in device_rows) else largest
            row = next((r for r in device_rows if r["name"] == name and r["batch"] == batch), None)
            value = None if row is None else _target_value(row, reference, device_rows, mm_gflops)
            if value is None:
                continue
            checks.append({"device": device, "row": name, "reference": reference, "batch": batch,
                           "value": value, "target": minimum, "met": bool(value >= minimum)})
    return checks


def rows_above_bound(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows faster than their bound: each one means the bound is wrong for this machine."""
    return [r for r in result["rows"] if r["fraction_of_bound"] is not None and r["fraction_of_bound"] > 1.0]


def _header(result: dict[str, Any]) -> list[str]:
    lines = []
    for device, mm_gflops in result["mm_gflops"].items():
        bound = result["bounds"].get(device)
        if bound is not None:
            lines.append(f"{device}: {bound['description']}")
        else:
            lines.append(f"{device}: no analytic bound is worked out for a GPU; '% bound' stays empty")
        lines.append(f"{device}: torch.mm float32 measured {mm_gflops:.1f} GFLOP/s ({result['threads']} threads): "
                     f"a reference, not a limit")
    return lines


def _row_line(row: dict[str, Any], peers: set[tuple[str, int, str]]) -> str:
    if row["ratio_to_peer"] is not None:
        ratio = f"{row['ratio_to_peer']:.2f}"
    else:
        ratio = "peer" if (row["name"], row["batch"], row["device"]) in peers else ""
    gflops = f"{row['gflops_per_s']:.1f}" if row["gflops_per_s"] is not None else "-"
    share = row["fraction_of_bound"]
    share_text = "-" if share is None else f"{100 * share:.0f}%" + ("!" if share > 1.0 else "")
    return (f"{row['name']:<52} {row['device']:<5} {row['batch']:>5} {row['images_per_s']:>9.1f} "
            f"{ratio:>7} {gflops:>8} {share_text:>7}")


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table: the bound and the torch.mm reference, one line per row, the targets."""
    lines = _header(result)
    header = f"{'name':<52} {'dev':<5} {'batch':>5} {'img/s':>9} {'x peer':>7} {'GFLOP/s':>8} {'% bound':>7}"
    lines += [header, "-" * len(header)]
    section = None
    peers = {(r["peer"], r["batch"], r["device"]) for r in result["rows"] if r["peer"]}
    for row in sorted(result["rows"], key=lambda r: (r["device"], r["section"], r["batch"])):
        if (row["device"], row["section"], row["batch"]) != section:
            if section is not None:
                lines.append("")
            section = (row["device"], row["section"], row["batch"])
        lines.append(_row_line(row, peers))
    for row in rows_above_bound(result):
        lines.append(f"ABOVE THE BOUND: {row['name']} @ batch {row['batch']} ({row['device']}) runs at "
                     f"{100 * row['fraction_of_bound']:.0f}% of it; the bound's clock is too low for this machine")
    checks = check_targets(result)
    if checks:
        lines += ["", "speed targets:"]
        for c in checks:
            reference = "torch.mm-implied rate" if c["reference"] == "mm" else c["reference"]
            lines.append(f"  {c['row']} / {reference} @ batch {c['batch']} ({c['device']}): {c['value']:.2f} "
                         f"(target >= {c['target']:g}) {'met' if c['met'] else 'NOT met'}")
    return "\n".join(lines)
