"""tools/infer_det.py: drawing detections and writing COCO results with original category ids.

The checkpoint is built directly (an untrained width-0.25 SSD whose config carries the shapes
dataset's classes) so the test needs no training; with random weights every anchor scores about
1/num_classes, so detections exist at a low threshold and none at threshold 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnapps.tasks.detection import build_model
from mnapps.config import BackboneConfig, to_dict
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.checkpoint import save_checkpoint
from mnapps.tasks.detection import DetConfig, DetModelConfig, image_ids_for
from mnapps.eval.coco import evaluate_results
from mnapps.heads.ssd import SSDConfig

from mnapps.cli import infer_det


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes_detection(
        tmp_path_factory.mktemp("data") / "shapes", num_train=1, num_val=3, image_size=96, progress=False
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = DetConfig(
        model=DetModelConfig(
            head="ssd",
            backbone=BackboneConfig(width_mult=0.25),
            head_settings=SSDConfig(size=96, score_threshold=0.05, detections_per_image=20),
            num_classes=5,
            class_names=("__background__", "circle", "square", "triangle", "cross"),
            category_ids=(2, 5, 9, 11),
        )
    )
    torch.manual_seed(0)
    model = build_model(cfg, 5)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    return save_checkpoint(
        {"task": "detection", "head": "ssd", "config": to_dict(cfg), "model": model.state_dict(), "epoch": 1}, path
    )


def test_draws_every_image_and_writes_results_with_original_ids(shapes, checkpoint, tmp_path, capsys):
    out = tmp_path / "drawn"
    results_path = tmp_path / "results.json"
    code = infer_det.main([
        str(shapes.val_images), "--checkpoint", str(checkpoint), "--out", str(out), "--score-threshold", "0.0",
        "--results-json", str(results_path), "--ann", str(shapes.val_ann),
    ])  # fmt: skip
    assert code == 0
    sources = sorted(shapes.val_images.glob("*.jpg"))
    drawn = sorted(out.iterdir())
    assert [p.name for p in drawn] == [p.name for p in sources]  # JPEG in, JPEG out
    for source, target in zip(sources, drawn):
        with Image.open(source) as a, Image.open(target) as b:
            assert a.size == b.size and b.format == "JPEG"
    assert "detection(s) >= 0" in capsys.readouterr().out

    results = json.loads(results_path.read_text())
    gt = json.loads(shapes.val_ann.read_text())
    assert results, "an untrained model still scores ~0.2 everywhere at threshold 0.05"
    assert {r["category_id"] for r in results} <= {2, 5, 9, 11}  # never the contiguous labels 1..4
    assert {r["image_id"] for r in results} <= {img["id"] for img in gt["images"]}
    metrics, _, _ = evaluate_results(shapes.val_ann, results_path)  # pycocotools accepts the file
    assert 0.0 <= metrics["AP"] <= 1.0


def test_threshold_one_draws_nothing(shapes, checkpoint, tmp_path):
    image = sorted(shapes.val_images.glob("*.jpg"))[0]
    png_source = tmp_path / "plain.png"
    Image.open(image).save(png_source)
    out = tmp_path / "drawn"
    assert infer_det.main([str(png_source), "--checkpoint", str(checkpoint), "--out", str(out),
                           "--score-threshold", "1.0"]) == 0  # fmt: skip
    untouched = np.asarray(Image.open(out / "plain.png"))
    assert np.array_equal(untouched, np.asarray(Image.open(png_source)))
    # The first run's drawing is only replaced on request.
    assert infer_det.main([str(png_source), "--checkpoint", str(checkpoint), "--out", str(out),
                           "--score-threshold", "0.0", "--overwrite"]) == 0  # fmt: skip
    assert not np.array_equal(np.asarray(Image.open(out / "plain.png")), untouched)


def test_image_ids_from_annotations_numbers_or_positions(shapes, tmp_path):
    paths = sorted(shapes.val_images.glob("*.jpg"))
    gt = {img["file_name"]: img["id"] for img in json.loads(shapes.val_ann.read_text())["images"]}
    assert image_ids_for(paths, shapes.val_ann) == [gt[p.name] for p in paths]
    assert image_ids_for([Path("000000000139.jpg"), Path("000000000285.jpg")]) == [139, 285]
    assert image_ids_for([Path("a.jpg"), Path("b.jpg")]) == [1, 2]
    with pytest.raises(ValueError, match="does not list"):
        image_ids_for([tmp_path / "other.jpg"], shapes.val_ann)


def test_bad_inputs_are_clear_errors(checkpoint, tmp_path, capsys):
    assert infer_det.main([str(tmp_path / "missing"), "--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert f"image file or folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    not_detection = save_checkpoint({"task": "classification", "model": {}, "config": {}}, tmp_path / "cls.pt")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "imgs" / "x.png")
    assert infer_det.main([str(tmp_path / "imgs"), "--checkpoint", str(not_detection), "--out", str(tmp_path)]) == 2
    assert "not an mnapps detection checkpoint" in capsys.readouterr().err
