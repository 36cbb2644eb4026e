"""What the data path costs at COCO scale: ``tools/bench_data.py``'s measurements.

This module owns the measurements on the simulated COCO file of :mod:`lab.coco_sim`:
:func:`run_scale_benchmark` runs each in a fresh Python process (:func:`run_isolated`), so that
no figure inherits another's heap (:mod:`lab.data_report` summarises and plots them):

* ``first_parse``: mnapps' first construction (JSON parse, validation, index, cache write)
  and pycocotools' own ``COCO()`` load, with the peak RSS of each;
* ``loader``: for mnapps' :class:`~mnapps.data.coco.CocoDetection` with
  :func:`~mnapps.data.transforms.build_det_transforms` (SSD recipe, 300 px) and for the
  torchvision reference (``torchvision.datasets.CocoDetection`` +
  ``wrap_dataset_for_transforms_v2``, its SSD augmentation and a 300x300 resize, images
  without boxes removed as its detection reference does): time to first batch (from dataset
  construction, mnapps with its cached index), then PSS and USS (``/proc/<pid>/smaps_rollup``)
  of the main process and summed over the DataLoader workers after the first and after the
  last of several passes of a fixed number of random batches through persistent workers, and
  the loader's images/s over the passes after the first;
* ``annotation epoch`` (same process, after the passes): fresh workers read every sample's
  annotations once, without decoding (each dataset's own sample path with the image replaced
  by a placeholder), and their PSS/USS are read at its start and end. A full epoch of reads
  is what turns shared pages private when per-image Python objects are touched; pixels do
  not matter for it, so it takes seconds even at 118k images.

PSS divides each shared page among the processes sharing it, so the sum over processes is
what the machine really spends; USS counts only private pages, so a worker's USS growing pass
after pass is the copy-on-read effect itself.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Sampler, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from mnapps.data.coco import CocoDetection, collate_fn
from mnapps.data.coco_index import index_cache_paths, load_coco_index
from mnapps.data.transforms import build_det_transforms

from .coco_sim import COCO_TRAIN2017_IMAGES, prepare_image_pool, write_coco_simulation

__all__ = ["IMPLEMENTATIONS", "ScaleSettings", "process_memory", "child_pids", "torchvision_ssd_transforms",
           "measure_first_parse", "measure_loader", "run_isolated", "run_scale_benchmark", "machine_description"]

IMPLEMENTATIONS = ("mnapps", "torchvision")
_MB = 1 << 20

# ------------------------------------------------------------------------------------------
# memory of processes


def process_memory(pid: int | None = None) -> dict[str, int]:
    """``{"rss", "pss", "uss"}`` in bytes of one process, from ``/proc/<pid>/smaps_rollup``.

    Raises:
        OSError: not Linux (or a kernel before 4.14), or the process is gone.
    """
    path = Path(f"/proc/{os.getpid() if pid is None else pid}/smaps_rollup")
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise OSError(f"{path} not found: PSS/USS need Linux 4.14+ and a live process") from err
    fields: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def child_pids(pid: int | None = None) -> list[int]:
    """Process ids whose parent is ``pid`` (this process by default): DataLoader workers."""
    pid = os.getpid() if pid is None else pid
    children: set[int] = set()
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            children.update(int(c) for c in (task / "children").read_text().split())
        return sorted(children)
    except OSError:
        pass  # kernels without CONFIG_PROC_CHILDREN: scan every process's parent
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return sorted(children)


def _memory_snapshot() -> dict[str, Any]:
    workers = [process_memory(p) for p in child_pids()]
    main = process_memory()
    return {"main_pss": main["pss"], "main_uss": main["uss"], "main_rss": main["rss"],
            "workers": len(workers),
            "workers_pss": sum(m["pss"] for m in workers), "workers_uss": sum(m["uss"] for m in workers)}


def _peak_rss() -> int:
    """Peak resident set of this process in bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM line; peak memory needs Linux")


# ------------------------------------------------------------------------------------------
# the datasets under test


