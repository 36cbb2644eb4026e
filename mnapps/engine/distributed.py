"""Process-group set-up under ``torchrun`` and the train/eval data loaders of every task.

This module owns the multi-process side of training: :func:`init_distributed` reads the
environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and starts the process
group (NCCL on CUDA, gloo on CPU), or reports a single process when that environment is
absent; :func:`distributed_run` wraps it for a training entry point and tears down the group
it started (barrier first, so no rank drops out while a peer still talks to it), and
:func:`run_distributed` runs a task function inside it (the one wrapper every task uses);
:func:`build_train_loader` makes the training loader whose order and augmentation
randomness depend only on ``(cfg.seed, epoch, rank)``, which is what makes ``--resume``
reproduce an uninterrupted run exactly. Launch multi-GPU / multi-node runs with
``torchrun --nproc_per_node=N tools/train_det.py ...``; there is no home-made launcher.

Batch size convention: ``cfg.batch_size`` is the whole batch of one optimisation step over
all processes; each process loads ``cfg.batch_size // world_size`` images, and ``cfg.lr`` is
the learning rate for that whole batch (it is not rescaled with the number of processes).
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sized, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mnapps.config import TrainConfig

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "distributed_run",
    "run_distributed",
    "current_dist_info",
    "epoch_seed",
    "seed_augmentations",
    "EpochShuffleSampler",
    "TrainLoader",
    "build_train_loader",
    "build_eval_loader",
    "resolve_device",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global index of this process (0 .. world_size - 1).
        world_size: number of processes; 1 when not launched by torchrun.
        local_rank: index on this machine; picks the GPU.
        is_main: ``rank == 0``; only it writes checkpoints and shows progress bars.
        device: the device this process trains on (``cuda:<local_rank>`` or ``cpu``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """Check a ``--device`` value: ``cpu``, ``cuda`` or ``cuda:N`` that this machine has.

    Returns:
        the device, or None when ``device`` is None (callers then pick CUDA when available).

    Raises:
        ValueError: an unknown device name, or a CUDA device this machine does not have, with
            the fix in the message.
    """
    if device is None or isinstance(device, torch.device):
        wanted = device
    else:
        try:
            wanted = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if wanted is None:
        return None
    if wanted.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    if wanted.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but this machine has no CUDA GPU "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if wanted.index is not None and wanted.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} was asked for but only {torch.cuda.device_count()} GPU(s) "
                             "are visible")
    return wanted


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Start the process group when launched by ``torchrun``; otherwise describe one process.

    Args:
        device: ``"cuda"``, ``"cpu"`` or None (CUDA when available). Under torchrun each
            process takes GPU ``LOCAL_RANK``; the backend is NCCL on CUDA and gloo on CPU.

    Returns:
        A :class:`DistInfo`. Without ``RANK``/``WORLD_SIZE`` in the environment (or with
        ``WORLD_SIZE=1``) no process group is created and ``world_size == 1``.

    Raises:
        ValueError: CUDA asked for but unavailable, or fewer GPUs than local processes.
    """
    wanted = resolve_device(device)
    use_cuda = wanted.type == "cuda" if wanted is not None else torch.cuda.is_available()

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world_size = _env_int("WORLD_SIZE") if launched else 1
    if world_size <= 1:
        if not use_cuda:
            return DistInfo(device=torch.device("cpu"))
        return DistInfo(device=wanted if wanted is not None and wanted.index is not None else torch.device("cuda"))

    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                f"launch at most that many processes per node (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        run_device = torch.device("cuda", local_rank)
    else:
        run_device = torch.device("cpu")
    if not dist.is_initialized():
        # Evaluation runs on rank 0 while the others wait in a collective; a full COCO val pass
        # can outlast the default 10-minute NCCL timeout, hence the generous one.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=60))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, is_main=rank == 0, device=run_device)


