"""One rank of the 2-process CPU/gloo DDP test; launched by tests/test_distributed.py via torchrun.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT``.
Each rank trains a tiny conv net with :func:`mnapps.engine.loop.fit` through
:func:`mnapps.engine.distributed.run_distributed` (so inside ``distributed_run``) and saves its
final parameters, the sample indices it saw per epoch, its history, how often ``evaluate`` ran
on it and whether the process group was gone after the block to ``OUT/rank<r>.pt``;
checkpoints go to ``OUT/run``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from mnapps.config import TrainConfig
from mnapps.engine.distributed import DistInfo, build_train_loader, run_distributed
from mnapps.engine.loop import RunOptions, TaskHooks, fit, to_device

NUM_ITEMS = 32


class IndexedImages(Dataset):
    """Fixed random 8x8 images with labels, returning their own index too."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(NUM_ITEMS, 3, 8, 8, generator=generator)
        self.labels = torch.randint(0, 3, (NUM_ITEMS,), generator=generator)

    def __len__(self) -> int:
        return NUM_ITEMS

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], index


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    result = run_distributed(train, "cpu", out)
    # distributed_run must have torn the group down (after a barrier) on leaving the block.
    result["group_destroyed"] = not dist.is_initialized()
    torch.save(result, out / f"rank{result['rank']}.pt")


def train(out: Path, *, info: DistInfo) -> dict:
    torch.manual_seed(100 + info.rank)  # different initial weights per rank: DDP must sync them
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    dataset = IndexedImages()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.2, num_workers=0, channels_last=False, seed=3, warmup_epochs=0.5)
    loader = build_train_loader(dataset, cfg, None, info)
    seen: dict[int, list[int]] = {}
    eval_calls: list[int] = []

    def loss_fn(model, batch, device):
        images, labels, indices = to_device(batch, device)
        seen.setdefault(loader.epoch, []).extend(indices.tolist())
        return {"loss_ce": nn.functional.cross_entropy(model(images), labels)}

    def evaluate(model, epoch):
        eval_calls.append(epoch)
        model.eval()
        with torch.no_grad():
            accuracy = (model(dataset.images).argmax(1) == dataset.labels).float().mean().item()
        return {"acc": accuracy}

    result = fit(
        model, loader, cfg, TaskHooks(loss_fn, evaluate),
        RunOptions(out / "run", device=info.device, task="ddp-test"),
    )
    return {
        "rank": info.rank,
        "world_size": info.world_size,
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "seen": seen,
        "eval_calls": eval_calls,
        "history": [entry.to_dict() for entry in result.history],
    }


if __name__ == "__main__":
    main()
