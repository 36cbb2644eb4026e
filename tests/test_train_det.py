"""tools/train_det.py end to end on a tiny generated COCO-format dataset.

Each run trains a width-0.25 SSD at 96x96 for a step or two: the point is the plumbing (data ->
engine -> COCO evaluation -> checkpoints -> reload), not the accuracy.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from mnapps.backbones import MobileNetV1
from mnapps.data.synthetic_det import SHAPE_CATEGORIES, ensure_shapes_detection
from mnapps.checkpoint import load_checkpoint, save_checkpoint
from mnapps.tasks.detection import load_detector
from mnapps.eval.coco import COCO_METRIC_NAMES

from mnapps.cli import train_det

TINY = [
    "--set", "model.backbone.width_mult=0.25",
    "--set", "model.ssd.size=96",
    "--set", "train.num_workers=0",
    "--set", "train.num_threads=1",
    "--set", "train.channels_last=false",
    "--set", "train.warmup_epochs=0.0",
    "--set", "data.eval_batch_size=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    return ensure_shapes_detection(
        tmp_path_factory.mktemp("data") / "shapes", num_train=8, num_val=4, image_size=96, progress=False
    )


def _data_args(paths) -> list[str]:
    return [
        "--train-ann", str(paths.train_ann), "--train-images", str(paths.train_images),
        "--val-ann", str(paths.val_ann), "--val-images", str(paths.val_images),
    ]  # fmt: skip


def _run(args: list[str]) -> int:
    return train_det.main(args)


def test_train_evaluate_checkpoint_and_reload(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "run"
    code = _run(["--head", "ssd", *_data_args(tiny_shapes), "--epochs", "1", "--batch-size", "4",
                 "--output-dir", str(out), *TINY])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]" in printed
    assert "8 images (0 without boxes)" in printed  # the end-of-run data report

    metrics = json.loads((out / "metrics.json").read_text())
    assert all(isinstance(metrics[name], (int, float)) for name in COCO_METRIC_NAMES)
    assert set(metrics["per_class_AP"]) <= {c["name"] for c in SHAPE_CATEGORIES}

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["num_classes"] == 5
    assert resolved["model"]["class_names"] == ["__background__", "circle", "square", "triangle", "cross"]
    assert resolved["model"]["category_ids"] == [2, 5, 9, 11]  # the dataset's own, non-contiguous ids

    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["task"] == "detection" and checkpoint["head"] == "ssd" and checkpoint["epoch"] == 1
    assert (out / "best.pt").is_file()
    model, cfg = load_detector(out / "best.pt")
    assert not model.training and cfg.model.head_settings.size == 96
    with torch.no_grad():
        detections = model([torch.rand(3, 80, 100)])
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def test_resume_gives_the_same_model_as_an_uninterrupted_run(tiny_shapes, tmp_path):
    # A constant lr makes the schedule independent of the planned length, so a 1-epoch run
    # is a 2-epoch run killed after its first epoch, except that it is evaluated at its end
    # (the straight run, evaluating every 2 epochs, is not): evaluation must not disturb training.
    common = ["--head", "ssd", *_data_args(tiny_shapes), "--batch-size", "4", *TINY,
              "--set", "train.schedule=constant", "--set", "train.eval_every=2"]  # fmt: skip
    assert _run([*common, "--epochs", "2", "--output-dir", str(tmp_path / "straight")]) == 0
    assert _run([*common, "--epochs", "1", "--output-dir", str(tmp_path / "split")]) == 0
    assert _run([*common, "--epochs", "2", "--output-dir", str(tmp_path / "split"), "--resume"]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")
    assert resumed["epoch"] == straight["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert resumed["metrics"]["AP"] == straight["metrics"]["AP"]


def test_unknown_head_is_a_clear_error(capsys):
    assert _run(["--head", "yolo"]) == 2
    err = capsys.readouterr().err
    assert "unknown head 'yolo'" in err and "'ssd'" in err and "'ssdlite'" in err


def test_half_given_data_and_missing_files_are_clear_errors(tiny_shapes, tmp_path, capsys):
    assert _run(["--head", "ssd", "--train-ann", str(tiny_shapes.train_ann), *TINY]) == 2
    assert "--train-images" in capsys.readouterr().err
    missing = tmp_path / "nope.json"
    args = _data_args(tiny_shapes)
    args[1] = str(missing)
    assert _run(["--head", "ssd", *args, "--output-dir", str(tmp_path / "x"), *TINY]) == 2
    assert str(missing) in capsys.readouterr().err


def test_batch_of_one_is_refused_for_ssd(tiny_shapes, tmp_path, capsys):
    code = _run(["--head", "ssd", *_data_args(tiny_shapes), "--batch-size", "1", "--output-dir", str(tmp_path), *TINY])
    assert code == 2
    assert "batch_size" in capsys.readouterr().err


def test_backbone_weights_from_a_classification_checkpoint(tiny_shapes, tmp_path, capsys):
    classifier = MobileNetV1(0.25, num_classes=6)
    weights = save_checkpoint(
        {"task": "classification", "head": None, "config": {}, "model": classifier.state_dict()}, tmp_path / "cls.pt"
    )
    code = _run(["--head", "ssd", *_data_args(tiny_shapes), "--epochs", "1", "--batch-size", "4",
                 "--output-dir", str(tmp_path / "run"), "--backbone-weights", str(weights), *TINY])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"backbone: loaded 135 backbone tensors from {weights}" in printed


def test_ssdlite_head_trains(tiny_shapes, tmp_path):
    assert _run(["--head", "ssdlite", *_data_args(tiny_shapes), "--epochs", "1", "--batch-size", "4",
                 "--output-dir", str(tmp_path), *TINY]) == 0  # fmt: skip
    assert load_checkpoint(tmp_path / "last.pt")["head"] == "ssdlite"


def test_an_unreadable_training_image_is_skipped_and_reported(tiny_shapes, tmp_path, capsys):
    import shutil

    images = tmp_path / "train"
    shutil.copytree(tiny_shapes.train_images, images)
    broken = sorted(images.glob("*.jpg"))[3]
    broken.write_bytes(b"not a jpeg at all")
    args = _data_args(tiny_shapes)
    args[3] = str(images)
    code = _run(["--head", "ssd", *args, "--epochs", "1", "--batch-size", "4", "--output-dir", str(tmp_path / "run"), *TINY])
    assert code == 0
    printed = capsys.readouterr().out
    # 8 images in two batches of 4: the broken one is dropped once and reported at the end
    assert "8 images (0 without boxes)" in printed and "1 unreadable samples skipped" in printed


def test_loss_fn_pads_a_batch_of_one_and_zeroes_an_empty_batch():
    from mnapps.config import BackboneConfig
    from mnapps.tasks.detection.train import BatchCounter, detection_losses
    from mnapps.heads.ssd import SSDConfig, build_ssd

    model = build_ssd(SSDConfig(size=64), num_classes=3, backbone_cfg=BackboneConfig(width_mult=0.25)).train()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    counter = BatchCounter()
    loss_fn = partial(detection_losses, counter=counter, min_images=2)
    target = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1]), "image_id": 7}
    losses = loss_fn(model, ([torch.rand(3, 64, 64)], [target], 1), torch.device("cpu"))
    assert seen == [2] and set(losses) == {"bbox_regression", "classification"}
    assert counter.skipped_samples == 1
    zero = loss_fn(model, ([], [], 2), torch.device("cpu"))
    assert set(zero) == {"bbox_regression", "classification"}
    assert all(v.item() == 0.0 and v.requires_grad for v in zero.values())
    assert counter.skipped_batches == 1 and counter.skipped_samples == 3


def test_two_process_gloo_ddp_run(tiny_shapes, tmp_path):
    import os
    import signal
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(root / "tools" / "train_det.py"), "--head", "ssd", *_data_args(tiny_shapes), "--epochs", "1",
        "--batch-size", "4", "--device", "cpu", "--output-dir", str(out), *TINY,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a rank that aborts shows its stack
    # A session of its own, so a hang kills torchrun and both ranks, not torchrun alone.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the 2-process run hung")
    assert process.returncode == 0, stderr[-2000:]
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["world_size"] == 2 and checkpoint["epoch"] == 1
    assert set(COCO_METRIC_NAMES) <= set(json.loads((out / "metrics.json").read_text()))
    assert stdout.count("COCO bbox evaluation of the final model") == 1  # rank 0 only
