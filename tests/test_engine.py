"""fit(): exact resume, non-finite loss handling, best.pt selection, clipping, logging, errors."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mnapps.config import TrainConfig
from mnapps.checkpoint import load_checkpoint
from mnapps.engine.distributed import build_train_loader
from mnapps.engine.loop import (
    NonFiniteLossError,
    RunFolderError,
    capture_rng_state,
    check_run_folder,
    RunOptions,
    TaskHooks,
    restore_rng_state,
    to_device,
)
from mnapps.engine.loop import fit as engine_fit


def fit(model, loader, cfg, *, loss_fn, output_dir, evaluate=None, best_metric=None, best_mode="max",
        batch_size_fn=None, resume=None, overwrite=False, device="cpu", checkpoint_meta=None):
    """The engine's fit with its two named objects built from keywords (shorter tests)."""
    meta = checkpoint_meta or {}
    return engine_fit(
        model, loader, cfg, TaskHooks(loss_fn, evaluate, best_metric, best_mode, batch_size_fn),
        RunOptions(output_dir, resume, overwrite, device, meta.get("task"), meta.get("head"), meta.get("config")),
    )


class RandomAugmentedImages(Dataset):
    """24 fixed random 8x8 images, 3 classes, with random augmentation from three sources:
    torch's and numpy's global RNGs and an unseeded albumentations pipeline (own RNG)."""

    def __init__(self, size: int = 24) -> None:
        import albumentations as A

        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(size, 3, 8, 8, generator=generator)
        self.labels = torch.randint(0, 3, (size,), generator=generator)
        self.transforms = A.Compose([A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=0.5)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(1)
        image = image + 0.05 * float(np.random.randn())
        hwc = image.clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float32)
        augmented = self.transforms(image=hwc)["image"]
        return torch.from_numpy(np.ascontiguousarray(augmented)).permute(2, 0, 1), self.labels[index]


def _tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),  # consumes the global RNG inside the loop
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


CFG = TrainConfig(
    epochs=3, batch_size=4, lr=0.1, warmup_epochs=0.5, schedule="cosine", weight_decay=1e-3,
    num_workers=0, channels_last=True, seed=7, log_every=2,
)


def _classification_loss(model, batch, device):
    images, labels = to_device(batch, device, channels_last=CFG.channels_last)
    logits = model(images)
    return {"loss_ce": nn.functional.cross_entropy(logits, labels), "loss_logit_l2": 1e-3 * logits.pow(2).mean()}


def _accuracy_on(dataset):
    images, labels = dataset.images, dataset.labels

    def evaluate(model, epoch):
        model.eval()
        with torch.no_grad():
            accuracy = (model(images).argmax(1) == labels).float().mean().item()
        return {"acc": accuracy, "epoch_seen": epoch}

    return evaluate


class _Killed(Exception):
    pass


def _killed_at_call(limit):
    calls = {"n": 0}

    def loss_fn(model, batch, device):
        calls["n"] += 1
        if calls["n"] == limit:
            raise _Killed
        return _classification_loss(model, batch, device)

    return loss_fn


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    dataset = RandomAugmentedImages()
    evaluate = _accuracy_on(dataset)
    full = _tiny_net(0)
    result_full = fit(
        full, build_train_loader(dataset, CFG), CFG, loss_fn=_classification_loss, output_dir=tmp_path / "full",
        evaluate=evaluate, best_metric="acc",
    )
    assert result_full.epochs_run == 3

    # Same run killed on the 3rd batch of epoch 3 (6 steps per epoch), then resumed in a
    # "new process": a differently initialised model and disturbed global RNGs.
    interrupted = _tiny_net(0)
    with pytest.raises(_Killed):
        fit(
            interrupted, build_train_loader(dataset, CFG), CFG, loss_fn=_killed_at_call(6 + 6 + 3),
            output_dir=tmp_path / "cut", evaluate=evaluate, best_metric="acc",
        )
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    resumed = _tiny_net(123)
    torch.rand(5), np.random.rand(5)
    result_resumed = fit(
        resumed, build_train_loader(RandomAugmentedImages(), CFG), CFG, loss_fn=_classification_loss,
        output_dir=tmp_path / "cut", evaluate=evaluate, best_metric="acc", resume=True,
    )
    assert result_resumed.epochs_run == 1
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        assert torch.equal(full_state[key], resumed_state[key]), key
    for epoch_full, epoch_resumed in zip(result_full.history, result_resumed.history, strict=True):
        assert epoch_full.metrics == epoch_resumed.metrics
        assert epoch_full.train.losses == epoch_resumed.train.losses, epoch_full.epoch
        assert epoch_full.train.lr == epoch_resumed.train.lr, epoch_full.epoch
    assert result_resumed.best == result_full.best


