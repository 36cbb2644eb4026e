"""The run folder a training run leaves: metrics.csv (one row per epoch, resume-safe) and results.png."""

from __future__ import annotations

import csv
import sys
import types

import pytest
import torch
from PIL import Image
from test_engine import CFG, RandomAugmentedImages, _accuracy_on, _classification_loss, _Killed, _killed_at_call, _tiny_net, fit

from mnapps.engine import run_log
from mnapps.engine.distributed import build_train_loader
from mnapps.engine.result import EpochRecord, EpochStats


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_history_rows_name_every_value():
    history = [
        EpochRecord(1, EpochStats({"loss": 2.0, "cls": 1.5, "box": 0.5}, lr=0.1, images_per_s=10.0, time_s=3.0)),
        EpochRecord(2, EpochStats({"loss": 1.0, "cls": 0.75, "box": 0.25}, lr=0.05, images_per_s=12.0, time_s=2.5),
                    {"AP": 0.25, "note": "text is left out"}),
    ]  # fmt: skip
    columns, rows = run_log.history_rows(history)
    assert columns == ["epoch", "train/loss", "train/cls", "train/box", "lr", "images_per_s", "time_s", "val/AP"]
    assert rows[1] == {"epoch": 2, "train/loss": 1.0, "train/cls": 0.75, "train/box": 0.25, "lr": 0.05,
                       "images_per_s": 12.0, "time_s": 2.5, "val/AP": 0.25}  # fmt: skip
    assert "val/AP" not in rows[0]


def test_a_run_writes_metrics_csv_and_results_png_and_says_where(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_log.importlib.util, "find_spec", lambda name: None)  # as without tensorboard
    dataset = RandomAugmentedImages()
    result = fit(_tiny_net(0), build_train_loader(dataset, CFG), CFG, loss_fn=_classification_loss,
                 output_dir=tmp_path, evaluate=_accuracy_on(dataset), best_metric="acc")  # fmt: skip
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row, entry in zip(rows, result.history, strict=True):
        assert float(row["train/loss"]) == pytest.approx(entry.train.loss, rel=1e-5)
        assert float(row["lr"]) == pytest.approx(entry.train.lr, rel=1e-5)
        assert float(row["val/acc"]) == pytest.approx(entry.metrics["acc"], rel=1e-5)
    with Image.open(tmp_path / "results.png") as image:
        assert image.format == "PNG" and image.width > 600
    out = capsys.readouterr().out
    assert out.count("run log: ") == 1 and "pip install tensorboard" in out


def test_a_resumed_run_lists_every_epoch_once(tmp_path):
    dataset = RandomAugmentedImages()
    evaluate = _accuracy_on(dataset)
    full = fit(_tiny_net(0), build_train_loader(dataset, CFG), CFG, loss_fn=_classification_loss,
               output_dir=tmp_path / "full", evaluate=evaluate, best_metric="acc")  # fmt: skip
    with pytest.raises(_Killed):
        fit(_tiny_net(0), build_train_loader(dataset, CFG), CFG, loss_fn=_killed_at_call(6 + 6 + 3),
            output_dir=tmp_path / "cut", evaluate=evaluate, best_metric="acc")  # fmt: skip
    assert [int(r["epoch"]) for r in _read_csv(tmp_path / "cut" / "metrics.csv")] == [1, 2]
    torch.manual_seed(5)
    fit(_tiny_net(9), build_train_loader(RandomAugmentedImages(), CFG), CFG, loss_fn=_classification_loss,
        output_dir=tmp_path / "cut", evaluate=evaluate, best_metric="acc", resume=True)  # fmt: skip
    rows = _read_csv(tmp_path / "cut" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [r["val/acc"] for r in rows] == [r["val/acc"] for r in _read_csv(tmp_path / "full" / "metrics.csv")]
    assert [e.metrics["acc"] for e in full.history] == pytest.approx([float(r["val/acc"]) for r in rows])


def test_tensorboard_gets_every_scalar_of_the_epoch_when_installed(tmp_path, capsys, monkeypatch):
    # tensorboard is an optional extra; a stand-in SummaryWriter records what the run log sends it.
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, name, value, global_step):
            calls.append((name, value, global_step))

        def flush(self):
            calls.append(("flush",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(run_log.importlib.util, "find_spec", lambda name: object())
    history = [EpochRecord(1, EpochStats({"loss": 2.0}, lr=0.1, images_per_s=5.0, time_s=1.0)),
               EpochRecord(2, EpochStats({"loss": 1.0}, lr=0.05, images_per_s=6.0, time_s=1.0), {"AP": 0.5})]
    run_log.log_epoch(tmp_path, history[:1], log=print)
    run_log.log_epoch(tmp_path, history, log=print)
    assert calls[0] == ("open", str(tmp_path / "tensorboard"))
    assert ("train/loss", 2.0, 1) in calls and ("train/loss", 1.0, 2) in calls and ("val/AP", 0.5, 2) in calls
    assert sum(1 for c in calls if c[0] == "open") == 1  # one writer per run folder
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}" in capsys.readouterr().out
