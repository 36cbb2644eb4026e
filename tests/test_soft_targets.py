"""Soft targets from a teacher detector: the two terms worked out by hand, the refusal of a teacher
whose anchors are not the student's, and a run of train_det with a ``distill`` section."""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from mnapps.cli import train_det
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.config import load_config
from mnapps.tasks.detection import (DetConfig, DetDistillConfig, load_detector, soft_target_losses,
                                    with_soft_targets)
from mnapps.tasks.detection.train import BatchCounter, detection_losses

DETECTOR = Path(__file__).parent / "fixtures" / "format1_detection.pt"  # SSD x0.25 at 64 px, 5 classes
LN3 = math.log(3.0)


def _heads(cls, box):
    return {"cls_logits": torch.tensor([cls], dtype=torch.float32), "bbox_regression": torch.tensor([box])}


def test_sigmoid_terms_by_hand():
    # anchor 1: the teacher gives the face 0.75 (logit ln 3), the student 0.5: binary KL
    #   0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.130812; background logits equal: 0.
    # anchor 2: the teacher gives 0.25 (logit -ln 3): the same KL, 0.130812, but it is not foreground.
    # Boxes count on anchor 1 only: smooth L1 of (1, 0, 0, 0.5) = 0.5 + 0.125 = 0.625.
    student = _heads([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    teacher = _heads([[0.0, LN3], [0.0, -LN3]], [[1.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    losses = soft_target_losses(student, teacher, "sigmoid", DetDistillConfig(weight=2.0, box_weight=0.5))
    assert losses["soft_classification"].item() == pytest.approx(2.0 * 2 * 0.130812, abs=1e-5)
    assert losses["soft_bbox_regression"].item() == pytest.approx(0.5 * 0.625, abs=1e-6)


def test_softmax_terms_by_hand():
    # teacher softmax (1, 3)/4, student (1, 2)/3: KL = 0.25 ln(0.75) + 0.75 ln(1.125) = 0.016417
    student = _heads([[0.0, math.log(2.0)]], [[0.0, 0.0, 0.0, 0.0]])
    teacher = _heads([[0.0, LN3]], [[0.0, 2.0, 0.0, 0.0]])  # smooth L1 of 2: 1.5
    losses = soft_target_losses(student, teacher, "softmax", DetDistillConfig())
    assert losses["soft_classification"].item() == pytest.approx(0.016417, abs=1e-5)
    assert losses["soft_bbox_regression"].item() == pytest.approx(1.5, abs=1e-6)
    # no foreground anchor at all: the sum is divided by 1, and no box counts
    none = soft_target_losses(student, teacher, "softmax", DetDistillConfig(foreground_score=0.9))
    assert none["soft_bbox_regression"].item() == 0.0


def _batch(images=2, size=64):
    torch.manual_seed(0)
    pictures = [torch.rand(3, size, size) for _ in range(images)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])} for _ in range(images)]
    return pictures, targets, 0


def test_the_student_learns_the_teachers_outputs_through_the_loss():
    teacher, cfg = load_detector(DETECTOR)
    student, _ = load_detector(DETECTOR)
    with torch.no_grad():  # a student that disagrees with the teacher on every anchor
        for name, parameter in student.head.named_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    student.train()
    distill = DetDistillConfig(teacher=str(DETECTOR), weight=1.0, box_weight=1.0, foreground_score=0.2)
    loss_fn = with_soft_targets(partial(detection_losses, counter=BatchCounter(), min_images=2), teacher, distill)
    optimiser = torch.optim.Adam(student.head.parameters(), lr=0.01)
    batch, first = _batch(), None
    for _ in range(30):
        losses = loss_fn(student, batch, torch.device("cpu"))
        assert {"bbox_regression", "classification", "soft_classification", "soft_bbox_regression"} <= set(losses)
        first = first if first is not None else losses["soft_classification"].item()
        optimiser.zero_grad()
        (losses["soft_classification"] + losses["soft_bbox_regression"]).backward()
        optimiser.step()
    assert losses["soft_classification"].item() < 0.3 * first


def _shapes(tmp_path):
    shapes = ensure_shapes_detection(tmp_path / "shapes", num_train=4, num_val=2, image_size=96, progress=False)
    return ["--train-ann", str(shapes.train_ann), "--train-images", str(shapes.train_images),
            "--val-ann", str(shapes.val_ann), "--val-images", str(shapes.val_images),
            "--epochs", "1", "--batch-size", "2", "--set", "train.num_workers=0", "--set", "train.num_threads=1",
            "--set", "train.channels_last=false", "--set", "train.warmup_epochs=0.0", "--set", "data.eval_batch_size=2"]


def test_train_det_with_a_teacher_of_the_students_anchors(tmp_path, capsys):
    out = tmp_path / "soft"
    code = train_det.main(["--weights", str(DETECTOR), *_shapes(tmp_path), "--set", f"distill.teacher={DETECTOR}",
                           "--set", "distill.weight=0.5", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"soft targets: teacher {DETECTOR} (" in printed and "anchors, the student's), weight 0.5" in printed
    assert "soft_classification" in (out / "metrics.csv").read_text().splitlines()[0]
    _, cfg = load_detector(out / "last.pt")
    assert cfg.distill == DetDistillConfig(teacher=str(DETECTOR), weight=0.5)


def test_a_teacher_of_other_anchors_is_refused_by_name(tmp_path, capsys):
    config = tmp_path / "student.yaml"
    config.write_text(yaml.safe_dump({"model": {"head": "ssd", "backbone": {"width_mult": 0.25}, "ssd": {"size": 96}},
                                      "distill": {"teacher": str(DETECTOR)}}))
    code = train_det.main(["--config", str(config), *_shapes(tmp_path), "--output-dir", str(tmp_path / "refused")])
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("first use:")]
    assert code == 2
    assert any(f"distill.teacher {DETECTOR}: input" in line and "the student's is" in line
               and "soft targets need the teacher's anchors" in line for line in errors), errors


def test_the_shipped_soft_config_is_its_baseline_plus_the_teacher():
    configs = Path(__file__).resolve().parents[1] / "configs"
    hard = load_config(configs / "ssd_mnv1_a050_r512_faces.yaml", DetConfig)
    soft = load_config(configs / "ssd_mnv1_a050_r512_faces_soft.yaml", DetConfig)
    assert hard.distill is None
    assert soft.distill == DetDistillConfig(teacher="runs/weights/faceapi_ssd.pt")
    assert dataclasses.replace(soft, distill=None) == hard