def _tv_collate(batch):
    return tuple(zip(*batch))


def _count(batch) -> int:
    return len(batch)


def _targets_only(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray):
    # mnapps' transform contract, without the pixel work: the annotation side of a sample only.
    return torch.empty(0), torch.from_numpy(boxes), torch.from_numpy(labels)


class _MnappsDataset(CocoDetection):
    """mnapps' dataset; with ``decode = False`` images are not read (an all-zero view of their size)."""

    decode = True

    def _load_image(self, path, expected):
        if self.decode:
            return super()._load_image(path, expected)
        width, height = expected if expected is not None else (1, 1)
        return np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (int(height), int(width), 3))


class _TorchvisionDataset(torchvision.datasets.CocoDetection):
    """torchvision's dataset; with ``decode = False`` images are not read (a 1x1 placeholder)."""

    decode = True

    def _load_image(self, id: int):
        if self.decode:
            return super()._load_image(id)
        self.coco.loadImgs(id)[0]["file_name"]  # the look-up the real method makes
        return Image.new("RGB", (1, 1))


def torchvision_ssd_transforms(size: int = 300):
    """torchvision's SSD training augmentation (its detection reference's "ssd" preset) + a resize.

    Photometric distortion, zoom out onto the mean colour up to 4x, the SSD IoU crop and a
    horizontal flip, as ``references/detection/presets.py`` composes them with transforms v2;
    the reference leaves resizing to the model, here images are resized to ``size`` so that
    both loaders deliver the same 300x300 tensors.
    """
    mean = [123.0, 117.0, 104.0]
    return v2.Compose([
        v2.ToImage(),
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomZoomOut(fill={tv_tensors.Image: mean, "others": 0}, side_range=(1.0, 4.0), p=0.5),
        v2.RandomIoUCrop(),
        v2.RandomHorizontalFlip(p=0.5),
        v2.Resize((size, size)),
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(),
    ])


def _build_dataset(impl: str, ann_file: str, image_dir: str, size: int):
    if impl == "mnapps":
        return _MnappsDataset(ann_file, image_dir, build_det_transforms(True, size, "ssd")), collate_fn
    if impl == "torchvision":
        base = _TorchvisionDataset(image_dir, ann_file, transforms=torchvision_ssd_transforms(size))
        dataset = torchvision.datasets.wrap_dataset_for_transforms_v2(base)
        # The reference trains only on images with a box of more than 1 px in both sides
        # (RandomIoUCrop needs boxes); mnapps keeps the others as background.
        keep = [i for i, image_id in enumerate(base.ids)
                if any(a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in base.coco.imgToAnns.get(image_id, []))]
        return Subset(dataset, keep), _tv_collate
    raise ValueError(f"unknown implementation {impl!r}; choose from {list(IMPLEMENTATIONS)}")


class _RandomSamples(Sampler[int]):
    """``count`` distinct random indices, a new draw per pass.

    Unlike ``RandomSampler(num_samples=count)``, no Python list of all ``n`` indices is made
    per pass: allocating 118k ints in the main process writes to heap pages it shares with
    the workers, which then count as the workers' private memory and blur what the dataset
    itself costs.
    """

    def __init__(self, n: int, count: int, generator: torch.Generator) -> None:
        self.n, self.count, self.generator = n, min(count, n), generator

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator)[: self.count].tolist())


def _annotations_only(dataset) -> None:
    """Switch a dataset from :func:`_build_dataset` to annotation reads: no decoding, no augmentation."""
    if isinstance(dataset, _MnappsDataset):
        dataset.decode, dataset.transforms = False, _targets_only
    else:  # Subset(wrapper(_TorchvisionDataset))
        wrapper = dataset.dataset
        wrapper._dataset.decode, wrapper.transforms = False, None


