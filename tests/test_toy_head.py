"""Adding a detection head is one module plus one HEADS entry, and nothing else.

This file is that module: a toy single-map SSD head (:class:`ToyConfig`, :func:`build_toy`). Run as
a script it imports the task layer and export first, then registers the head in
:data:`mnapps.heads.HEADS` (the order carries no condition: configs, checkpoints and export look a
head up when they meet its name), then builds, trains a step, saves, loads and exports it with the
ordinary mnapps entry points, and prints what it saw as JSON. The test runs that script in a fresh
process, so the registration never leaks into the other tests, and touches no mnapps file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead

from mnapps.backbones import prepare_trunk
from mnapps.config import BackboneConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ToyConfig:
    """The toy head's settings section (``model.toy``)."""

    size: int = 96
    aspect_ratios: tuple[float, ...] = (2.0,)


class _LastMap(nn.Module):
    """The trunk's deepest map as torchvision's one-entry feature dict (trunk kept as ``trunk``)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, images: torch.Tensor) -> OrderedDict:
        return OrderedDict(last=self.trunk.forward_features(images))


def build_toy(cfg: ToyConfig, *, num_classes: int, backbone_cfg: BackboneConfig | None = None,
              weights_backbone=None) -> SSD:
    """A torchvision SSD predicting from the trunk's last map only."""
    trunk, report = prepare_trunk(backbone_cfg or BackboneConfig(), weights=weights_backbone)
    anchors = DefaultBoxGenerator([list(cfg.aspect_ratios)])
    head = SSDHead([trunk.feature_info()[-1].channels], anchors.num_anchors_per_location(), num_classes)
    model = SSD(_LastMap(trunk), anchors, (cfg.size, cfg.size), num_classes, image_mean=[0.5] * 3,
                image_std=[0.5] * 3, head=head)
    model.backbone_load_report = report
    return model


def _cycle(work: Path) -> dict:
    """Import the task layer, then register the head, then build, train, save, load and export it."""
    from mnapps.checkpoint import read_checkpoint
    from mnapps.config import ConfigError, TrainConfig, load_config, to_dict
    from mnapps.data.synthetic_det import ensure_shapes_detection
    from mnapps.export.pipeline import export_checkpoint
    from mnapps.graph_kind import GraphKind
    from mnapps.heads import HEADS, HeadSpec
    from mnapps.tasks.detection import DetConfig, load_detector, train_detector

    imported_first = "mnapps.tasks.detection" in sys.modules and "mnapps.export.pipeline" in sys.modules
    HEADS["toy"] = HeadSpec(build_toy, ToyConfig, "toy", "unused.yaml", lambda c: c.size, 2, GraphKind.SSD)

    shapes = ensure_shapes_detection(work / "shapes", num_train=4, num_val=2, image_size=96, progress=False)
    yaml_file = work / "toy.yaml"
    yaml_file.write_text("model:\n  head: toy\n  backbone: {width_mult: 0.25}\n  toy: {size: 96}\n")
    overrides = [f"data.train_ann={str(shapes.train_ann)!r}", f"data.train_images={str(shapes.train_images)!r}",
                 f"data.val_ann={str(shapes.val_ann)!r}", f"data.val_images={str(shapes.val_images)!r}",
                 "data.eval_batch_size=2"]
    cfg = load_config(yaml_file, DetConfig, overrides)
    try:
        load_config(yaml_file, DetConfig, ["model.toy.sise=64"])
        misspelt = "accepted"
    except ConfigError as exc:
        misspelt = str(exc)
    cfg = DetConfig(model=cfg.model, data=cfg.data, train=TrainConfig(
        epochs=1, batch_size=4, num_workers=0, num_threads=1, channels_last=False, warmup_epochs=0.0))
    result = train_detector(cfg, output_dir=work / "run", device="cpu")
    model, loaded = load_detector(work / "run" / "last.pt")
    record = read_checkpoint(work / "run" / "last.pt")
    same = all(torch.equal(model.state_dict()[k], record.weights[k]) for k in record.weights)
    exported = export_checkpoint(work / "run" / "last.pt", work / "toy.onnx", num_parity=2)
    return {
        "imported_first": imported_first,
        "misspelt": misspelt,
        "steps": result.fit.history[0].train.loss > 0,
        "ap": "AP" in result.metrics,
        "head": record.head,
        "settings": [type(loaded.model.head_settings).__name__, loaded.model.head_settings.size],
        "saved_sections": list(to_dict(loaded.model)),
        "same_weights": same,
        "onnx": exported.fp32_path.is_file(),
        "parity": [report.name for report in exported.reports if report.passed],
    }


def test_a_head_registered_from_outside_trains_saves_loads_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["imported_first"]  # registered after the task layer and export were imported
    assert seen["misspelt"].startswith("--set model.toy.sise=64: unknown key model.toy.sise in ToyConfig")
    assert seen["misspelt"].endswith("valid keys are: size, aspect_ratios")
    assert seen["steps"] and seen["ap"] and seen["head"] == "toy" and seen["settings"] == ["ToyConfig", 96]
    # only the chosen head's section is saved, under the toy's own key
    assert seen["saved_sections"] == ["head", "backbone", "toy", "num_classes", "class_names", "category_ids"]
    assert seen["same_weights"] and seen["onnx"]
    assert any("detections" in name for name in seen["parity"]), seen["parity"]


if __name__ == "__main__":
    print(json.dumps(_cycle(Path(sys.argv[1]))))
