"""Students of a detector: BatchNorm recalibration keeps the eval function, slimming keeps channels.

Runs on small generated SSDs (no ../shared needed). The folded-BatchNorm case is built the way an
imported TF model arrives: identity BatchNorms (mean 0, variance 1, gamma 1) after convolutions
whose outputs are far from zero-mean and unit-variance.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
from PIL import Image
import torch
from torch import nn

from mnapps.checkpoint import save_checkpoint
from mnapps.config import BackboneConfig, to_dict
from mnapps.heads.ssd import SSDConfig
from mnapps.tasks.detection.students import reparametrize_batchnorm_keeping_output, slim_state_dict, student_checkpoint
from mnapps.cli import make_student
from mnapps.tasks.detection import DetConfig, DetModelConfig, build_model, load_detector, load_detector_weights

SSD = SSDConfig(size=96, extra_depths=(64, 32, 32, 32), score_activation="sigmoid", preprocess="tf_pad_resize")


def _cfg(width: float, size: int = 96) -> DetConfig:
    model = DetModelConfig(
        head="ssd", backbone=BackboneConfig(width_mult=width, activation="relu6", bn_eps=1e-3, tf_padding=True),
        head_settings=dataclasses.replace(SSD, size=size), num_classes=2, class_names=("__background__", "face"),
    )
    return DetConfig(model=model)


def _folded_model(width: float) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(_cfg(width), 2)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # identity BN, as a folded import loads it
            module.reset_running_stats()
            nn.init.ones_(module.weight)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model.eval()


def _images(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 80 + 8 * i, 96, generator=generator) for i in range(count)]


def _head_outputs(model: nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    batch, _ = model.transform(images)
    features = list(model.backbone(batch.tensors).values())
    return torch.cat([value.flatten(1) for value in model.head(features).values()], dim=1)


def test_recalibration_keeps_the_eval_function_and_moves_train_mode_to_it():
    model = _folded_model(0.25)
    images = _images(6)
    with torch.no_grad():
        before = _head_outputs(model, images)
        # a copy: train mode moves the running statistics it would otherwise leave behind
        train_before = _head_outputs(copy.deepcopy(model).train(), images)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # the first BatchNorm's input is the stem conv's output: its statistics worked out directly
    stem_out = []
    handle = norms[0].register_forward_hook(lambda m, inputs, out: stem_out.append(inputs[0].double()))
    assert reparametrize_batchnorm_keeping_output(model, images) == len(norms)
    handle.remove()
    stem = torch.cat([x.permute(1, 0, 2, 3).flatten(1) for x in stem_out], dim=1)
    torch.testing.assert_close(norms[0].running_mean.double(), stem.mean(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norms[0].running_var.double(), stem.var(dim=1, unbiased=False), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        after = _head_outputs(model.eval(), images)
        train_after = _head_outputs(copy.deepcopy(model).train(), images)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # train mode (batch statistics) now computes nearly what eval mode does; before, it did not
    assert (train_after - after).abs().mean() < 0.2 * (train_before - before).abs().mean()


def test_slimming_keeps_the_strongest_channels_and_loads_strictly():
    teacher = _folded_model(0.5)
    student = build_model(_cfg(0.25), 2)
    state = slim_state_dict(teacher.state_dict(), student.state_dict(), SSD.feature_maps)
    student.load_state_dict(state)  # strict: every tensor there, every shape right
    stem = teacher.state_dict()["backbone.trunk.stem.conv.weight"]
    kept = [int(i) for i in stem.abs().sum(dim=(1, 2, 3)).argsort(descending=True)[: student.state_dict()[
        "backbone.trunk.stem.conv.weight"].shape[0]]]
    torch.testing.assert_close(state["backbone.trunk.stem.conv.weight"], stem[sorted(kept)])
    # the first depthwise conv carries the stem's channels on
    depthwise = teacher.state_dict()["backbone.trunk.block1.depthwise.conv.weight"]
    torch.testing.assert_close(state["backbone.trunk.block1.depthwise.conv.weight"], depthwise[sorted(kept)])
    # same width: nothing is cut
    same = slim_state_dict(teacher.state_dict(), teacher.state_dict(), SSD.feature_maps)
    assert all(torch.equal(same[k], v) for k, v in teacher.state_dict().items())


def test_student_checkpoint_rebuilds_at_the_new_size_and_width(tmp_path, checkpoint_reads):
    teacher = _folded_model(0.5)
    path = save_checkpoint(
        {"task": "detection", "head": "ssd", "config": to_dict(_cfg(0.5)), "model": teacher.state_dict(),
         "epoch": 0, "metrics": {}}, tmp_path / "teacher.pt",
    )
    photos = []  # real files: student_checkpoint reads photos from disk
    for index, image in enumerate(_images(3)):
        photos.append(tmp_path / f"photo{index}.png")

        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(photos[-1])
    output, report = student_checkpoint(path, tmp_path / "student.pt", photos, size=64, width_mult=0.25)
    assert checkpoint_reads == [path]  # the teacher is read once, for its config and its tensors
    model, cfg = load_detector(output)
    assert (cfg.model.head_settings.size, cfg.model.backbone.width_mult) == (64, 0.25)
    assert report["recalibrated"] == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(FileExistsError, match="already exists"):
        student_checkpoint(path, output, photos, size=64)
    with pytest.raises(ValueError, match="above the teacher"):
        student_checkpoint(path, tmp_path / "wide.pt", photos, width_mult=1.0)


def test_make_student_tool_writes_a_checkpoint_train_det_can_load(tmp_path, capsys):
    teacher = _folded_model(0.5)
    path = save_checkpoint(
        {"task": "detection", "head": "ssd", "config": to_dict(_cfg(0.5)), "model": teacher.state_dict(),
         "epoch": 0, "metrics": {}}, tmp_path / "teacher.pt",
    )
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, image in enumerate(_images(2)):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(photos / f"p{index}.png")
    output = tmp_path / "student.pt"
    args = [str(path), "--size", "64", "--width-mult", "0.25", "--photos", str(photos), "--output", str(output)]
    assert make_student.main(args) == 0
    assert "MobileNetV1 x0.25, input 64" in capsys.readouterr().out
    model = build_model(_cfg(0.25, 64), 2)
    assert load_detector_weights(model, output, 2) == [f"loaded {len(model.state_dict())} of {len(model.state_dict())} tensors from {output}"]
    assert make_student.main(args) == 2  # exists: refused without --overwrite
    assert "already exists" in capsys.readouterr().err