def _wait_for_workers_to_exit(timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while child_pids():
        if time.monotonic() > deadline:
            raise RuntimeError(f"DataLoader workers {child_pids()} still alive {timeout_s:g} s after their loader "
                               "was deleted; the next memory reading would count them")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------
# measurements (each meant to run in its own process: see run_isolated)


def measure_first_parse(ann_file: str | Path, what: str) -> dict[str, Any]:
    """Seconds and peak RSS of one cold load of ``ann_file``.

    Args:
        what: ``"mnapps"`` (first :class:`~mnapps.data.coco.CocoDetection` construction: any
            cached index is deleted first, and written anew) or ``"pycocotools"`` (``COCO()``).
    """
    ann_file = Path(ann_file)
    if what == "mnapps":
        for path in index_cache_paths(ann_file):
            path.unlink(missing_ok=True)
        start = time.perf_counter()
        index = load_coco_index(ann_file)
        seconds = time.perf_counter() - start
        cache = next((p for p in index_cache_paths(ann_file) if p.is_file()), None)
        return {"what": what, "seconds": seconds, "peak_rss": _peak_rss(), "index_bytes": index.nbytes(),
                "cache_bytes": cache.stat().st_size if cache else 0}
    if what == "pycocotools":
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            COCO(str(ann_file))
        return {"what": what, "seconds": time.perf_counter() - start, "peak_rss": _peak_rss()}
    raise ValueError(f"unknown first-parse measurement {what!r}; choose 'mnapps' or 'pycocotools'")


def measure_loader(
    impl: str,
    ann_file: str | Path,
    image_dir: str | Path,
    *,
    workers: int,
    batch_size: int = 16,
    batches_per_pass: int = 8,
    passes: int = 3,
    size: int = 300,
    seed: int = 0,
    annotation_epoch: bool = True,
) -> dict[str, Any]:
    """Time to first batch, memory after the first and last pass, and images/s of one loader set-up.

    Builds the dataset (``impl``: ``"mnapps"`` or ``"torchvision"``), then a DataLoader with
    ``workers`` persistent workers over ``batches_per_pass`` random batches per pass (a new
    draw each pass, so later passes reach images not seen before, as an epoch does).

    With workers and ``annotation_epoch``, the loader is then shut down and one epoch of
    annotation reads over every sample runs with fresh workers (:func:`_annotation_epoch`).

    Returns:
        ``{"first_batch_s", "construct_s", "images_per_s", "after_first": {...},
        "after_last": {...}, "annotation_epoch": {...}, ...}``; the memory dicts hold
        ``main_pss``, ``main_uss``, ``workers_pss``, ``workers_uss`` (bytes, summed over workers).
    """
    if passes < 2:
        raise ValueError(f"passes must be >= 2 (memory after the first and after the last), got {passes}")
    if workers == 0:
        torch.set_num_threads(1)  # the main process then does a worker's job: give it a worker's threads
    start = time.perf_counter()
    dataset, collate = _build_dataset(impl, str(ann_file), str(image_dir), size)
    construct_s = time.perf_counter() - start
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = _RandomSamples(len(dataset), batch_size * batches_per_pass, generator)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate, drop_last=True, persistent_workers=workers > 0)
    iterator = iter(loader)
    batch = next(iterator)
    first_batch_s = time.perf_counter() - start
    for batch in iterator:
        pass
    # A batch still referenced here would count its shared-memory tensors in the main process.
    del batch
    after_first = _memory_snapshot()
    images = 0
    timed_start = time.perf_counter()
    for _ in range(passes - 1):
        for batch in loader:
            images += len(batch[0])
        del batch
    seconds = time.perf_counter() - timed_start
    after_last = _memory_snapshot()
    result = {
        "impl": impl, "workers": workers, "batch_size": batch_size, "batches_per_pass": batches_per_pass,
        "passes": passes, "samples": len(dataset), "construct_s": construct_s, "first_batch_s": first_batch_s,
        "images_per_s": images / seconds, "after_first": after_first, "after_last": after_last,
    }
    if workers > 0 and annotation_epoch:
        del loader, iterator  # the iterator owns the persistent workers
        gc.collect()
        _wait_for_workers_to_exit()
        result["annotation_epoch"] = _annotation_epoch(dataset, workers)
    return result


