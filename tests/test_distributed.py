"""init_distributed, the per-epoch seeded train loader, the eval loader, and a real 2-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from mnapps.config import TrainConfig
from mnapps.checkpoint import load_checkpoint
from mnapps.engine.distributed import (
    DistInfo,
    build_eval_loader,
    build_train_loader,
    init_distributed,
    run_distributed,
)

TESTS = Path(__file__).resolve().parent


class IndexAndNoise(Dataset):
    """Item i is (i, a draw from torch's global RNG): shows order and augmentation randomness."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return index, torch.rand(()).item()


def _epoch(loader, epoch: int) -> list[tuple[int, float]]:
    loader.set_epoch(epoch)
    return [(int(i), float(v)) for indices, values in loader for i, v in zip(indices, values)]


def test_init_distributed_without_torchrun_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, is_main=True, device=torch.device("cpu"))
    assert not info.distributed and not torch.distributed.is_initialized()


def test_init_distributed_bad_environment(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_init_distributed_cuda_unavailable():
    with pytest.raises(ValueError, match="use --device cpu"):
        init_distributed("cuda")


def test_run_distributed_hands_the_task_its_info(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    seen = []

    def task(first, second, *, info, scale):
        seen.append(info)
        return (first + second) * scale

    assert run_distributed(task, "cpu", 2, 3, scale=10) == 50
    assert seen == [DistInfo(rank=0, world_size=1, local_rank=0, is_main=True, device=torch.device("cpu"))]
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        run_distributed(task, "gpu0", 2, 3, scale=10)
    assert len(seen) == 1  # a bad device stops before the task starts


def test_train_loader_depends_only_on_seed_and_epoch():
    cfg = TrainConfig(batch_size=4, num_workers=1, seed=5)
    loader = build_train_loader(IndexAndNoise(10), cfg)
    assert len(loader) == 2  # 10 items, batches of 4, the partial last batch dropped
    first = _epoch(loader, 1)
    assert len(first) == 8 and len({i for i, _ in first}) == 8
    torch.rand(3)  # the caller's RNG use must not matter
    assert _epoch(loader, 1) == first  # same order and same worker randomness
    assert _epoch(build_train_loader(IndexAndNoise(10), cfg), 1) == first  # a fresh process too
    second = _epoch(loader, 2)
    assert [i for i, _ in second] != [i for i, _ in first]
    assert {v for _, v in second}.isdisjoint({v for _, v in first})


def test_train_loader_splits_ranks():
    cfg = TrainConfig(batch_size=4, num_workers=0, seed=1)
    per_rank = []
    for rank in (0, 1):
        loader = build_train_loader(IndexAndNoise(11), cfg, distributed=DistInfo(rank=rank, world_size=2))
        assert loader.batch_size == 2  # the whole batch of 4 shared by 2 processes
        assert len(loader) == 2  # 11 items -> 5 per rank (tail dropped) -> 2 full batches
        per_rank.append({i for i, _ in _epoch(loader, 0)})
    assert per_rank[0].isdisjoint(per_rank[1]) and len(per_rank[0]) == len(per_rank[1]) == 4


@pytest.mark.parametrize(
    "size,batch_size,distributed,message",
    [
        (3, 4, None, "fewer than one batch of 4"),
        (10, 3, DistInfo(rank=0, world_size=2), "must be divisible"),
        (10, 4, True, "needs an initialised process group"),
    ],
)
def test_train_loader_errors(size, batch_size, distributed, message):
    with pytest.raises(ValueError, match=message):
        cfg = TrainConfig(batch_size=batch_size, num_workers=0)
        build_train_loader(IndexAndNoise(size), cfg, distributed=distributed)


def test_eval_loader_keeps_order_and_every_item():
    loader = build_eval_loader(IndexAndNoise(10), batch_size=4, num_workers=0)
    batches = [indices.tolist() for indices, _ in loader]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.slow
def test_two_process_gloo_ddp_run(tmp_path):
    # The fault handler prints the Python stack of a rank that aborts, should one ever do so.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent), "PYTHONFAULTHANDLER": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(TESTS / "ddp_worker.py"), str(tmp_path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-1500:] + completed.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["group_destroyed"] and rank1["group_destroyed"]
    # DDP kept the two replicas identical although each started from its own initialisation.
    assert rank0["params"].keys() == rank1["params"].keys()
    for name in rank0["params"]:
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    # Each epoch the two ranks saw disjoint halves of the 32 items, in a new order per epoch.
    for epoch in (0, 1):
        seen0, seen1 = rank0["seen"][epoch], rank1["seen"][epoch]
        assert len(seen0) == len(seen1) == 16 and set(seen0).isdisjoint(seen1)
    assert rank0["seen"][0] != rank0["seen"][1]
    # Evaluation ran on rank 0 only; its metrics reached rank 1 through the broadcast.
    assert rank0["eval_calls"] == [1, 2] and rank1["eval_calls"] == []
    assert [h["metrics"] for h in rank0["history"]] == [h["metrics"] for h in rank1["history"]]
    assert rank0["history"][1]["train"]["loss"] == rank1["history"][1]["train"]["loss"]
    # One checkpoint, written by rank 0, holding the unwrapped model and both ranks' RNG states.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last.pt", "metrics.csv", "results.png"]
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["world_size"] == 2 and len(checkpoint["rng_per_rank"]) == 2
    assert all(not key.startswith("module.") for key in checkpoint["model"])
    for name, value in rank0["params"].items():
        assert torch.equal(checkpoint["model"][name], value), name