def cleanup_distributed(synchronize: bool = True) -> None:
    """Destroy the process group if one was started (safe to call in any case).

    Args:
        synchronize: meet every other rank in a barrier first, so that no process shuts its
            transport down while a peer is still finishing the last collective (a gloo rank
            that loses its peer mid-message aborts the whole job at exit). Pass False on an
            error path, where the other ranks may never arrive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize:
        try:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()
        except RuntimeError:
            pass  # a peer is already gone; tearing down is all that is left to do
    # A DDP wrapper that only a reference cycle keeps alive still holds the group; collecting
    # it now destroys it while the interpreter is whole, not during interpreter shutdown.
    gc.collect()
    dist.destroy_process_group()


@contextmanager
def distributed_run(device: str | torch.device | None = None) -> Iterator[DistInfo]:
    """:func:`init_distributed` for the length of a ``with`` block.

    A process group that this call started is destroyed on leaving the block: after a
    barrier when the block finished, without one when it raised (the other ranks may be
    stuck elsewhere). A group the caller had already started is left alone.
    """
    already_started = dist.is_available() and dist.is_initialized()
    info = init_distributed(device)
    owns_group = info.distributed and not already_started
    try:
        yield info
    except BaseException:
        if owns_group:
            cleanup_distributed(synchronize=False)
        raise
    if owns_group:
        cleanup_distributed()


def run_distributed(task: Callable[..., T], device: str | torch.device | None, *args: Any, **kwargs: Any) -> T:
    """Run ``task(*args, info=<DistInfo>, **kwargs)`` inside :func:`distributed_run` and return its result.

    The entry point of every training task (``train_detector``, ``train_classifier``,
    ``distill_face``): under ``torchrun`` the process group lives exactly as long as the task.

    Args:
        task: the task body; it receives this process's :class:`DistInfo` as ``info``.
        device: ``"cuda"``, ``"cuda:N"``, ``"cpu"`` or None (CUDA when available), checked by
            :func:`resolve_device`.
    """
    with distributed_run(device) as info:
        return task(*args, info=info, **kwargs)


def current_dist_info(device: str | torch.device = "cpu") -> DistInfo:
    """The rank and world size of an already-initialised process group (or of one process)."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world_size, local_rank, rank == 0, torch.device(device))
    return DistInfo(device=torch.device(device))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed that depends only on ``(seed, epoch, rank)``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(rank)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def seed_augmentations(dataset: Any, seed: int, _depth: int = 0) -> int:
    """Re-seed augmentation pipelines that keep their own random state; returns how many.

    albumentations' ``Compose`` ignores the global numpy/random seeds and draws from its
    own generator, so the engine re-seeds it explicitly: every object reachable from
    ``dataset`` as itself, ``.transforms`` or ``.transform`` that has a ``set_random_seed``
    method is re-seeded, following ``.dataset``/``.datasets`` of wrappers such as
    ``Subset`` and ``ConcatDataset``.
    """
    if dataset is None or _depth > 4:
        return 0
    count = 0
    for candidate in (dataset, getattr(dataset, "transforms", None), getattr(dataset, "transform", None)):
        set_seed = getattr(candidate, "set_random_seed", None)
        if callable(set_seed):
            set_seed(int(seed) % 2**32)
            count += 1
    inner = getattr(dataset, "dataset", None)
    if inner is not None and inner is not dataset:
        count += seed_augmentations(inner, seed, _depth + 1)
    for child in getattr(dataset, "datasets", None) or ():
        count += seed_augmentations(child, seed, _depth + 1)
    return count


