"""Evaluation dispatches through the task table: a checkpoint's task picks its evaluator.

``mnapps.tasks.table.evaluate_checkpoint`` (behind ``tools/eval_det.py --checkpoint``) must call
the evaluator of the checkpoint's own ``TASKS`` entry, give the figures the detection pieces
give when called by hand, and refuse a task without an evaluator in one line naming the tool
that scores it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mnapps.checkpoint import Checkpoint
from mnapps.cli import eval_det
from mnapps.data.coco import collate_fn
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.engine.distributed import build_eval_loader
from mnapps.eval.coco import evaluate_detector
from mnapps.tasks.detection import build_eval_dataset, load_detector
from mnapps.tasks.detection import DetectionTask
from mnapps.tasks.spec import EvalRequest, Evaluation
from mnapps.tasks.table import TASKS, evaluate_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Validation data for the format-1 detector (the folders its config names were temporary)."""
    root = tmp_path_factory.mktemp("eval") / "shapes"
    return ensure_shapes_detection(root, num_train=1, num_val=3, image_size=96, progress=False)


def test_the_checkpoints_task_entry_evaluates_it(monkeypatch):
    calls = []

    class ToyTask(DetectionTask):
        name = "toy"

        def evaluate(self, record, request):
            calls.append((record, request))
            return Evaluation({"score": 0.5}, {}, "toy summary", {"checkpoint": record.origin})

    monkeypatch.setitem(TASKS, "toy", ToyTask())
    record = Checkpoint(task="toy", head=None, config={}, weights={"w": torch.zeros(1)})
    request = EvalRequest(max_images=3)
    result = evaluate_checkpoint(record, request)
    assert result.metrics == {"score": 0.5} and result.summary == "toy summary"
    assert calls == [(record, request)]


def test_detection_evaluation_matches_the_pieces_called_by_hand(shapes, checkpoint_reads):
    path = FIXTURES / "format1_detection.pt"
    result = evaluate_checkpoint(path, EvalRequest(val_ann=shapes.val_ann, val_images=shapes.val_images, batch_size=2,
                                                   workers=0, max_images=2, progress=False))
    assert checkpoint_reads == [path]  # read once, the record handed to the task's evaluator

    model, cfg = load_detector(path)
    dataset = build_eval_dataset(cfg, shapes.val_ann, shapes.val_images)
    loader = build_eval_loader(dataset, 2, collate_fn, 0)
    metrics, per_class, summary = evaluate_detector(model, loader, dataset, "cpu", max_images=2, progress=False)
    assert result.metrics == pytest.approx(metrics, nan_ok=True)
    assert result.per_class == pytest.approx(per_class, nan_ok=True)
    assert result.summary == summary
    assert result.extra == {"checkpoint": str(path), "val_ann": str(dataset.ann_file), "device": "cpu"}


def test_a_task_without_an_evaluator_is_refused_naming_its_tool():
    with pytest.raises(ValueError, match=r"format1_face\.pt: a face checkpoint; only detection .*tools/eval_face\.py"):
        evaluate_checkpoint(FIXTURES / "format1_face.pt", EvalRequest())


def test_eval_det_checkpoint_mode_goes_through_the_table(tmp_path, capsys, shapes):
    code = eval_det.main(["--checkpoint", str(FIXTURES / "format1_face.pt"), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "tools/eval_face.py" in err

    code = eval_det.main(["--checkpoint", str(FIXTURES / "format1_detection.pt"), "--out-dir", str(tmp_path),
                          "--val-ann", str(shapes.val_ann), "--val-images", str(shapes.val_images),
                          "--batch-size", "2", "--workers", "0", "--device", "cpu", "--no-progress"])
    assert code == 0
    written = json.loads((tmp_path / eval_det.METRICS_FILE).read_text())
    expected = evaluate_checkpoint(FIXTURES / "format1_detection.pt",
                                   EvalRequest(val_ann=shapes.val_ann, val_images=shapes.val_images, batch_size=2,
                                               workers=0, progress=False))
    assert written["AP"] == pytest.approx(expected.metrics["AP"], nan_ok=True)
    assert written["checkpoint"] == str(FIXTURES / "format1_detection.pt")
