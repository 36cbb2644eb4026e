"""What a user sees: PR curves from COCOeval, drawn images, the detection run folder, honest starts."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes
from pycocotools.coco import COCO
from test_train_det import TINY, _data_args

from mnapps.cli import eval_det, train_det
from mnapps.config import TrainConfig
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.engine.optim import ScheduleWarning, lr_factor_fn
from mnapps.eval.plots import caption_font_size, coco_precision, draw_boxes, plot_pr_curves


def test_pr_curves_come_from_cocoevals_precision_and_match_the_published_ap50(shared_data, tmp_path):
    gt = COCO(str(shared_data / "coco_eval" / "instances_val2014_100.json"))
    results = json.loads((shared_data / "coco_eval" / "instances_val2014_fakebbox100_results.json").read_text())
    evaluator = coco_precision(gt, results, gt.getImgIds())
    assert evaluator.stats[0] == pytest.approx(0.505, abs=5e-4)  # cocoapi's published AP
    names = {cat_id: cat["name"] for cat_id, cat in gt.cats.items()}
    ap50 = plot_pr_curves(evaluator, names, tmp_path / "pr.png")
    # Each class's curve is its column of eval["precision"]; their mean is COCO's AP50 (published 0.697).
    assert np.mean(list(ap50.values())) == pytest.approx(0.697, abs=5e-4)
    with Image.open(tmp_path / "pr.png") as image:
        assert image.format == "PNG"


@pytest.mark.parametrize("side", [300, 3000])
def test_caption_text_scales_with_the_image(side):
    image = torch.zeros(3, side, side, dtype=torch.uint8)
    box = torch.tensor([[side * 0.3, side * 0.5, side * 0.7, side * 0.9]])
    drawn = draw_boxes(image, box, [1], ["background", "person"], [0.9])
    # The caption is what differs from the same box drawn without one.
    bare = draw_bounding_boxes(image, box, colors=[(60, 180, 75)], width=max(2, round(side / 200)))
    rows = torch.nonzero((drawn != bare).any(0).any(1)).flatten()
    band = int(rows.max() - rows.min()) + 1
    size = caption_font_size(side, side)
    assert size == max(10, round(side / 40))
    assert 0.8 * size <= band <= 2.0 * size, (band, size)


def test_warmup_over_every_epoch_is_a_warning():
    with pytest.warns(ScheduleWarning, match=r"warmup_epochs=1 covers all 1 epoch\(s\)"):
        lr_factor_fn(TrainConfig(epochs=1, warmup_epochs=1.0), steps_per_epoch=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lr_factor_fn(TrainConfig(epochs=3, warmup_epochs=1.0), steps_per_epoch=10)


def test_first_use_says_what_it_generates_and_how_long(tmp_path, capsys):
    ensure_shapes_detection(tmp_path / "shapes", num_train=3, num_val=2, image_size=96, progress=False)
    err = capsys.readouterr().err
    assert "first use: generating the shapes detection dataset, 5 images (about 5 s) into" in err
    ensure_shapes_detection(tmp_path / "shapes", num_train=3, num_val=2, image_size=96, progress=False)
    assert "first use" not in capsys.readouterr().err  # cached: nothing to say


@pytest.mark.slow
def test_a_detection_run_folder_is_worth_opening(tmp_path, capsys):
    data = ensure_shapes_detection(tmp_path / "data", num_train=8, num_val=6, image_size=96, progress=False)
    out = tmp_path / "run"
    code = train_det.main(["--head", "ssd", *_data_args(data), "--epochs", "2", "--batch-size", "4",
                           "--output-dir", str(out), *TINY, "--set", "data.eval_max_images=3"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "final model (epoch 2, 3 val images)" in printed
    assert "per-class precision-recall, 3 val images" in printed
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert float(rows[-1]["val/AP"]) == pytest.approx(metrics["AP"], abs=1e-5)
    assert {"train/loss", "train/bbox_regression", "train/classification", "lr", "images_per_s"} <= set(rows[0])
    for name in ("results.png", "pr_curves.png", "val_predictions.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 500, name

    # eval-det draws beside its own metrics and leaves the run's pictures as they were.
    before = (out / "pr_curves.png").read_bytes()
    assert eval_det.main(["--checkpoint", str(out / "best.pt"), "--max-images", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (out / "eval_pr_curves.png").is_file() and (out / "eval_val_predictions.png").is_file()
    assert "per-class precision-recall, 3 val images" in printed
    assert (out / "pr_curves.png").read_bytes() == before


def test_the_pictures_reuse_the_evaluation_pass_and_match_a_fresh_one(tmp_path):
    """write_detection_report given what evaluate_detector kept draws without running the model,
    and its PR curves' AP50 per class equal those of a second, independent pass."""
    from pathlib import Path

    from mnapps.data.coco import collate_fn
    from mnapps.engine.distributed import build_eval_loader
    from mnapps.eval.coco import evaluate_detector
    from mnapps.eval.plots import EvaluatedDetections, write_detection_report
    from mnapps.tasks.detection import build_eval_dataset, load_detector

    model, cfg = load_detector(Path(__file__).parent / "fixtures" / "format1_detection.pt")
    shapes = ensure_shapes_detection(tmp_path / "shapes", num_train=2, num_val=6, image_size=96, progress=False)
    dataset = build_eval_dataset(cfg, shapes.val_ann, shapes.val_images)
    seen = EvaluatedDetections(keep=4)
    metrics, _, _ = evaluate_detector(model, build_eval_loader(dataset, 2, collate_fn), dataset, "cpu",
                                      progress=False, on_image=seen)
    assert len(seen.image_ids) == 6 and len(seen.samples) == 4
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    reused = write_detection_report(model, dataset, tmp_path / "reused", grid_images=4, evaluated=seen)
    assert not calls, "the report ran the detector again although the evaluation's pass was given"
    fresh = write_detection_report(model, dataset, tmp_path / "fresh", grid_images=4)
    handle.remove()
    assert calls and reused["AP50"] == fresh["AP50"] and reused["images"] == fresh["images"] == 6
    assert reused["AP"] == pytest.approx(metrics["AP"])
    assert (tmp_path / "reused" / "pr_curves.png").is_file() and (tmp_path / "reused" / "val_predictions.png").is_file()