def test_non_finite_loss_names_step_and_keeps_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_fn(model, batch, device):
        calls["n"] += 1
        losses = _classification_loss(model, batch, device)
        if calls["n"] == 6 + 3:  # epoch 2, batch index 2, step 9
            losses["loss_ce"] = losses["loss_ce"] * float("nan")
        return losses

    model = _tiny_net(0)
    with pytest.raises(NonFiniteLossError) as info:
        fit(model, build_train_loader(RandomAugmentedImages(), CFG), CFG, loss_fn=loss_fn, output_dir=tmp_path)
    message = str(info.value)
    assert "epoch 2" in message and "step 9" in message and "batch 2" in message
    assert "loss_ce=nan" in message and "loss_logit_l2=" in message
    assert (info.value.epoch, info.value.step, info.value.batch_index) == (2, 9, 2)
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    _tiny_net(1).load_state_dict(checkpoint["model"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.csv", "results.png"]  # no temp files


@pytest.mark.parametrize("mode,best_epoch,best_value", [("max", 2, 0.5), ("min", 1, 0.2)])
def test_best_checkpoint_follows_metric(tmp_path, mode, best_epoch, best_value):
    scores = {1: 0.2, 2: 0.5, 3: 0.3}
    cfg = TrainConfig(**{**CFG.__dict__, "channels_last": False})
    result = fit(
        _tiny_net(0), build_train_loader(RandomAugmentedImages(), cfg), cfg, loss_fn=_classification_loss,
        output_dir=tmp_path, evaluate=lambda model, epoch: {"AP": scores[epoch]}, best_metric="AP",
        best_mode=mode, checkpoint_meta={"task": "test", "head": "tiny", "config": {"model": {"width": 1}}},
    )
    best = load_checkpoint(tmp_path / "best.pt")
    last = load_checkpoint(tmp_path / "last.pt")
    assert (best["epoch"], best["metrics"]["AP"], best["best"]) == (best_epoch, best_value, best_value)
    assert (last["epoch"], last["metrics"]["AP"]) == (3, 0.3)
    assert (last["task"], last["head"], last["config"]) == ("test", "tiny", {"model": {"width": 1}})
    assert {"optimizer", "scheduler", "scaler", "rng", "history"} <= set(last)
    assert {"torch", "numpy", "python"} <= set(last["rng"])
    assert result.best == best_value and result.best_metric == "AP"
    assert [h.metrics["AP"] for h in result.history] == [0.2, 0.5, 0.3]
    assert result.last_metrics == {"AP": 0.3}
    assert result.checkpoint == tmp_path / "last.pt" and result.best_checkpoint == tmp_path / "best.pt"


def _one_parameter_run(tmp_path, loss_of_weight, **cfg_changes):
    weight = nn.Parameter(torch.zeros(3))
    model = nn.Module()
    model.weight = weight
    cfg = TrainConfig(
        epochs=1, lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant", channels_last=False, **cfg_changes
    )
    loader = [torch.zeros(2, 1)]  # one batch of two "images"; a plain list has no set_epoch
    result = fit(model, loader, cfg, loss_fn=lambda m, batch, device: loss_of_weight(m.weight), output_dir=tmp_path)
    return weight.detach(), result


def test_gradient_clipping_bounds_the_step(tmp_path):
    # gradient (30, 40, 0) has norm 50; clipped to 0.5 with lr 1 the step is (-0.3, -0.4, 0).
    direction = torch.tensor([30.0, 40.0, 0.0])
    weight, _ = _one_parameter_run(tmp_path, lambda w: {"loss": (w * direction).sum()}, grad_clip_norm=0.5)
    assert torch.allclose(weight, torch.tensor([-0.3, -0.4, 0.0]), atol=1e-6)
    unclipped, _ = _one_parameter_run(tmp_path / "b", lambda w: {"loss": (w * direction).sum()})
    assert torch.allclose(unclipped, -direction)


def test_loss_terms_are_summed_and_logged(tmp_path, capsys):
    weight, result = _one_parameter_run(
        tmp_path, lambda w: {"loss_a": 1.0 + w.sum(), "loss_b": 2.0 + 2 * w.sum()}
    )
    assert torch.allclose(weight, torch.full((3,), -3.0))  # gradient of the sum is 3 per element
    train = result.history[0].train
    assert train.losses == {"loss": 3.0, "loss_a": 1.0, "loss_b": 2.0} and train.loss == 3.0
    assert train.lr == 1.0 and train.images_per_s > 0
    out = capsys.readouterr().out
    assert "epoch 1/1: loss 3.0000 loss_a 1.0000 loss_b 2.0000" in out


def test_to_device_handles_nested_structures():
    Pair = collections.namedtuple("Pair", "image target")
    batch = {
        "images": torch.rand(2, 3, 4, 5),
        "list": [
            torch.rand(3, 4, 5),
            Pair(torch.rand(1, 3, 2, 2), {"labels": torch.ones(2, 3, 4, 5, dtype=torch.long)}),
        ],
        "name": "keep",
    }
    moved = to_device(batch, "cpu", channels_last=True)
    assert moved["images"].is_contiguous(memory_format=torch.channels_last)
    assert not moved["images"].is_contiguous()
    assert moved["list"][0].is_contiguous()  # a 3-D image stays as it is
    assert isinstance(moved["list"][1], Pair)
    assert moved["list"][1].image.is_contiguous(memory_format=torch.channels_last)
    assert moved["list"][1].target["labels"].is_contiguous()  # integer tensors keep their layout
    assert moved["name"] == "keep"
    assert torch.equal(moved["images"], batch["images"])


def test_argument_errors(tmp_path):
    model, loader = _tiny_net(0), build_train_loader(RandomAugmentedImages(), CFG)
    with pytest.raises(ValueError, match="needs an evaluate callback"):
        fit(model, loader, CFG, loss_fn=_classification_loss, output_dir=tmp_path, best_metric="AP")
    with pytest.raises(FileNotFoundError, match="last.pt does not exist"):
        fit(model, loader, CFG, loss_fn=_classification_loss, output_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"best_metric 'AP' is not among the evaluation metrics \['acc'"):
        fit(model, loader, CFG, loss_fn=_classification_loss, output_dir=tmp_path,
            evaluate=lambda m, e: {"acc": 1.0}, best_metric="AP")
    with pytest.raises(ValueError, match="non-empty dict of scalar loss tensors"):
        fit(model, loader, CFG, loss_fn=lambda m, b, d: m(b[0]).sum(), output_dir=tmp_path / "x")


SHORT = TrainConfig(**{**CFG.__dict__, "epochs": 1})
MESSAGE_END = "--resume to continue it, --overwrite to start over, or --output-dir for a new folder"


def test_run_folder_with_checkpoints_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    folder = tmp_path / "run"
    evaluate = _accuracy_on(RandomAugmentedImages())
    fit(_tiny_net(0), build_train_loader(RandomAugmentedImages(), SHORT), SHORT, loss_fn=_classification_loss,
        output_dir=folder, evaluate=evaluate, best_metric="acc")  # fmt: skip
    best_bytes = (folder / "best.pt").read_bytes()
    with pytest.raises(RunFolderError) as caught:
        fit(_tiny_net(1), build_train_loader(RandomAugmentedImages(), SHORT), SHORT, loss_fn=_classification_loss,
            output_dir=folder, evaluate=evaluate, best_metric="acc")  # fmt: skip
    message = str(caught.value)
    assert str(folder) in message and "last.pt, best.pt" in message and message.endswith(MESSAGE_END)
    assert (folder / "best.pt").read_bytes() == best_bytes  # the earlier run's best is untouched

    check_run_folder(tmp_path / "new", resume=None, overwrite=False)  # a folder that does not exist yet
    check_run_folder(folder, resume=True, overwrite=False)
    with pytest.raises(RunFolderError, match="pick one"):
        check_run_folder(folder, resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        check_run_folder(tmp_path / "file", resume=None, overwrite=False)

    # --overwrite starts over: the old checkpoints go, so no stale best.pt outlives its run.
    capsys.readouterr()
    result = fit(_tiny_net(1), build_train_loader(RandomAugmentedImages(), SHORT), SHORT,
                 loss_fn=_classification_loss, output_dir=folder, overwrite=True)  # fmt: skip
    assert "--overwrite: removed last.pt, best.pt of the previous run" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "metrics.csv", "results.png"]
    assert result.best_checkpoint is None
    assert load_checkpoint(folder / "last.pt")["history"][0]["metrics"] == {}


def test_last_checkpoint_precedes_evaluation_and_resume_finishes_it(tmp_path, capsys):
    dataset = RandomAugmentedImages()
    accuracy = _accuracy_on(dataset)
    full = _tiny_net(0)
    result_full = fit(full, build_train_loader(dataset, CFG), CFG, loss_fn=_classification_loss,
                      output_dir=tmp_path / "full", evaluate=accuracy, best_metric="acc")  # fmt: skip

    def crashing_evaluate(model, epoch):
        if epoch == 2:
            raise _Killed  # evaluation crashes (or the job is killed) after epoch 2 trained
        return accuracy(model, epoch)

    with pytest.raises(_Killed):
        fit(_tiny_net(0), build_train_loader(dataset, CFG), CFG, loss_fn=_classification_loss,
            output_dir=tmp_path / "cut", evaluate=crashing_evaluate, best_metric="acc")  # fmt: skip
    last = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert last["epoch"] == 2 and last["evaluation_pending"] is True  # epoch 2's training is kept
    assert [h["metrics"] for h in last["history"]] == [result_full.history[0].metrics, {}]
    assert load_checkpoint(tmp_path / "cut" / "best.pt")["epoch"] == 1

    capsys.readouterr()
    resumed = _tiny_net(5)
    result = fit(resumed, build_train_loader(RandomAugmentedImages(), CFG), CFG, loss_fn=_classification_loss,
                 output_dir=tmp_path / "cut", evaluate=accuracy, best_metric="acc", resume=True)  # fmt: skip
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split(":")[0] for line in printed] == ["epoch 2/3", "epoch 3/3"]  # epoch 2 evaluated first
    assert result.epochs_run == 1 and [h.epoch for h in result.epochs_trained_here] == [3]
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [h.metrics for h in result.history] == [h.metrics for h in result_full.history]
    assert result.best == result_full.best
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["evaluation_pending"] is False


def test_temporaries_of_an_interrupted_save_are_removed(tmp_path, capsys):
    tmp_path.joinpath(".last.pt.k2j4h1.tmp").write_bytes(b"half a checkpoint")
    tmp_path.joinpath(".best.pt.a8b7c6.tmp").write_bytes(b"half a checkpoint")
    tmp_path.joinpath(".notes.txt.tmp").write_text("not ours")
    fit(_tiny_net(0), build_train_loader(RandomAugmentedImages(), SHORT), SHORT, loss_fn=_classification_loss,
        output_dir=tmp_path)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.tmp", "last.pt", "metrics.csv", "results.png"]
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("removed")]
    assert len(notes) == 2 and ".last.pt.k2j4h1.tmp" in notes[0] and ".best.pt.a8b7c6.tmp" in notes[1]