def _annotation_epoch(dataset, workers: int, batch_size: int = 256) -> dict[str, Any]:
    """One epoch over every sample's annotations (no pixels) with fresh workers: memory before and after.

    Every image is visited, as in a real epoch, which is what turns the parent's shared pages
    into private copies when per-image Python objects are read (their reference counts change).
    """
    _annotations_only(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_count,
                        persistent_workers=True)
    start = time.perf_counter()
    iterator = iter(loader)
    seen = next(iterator)
    at_start = _memory_snapshot()
    for count in iterator:
        seen += count
    at_end = _memory_snapshot()
    return {"samples": seen, "seconds": time.perf_counter() - start, "at_start": at_start, "at_end": at_end}


def _child_main() -> None:
    """Entry point of :func:`run_isolated`'s process: read a task as JSON on stdin, print the result."""
    task = json.loads(sys.stdin.read())
    kind = task.pop("kind")
    if kind == "first_parse":
        result = measure_first_parse(**task)
    elif kind == "loader":
        result = measure_loader(**task)
    else:
        raise ValueError(f"unknown measurement kind {kind!r}")
    sys.stdout.write("\n" + json.dumps(result) + "\n")


def run_isolated(kind: str, timeout_s: float = 1800.0, **task: Any) -> dict[str, Any]:
    """Run one measurement (``"first_parse"`` or ``"loader"``) in a fresh Python process.

    A fresh interpreter keeps every figure free of the heap a previous measurement left
    behind (freed Python objects rarely give their pages back).

    Raises:
        RuntimeError: the measurement failed (the message ends with its stderr).
    """
    # The child imports the lab (its package sits in tools/) and this checkout's mnapps (the root).
    lab_root, package_root = (str(p) for p in Path(__file__).resolve().parents[1:3])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [lab_root, package_root, env.get("PYTHONPATH")]))
    payload = json.dumps({"kind": kind, **{k: str(v) if isinstance(v, Path) else v for k, v in task.items()}})
    proc = subprocess.run([sys.executable, "-c", "from lab.data_path import _child_main; _child_main()"],
                          input=payload, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {kind} {task} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])

# ------------------------------------------------------------------------------------------
# the whole run


