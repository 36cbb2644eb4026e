"""The tools' answers to a user's mistakes: outputs that would replace inputs, the training
record, a wrong --device, a wrong kind of file, a folder where a file was meant; and, in a second
round, read-only output folders, a second evaluation into the first one's file, file modes that
ignore the umask and an input file that is read only after the long work.

Every case runs a CLI's ``main(argv)`` in-process on tiny generated material (an untrained
width-0.25 SSD and classifier) and checks the exit status, the one-line message and that the
user's files are byte-for-byte what they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnapps.backbones import MobileNetV1
from mnapps.checkpoint import save_checkpoint
from lab import benchmark_cli as benchmark, face_pipeline_bench_cli as face_pipeline_bench
from mnapps.cli import classify, eval_det, export, infer_det, train_cls, train_det
from mnapps.config import BackboneConfig, to_dict
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.heads.ssd import SSDConfig
from mnapps.tasks.classification import ClsConfig, ClsModelConfig, load_classifier, preprocess_image
from mnapps.tasks.detection import DetConfig, DetModelConfig, build_model

TINY_DET = [
    "--set", "model.backbone.width_mult=0.25", "--set", "model.ssd.size=96", "--set", "train.num_workers=0",
    "--set", "train.channels_last=false", "--set", "data.eval_batch_size=4",
]  # fmt: skip


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(text: str) -> str:
    """The single ``error: ...`` line a tool printed (and proof there is no traceback)."""
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes_detection(
        tmp_path_factory.mktemp("data") / "shapes", num_train=2, num_val=2, image_size=96, progress=False
    )


@pytest.fixture(scope="module")
def det_checkpoint(tmp_path_factory) -> Path:
    cfg = DetConfig(
        model=DetModelConfig(
            head="ssd",
            backbone=BackboneConfig(width_mult=0.25),
            head_settings=SSDConfig(size=96, score_threshold=0.05, detections_per_image=10),
            num_classes=5,
            class_names=("__background__", "circle", "square", "triangle", "cross"),
            category_ids=(2, 5, 9, 11),
        )
    )
    torch.manual_seed(0)
    model = build_model(cfg, 5)
    path = tmp_path_factory.mktemp("det") / "best.pt"
    return save_checkpoint({"task": "detection", "head": "ssd", "config": to_dict(cfg), "model": model.state_dict()}, path)


@pytest.fixture(scope="module")
def cls_checkpoint(tmp_path_factory) -> Path:
    cfg = ClsConfig(model=ClsModelConfig(backbone=BackboneConfig(width_mult=0.25), num_classes=3, resolution=32,
                                         class_names=("red", "green", "blue")))  # fmt: skip
    torch.manual_seed(0)
    model = MobileNetV1(0.25, 3)
    path = tmp_path_factory.mktemp("cls") / "cls.pt"
    return save_checkpoint({"task": "classification", "config": to_dict(cfg), "model": model.state_dict()}, path)


def _photos(folder: Path, count: int = 2, suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(list(folder.iterdir())))
    paths = []
    for i in range(count):
        path = folder / f"photo{i}{suffix}"
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------
# infer_det: --out never replaces the user's photos


@pytest.mark.parametrize("where", ["same", "inside"])
def test_infer_det_refuses_an_out_folder_that_is_or_is_inside_the_input(det_checkpoint, tmp_path, capsys, where):
    photos = tmp_path / "photos"
    _photos(photos, suffix=".jpg")
    before = digest(tmp_path)
    out = photos if where == "same" else photos / "drawn"
    assert infer_det.main([str(photos), "--checkpoint", str(det_checkpoint), "--out", str(out)]) == 2
    assert "is, or is inside, the input" in one_line_error(capsys.readouterr().err)
    assert digest(tmp_path) == before and not (photos / "drawn").exists()


def test_infer_det_refuses_to_draw_a_single_photo_over_itself(det_checkpoint, tmp_path, capsys):
    photo = _photos(tmp_path / "album")[0]
    before = digest(tmp_path)
    assert infer_det.main([str(photo), "--checkpoint", str(det_checkpoint), "--out", str(photo.parent)]) == 2
    assert "would write over the input" in one_line_error(capsys.readouterr().err)
    assert digest(tmp_path) == before


def test_infer_det_refuses_a_results_file_inside_the_input_folder(det_checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    _photos(photos)
    before = digest(tmp_path)
    code = infer_det.main([str(photos), "--checkpoint", str(det_checkpoint), "--out", str(tmp_path / "drawn"),
                           "--results-json", str(photos / "results.json")])  # fmt: skip
    assert code == 2
    assert "--results-json file" in one_line_error(capsys.readouterr().err)
    assert digest(tmp_path) == before and not (tmp_path / "drawn").exists()


def test_infer_det_out_that_is_a_file_and_nothing_readable_are_errors(det_checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    _photos(photos)
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    assert infer_det.main([str(photos), "--checkpoint", str(det_checkpoint), "--out", str(existing)]) == 2
    assert "is an existing file" in one_line_error(capsys.readouterr().err)
    assert existing.read_text() == "keep me"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"")
    (broken / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert infer_det.main([str(broken), "--checkpoint", str(det_checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert "none of the 2 image(s)" in one_line_error(capsys.readouterr().err)


def test_infer_det_keeps_photos_that_share_a_stem_apart(det_checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48), (200, 0, 0)).save(photos / "x.png")
    Image.new("RGB", (64, 48), (0, 0, 200)).save(photos / "x.bmp")
    out = tmp_path / "drawn"
    assert infer_det.main([str(photos), "--checkpoint", str(det_checkpoint), "--out", str(out),
                           "--score-threshold", "1.0"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["x.bmp.png", "x.png"]
    # Threshold 1 draws nothing: each output is its own input's pixels.
    assert np.asarray(Image.open(out / "x.png"))[0, 0].tolist() == [200, 0, 0]
    assert np.asarray(Image.open(out / "x.bmp.png"))[0, 0].tolist() == [0, 0, 200]


# ------------------------------------------------------------------------------------------
# eval_det: its own file, never the training record


def _perfect_results(ann: Path) -> list[dict]:
    gt = json.loads(ann.read_text())
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
    ]


def test_eval_det_writes_eval_metrics_and_leaves_the_training_record(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    record = run / "metrics.json"
    record.write_text(json.dumps({"AP": 0.188, "note": "the training run's record"}))
    results = run / "results.json"
    results.write_text(json.dumps(_perfect_results(shapes.val_ann)))
    assert eval_det.main(["--results", str(results), "--val-ann", str(shapes.val_ann)]) == 0
    assert json.loads(record.read_text()) == {"AP": 0.188, "note": "the training run's record"}
    written = json.loads((run / "eval_metrics.json").read_text())
    assert written["AP"] == pytest.approx(1.0)  # every ground-truth box given back with score 1
    out_dir = tmp_path / "elsewhere"
    assert eval_det.main(["--results", str(results), "--val-ann", str(shapes.val_ann), "--out-dir", str(out_dir)]) == 0
    assert json.loads((out_dir / "eval_metrics.json").read_text())["AP"] == pytest.approx(1.0)
    assert f"wrote {out_dir / 'eval_metrics.json'}" in capsys.readouterr().out


def test_eval_det_string_bbox_and_file_out_dir_are_one_line_errors(shapes, tmp_path, capsys):
    results = _perfect_results(shapes.val_ann)
    results[0]["bbox"] = "10 10 20 20"
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps(results))
    assert eval_det.main(["--results", str(bad), "--val-ann", str(shapes.val_ann)]) == 2
    assert str(bad) in one_line_error(capsys.readouterr().err)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_perfect_results(shapes.val_ann)))
    existing = tmp_path / "file"
    existing.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        eval_det.main(["--results", str(good), "--val-ann", str(shapes.val_ann), "--out-dir", str(existing)])
    assert exit_info.value.code == 2 and "is an existing file" in capsys.readouterr().err
    assert existing.read_text() == "keep me"


# ------------------------------------------------------------------------------------------
# train_det: the empty validation set is found before any training


def test_train_det_empty_validation_set_is_named_before_training(shapes, tmp_path, capsys):
    gt = json.loads(shapes.val_ann.read_text())
    empty = tmp_path / "empty_val.json"
    empty.write_text(json.dumps({**gt, "images": [], "annotations": []}))
    out = tmp_path / "run"
    code = train_det.main([
        "--head", "ssd", "--train-ann", str(shapes.train_ann), "--train-images", str(shapes.train_images),
        "--val-ann", str(empty), "--val-images", str(shapes.val_images), "--output-dir", str(out), *TINY_DET,
    ])  # fmt: skip
    assert code == 2
    message = one_line_error(capsys.readouterr().err)
    assert "validation set is empty" in message and str(empty) in message
    assert not (out / "last.pt").exists() and not (out / "config.yaml").exists()  # stopped before the model


@pytest.mark.parametrize("tool", ["train_det", "train_cls"])
def test_training_refuses_a_run_folder_holding_checkpoints_and_a_file_as_folder(tool, tmp_path, capsys):
    main = train_det.main if tool == "train_det" else train_cls.main
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"the best checkpoint of an earlier run")
    before = digest(tmp_path)
    assert main(["--output-dir", str(run), "--device", "cpu"]) == 2
    message = one_line_error(capsys.readouterr().err)
    assert "--resume" in message and "--overwrite" in message
    not_a_folder = tmp_path / "plain_file"
    not_a_folder.write_text("x")
    before = digest(tmp_path)
    assert main(["--output-dir", str(not_a_folder), "--device", "cpu"]) == 2
    assert "is a file" in one_line_error(capsys.readouterr().err)
    assert digest(tmp_path) == before


# ------------------------------------------------------------------------------------------
# --device in every tool


def _device_cases(det_checkpoint, cls_checkpoint, shapes, tmp_path):
    photos = tmp_path / "photos"
    _photos(photos)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_perfect_results(shapes.val_ann)))
    return {
        "train_det": (train_det.main, ["--output-dir", str(tmp_path / "run")]),
        "train_cls": (train_cls.main, ["--output-dir", str(tmp_path / "run")]),
        "infer_det": (infer_det.main, [str(photos), "--checkpoint", str(det_checkpoint), "--out", str(tmp_path / "o")]),
        "eval_det": (eval_det.main, ["--checkpoint", str(det_checkpoint), "--val-ann", str(shapes.val_ann),
                                     "--val-images", str(shapes.val_images)]),
        "classify": (classify.main, [str(photos), "--checkpoint", str(cls_checkpoint)]),
    }


@pytest.mark.parametrize("device", ["tpu", "cuda:99"])
def test_every_tool_checks_its_device(det_checkpoint, cls_checkpoint, shapes, tmp_path, capsys, device):
    for name, (main, args) in _device_cases(det_checkpoint, cls_checkpoint, shapes, tmp_path).items():
        assert main([*args, "--device", device]) == 2, name
        message = one_line_error(capsys.readouterr().err)
        assert repr(device) in message, (name, message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


def test_benchmark_cuda_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert benchmark.main(["--device", "cuda", "--quick"]) == 2
    assert "no CUDA GPU" in one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------
# the wrong kind of checkpoint file


def test_an_onnx_model_given_as_checkpoint_is_named_as_such(det_checkpoint, cls_checkpoint, shapes, tmp_path, capsys):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07\x12\x07pytorch")  # the first bytes of an ONNX ModelProto
    photos = tmp_path / "photos"
    _photos(photos)
    calls = {
        "infer_det": (infer_det.main, [str(photos), "--checkpoint", str(onnx_file), "--out", str(tmp_path / "o")]),
        "eval_det": (eval_det.main, ["--checkpoint", str(onnx_file), "--val-ann", str(shapes.val_ann),
                                     "--val-images", str(shapes.val_images), "--device", "cpu"]),
        "classify": (classify.main, [str(photos), "--checkpoint", str(onnx_file)]),
        "export": (export.main, ["--checkpoint", str(onnx_file), "--out", str(tmp_path / "x.onnx")]),
    }
    for name, (main, args) in calls.items():
        assert main(args) == 2, name
        message = one_line_error(capsys.readouterr().err)
        assert "ONNX model" in message and ".pt" in message, (name, message)


def test_pytorch_advice_to_turn_weights_only_off_never_reaches_the_user(tmp_path, capsys):
    class Smuggled:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    crafted = tmp_path / "crafted.pt"
    torch.save({"format": "mnapps-checkpoint", "task": "detection", "payload": Smuggled()}, crafted)
    photos = tmp_path / "photos"
    _photos(photos)
    for main, args in (
        (infer_det.main, [str(photos), "--checkpoint", str(crafted), "--out", str(tmp_path / "o")]),
        (classify.main, [str(photos), "--checkpoint", str(crafted)]),
        (export.main, ["--checkpoint", str(crafted)]),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        message = one_line_error(err)
        assert str(crafted) in message and "pathlib" in message  # names what it would have imported
        assert "weights_only=False" not in err and "Re-running" not in err and "WeightsUnpickler" not in err
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------
# classify: folders and unreadable photos


def test_classify_a_folder_classifies_its_images_and_counts_unreadable_ones(cls_checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    files = _photos(photos, count=3)
    (photos / "zz_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert classify.main([str(photos), "--checkpoint", str(cls_checkpoint), "--topk", "1"]) == 0
    captured = capsys.readouterr()
    # The same model applied by hand to each file: the printed top-1 label is its argmax.
    model, cfg, names = load_classifier(cls_checkpoint)
    with torch.no_grad():
        logits = model(torch.stack([preprocess_image(f, cfg.model.resolution) for f in files]))
    for path, label in zip(files, logits.argmax(1).tolist()):
        assert f"{path}:\n  1. {names[label]}" in captured.out
    assert "classified 3 image(s), skipped 1 unreadable" in captured.out
    assert "zz_broken.jpg" in captured.err and "Traceback" not in captured.err


# ------------------------------------------------------------------------------------------
# export: folders where a file was meant, and unreadable parity images


def test_export_out_folder_is_refused(cls_checkpoint, tmp_path, capsys):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    assert export.main(["--checkpoint", str(cls_checkpoint), "--out", str(folder)]) == 2
    assert "is an existing folder" in one_line_error(capsys.readouterr().err)


def test_export_skips_and_counts_a_corrupt_parity_image(cls_checkpoint, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    images = tmp_path / "images"
    _photos(images, count=3)
    (images / "zz_truncated.png").write_bytes((images / "photo0.png").read_bytes()[:40])
    out = tmp_path / "cls.onnx"
    code = export.main(["--checkpoint", str(cls_checkpoint), "--images", str(images), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "parity images: skipped 1 unreadable image(s) of 4" in captured.out
    assert out.is_file()


# ------------------------------------------------------------------------------------------
# round two: read-only output folders, a second evaluation, file modes, inputs checked first


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def _read_only_cases(det_checkpoint, shapes, tmp_path, folder):
    photos = tmp_path / "photos"
    _photos(photos)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_perfect_results(shapes.val_ann)))
    return {
        "infer_det --out": (infer_det.main, [str(photos), "--checkpoint", str(det_checkpoint), "--out", str(folder)]),
        "infer_det --out (new, below)": (infer_det.main, [str(photos), "--checkpoint", str(det_checkpoint), "--out",
                                                          str(folder / "new")]),
        "eval_det --out-dir": (eval_det.main, ["--results", str(results), "--val-ann", str(shapes.val_ann),
                                               "--out-dir", str(folder)]),
        "train_det --output-dir": (train_det.main, ["--output-dir", str(folder / "run"), "--device", "cpu", *TINY_DET]),
        "train_cls --output-dir": (train_cls.main, ["--output-dir", str(folder / "run"), "--device", "cpu"]),
    }


@pytest.mark.parametrize("case", ["infer_det --out", "infer_det --out (new, below)", "eval_det --out-dir",
                                  "train_det --output-dir", "train_cls --output-dir"])
def test_a_read_only_output_folder_is_one_line_before_any_work(case, det_checkpoint, shapes, tmp_path,
                                                               read_only_folder, capsys):  # fmt: skip
    main, argv = _read_only_cases(det_checkpoint, shapes, tmp_path, read_only_folder)[case]
    assert main(argv) == 2
    captured = capsys.readouterr()
    message = one_line_error(captured.err)
    assert "is read-only" in message and case.split()[1] in message, message
    assert list(read_only_folder.iterdir()) == [] and "Traceback" not in captured.out


def test_eval_det_keeps_the_first_evaluation_of_a_run(det_checkpoint, shapes, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt"):
        (run / name).write_bytes(det_checkpoint.read_bytes())
    common = ["--val-ann", str(shapes.val_ann), "--val-images", str(shapes.val_images), "--device", "cpu",
              "--no-progress"]  # fmt: skip
    assert eval_det.main(["--checkpoint", str(run / "best.pt"), *common]) == 0
    first = (run / "eval_metrics.json").read_text()
    assert json.loads(first)["checkpoint"] == str(run / "best.pt")
    capsys.readouterr()
    assert eval_det.main(["--checkpoint", str(run / "last.pt"), *common]) == 2
    message = one_line_error(capsys.readouterr().err)
    assert str(run / "eval_metrics.json") in message and "--overwrite" in message and "--out-dir" in message
    assert (run / "eval_metrics.json").read_text() == first
    assert eval_det.main(["--checkpoint", str(run / "last.pt"), *common, "--overwrite"]) == 0
    assert json.loads((run / "eval_metrics.json").read_text())["checkpoint"] == str(run / "last.pt")


def test_written_files_follow_the_umask(shapes, tmp_path):
    old = os.umask(0o027)  # a team folder: group may read, others nothing
    try:
        results = tmp_path / "results.json"
        results.write_text(json.dumps(_perfect_results(shapes.val_ann)))
        assert eval_det.main(["--results", str(results), "--val-ann", str(shapes.val_ann)]) == 0
        checkpoint = save_checkpoint({"model": {"w": torch.ones(1)}}, tmp_path / "c.pt")
        config = tmp_path / "config.yaml"
        from mnapps.config import save_config

        save_config(BackboneConfig(), config)
    finally:
        os.umask(old)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "eval_metrics.json", checkpoint, config)}
    assert modes == {"eval_metrics.json": 0o640, "c.pt": 0o640, "config.yaml": 0o640}  # what open() gives


def test_face_pipeline_bench_reads_the_teacher_before_detecting(det_checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    _photos(photos)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("file_x,file_y,Decision\nphoto0.png,photo1.png,Yes\n")
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"not a state dict")
    code = face_pipeline_bench.main([
        "--detector-weights", str(det_checkpoint), "--photos", str(photos), "--pairs", str(pairs),
        "--pair-images", str(photos), "--teacher-weights", str(teacher), "--out", str(tmp_path / "out"),
        "--data", str(tmp_path), "--threads", "1",
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert str(teacher) in one_line_error(captured.err)
    assert "detecting faces" not in captured.out  # refused before the long detection pass