def _detection_meta(head: str, width: float) -> dict:
    return {"task": "detection", "head": head, "config": {"model": {"head": head, "backbone": {"width_mult": width}}}}


@pytest.mark.parametrize(
    "wanted,expected",
    [
        (_detection_meta("faster_rcnn", 0.5), "config wants a detection model (head faster_rcnn, backbone width 0.5)"),
        (_detection_meta("ssd", 1.0), "but the config wants a detection model (head ssd, backbone width 1.0)"),
        ({"task": "face", "head": "face_embedding", "config": {}}, "wants a face model (head face_embedding)"),
    ],
)
def test_resume_names_a_checkpoint_of_another_run(tmp_path, wanted, expected):
    fit(_tiny_net(0), build_train_loader(RandomAugmentedImages(), SHORT), SHORT, loss_fn=_classification_loss,
        output_dir=tmp_path, checkpoint_meta=_detection_meta("ssd", 0.5))  # fmt: skip
    with pytest.raises(ValueError) as caught:
        fit(_tiny_net(0), build_train_loader(RandomAugmentedImages(), CFG), CFG, loss_fn=_classification_loss,
            output_dir=tmp_path, checkpoint_meta=wanted, resume=True)  # fmt: skip
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "last.pt") in message
    assert "it holds a detection model (head ssd, backbone width 0.5)" in message and expected in message
    assert "--weights-backbone" in message


