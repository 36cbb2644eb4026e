"""Checkpoints users already have keep working: format-1 files written by mnapps before the
checkpoint record existed (``tests/fixtures/make_format1_checkpoints.py``) load with every
task's loader and rebuild the very weights they hold."""

from __future__ import annotations

from pathlib import Path

import torch

from mnapps.checkpoint import load_checkpoint
from mnapps.tasks.classification import load_classifier
from mnapps.tasks.detection import load_detector
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
    assert cfg.model.head == "ssd" and cfg.model.ssd.size == 64 and cfg.model.num_classes == 5
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
