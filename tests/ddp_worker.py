"""One rank of the 2-process CPU/gloo DDP test; launched by tests/test_distributed.py via torchrun.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT``.
Each rank trains a tiny conv net with :func:`mnapps.engine.loop.fit` inside
:func:`mnapps.engine.distributed.distributed_run` and saves its final parameters, the sample
indices it saw per epoch, its history, how often ``evaluate`` ran on it and whether the
process group was gone after the block to ``OUT/rank<r>.pt``; checkpoints go to ``OUT/run``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from mnapps.config import TrainConfig  # noqa: E402
from mnapps.engine.distributed import DistInfo, build_train_loader, distributed_run  # noqa: E402
from mnapps.engine.loop import fit, to_device  # noqa: E402

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
    with distributed_run("cpu") as info:
        result = train(info, out)
    # distributed_run must have torn the group down (after a barrier) on leaving the block.
    result["group_destroyed"] = not dist.is_initialized()
    torch.save(result, out / f"rank{info.rank}.pt")


def train(info: DistInfo, out: Path) -> dict:
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
        model, loader, cfg, loss_fn=loss_fn, output_dir=out / "run", evaluate=evaluate,
        checkpoint_meta={"task": "ddp-test"}, device=info.device,
    )
    return {
        "world_size": info.world_size,
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "seen": seen,
        "eval_calls": eval_calls,
        "history": result["history"],
    }


if __name__ == "__main__":
    main()