@dataclass(frozen=True)
class ScaleSettings:
    """What :func:`run_scale_benchmark` measures, and how long.

    Attributes:
        sizes: simulated file sizes (images); COCO 2017 train is 118,287.
        workers: DataLoader worker counts to measure memory and speed at.
        impls: ``"mnapps"`` and/or ``"torchvision"``.
        batch_size, batches_per_pass, passes: each loader run draws ``passes`` times
            ``batches_per_pass`` random batches; memory is read after the first and the last.
        input_size: side of the SSD training crops.
        polygons: write COCO-like polygon segmentations (the real file's size and parse cost).
        annotation_epoch: after the passes, read every sample's annotations once (no pixels)
            with fresh workers and record their memory before and after (copy-on-read).
        seed: simulation and sampling seed.
        timeout_s: limit for each isolated measurement.
    """

    sizes: tuple[int, ...] = (10_000, 50_000, COCO_TRAIN2017_IMAGES)
    workers: tuple[int, ...] = (0, 2, 4)
    impls: tuple[str, ...] = IMPLEMENTATIONS
    batch_size: int = 16
    batches_per_pass: int = 8
    passes: int = 3
    input_size: int = 300
    polygons: bool = True
    annotation_epoch: bool = True
    seed: int = 0
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if not self.sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.sizes):
            raise ValueError(f"sizes must be image counts >= 1, got {list(self.sizes)}")
        if not self.workers or any(w < 0 for w in self.workers):
            raise ValueError(f"workers must be counts >= 0, got {list(self.workers)}")
        unknown = sorted(set(self.impls) - set(IMPLEMENTATIONS))
        if not self.impls or unknown:
            raise ValueError(f"unknown implementation(s) {unknown or '(none given)'}; "
                             f"choose from {list(IMPLEMENTATIONS)}")
        for name in ("batch_size", "batches_per_pass", "input_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.passes < 2:
            raise ValueError(f"passes must be >= 2 (memory after the first and after the last), got {self.passes}")
        if min(self.sizes) < self.batch_size * self.batches_per_pass:
            raise ValueError(f"the smallest size ({min(self.sizes)} images) is below one pass of "
                             f"{self.batch_size} x {self.batches_per_pass} images; raise sizes or lower the batches")


def run_scale_benchmark(
    settings: ScaleSettings,
    workdir: str | Path,
    pool_source: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the simulations into ``workdir`` and run every measurement, each in its own process.

    Args:
        settings: what to measure.
        workdir: folder for the image pool and the simulated files (they stay there).
        pool_source: folder of JPEGs for the pool (None: generated shapes images).
        log: receives one line per step.

    Returns:
        ``{"settings", "pool", "sizes": [{"simulation", "first_parse", "loaders"}], "machine"}``.
    """
    workdir = Path(workdir)
    image_dir, pool = prepare_image_pool(workdir / "images", pool_source)
    log(f"image pool: {len(pool)} JPEGs from {pool_source or 'generated shapes'} in {image_dir}")
    result: dict[str, Any] = {"settings": asdict(settings), "sizes": [], "machine": machine_description(),
                              "pool": {"source": str(pool_source) if pool_source else "generated shapes",
                                       "images": [list(p) for p in pool]}}
    for num_images in settings.sizes:
        sim = write_coco_simulation(workdir / f"instances_sim{num_images}.json", image_dir, pool, num_images,
                                    seed=settings.seed, polygons=settings.polygons)
        log(f"{num_images} images: wrote {sim.ann_file.name} ({sim.json_bytes / _MB:.0f} MiB, "
            f"{sim.num_annotations} boxes) in {sim.write_s:.1f} s")
        entry: dict[str, Any] = {"simulation": sim.as_json(), "first_parse": {}, "loaders": []}
        # mnapps first: its first parse writes the index cache that its loader runs then use.
        for what in (["mnapps"] if "mnapps" in settings.impls else []) + ["pycocotools"]:
            parse = run_isolated("first_parse", settings.timeout_s, ann_file=sim.ann_file, what=what)
            entry["first_parse"][what] = parse
            log(f"  first parse {what}: {parse['seconds']:.1f} s, peak RSS {parse['peak_rss'] / _MB:.0f} MiB")
        for impl in settings.impls:
            for workers in settings.workers:
                run = run_isolated("loader", settings.timeout_s, impl=impl, ann_file=sim.ann_file,
                                   image_dir=image_dir, workers=workers, batch_size=settings.batch_size,
                                   batches_per_pass=settings.batches_per_pass, passes=settings.passes,
                                   size=settings.input_size, seed=settings.seed,
                                   annotation_epoch=settings.annotation_epoch)
                entry["loaders"].append(run)
                epoch = run.get("annotation_epoch")
                log(f"  {impl} {workers} workers: first batch {run['first_batch_s']:.2f} s, "
                    f"{run['images_per_s']:.1f} img/s, workers PSS {run['after_first']['workers_pss'] / _MB:.0f} -> "
                    f"{run['after_last']['workers_pss'] / _MB:.0f} MiB"
                    + (f"; annotation epoch: workers USS {epoch['at_start']['workers_uss'] / _MB:.0f} -> "
                       f"{epoch['at_end']['workers_uss'] / _MB:.0f} MiB" if epoch else ""))
        result["sizes"].append(entry)
    # Speeds mean little on a busy machine: record how busy it was.
    result["machine"]["load_average_end"] = list(os.getloadavg())
    return result


def machine_description() -> dict[str, Any]:
    """CPU model, core count and flags (from ``lscpu`` when present) and the memory total."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_start": list(os.getloadavg())}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Flags"):
                info[key.strip().lower().replace(" ", "_")] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_bytes"] = int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024
    except (OSError, ValueError):
        pass
    return info
