"""Fine-tuning a whole detector (``train_det --weights``): frozen BatchNorm on either side, and a
``model`` section in ``--config``, which must agree with the checkpoint or be refused by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from mnapps.checkpoint import Checkpoint, read_checkpoint
from mnapps.cli import train_det
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.tasks.detection import build_model, fine_tune_config, load_detector, load_detector_weights

DETECTOR = Path(__file__).parent / "fixtures" / "format1_detection.pt"  # SSD x0.25 at 64 px, 5 classes
COUNTER = "num_batches_tracked"


def _with_frozen_bn(cfg, frozen: bool):
    backbone = dataclasses.replace(cfg.model.backbone, frozen_bn=frozen)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone))


def test_a_frozen_bn_model_starts_from_a_detector_trained_with_batchnorm():
    _, cfg = load_detector(DETECTOR)
    stored = read_checkpoint(DETECTOR).weights
    model = build_model(_with_frozen_bn(cfg, True), 5)
    own = model.state_dict()
    trunk = "backbone.trunk."  # frozen_bn freezes the trunk's BatchNorm; the SSD extras keep theirs
    assert not any(key.startswith(trunk) and key.endswith(COUNTER) for key in own)
    assert any(key.startswith(trunk) and key.endswith(COUNTER) for key in stored)
    lines = load_detector_weights(model, DETECTOR, 5)
    assert lines == [f"loaded {len(own)} of {len(own)} tensors from {DETECTOR}"]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], stored[key]) for key in own)  # running statistics included


def test_a_batchnorm_model_starts_from_a_frozen_bn_detector():
    _, cfg = load_detector(DETECTOR)
    frozen = build_model(_with_frozen_bn(cfg, True), 5)
    load_detector_weights(frozen, DETECTOR, 5)
    record = Checkpoint(task="detection", head="ssd", config={"model": {}}, weights=frozen.state_dict())
    model = build_model(cfg, 5)
    lines = load_detector_weights(model, record, 5)
    trunk_counters = sum(key.startswith("backbone.trunk.") and key.endswith(COUNTER) for key in model.state_dict())
    total = len(model.state_dict())
    assert trunk_counters == 27 and lines == [f"loaded {total - trunk_counters} of {total} tensors from the given checkpoint"]
    stored = read_checkpoint(DETECTOR).weights
    assert all(torch.equal(value, stored[key]) for key, value in model.state_dict().items() if not key.endswith(COUNTER))


def test_other_misfits_are_still_refused():
    _, cfg = load_detector(DETECTOR)
    wider = build_model(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, backbone=dataclasses.replace(cfg.model.backbone, width_mult=0.5, frozen_bn=True))), 5)
    with pytest.raises(ValueError, match=r"does not fit the configured SSD: backbone\.trunk\.stem\.conv\.weight"):
        load_detector_weights(wider, DETECTOR, 5)


def _config(tmp_path: Path, model: dict) -> Path:
    path = tmp_path / "fine_tune.yaml"
    path.write_text(yaml.safe_dump({"model": model, "train": {"epochs": 1}}))
    return path


def test_a_model_key_of_the_config_that_differs_from_the_checkpoint_is_refused_by_name(tmp_path):
    config = _config(tmp_path, {"backbone": {"frozen_bn": True}})
    with pytest.raises(ValueError, match=r"fine_tune\.yaml: model\.backbone\.frozen_bn is True but with --weights .*"
                                         r"\(False\); remove model\.backbone\.frozen_bn from the file, or pass "
                                         r"--set model\.backbone\.frozen_bn=VALUE"):
        fine_tune_config(DETECTOR, config)
    # The same setting as an override is honoured; a key that agrees with the checkpoint is fine.
    assert fine_tune_config(DETECTOR, None, ["model.backbone.frozen_bn=true"]).model.backbone.frozen_bn
    agreeing = _config(tmp_path, {"head": "ssd", "backbone": {"width_mult": 0.25}, "ssd": {"size": 64}})
    cfg = fine_tune_config(DETECTOR, agreeing)
    assert cfg.train.epochs == 1 and cfg.model.head_settings.size == 64
    # The head's default config (not chosen by the user) is read for data/train only.
    other = _config(tmp_path, {"backbone": {"width_mult": 0.5}, "ssd": {"size": 192}})
    cfg = fine_tune_config(DETECTOR, other, config_is_default=True)
    assert (cfg.model.backbone.width_mult, cfg.model.head_settings.size, cfg.train.epochs) == (0.25, 64, 1)


def test_train_det_weights_with_frozen_bn_and_a_model_section(tmp_path, capsys, checkpoint_reads):
    shapes = ensure_shapes_detection(tmp_path / "shapes", num_train=4, num_val=2, image_size=96, progress=False)
    data = ["--train-ann", str(shapes.train_ann), "--train-images", str(shapes.train_images),
            "--val-ann", str(shapes.val_ann), "--val-images", str(shapes.val_images)]
    fast = ["--epochs", "1", "--batch-size", "2", "--set", "train.num_workers=0", "--set", "train.num_threads=1",
            "--set", "train.channels_last=false", "--set", "train.warmup_epochs=0.0", "--set", "data.eval_batch_size=2"]
    config = _config(tmp_path, {"backbone": {"frozen_bn": True}})
    code = train_det.main(["--weights", str(DETECTOR), "--config", str(config), *data, *fast,
                           "--output-dir", str(tmp_path / "refused")])
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("first use:")]
    assert code == 2 and len(errors) == 1 and "model.backbone.frozen_bn" in errors[0]

    out = tmp_path / "frozen"
    checkpoint_reads.clear()
    code = train_det.main(["--weights", str(DETECTOR), *data, *fast, "--set", "model.backbone.frozen_bn=true",
                           "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"weights: loaded " in printed and "does not fit" not in printed
    assert checkpoint_reads.count(DETECTOR) == 1  # one read gives the config its model section and the model its tensors
    model, cfg = load_detector(out / "last.pt")
    assert cfg.model.backbone.frozen_bn
    # Frozen BatchNorm kept the checkpoint's statistics through the epoch.
    key = "backbone.trunk.stem.bn.running_mean"
    assert torch.equal(model.state_dict()[key], read_checkpoint(DETECTOR).weights[key])
