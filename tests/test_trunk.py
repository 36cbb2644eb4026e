"""One trunk preparation for every model: weights, strictness and trainable_stages act the same.

Every detector head, the face student and the classifier get their MobileNetV1 from
:func:`mnapps.backbones.prepare_trunk`. The same backbone config must therefore freeze the same
stages (parameters and BatchNorm statistics) and load the same tensors in all of them, and a
checkpoint that does not fit must be refused the same way, naming the first bad tensor.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from mnapps.backbones import MobileNetV1, prepare_trunk
from mnapps.backbones.trunk import _TRUNK_KEY
from mnapps.checkpoint import save_checkpoint
from mnapps.config import BackboneConfig
from mnapps.heads import HEADS
from mnapps.heads.face_embedding import FaceModelConfig, build_face_embedder
from mnapps.tasks.classification import ClsModelConfig, build_classifier

STAGES = ["stem"] + [f"block{i}" for i in range(1, 14)]


def build(name: str, backbone: BackboneConfig, weights=None) -> torch.nn.Module:
    if name == "face":
        return build_face_embedder(FaceModelConfig(backbone=backbone, input_size=64), weights_backbone=weights)
    if name == "classifier":
        return build_classifier(ClsModelConfig(backbone=backbone), 3, weights_backbone=weights)
    spec = HEADS[name]
    return spec.build(spec.settings_cls(), num_classes=3, backbone_cfg=backbone, weights_backbone=weights)


MODELS = [*HEADS, "face", "classifier"]


def canonical(name: str) -> str:
    return _TRUNK_KEY.search(name).group(1)


def frozen_trunk(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """(stages whose parameters do not train, stages holding a FrozenBatchNorm2d)."""
    no_grad = {canonical(n).split(".")[0] for n, p in model.named_parameters() if _TRUNK_KEY.search(n) and not p.requires_grad}
    frozen_bn = {canonical(n + ".x").split(".")[0] for n, m in model.named_modules()
                 if isinstance(m, FrozenBatchNorm2d) and _TRUNK_KEY.search(n + ".x")}
    return no_grad, frozen_bn


@pytest.mark.parametrize("trainable_stages", [None, 0, 3, 14])
@pytest.mark.parametrize("name", MODELS)
def test_trainable_stages_freeze_the_same_stages_everywhere(name, trainable_stages):
    model = build(name, BackboneConfig(width_mult=0.25, trainable_stages=trainable_stages))
    expected = set() if trainable_stages is None else set(STAGES[: len(STAGES) - trainable_stages])
    no_grad, frozen_bn = frozen_trunk(model)
    assert no_grad == expected  # torchvision's trainable_layers: the deepest N stages train
    assert frozen_bn == expected  # and the frozen ones keep their BatchNorm statistics


@pytest.mark.parametrize("name", MODELS)
def test_trainable_stages_out_of_range_is_the_same_error(name):
    with pytest.raises(ValueError, match=r"trainable_stages must be an integer in \[0, 14\]"):
        build(name, BackboneConfig(width_mult=0.25, trainable_stages=15))


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    trunk = MobileNetV1(0.25, num_classes=0)
    with torch.no_grad():
        for buffer in trunk.buffers():
            if buffer.dtype.is_floating_point:
                buffer.uniform_(0.5, 1.5)  # non-default BN statistics, so loading them is visible
    path = tmp_path_factory.mktemp("trunk") / "source.pt"
    save_checkpoint({"task": "classification", "config": {}, "model": trunk.state_dict()}, path)
    return path, trunk.state_dict()


@pytest.mark.parametrize("name", MODELS)
def test_trunk_weights_load_identically_everywhere(name, source_checkpoint):
    path, source = source_checkpoint
    model = build(name, BackboneConfig(width_mult=0.25, trainable_stages=2), weights=str(path))
    report = model.backbone_load_report
    assert report.complete and report.loaded == len([k for k in source if not k.endswith("num_batches_tracked")])
    state = model.state_dict()
    copies = {}
    for key, value in state.items():
        match = _TRUNK_KEY.search(key)
        if match and not key.endswith("num_batches_tracked"):
            copies.setdefault(match.group(1), []).append(value)
    assert set(copies) == {k for k in source if not k.endswith("num_batches_tracked")}
    for key, values in copies.items():
        for value in values:  # frozen stages too: FrozenBatchNorm2d kept the loaded statistics
            torch.testing.assert_close(value, source[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_a_checkpoint_of_another_width_is_refused_naming_the_tensor(name, source_checkpoint):
    path, _ = source_checkpoint
    with pytest.raises(ValueError) as info:
        build(name, BackboneConfig(width_mult=0.5), weights=str(path))
    message = str(info.value)
    # block1.depthwise.bn.bias is the first trunk tensor in sorted order: 8 channels at x0.25, 16 at x0.5.
    assert "tensor block1.depthwise.bn.bias (8,) vs (16,) (checkpoint vs model) (and 134 more)" in message
    assert "strict_weights=false" in message


@pytest.mark.parametrize("name", MODELS)
def test_non_strict_loading_reports_what_did_not_fit(name, source_checkpoint):
    path, _ = source_checkpoint
    model = build(name, BackboneConfig(width_mult=0.5, strict_weights=False), weights=str(path))
    report = model.backbone_load_report
    assert report.loaded == 0 and len(report.shape_mismatch) == 135  # every trunk tensor, none fits
    assert not report.complete


def test_prepare_trunk_without_weights_reports_nothing():
    trunk, report = prepare_trunk(BackboneConfig(width_mult=0.25))
    assert report is None and isinstance(trunk, MobileNetV1)
