"""The checkpoint format: round trip, atomic writes, backbone transfer between models."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from mnapps.backbones import MobileNetV1
from mnapps import checkpoint as ckpt
from mnapps.backbones.trunk import extract_backbone_state, load_backbone_weights
from mnapps.checkpoint import load_checkpoint, save_checkpoint

# 27 convolutions, each with a weight and four BN tensors (weight, bias, running mean/var).
TRUNK_TENSORS = 27 * 5


class _Detector(nn.Module):
    """A stand-in head model that embeds the trunk under a prefix, as torchvision detectors do."""

    def __init__(self, width_mult: float = 0.25, variant: str = "standard") -> None:
        super().__init__()
        trunk = MobileNetV1(width_mult, 0, variant=variant)
        self.backbone = nn.Module()
        self.backbone.body = trunk.features_extractor([trunk.stage_names[-1]])
        self.head = nn.Conv2d(trunk.num_features, 4, 1)


def _classifier_payload(model: MobileNetV1) -> dict:
    return {"task": "classification", "head": None, "config": {"model": {"width_mult": model.width_mult}},
            "model": model.state_dict(), "epoch": 3, "metrics": {"top1": 0.5}}


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)


def test_round_trip(tmp_path):
    model = MobileNetV1(0.25, 10)
    path = save_checkpoint(_classifier_payload(model), tmp_path / "sub" / "model.pt")
    loaded = load_checkpoint(path)
    assert loaded["format"] == "mnapps-checkpoint" and loaded["version"] == 1
    assert (loaded["task"], loaded["epoch"], loaded["metrics"]) == ("classification", 3, {"top1": 0.5})
    assert loaded["config"] == {"model": {"width_mult": 0.25}}
    restored = MobileNetV1(0.25, 10)
    restored.load_state_dict(loaded["model"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key])


def test_atomic_write_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "model": {}}, path)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "model": {}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left behind


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(garbage)
    other = tmp_path / "other.pt"
    torch.save({"weights": [1, 2]}, other)
    with pytest.raises(ValueError, match="neither an mnapps checkpoint nor a state dict"):
        load_checkpoint(other)


def test_bare_state_dict_is_accepted(tmp_path):
    model = MobileNetV1(0.25, 3)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert load_checkpoint(tmp_path / "bare.pt")["format"] == "state_dict"


def test_backbone_from_classifier_into_prefixed_trunk(tmp_path):
    classifier = MobileNetV1(0.25, 10)
    _randomise_bn(classifier)
    path = save_checkpoint(_classifier_payload(classifier), tmp_path / "cls.pt")
    detector = _Detector(0.25)
    head_before = detector.head.weight.clone()
    report = load_backbone_weights(detector, path, strict=True)
    assert report.loaded == TRUNK_TENSORS
    assert report.missing == report.unexpected == report.shape_mismatch == []
    source = classifier.state_dict()
    target = detector.state_dict()
    for key, value in source.items():
        if key.startswith(("stem", "block")) and not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(target[f"backbone.body.body.{key}"], value, rtol=0, atol=0)
    assert torch.equal(detector.head.weight, head_before)  # the classifier never moves into heads
    assert "loaded 135 backbone tensors" in str(report)


def test_backbone_between_two_heads_via_state_dict():
    first, second = _Detector(0.25), _Detector(0.25)
    _randomise_bn(first)
    report = load_backbone_weights(second, {"model": first.state_dict()})
    assert report.loaded == TRUNK_TENSORS
    key = "backbone.body.body.block13.pointwise.bn.running_mean"
    assert torch.equal(second.state_dict()[key], first.state_dict()[key])


def test_missing_and_unexpected_keys_are_reported():
    shallow = MobileNetV1(0.25, 0, variant="shallow").state_dict()
    standard_target = _Detector(0.25)
    report = load_backbone_weights(standard_target, shallow)
    missing_blocks = {key.split(".")[0] for key in report.missing}
    assert missing_blocks == {"block7", "block8", "block9", "block10", "block11"}
    assert report.loaded == TRUNK_TENSORS - 5 * 2 * 5
    assert "missing in checkpoint: 50" in str(report)

    report = load_backbone_weights(_Detector(0.25, "shallow"), MobileNetV1(0.25, 0).state_dict())
    assert len(report.unexpected) == 50 and "unexpected in checkpoint: 50" in str(report)
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone_weights(_Detector(0.25, "shallow"), MobileNetV1(0.25, 0).state_dict(), strict=True)


def test_shape_mismatch_is_reported_not_loaded():
    target = _Detector(0.5)
    before = target.state_dict()["backbone.body.body.stem.conv.weight"].clone()
    report = load_backbone_weights(target, MobileNetV1(0.25, 0).state_dict())
    assert report.loaded == 0 and len(report.shape_mismatch) == TRUNK_TENSORS
    assert "stem.conv.weight (8, 3, 3, 3) vs (16, 3, 3, 3)" in report.shape_mismatch
    assert torch.equal(target.state_dict()["backbone.body.body.stem.conv.weight"], before)


def test_no_trunk_in_source_or_target():
    with pytest.raises(ValueError, match="holds no MobileNetV1 trunk"):
        load_backbone_weights(_Detector(0.25), OrderedDict(fc=torch.zeros(2)))
    with pytest.raises(ValueError, match="contains no MobileNetV1 trunk"):
        load_backbone_weights(nn.Linear(2, 2), MobileNetV1(0.25, 0).state_dict())


def test_extract_backbone_state_strips_any_prefix():
    state = {"model.backbone.body.stem.conv.weight": torch.ones(1), "head.cls.weight": torch.ones(1)}
    assert list(extract_backbone_state(state)) == ["stem.conv.weight"]
