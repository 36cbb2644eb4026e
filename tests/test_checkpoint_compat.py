"""Checkpoints users already have keep working: format-1 files written by mnapps before the
checkpoint record existed (``tests/fixtures/make_format1_checkpoints.py``) load with every
task's loader and rebuild the very weights they hold, resume and export; the one legacy layout is
migrated, and a file of a newer format version is refused naming both versions."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnapps.checkpoint import VERSION, load_checkpoint, read_checkpoint
from mnapps.config import TrainConfig
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.export.pipeline import export_checkpoint
from mnapps.tasks.classification import load_classifier
from mnapps.tasks.detection import DetConfig, DetDataConfig, load_detector, train_detector
from mnapps.tasks.face import load_face_embedder

FIXTURES = Path(__file__).parent / "fixtures"


def _same_weights(model: torch.nn.Module, path: Path) -> None:
    stored = torch.load(path, weights_only=True)["model"]
    own = model.state_dict()
    assert set(own) == set(stored)
    assert all(torch.equal(own[k], stored[k]) for k in own)


def test_format1_detection_checkpoint_loads():
    path = FIXTURES / "format1_detection.pt"
    model, cfg = load_detector(path)
    assert cfg.model.head == "ssd" and cfg.model.head_settings.size == 64 and cfg.model.num_classes == 5
    _same_weights(model, path)
    with torch.no_grad():
        assert set(model([torch.rand(3, 60, 80)])[0]) == {"boxes", "labels", "scores"}


def test_format1_classification_checkpoint_loads():
    path = FIXTURES / "format1_classification.pt"
    model, cfg, names = load_classifier(path)
    assert cfg.model.resolution == 32 and len(names) == cfg.model.num_classes
    _same_weights(model, path)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, cfg.model.num_classes)


def test_format1_face_checkpoint_loads():
    path = FIXTURES / "format1_face.pt"
    model, _ = load_face_embedder(path)
    _same_weights(model, path)
    embeddings = model(torch.rand(2, 3, 64, 64))
    assert embeddings.shape == (2, 512)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2), atol=1e-5)


def test_format1_files_are_version_1_training_checkpoints():
    for task in ("detection", "classification", "face"):
        raw = load_checkpoint(FIXTURES / f"format1_{task}.pt")
        assert raw["version"] == 1 and raw["task"] == task and raw["epoch"] == 1 and "optimizer" in raw


def test_a_newer_format_version_is_refused_naming_both_versions(tmp_path):
    raw = load_checkpoint(FIXTURES / "format1_classification.pt")
    path = tmp_path / "future.pt"
    torch.save({**raw, "version": VERSION + 1}, path)
    with pytest.raises(ValueError, match=rf"format version {VERSION + 1}, newer than version {VERSION}"):
        load_classifier(path)
    with pytest.raises(ValueError, match=rf"format version {VERSION + 1}"):
        read_checkpoint(path)


def test_the_legacy_flat_trunk_keys_are_nested_once_for_every_loader(tmp_path):
    raw = load_checkpoint(FIXTURES / "format1_classification.pt")
    model = dict(raw["config"]["model"])
    flat = {**{k: v for k, v in model.items() if k != "backbone"}, **model["backbone"]}
    flat["weights_backbone"] = flat.pop("weights")
    path = tmp_path / "legacy.pt"
    torch.save({**raw, "config": {**raw["config"], "model": flat}}, path)
    record = read_checkpoint(path)
    assert record.backbone_config == model["backbone"]
    classifier, cfg, _ = load_classifier(path)
    assert cfg.model.backbone.width_mult == 0.25
    _same_weights(classifier, FIXTURES / "format1_classification.pt")


def test_the_record_reads_what_fit_wrote_and_writes_it_back_unchanged(tmp_path):
    record = read_checkpoint(FIXTURES / "format1_detection.pt")
    assert record.task == "detection" and record.head == "ssd" and record.epoch == 1
    assert record.training is not None and record.training.history[0]["epoch"] == 1
    again = read_checkpoint(record.save(tmp_path / "again.pt"))
    raw, rewritten = load_checkpoint(FIXTURES / "format1_detection.pt"), load_checkpoint(tmp_path / "again.pt")
    assert sorted(raw) == sorted(rewritten)
    assert again.training.best == record.training.best and again.config == record.config


def test_a_format1_training_checkpoint_resumes(tmp_path):
    shapes = ensure_shapes_detection(tmp_path / "shapes", num_train=4, num_val=2, image_size=96, progress=False)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURES / "format1_detection.pt", run / "last.pt")
    _, stored = load_detector(run / "last.pt")
    data = DetDataConfig(train_ann=str(shapes.train_ann), train_images=str(shapes.train_images),
                         val_ann=str(shapes.val_ann), val_images=str(shapes.val_images), eval_batch_size=2)
    train = TrainConfig(epochs=2, batch_size=4, momentum=0.0, num_workers=0, num_threads=1, channels_last=False,
                        warmup_epochs=0.0)
    cfg = DetConfig(model=replace(stored.model, num_classes=None, class_names=(), category_ids=()), data=data,
                    train=train)
    result = train_detector(cfg, output_dir=run, resume=True, device="cpu")
    assert result.fit.epochs_run == 1 and [h.epoch for h in result.fit.history] == [1, 2]
    # The format-1 epoch came back as a typed record holding the file's very figures.
    assert result.fit.history[0].to_dict() == read_checkpoint(FIXTURES / "format1_detection.pt").training.history[0]


def test_a_format1_checkpoint_exports(tmp_path, checkpoint_reads):
    pytest.importorskip("onnxruntime")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / f"{i}.png")
    result = export_checkpoint(FIXTURES / "format1_classification.pt", tmp_path / "cls.onnx", parity_images=images,
                               num_parity=2)
    assert result.fp32_path.is_file() and all(report.passed for report in result.reports)
    assert checkpoint_reads == [FIXTURES / "format1_classification.pt"]  # read once: model, plan and data