def test_resume_into_a_model_that_does_not_fit_is_one_line(tmp_path):
    fit(_tiny_net(0), build_train_loader(RandomAugmentedImages(), SHORT), SHORT, loss_fn=_classification_loss,
        output_dir=tmp_path)  # fmt: skip
    wider = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))  # fmt: skip
    with pytest.raises(ValueError) as caught:
        fit(wider, build_train_loader(RandomAugmentedImages(), CFG), CFG, loss_fn=_classification_loss,
            output_dir=tmp_path, resume=True)  # fmt: skip
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600
    assert message.startswith(f"cannot resume from {tmp_path / 'last.pt'}: its weights do not fit this model")
    assert "Error(s) in loading state_dict for Sequential" in message and "--weights-backbone" in message


def test_checkpoints_hold_only_what_weights_only_loading_reads(tmp_path):
    fit(_tiny_net(0), build_train_loader(RandomAugmentedImages(), SHORT), SHORT, loss_fn=_classification_loss,
        output_dir=tmp_path, evaluate=_accuracy_on(RandomAugmentedImages()), best_metric="acc")  # fmt: skip
    for name in ("last.pt", "best.pt"):
        raw = torch.load(tmp_path / name, weights_only=True)  # raises on any pickled Python object
        numpy_state = raw["rng"]["numpy"]
        assert numpy_state["keys"].dtype == torch.int64 and numpy_state["keys"].shape == (624,)
        assert isinstance(raw["rng"]["python"], tuple)


def test_rng_state_round_trip_restores_every_stream():
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]
    # A state captured before RNG states were stored as tensors (numpy's own tuple) still restores.
    legacy = {**state, "numpy": np.random.get_state()}
    draw = np.random.rand(2)
    restore_rng_state(legacy)
    assert np.array_equal(np.random.rand(2), draw)