def _seed_worker(worker_id: int) -> None:
    # torch already seeded this worker's torch, numpy and random from the loader's per-epoch
    # generator; pipelines with a private generator (albumentations) get a seed from it too.
    info = torch.utils.data.get_worker_info()
    if info is not None:
        seed_augmentations(info.dataset, info.seed)


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of ``range(len(data))`` that depends only on ``(seed, epoch)``."""

    def __init__(self, data: Sized, seed: int = 0, shuffle: bool = True) -> None:
        self.data = data
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(len(self.data)))
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(len(self.data), generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.data)


class TrainLoader(DataLoader):
    """A :class:`DataLoader` whose randomness is re-seeded from ``(seed, epoch, rank)``.

    :meth:`set_epoch` (called by :func:`mnapps.engine.loop.fit` before every epoch) selects the
    sampler's permutation and re-seeds the loader's generator, from which the worker seeds
    (torch, numpy, random) are drawn; pipelines with their own generator are re-seeded by
    :func:`seed_augmentations` in each worker, or in this process when ``num_workers == 0``.
    Workers are not persistent, so every epoch starts them from these seeds.
    """

    def __init__(self, *args, seed: int = 0, rank: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Prepare the loader for ``epoch`` (0-based)."""
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        loader_seed = epoch_seed(self.seed, epoch, self.rank)
        if self.generator is not None:
            self.generator.manual_seed(loader_seed)
        if self.num_workers == 0:
            seed_augmentations(self.dataset, loader_seed)


def _dist_settings(distributed: bool | DistInfo | None) -> tuple[int, int]:
    """(rank, world_size) from a DistInfo, or from the live process group when True."""
    if isinstance(distributed, DistInfo):
        return distributed.rank, distributed.world_size
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "build_train_loader(distributed=True) needs an initialised process group; "
                "call init_distributed() under torchrun first"
            )
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_train_loader(
    dataset: Dataset,
    cfg: TrainConfig,
    collate_fn: Callable | None = None,
    distributed: bool | DistInfo | None = None,
) -> TrainLoader:
    """The training loader: shuffled, incomplete last batch dropped, seeded per epoch.

    Args:
        dataset: a map-style dataset.
        cfg: uses ``batch_size`` (whole batch over all processes), ``num_workers``, ``seed``.
        collate_fn: batch assembly (e.g. :func:`mnapps.data.coco.collate_fn`).
        distributed: False/None for one process; True (read rank and world size from the
            running process group) or a :class:`DistInfo` to give each rank its own share
            through a :class:`~torch.utils.data.DistributedSampler`.

    Returns:
        A :class:`TrainLoader` of ``cfg.batch_size // world_size`` items per batch; call its
        ``set_epoch(epoch)`` before each epoch (``fit`` does).

    Raises:
        ValueError: a batch size not divisible by the number of processes, or a dataset too
            small to fill a single batch.
    """
    rank, world_size = _dist_settings(distributed)
    if cfg.batch_size < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.batch_size % world_size:
        raise ValueError(
            f"train.batch_size={cfg.batch_size} is the whole batch over {world_size} processes and must be "
            f"divisible by it; use a multiple of {world_size}"
        )
    if cfg.num_workers < 0:
        raise ValueError(f"train.num_workers must be >= 0, got {cfg.num_workers}")
    per_process = cfg.batch_size // world_size
    if world_size > 1:
        # drop_last here trims the dataset to a multiple of world_size so every rank runs the
        # same number of steps (a rank with one step more would hang in DDP's all-reduce).
        sampler: Sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    else:
        sampler = EpochShuffleSampler(dataset, seed=cfg.seed)
    generator = torch.Generator()
    generator.manual_seed(epoch_seed(cfg.seed, 0, rank))
    loader = TrainLoader(
        dataset,
        batch_size=per_process,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_fn,
        # A partial last batch would give BN a batch of one and DDP ranks unequal steps.
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        worker_init_fn=_seed_worker,
        persistent_workers=False,
        seed=cfg.seed,
        rank=rank,
    )
    if len(loader) == 0:
        raise ValueError(
            f"the training set has {len(dataset)} item(s), fewer than one batch of {per_process} per "
            f"process ({world_size} process(es)); lower train.batch_size (--batch-size) or add data"
        )
    return loader


def build_eval_loader(
    dataset: Dataset, batch_size: int, collate_fn: Callable | None = None, num_workers: int = 0
) -> DataLoader:
    """A loader over the whole dataset in order, every item kept (for evaluation on rank 0)."""
    if batch_size < 1:
        raise ValueError(f"eval batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
    )
