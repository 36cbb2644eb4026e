"""Fuzz-style: every tool's data reader fed broken files ends in a clean message and exit 2.

Each case generates its broken input in the test (zero-byte and truncated images, JSON and
checkpoints; JSON of the wrong shape; NaN, infinite and negative boxes; unknown image and
category ids; file names that climb out of the image folder), runs the tool's ``main(argv)``
in-process and checks:

* the exit status: 2 with exactly one ``error: ...`` line and no traceback, or 0 where the
  tool's contract is to skip what it cannot read and count it (the count is checked);
* that no file that existed before the run changed or disappeared (sha256 of every file of
  the case's folder and of the shared material, before and after).

The second half covers the families found by a second round of hostile inputs: file names in
inputs that escape their folder (TF.js shard paths, COCO ``file_name``), COCO fields of the wrong
type or with lying ids (each accepted variant scored against pycocotools on the cleaned file),
malformed TF.js manifests, NaN weights, two processes in one run folder, ``--resume`` into
another run, outputs that are hard or symbolic links to the inputs, and colliding output names.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from mnapps.backbones import MobileNetV1
from mnapps.checkpoint import save_checkpoint
from mnapps.cli import classify, embed_faces, eval_det, eval_face, export, import_weights, infer_det, train_cls, train_det
from mnapps.config import BackboneConfig, to_dict
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.heads.face_embedding import FaceModelConfig, build_face_embedder
from mnapps.heads.ssd import SSDConfig
from mnapps.tasks.classification import ClsConfig, ClsModelConfig
from mnapps.tasks.detection import DetConfig, DetModelConfig, build_model

TINY_DET = ["--set", "model.backbone.width_mult=0.25", "--set", "model.ssd.size=96", "--set", "train.num_workers=0"]


# ------------------------------------------------------------------------------------------
# shared, intact material (never to be modified by any case)


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("material")
    shapes = ensure_shapes_detection(root / "shapes", num_train=2, num_val=2, image_size=96, progress=False)
    # Score threshold 0.5: an untrained model (scores ~1/5) keeps no detection, so evaluation is quick.
    det_cfg = DetConfig(model=DetModelConfig(
        head="ssd", backbone=BackboneConfig(width_mult=0.25),
        head_settings=SSDConfig(size=96, score_threshold=0.5, detections_per_image=10),
        num_classes=5, class_names=("__background__", "circle", "square", "triangle", "cross"),
        category_ids=(2, 5, 9, 11),
    ))  # fmt: skip
    torch.manual_seed(0)
    det = save_checkpoint(
        {"task": "detection", "head": "ssd", "config": to_dict(det_cfg), "model": build_model(det_cfg, 5).state_dict()},
        root / "det.pt",
    )
    cls_cfg = ClsConfig(model=ClsModelConfig(backbone=BackboneConfig(width_mult=0.25), num_classes=3, resolution=32))
    cls = save_checkpoint(
        {"task": "classification", "config": to_dict(cls_cfg), "model": MobileNetV1(0.25, 3).state_dict()},
        root / "cls.pt",
    )
    # A detection checkpoint whose config says width 0.5 but whose weights are width 0.25.
    wrong_width = to_dict(det_cfg)
    wrong_width["model"]["backbone"]["width_mult"] = 0.5
    mismatched = save_checkpoint(
        {"task": "detection", "head": "ssd", "config": wrong_width, "model": build_model(det_cfg, 5).state_dict()},
        root / "mismatched.pt",
    )
    face_cfg = FaceModelConfig(backbone=BackboneConfig(width_mult=0.25), input_size=64, embedding_dim=16)
    face = save_checkpoint(
        {"task": "face", "head": "face_embedding", "config": {"model": to_dict(face_cfg)},
         "model": build_face_embedder(face_cfg).state_dict()},
        root / "face.pt",
    )  # fmt: skip
    good_image = root / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(good_image)
    return {
        "root": root, "train_ann": shapes.train_ann, "train_images": shapes.train_images, "val_ann": shapes.val_ann,
        "val_images": shapes.val_images, "det": det, "cls": cls, "mismatched": mismatched, "face": face, "good_image": good_image,
    }  # fmt: skip


def digest(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------
# broken files


def broken_json_texts(valid: dict) -> dict[str, str]:
    """Text of broken versions of a COCO annotation dict ``valid``."""
    text = json.dumps(valid)

    def with_first_annotation(**changes) -> str:
        data = json.loads(text)
        data["annotations"][0].update(changes)
        return json.dumps(data)  # NaN / Infinity are written as the tokens Python's json reads back

    return {
        "zero_byte": "",
        "truncated": text[: len(text) // 2],
        "list_not_dict": json.dumps([valid]),
        "images_not_list": json.dumps({**valid, "images": {"a": 1}}),
        "bbox_string": with_first_annotation(bbox="10 10 20 20"),
        "bbox_three_numbers": with_first_annotation(bbox=[1, 2, 3]),
        "unknown_image_id": with_first_annotation(image_id=987654),
        "unknown_category_id": with_first_annotation(category_id=4242),
    }


def bad_box_texts(valid: dict) -> dict[str, str]:
    """Annotation files whose first box is NaN, infinite or of negative width (dropped, counted)."""
    texts = {}
    for name, box in (("nan_box", [math.nan, 5, 10, 10]), ("inf_box", [5, 5, math.inf, 10]),
                      ("negative_box", [30, 30, -12, 10])):  # fmt: skip
        data = json.loads(json.dumps(valid))
        data["annotations"][0]["bbox"] = box
        texts[name] = json.dumps(data)
    return texts


def broken_images(folder: Path, good: Path) -> Path:
    """A folder with one readable image and three that are not: empty, truncated, text."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a_good.png").write_bytes(good.read_bytes())
    (folder / "b_zero_byte.jpg").write_bytes(b"")
    (folder / "c_truncated.png").write_bytes(good.read_bytes()[:60])
    (folder / "d_text.jpg").write_text("this is not a picture")
    return folder


def broken_checkpoints(folder: Path, material: dict[str, Path]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    real = material["det"].read_bytes()
    files = {
        "zero_byte": b"",
        "truncated": real[: len(real) // 3],
        "json_renamed": json.dumps({"task": "detection"}).encode(),
    }
    paths = {name: folder / f"{name}.pt" for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    onnx = folder / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch")
    paths["onnx"] = onnx
    paths["state_dict_mismatch"] = material["mismatched"]
    return paths


# ------------------------------------------------------------------------------------------
# the cases: (tool main, argv builder, expectation)

Case = tuple[Callable[[list[str]], int], Callable[[Path, dict], list[str]], str]
CASES: dict[str, Case] = {}
# Expectations: "error" (exit 2, one line) or "skip:<text the count shows>" (exit 0).


def _ann_cases() -> None:
    for name in ("zero_byte", "truncated", "list_not_dict", "images_not_list", "bbox_string", "bbox_three_numbers",
                 "unknown_image_id", "unknown_category_id"):  # fmt: skip
        def write(tmp: Path, m: dict, name=name) -> Path:
            path = tmp / f"{name}.json"
            path.write_text(broken_json_texts(json.loads(m["val_ann"].read_text()))[name])
            return path

        CASES[f"eval_det-val_ann-{name}"] = (eval_det.main, lambda tmp, m, write=write: [
            "--checkpoint", str(m["det"]), "--val-ann", str(write(tmp, m)), "--val-images", str(m["val_images"]),
            "--device", "cpu", "--no-progress", "--out-dir", str(tmp / "out")], "error")  # fmt: skip
        CASES[f"train_det-train_ann-{name}"] = (train_det.main, lambda tmp, m, write=write: [
            "--train-ann", str(write(tmp, m)), "--train-images", str(m["train_images"]), "--val-ann", str(m["val_ann"]),
            "--val-images", str(m["val_images"]), "--output-dir", str(tmp / "run"), "--device", "cpu", *TINY_DET],
            "error")  # fmt: skip
        CASES[f"infer_det-ann-{name}"] = (infer_det.main, lambda tmp, m, write=write: [
            str(m["val_images"]), "--checkpoint", str(m["det"]), "--out", str(tmp / "drawn"),
            "--results-json", str(tmp / "results.json"), "--ann", str(write(tmp, m))], "error")  # fmt: skip
    for name in ("nan_box", "inf_box", "negative_box"):
        def write_box(tmp: Path, m: dict, name=name) -> Path:
            path = tmp / f"{name}.json"
            path.write_text(bad_box_texts(json.loads(m["val_ann"].read_text()))[name])
            return path

        # Ground truth that cannot be a box is dropped (and counted) before COCOeval.
        CASES[f"eval_det-val_ann-{name}"] = (eval_det.main, lambda tmp, m, write=write_box: [
            "--checkpoint", str(m["det"]), "--val-ann", str(write(tmp, m)), "--val-images", str(m["val_images"]),
            "--device", "cpu", "--no-progress", "--out-dir", str(tmp / "out")], "skip:1 ground-truth box(es)")  # fmt: skip


def _results_cases() -> None:
    def results(m: dict, change: Callable[[list[dict]], object]) -> str:
        gt = json.loads(m["val_ann"].read_text())
        rows = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                for a in gt["annotations"]]  # fmt: skip
        return json.dumps(change(rows))

    def set_first(**changes):
        def change(rows):
            rows[0].update(changes)
            return rows

        return change

    variants = {
        "zero_byte": lambda m: "",
        "truncated": lambda m: results(m, lambda rows: rows)[:25],
        "dict_not_list": lambda m: results(m, lambda rows: {"results": rows}),
        "bbox_string": lambda m: results(m, set_first(bbox="1 2 3 4")),
        "bbox_nan": lambda m: results(m, set_first(bbox=[math.nan, 1, 2, 3])),
        "score_nan": lambda m: results(m, set_first(score=math.nan)),
        "unknown_image_id": lambda m: results(m, set_first(image_id=987654)),
        "unknown_category_id": lambda m: results(m, set_first(category_id=4242)),
    }
    for name, text in variants.items():
        def argv(tmp: Path, m: dict, text=text, name=name) -> list[str]:
            path = tmp / f"results_{name}.json"
            path.write_text(text(m))
            return ["--results", str(path), "--val-ann", str(m["val_ann"])]

        CASES[f"eval_det-results-{name}"] = (eval_det.main, argv, "error")


def _checkpoint_cases() -> None:
    for name in ("zero_byte", "truncated", "json_renamed", "onnx", "state_dict_mismatch"):
        def ckpt(tmp: Path, m: dict, name=name) -> Path:
            return broken_checkpoints(tmp / "ckpts", m)[name]

        CASES[f"infer_det-checkpoint-{name}"] = (infer_det.main, lambda tmp, m, c=ckpt: [
            str(m["val_images"]), "--checkpoint", str(c(tmp, m)), "--out", str(tmp / "drawn")], "error")
        CASES[f"eval_det-checkpoint-{name}"] = (eval_det.main, lambda tmp, m, c=ckpt: [
            "--checkpoint", str(c(tmp, m)), "--device", "cpu", "--val-ann", str(m["val_ann"]),
            "--val-images", str(m["val_images"])], "error")  # fmt: skip
        CASES[f"classify-checkpoint-{name}"] = (classify.main, lambda tmp, m, c=ckpt: [
            str(m["good_image"]), "--checkpoint", str(c(tmp, m))], "error")
        CASES[f"export-checkpoint-{name}"] = (export.main, lambda tmp, m, c=ckpt: [
            "--checkpoint", str(c(tmp, m)), "--out", str(tmp / "model_out.onnx")], "error")
        CASES[f"embed_faces-checkpoint-{name}"] = (embed_faces.main, lambda tmp, m, c=ckpt: [
            str(m["train_images"]), "--checkpoint", str(c(tmp, m)), "--out", str(tmp / "emb.npz"), "--device", "cpu"],
            "error")  # fmt: skip
        # The mismatched checkpoint holds a width-0.25 trunk: a width-0.5 model cannot take it.
        width = ["--set", "model.backbone.width_mult=0.5"] if name == "state_dict_mismatch" else []
        CASES[f"train_det-weights_backbone-{name}"] = (train_det.main, lambda tmp, m, c=ckpt, width=width: [
            "--train-ann", str(m["train_ann"]), "--train-images", str(m["train_images"]), "--val-ann",
            str(m["val_ann"]), "--val-images", str(m["val_images"]), "--output-dir", str(tmp / "run"),
            "--weights-backbone", str(c(tmp, m)), "--device", "cpu", "--batch-size", "2", *TINY_DET, *width],
            "error")  # fmt: skip
    # A checkpoint of another task is named as such.
    CASES["infer_det-checkpoint-classifier"] = (infer_det.main, lambda tmp, m: [
        str(m["val_images"]), "--checkpoint", str(m["cls"]), "--out", str(tmp / "drawn")], "error")
    CASES["classify-checkpoint-detector"] = (classify.main, lambda tmp, m: [
        str(m["good_image"]), "--checkpoint", str(m["det"])], "error")


def _image_cases() -> None:
    CASES["infer_det-images-broken"] = (infer_det.main, lambda tmp, m: [
        str(broken_images(tmp / "photos", m["good_image"])), "--checkpoint", str(m["det"]), "--out",
        str(tmp / "drawn")], "skip:skipped 3 unreadable")  # fmt: skip
    CASES["classify-images-broken"] = (classify.main, lambda tmp, m: [
        str(broken_images(tmp / "photos", m["good_image"])), "--checkpoint", str(m["cls"])],
        "skip:skipped 3 unreadable")  # fmt: skip
    CASES["infer_det-images-all-broken"] = (infer_det.main, lambda tmp, m: [
        str(_only_broken(tmp / "photos", m)), "--checkpoint", str(m["det"]), "--out", str(tmp / "drawn")], "error")
    CASES["classify-images-all-broken"] = (classify.main, lambda tmp, m: [
        str(_only_broken(tmp / "photos", m)), "--checkpoint", str(m["cls"])], "error")
    CASES["embed_faces-images-all-broken"] = (embed_faces.main, lambda tmp, m: [
        str(_only_broken(tmp / "faces", m)), "--checkpoint", str(m["face"]), "--out", str(tmp / "emb.npz"),
        "--device", "cpu"], "error")  # fmt: skip
    CASES["train_cls-train_dir-is-a-file"] = (train_cls.main, lambda tmp, m: [
        "--train-dir", str(m["good_image"]), "--val-dir", str(m["good_image"]), "--output-dir", str(tmp / "run"),
        "--device", "cpu"], "error")  # fmt: skip
    CASES["train_cls-empty-class-folder"] = (train_cls.main, lambda tmp, m: [
        "--train-dir", str(_empty_class(tmp / "cls", m)), "--val-dir", str(tmp / "cls"), "--output-dir",
        str(tmp / "run"), "--device", "cpu"], "error")  # fmt: skip


def _only_broken(folder: Path, m: dict) -> Path:
    broken_images(folder, m["good_image"])
    (folder / "a_good.png").unlink()
    return folder


def _empty_class(folder: Path, m: dict) -> Path:
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.png").write_bytes(m["good_image"].read_bytes())
    (folder / "dog").mkdir()
    return folder


def _path_and_config_cases() -> None:
    for name, text in (("zero_byte", ""), ("truncated", "model: {head: ssd, backbone: {width_mult: 0.25"),
                       ("list_not_mapping", "- model\n- data\n")):  # fmt: skip
        def argv(tmp: Path, m: dict, text=text, name=name) -> list[str]:
            path = tmp / f"{name}.yaml"
            path.write_text(text)
            return ["--config", str(path), "--output-dir", str(tmp / "run"), "--device", "cpu"]

        CASES[f"train_det-config-{name}"] = (train_det.main, argv, "error")
        CASES[f"train_cls-config-{name}"] = (train_cls.main, argv, "error")
    for name, content in (("zero_byte", b""), ("truncated_npz", None), ("wrong_tensors", None)):
        def npz(tmp: Path, m: dict, name=name, content=content) -> list[str]:
            path = tmp / f"{name}.npz"
            if name == "truncated_npz":
                np.savez(path, weights=np.ones((64, 64), dtype=np.float32))
                path.write_bytes(path.read_bytes()[:100])
            elif name == "wrong_tensors":
                np.savez(path, **{"MobilenetV1/Conv2d_0/weights": np.ones((3, 3), dtype=np.float32)})
            else:
                path.write_bytes(content)
            return [str(path), "--output", str(tmp / "imported.pt")]

        CASES[f"import_weights-{name}"] = (import_weights.main, npz, "error")
    # A pairs name that climbs out of --images is read (and reported); here it does not exist.
    for name, text in (("zero_byte", ""), ("garbage", "\x00\x01 not, a, pairs, file\n"),
                       ("escaping", "img1,img2,label\n../../outside.png,train_000000.jpg,1\n"
                                   "train_000000.jpg,train_000001.jpg,0\n")):  # fmt: skip
        def pairs(tmp: Path, m: dict, text=text, name=name) -> list[str]:
            path = tmp / f"pairs_{name}.txt"
            path.write_text(text)
            return ["--pairs", str(path), "--images", str(m["train_images"]), "--checkpoint", str(m["face"]),
                    "--folds", "2", "--device", "cpu", "--out", str(tmp / "eval_out")]  # fmt: skip

        CASES[f"eval_face-pairs-{name}"] = (eval_face.main, pairs, "error")



# ------------------------------------------------------------------------------------------
# round two: names that escape, COCO fields that lie, malformed TF.js manifests, NaN weights

#: file_name values that leave the image folder: refused, naming the entry (not read, not skipped).
ESCAPING_NAMES = {"dotdot": "../../outside_the_folder.jpg", "nested_dotdot": "a/../../x.jpg", "absolute": "/etc/hostname"}

#: One annotation field set to a value of the wrong type or a lying id: (field, value); all refused.
COCO_FIELD_ERRORS = {
    "duplicate_ann_id": ("id", "<duplicate>"),
    "iscrowd_string_0": ("iscrowd", "0"),
    "iscrowd_no": ("iscrowd", "no"),
    "iscrowd_2": ("iscrowd", 2),
    "category_id_true": ("category_id", True),
    "category_id_string": ("category_id", "2"),
    "image_id_true": ("image_id", True),
    "area_string": ("area", "big"),
}


def coco_with_field(valid: dict, field: str, value, index: int = 0) -> dict:
    """``valid`` with annotation ``index``'s ``field`` set to ``value`` (``<duplicate>``: another's id)."""
    data = json.loads(json.dumps(valid))
    anns = data["annotations"]
    anns[index][field] = anns[(index + 1) % len(anns)]["id"] if value == "<duplicate>" else value
    return data


def coco_with_file_name(valid: dict, name: str) -> dict:
    data = json.loads(json.dumps(valid))
    data["images"][0]["file_name"] = name
    return data


def tfjs_folder(folder: Path, groups: list, shard: bytes = b"\x00" * 8, shard_name: str = "w.bin") -> Path:
    """A TF.js weights folder: ``model-weights_manifest.json`` with ``groups`` and one shard."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / shard_name).write_bytes(shard)
    (folder / "model-weights_manifest.json").write_text(json.dumps(groups))
    return folder


def _tensor(**changes) -> list:
    return [{"paths": ["w.bin"], "weights": [{"name": "a", "shape": [2], "dtype": "float32", **changes}]}]


#: Malformed manifests: each an error naming the manifest and the field, never a traceback.
TFJS_MALFORMED = {
    "shape_string": _tensor(shape="2"),
    "shape_string_dims": _tensor(shape=["2"]),
    "shape_negative": _tensor(shape=[-2]),
    "shape_float": _tensor(shape=[2.0]),
    "quantization_5": _tensor(quantization=5),
    "paths_5": [{"paths": [5], "weights": [{"name": "a", "shape": [2], "dtype": "float32"}]}],
    "weights_entry_string": [{"paths": ["w.bin"], "weights": ["a"]}],
}
#: Shard paths that leave the manifest's folder.
TFJS_ESCAPING = {"dotdot": "../secret.bin", "absolute": "<absolute>"}


def _tfjs_cases_folder(tmp: Path, name: str) -> Path:
    if name in TFJS_MALFORMED:
        return tfjs_folder(tmp / "model", TFJS_MALFORMED[name])
    secret = tmp / "secret.bin"
    secret.write_bytes(b"SECRET!!")
    path = str(secret) if TFJS_ESCAPING[name] == "<absolute>" else TFJS_ESCAPING[name]
    return tfjs_folder(tmp / "model", [{"paths": [path], "weights": [{"name": "a", "shape": [2], "dtype": "float32"}]}])


def _round_two_cases() -> None:
    def det_eval_argv(tmp: Path, m: dict, ann: Path) -> list[str]:
        return ["--checkpoint", str(m["det"]), "--val-ann", str(ann), "--val-images", str(m["val_images"]),
                "--device", "cpu", "--no-progress", "--out-dir", str(tmp / "out")]  # fmt: skip

    def det_train_argv(tmp: Path, m: dict, ann: Path) -> list[str]:
        return ["--train-ann", str(ann), "--train-images", str(m["train_images"]), "--val-ann", str(m["val_ann"]),
                "--val-images", str(m["val_images"]), "--output-dir", str(tmp / "run"), "--device", "cpu", *TINY_DET]

    for name, file_name in ESCAPING_NAMES.items():
        def ann(tmp: Path, m: dict, file_name=file_name, key="val_ann") -> Path:
            path = tmp / "escaping.json"
            path.write_text(json.dumps(coco_with_file_name(json.loads(m[key].read_text()), file_name)))
            return path

        CASES[f"eval_det-val_ann-file_name-{name}"] = (
            eval_det.main, lambda tmp, m, ann=ann: det_eval_argv(tmp, m, ann(tmp, m)), "error")
        CASES[f"train_det-train_ann-file_name-{name}"] = (
            train_det.main, lambda tmp, m, ann=ann: det_train_argv(tmp, m, ann(tmp, m, key="train_ann")), "error")
    for name, (field, value) in COCO_FIELD_ERRORS.items():
        def ann(tmp: Path, m: dict, field=field, value=value, key="val_ann") -> Path:
            path = tmp / f"{name}.json"
            path.write_text(json.dumps(coco_with_field(json.loads(m[key].read_text()), field, value)))
            return path

        def results_argv(tmp: Path, m: dict, ann=ann) -> list[str]:
            gt = json.loads(m["val_ann"].read_text())
            results = tmp / "results.json"
            results.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"],
                                            "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]))
            return ["--results", str(results), "--val-ann", str(ann(tmp, m)), "--out-dir", str(tmp / "out")]

        CASES[f"eval_det-results-gt-{name}"] = (eval_det.main, results_argv, "error")
        CASES[f"eval_det-val_ann-{name}"] = (eval_det.main, lambda tmp, m, ann=ann: det_eval_argv(tmp, m, ann(tmp, m)),
                                             "error")
        CASES[f"train_det-train_ann-{name}"] = (
            train_det.main, lambda tmp, m, ann=ann: det_train_argv(tmp, m, ann(tmp, m, key="train_ann")), "error")
    for name in [*TFJS_MALFORMED, *(f"escape_{k}" for k in TFJS_ESCAPING)]:
        CASES[f"import_weights-tfjs-{name}"] = (import_weights.main, lambda tmp, m, name=name: [
            str(_tfjs_cases_folder(tmp, name.removeprefix("escape_"))), "--kind", "ssd", "--output",
            str(tmp / "imported.pt")], "error")  # fmt: skip

    def nan_npz(tmp: Path, m: dict) -> list[str]:
        from test_tf_import import _fake_tf_tensors

        tensors = _fake_tf_tensors(0.25)
        tensors["MobilenetV1/Conv2d_3_pointwise/BatchNorm/gamma"][5] = np.nan
        np.savez(tmp / "nan_gamma.npz", **tensors)
        return [str(tmp / "nan_gamma.npz"), "--output", str(tmp / "imported.pt")]

    CASES["import_weights-npz-nan_bn_gamma"] = (import_weights.main, nan_npz, "error")



_ann_cases()
_results_cases()
_checkpoint_cases()
_image_cases()
_path_and_config_cases()
_round_two_cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_input_ends_cleanly(case, material, tmp_path, capsys):
    main, make_argv, expected = CASES[case]
    argv = make_argv(tmp_path, material)
    before = digest(tmp_path, material["root"])
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals: usage + one line, status 2
        code = exc.code
    captured = capsys.readouterr()
    after = digest(tmp_path, material["root"])
    assert {path: after.get(path) for path in before} == before, "an existing file was changed or removed"
    assert "Traceback" not in captured.err + captured.out
    assert "weights_only=False" not in captured.err
    if expected == "error":
        assert code == 2, (code, captured.err[-2000:], captured.out[-2000:])
        errors = [line for line in captured.err.splitlines() if "error:" in line]
        assert len(errors) == 1 and len(errors[0]) < 1000, captured.err
    else:
        assert code == 0, (code, captured.err[-2000:])
        assert expected.removeprefix("skip:") in captured.out + captured.err


# ------------------------------------------------------------------------------------------
# round two, what each message says, and what accepted COCO files score


def _single_error_line(text: str) -> str:
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if "error:" in line]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("name", sorted(COCO_FIELD_ERRORS))
def test_coco_field_errors_name_the_file_the_entry_and_the_field(name, material, tmp_path, capsys):
    field, value = COCO_FIELD_ERRORS[name]
    gt = json.loads(material["val_ann"].read_text())
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(coco_with_field(gt, field, value)))
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                                    "score": 0.9} for a in gt["annotations"]]))  # fmt: skip
    assert eval_det.main(["--results", str(results), "--val-ann", str(ann), "--out-dir", str(tmp_path / "o")]) == 2
    message = _single_error_line(capsys.readouterr().err)
    assert str(ann) in message and "annotations[" in message, message
    assert ("repeats its id" in message) if field == "id" else (f"{field}=" in message), message
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", sorted(TFJS_MALFORMED) + sorted(f"escape_{k}" for k in TFJS_ESCAPING))
def test_tfjs_manifest_problems_name_the_manifest_and_the_field(name, tmp_path):
    from mnapps.importers.tfjs import TfjsWeightsError, read_tfjs_weights

    folder = _tfjs_cases_folder(tmp_path, name.removeprefix("escape_"))
    with pytest.raises(TfjsWeightsError) as caught:
        read_tfjs_weights(folder)
    message = str(caught.value)
    assert str(folder / "model-weights_manifest.json") in message and "\n" not in message
    expected = {"shape": "shape", "quantization": "quantization", "paths": "paths[0]", "weights": "weights entry",
                "escape": "paths[0]"}[name.split("_")[0]]  # fmt: skip
    assert expected in message, message
    if name.startswith("escape_"):
        assert "MNAPPS_ALLOW_OUTSIDE_PATHS" in message


def test_tfjs_shard_outside_the_folder_is_read_only_when_the_user_allows_it(tmp_path, monkeypatch):
    from mnapps.importers.tfjs import read_tfjs_weights

    folder = _tfjs_cases_folder(tmp_path, "dotdot")
    monkeypatch.setenv("MNAPPS_ALLOW_OUTSIDE_PATHS", "1")
    assert read_tfjs_weights(folder)["a"].tobytes() == b"SECRET!!"  # the explicit switch works as documented


def test_faceapi_manifest_pointing_outside_its_folder_imports_nothing(shared_data, tmp_path, capsys):
    # The real face-api.js detector with its shard moved one folder up and the manifest naming it
    # "../": before, its bytes were imported (exit 0); the shard is an outside file now.
    source = shared_data / "faceapi_ssd_mobilenetv1"
    model = tmp_path / "deep" / "model"
    model.mkdir(parents=True)
    manifest = json.loads((source / "ssd_mobilenetv1_model-weights_manifest.json").read_text())
    for group in manifest:
        for k, name in enumerate(group["paths"]):
            (tmp_path / "deep" / name).write_bytes((source / name).read_bytes())
            group["paths"][k] = f"../{name}"
    (model / "ssd_mobilenetv1_model-weights_manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "faceapi.pt"
    assert import_weights.main([str(model), "--kind", "ssd", "--output", str(out)]) == 2
    assert "climbs out of its folder" in _single_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_nan_batchnorm_gamma_is_refused_by_name(tmp_path, capsys):
    argv = CASES["import_weights-npz-nan_bn_gamma"][1](tmp_path, {})
    assert import_weights.main(argv) == 2
    message = _single_error_line(capsys.readouterr().err)
    assert "MobilenetV1/Conv2d_3_pointwise/BatchNorm/gamma" in message and "NaN" in message
    assert not (tmp_path / "imported.pt").exists()


def _pycocotools_stats(gt: dict, results: list) -> list[float]:
    """The 12 numbers of pycocotools itself, run on ``gt`` as given (no mnapps code)."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def _first_matched_annotation(gt: dict, results: list) -> int:
    """Index of an annotation some detection overlaps well (so changing it moves AP)."""
    by_image: dict[int, list] = {}
    for det in results:
        by_image.setdefault(det["image_id"], []).append(det["bbox"])
    for i, ann in enumerate(gt["annotations"]):
        x, y, w, h = ann["bbox"]
        for dx, dy, dw, dh in by_image.get(ann["image_id"], []):
            inter = max(0, min(x + w, dx + dw) - max(x, dx)) * max(0, min(y + h, dy + dh) - max(y, dy))
            if not ann.get("iscrowd") and w * h > 1000 and inter / (w * h + dw * dh - inter) > 0.9:
                return i
    raise AssertionError("no well-matched annotation in the fixture")


#: Accepted COCO oddities: (how to break one annotation, how a careful user would clean it).
COCO_ACCEPTED = {
    "ann_id_0": (lambda ann, gt: ann.update(id=0),
                 lambda ann, gt: ann.update(id=max(a["id"] for a in gt["annotations"]) + 1)),
    "area_negative": (lambda ann, gt: ann.update(area=-5), lambda ann, gt: ann.update(area=ann["bbox"][2] * ann["bbox"][3])),
    "area_nan": (lambda ann, gt: ann.update(area=math.nan), lambda ann, gt: ann.update(area=ann["bbox"][2] * ann["bbox"][3])),
    "iscrowd_false": (lambda ann, gt: ann.update(iscrowd=False), lambda ann, gt: ann.update(iscrowd=0)),
}


@pytest.mark.parametrize("name", sorted(COCO_ACCEPTED))
def test_accepted_coco_oddities_score_what_pycocotools_scores_on_the_cleaned_file(name, shared_data, tmp_path, capsys):
    fixture = shared_data / "coco_eval"
    gt = json.loads((fixture / "instances_val2014_100.json").read_text())
    results = json.loads((fixture / "instances_val2014_fakebbox100_results.json").read_text())
    break_it, clean_it = COCO_ACCEPTED[name]
    index = _first_matched_annotation(gt, results)
    broken, cleaned = json.loads(json.dumps(gt)), json.loads(json.dumps(gt))
    break_it(broken["annotations"][index], broken)
    clean_it(cleaned["annotations"][index], cleaned)
    expected = _pycocotools_stats(cleaned, results)
    if name != "iscrowd_false":  # the case matters: pycocotools on the raw file gives another AP
        assert _pycocotools_stats(broken, results) != expected
    ann = tmp_path / "broken.json"
    ann.write_text(json.dumps(broken))  # NaN written as the token Python's json reads back
    res = tmp_path / "results.json"
    res.write_text(json.dumps(results))
    assert eval_det.main(["--results", str(res), "--val-ann", str(ann), "--out-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "o" / "eval_metrics.json").read_text())
    from mnapps.eval.coco import COCO_METRIC_NAMES

    assert [written[k] for k in COCO_METRIC_NAMES] == pytest.approx(expected, abs=1e-12)
    if name.startswith("area"):
        assert "1 ground-truth annotation(s) with a negative or non-finite area" in out
    if name == "ann_id_0":
        assert "1 ground-truth annotation(s) with id 0 were renumbered" in out


@pytest.mark.parametrize("name", sorted(ESCAPING_NAMES))
def test_escaping_file_names_are_named_not_read(name, material, tmp_path, capsys):
    ann = tmp_path / "escaping.json"
    ann.write_text(json.dumps(coco_with_file_name(json.loads(material["val_ann"].read_text()), ESCAPING_NAMES[name])))
    code = eval_det.main(["--checkpoint", str(material["det"]), "--val-ann", str(ann), "--val-images",
                          str(material["val_images"]), "--device", "cpu", "--no-progress", "--out-dir",
                          str(tmp_path / "out")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and "RuntimeWarning" not in captured.err + captured.out
    message = _single_error_line(captured.err)
    assert str(ann) in message and "images[0]" in message and "file_name" in message
    assert "MNAPPS_ALLOW_OUTSIDE_PATHS" in message


# ------------------------------------------------------------------------------------------
# round two: two processes in one run folder, --resume into another run, Ctrl-C


def _tool_command(tool: str, args: list[str]) -> list[str]:
    # Through -c and PYTHONPATH, so the code under test is the one on the path (this checkout).
    return [sys.executable, "-c", f"import sys; from mnapps.cli.{tool} import main; sys.exit(main(sys.argv[1:]))", *args]


def _tool_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or root, "OMP_NUM_THREADS": "1"}


def _train_args(m: dict, run: Path) -> list[str]:
    return ["--train-ann", str(m["train_ann"]), "--train-images", str(m["train_images"]), "--val-ann", str(m["val_ann"]),
            "--val-images", str(m["val_images"]), "--output-dir", str(run), "--device", "cpu", "--batch-size", "2",
            *TINY_DET, "--set", "train.channels_last=false"]  # fmt: skip


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the first run ended early: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {seconds} s")
        time.sleep(0.2)


def _start_long_run(m: dict, run: Path) -> subprocess.Popen:
    """A training run of 500 epochs in a subprocess, returned once its first checkpoint exists."""
    # SIGINT back to its default: a test run started in the background (nohup, CI) ignores it,
    # and children inherit that, where a user's terminal would deliver Ctrl-C.
    process = subprocess.Popen(_tool_command("train_det", [*_train_args(m, run), "--epochs", "500"]),
                               env=_tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    _wait_for(run / "last.pt", process)
    return process


def test_a_second_run_into_a_busy_folder_is_refused(material, tmp_path, capsys):
    run = tmp_path / "run"
    first = _start_long_run(material, run)
    try:
        for extra in ([], ["--overwrite"]):  # a plain start, and one that would replace the run
            second = subprocess.run(_tool_command("train_det", [*_train_args(material, run), "--epochs", "1", *extra]),
                                    env=_tool_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
            assert second.returncode == 2, second.stderr[-2000:]
            message = _single_error_line(second.stderr)
            assert f"in use by pid {first.pid}" in message and "--output-dir" in message, message
        assert first.poll() is None  # still training, untouched
    finally:
        first.kill()  # SIGKILL: no clean-up runs, the lock file stays behind
        first.communicate()
    # A process killed outright leaves its lock file; the next run sees that nobody holds it.
    assert (run / ".mnapps-run.lock").read_text().startswith(f"pid {first.pid} ")
    epoch = int(torch.load(run / "last.pt", weights_only=True)["epoch"])
    assert train_det.main([*_train_args(material, run), "--epochs", str(epoch + 1), "--resume"]) == 0
    assert f"no longer running (pid {first.pid} " in capsys.readouterr().out
    assert not (run / ".mnapps-run.lock").exists()


def test_a_ctrl_c_that_lands_in_a_finaliser_still_stops_the_run(tmp_path):
    # Python ignores a KeyboardInterrupt raised in a __del__ (it only reports it): while a run
    # folder is locked, it must reach the main code anyway, as if Ctrl-C came a moment later.
    script = f"""
import time
from mnapps.engine.run_lock import RunLock
class Finalised:
    def __del__(self):
        raise KeyboardInterrupt
with RunLock({str(tmp_path / "run")!r}):
    try:
        Finalised()
        started = time.monotonic()
        while time.monotonic() - started < 20:
            pass
        print("went on")
    except KeyboardInterrupt:
        print("stopped")
"""
    result = subprocess.run([sys.executable, "-c", script], env=_tool_env(), capture_output=True, text=True,
                            timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.stdout.strip() == "stopped", result.stderr[-2000:]
    assert "Exception ignored in sys.unraisablehook" not in result.stderr


def test_ctrl_c_prints_where_the_checkpoint_is_and_how_to_resume(material, tmp_path):
    run = tmp_path / "run"
    first = _start_long_run(material, run)
    try:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=600)  # generous: CI machines can be very busy
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, err[-3000:]
    assert f"the last checkpoint is {run / 'last.pt'}" in lines[0] and lines[0].endswith("--resume")
    assert "--overwrite" not in lines[0] and not (run / ".mnapps-run.lock").exists()
    # The checkpoint is intact and the printed way to continue works (one more epoch).
    epoch = int(torch.load(run / "last.pt", weights_only=True)["epoch"])
    assert f"(after epoch {epoch})" in lines[0]
    assert train_det.main([*_train_args(material, run), "--epochs", str(epoch + 1), "--resume"]) == 0
    assert int(torch.load(run / "last.pt", weights_only=True)["epoch"]) == epoch + 1


def test_a_lock_left_by_a_dead_process_is_taken_over(material, tmp_path, capsys):
    from mnapps.engine.run_lock import LOCK_NAME, claim_run_folder

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text("pid 999999999 on a-crashed-host\n")  # no process holds its flock
    with claim_run_folder(run) as lock:
        assert f"pid {os.getpid()}" in (run / LOCK_NAME).read_text()
        assert lock.stale_owner == "pid 999999999 on a-crashed-host"
    assert "no longer running (pid 999999999 on a-crashed-host)" in capsys.readouterr().out
    assert not (run / LOCK_NAME).exists()


def test_a_live_lock_refuses_training_in_the_same_process_too(material, tmp_path, capsys):
    from mnapps.engine.run_lock import RunLock

    run = tmp_path / "run"
    with RunLock(run):
        before = digest(run)
        assert train_det.main([*_train_args(material, run), "--epochs", "1"]) == 2
        assert f"in use by pid {os.getpid()}" in _single_error_line(capsys.readouterr().err)
        assert digest(run) == before
    assert not run.exists()  # the lock made the folder and nothing else was written: gone again


def test_resume_into_another_existing_run_is_refused_unless_overwrite(material, tmp_path, capsys):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for run in (run_a, run_b):
        assert train_det.main([*_train_args(material, run), "--epochs", "1"]) == 0
    capsys.readouterr()
    before = digest(run_b)
    args = [*_train_args(material, run_b), "--epochs", "2", "--resume", str(run_a / "last.pt")]
    assert train_det.main(args) == 2
    message = _single_error_line(capsys.readouterr().err)
    assert f"--resume {run_a / 'last.pt'}" in message and "holds another run" in message and "--overwrite" in message
    assert digest(run_b) == before  # last.pt, best.pt, config.yaml and metrics.json of b untouched
    assert train_det.main([*args, "--overwrite"]) == 0
    assert "removed last.pt, best.pt, metrics.json of the previous run" in capsys.readouterr().out
    assert int(torch.load(run_b / "last.pt", weights_only=True)["epoch"]) == 2


@pytest.mark.parametrize("kind", ["missing", "garbage", "not_training"])
def test_a_bad_resume_checkpoint_is_named_before_any_data_is_read(kind, material, tmp_path, capsys):
    resume = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        resume.write_bytes(b"not a checkpoint")
    elif kind == "not_training":
        resume.write_bytes(material["det"].read_bytes())  # a model, without optimiser state
    args = [*_train_args(material, tmp_path / "run"), "--resume", str(resume)]
    args[args.index("--train-ann") + 1] = str(tmp_path / "not_there_yet.json")  # the data comes later
    assert train_det.main(args) == 2
    message = _single_error_line(capsys.readouterr().err)
    assert str(resume) in message and "not_there_yet.json" not in message, message


# ------------------------------------------------------------------------------------------
# round two: outputs that are links to the inputs, or share a name


def _solid_photos(folder: Path, names: dict[str, tuple[int, int, int]]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, colour in names.items():
        paths[name] = folder / name
        Image.new("RGB", (64, 48), colour).save(paths[name], format="PNG")  # lossless whatever the suffix
    return paths


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_an_out_folder_of_links_to_the_photos_never_changes_the_photos(link, material, tmp_path, capsys):
    photos = tmp_path / "photos"
    _solid_photos(photos, {"p0.png": (200, 0, 0), "p1.png": (0, 0, 200)})
    out = tmp_path / "out"  # what `cp -al photos out` (or `cp -as`) makes
    out.mkdir()
    for photo in photos.iterdir():
        (os.link if link == "hard" else os.symlink)(photo, out / photo.name)
    before = digest(photos)
    argv = [str(photos), "--checkpoint", str(material["det"]), "--out", str(out), "--score-threshold", "0.0"]
    assert infer_det.main(argv) == 2
    assert "already exist(s)" in _single_error_line(capsys.readouterr().err)
    assert infer_det.main([*argv, "--overwrite"]) == 0
    assert digest(photos) == before  # the photos' bytes are what they were
    for photo in photos.iterdir():
        drawn = out / photo.name
        assert not drawn.is_symlink() and drawn.stat().st_ino != photo.stat().st_ino


def test_out_set_to_the_photos_parent_does_not_replace_a_photo_there(material, tmp_path, capsys):
    _solid_photos(tmp_path, {"a.png": (10, 200, 10)})  # another photo, in the parent folder
    _solid_photos(tmp_path / "photos", {"a.png": (200, 10, 10)})
    before = digest(tmp_path)
    assert infer_det.main([str(tmp_path / "photos"), "--checkpoint", str(material["det"]), "--out", str(tmp_path)]) == 2
    message = _single_error_line(capsys.readouterr().err)
    assert str(tmp_path / "a.png") in message and "--overwrite" in message
    assert digest(tmp_path) == before


def test_every_photo_gets_its_own_drawing_even_when_names_clash(material, tmp_path, capsys):
    colours = {"c.bmp": (200, 0, 0), "c.bmp.png": (0, 200, 0), "d.png": (0, 0, 200), "d.tif": (200, 200, 0)}
    _solid_photos(tmp_path / "photos", colours)
    out = tmp_path / "drawn"
    assert infer_det.main([str(tmp_path / "photos"), "--checkpoint", str(material["det"]), "--out", str(out),
                           "--score-threshold", "1.0"]) == 0  # fmt: skip
    assert "drew 4 image(s)" in capsys.readouterr().out
    written = sorted(p.name for p in out.iterdir())
    assert written == ["c.bmp.png", "c.bmp~2.png", "d.png", "d.tif.png"]
    # Threshold 1 draws nothing: each file holds its own photo's colour.
    for name, colour in (("c.bmp.png", colours["c.bmp.png"]), ("c.bmp~2.png", colours["c.bmp"]),
                         ("d.png", colours["d.png"]), ("d.tif.png", colours["d.tif"])):  # fmt: skip
        assert np.asarray(Image.open(out / name))[0, 0].tolist() == list(colour), name


class _ColourFaces:
    """A stand-in face detector: a photo of colour C holds FACES[C] faces, each crop of colour C."""

    def __init__(self, faces: dict[tuple, int]) -> None:
        self.faces = faces

    def detect(self, image, *, keep_all: bool = False):
        from mnapps.tasks.face.data.align import DetectedFace

        colour = tuple(int(v) for v in np.asarray(image)[0, 0])
        count = self.faces.get(colour, 1) if keep_all else 1
        crop = np.full((16, 16, 3), colour, dtype=np.uint8)
        return [DetectedFace(crop=crop, box=(0.0, 0.0, 8.0, 8.0), probability=0.99, landmarks=np.zeros((5, 2)))
                for _ in range(count)]  # fmt: skip


def _crop_colour(path: Path) -> list[int]:
    return np.asarray(Image.open(path))[0, 0].tolist()


def test_extra_faces_never_take_another_photos_crop_name_and_resume_keeps_them_apart(tmp_path):
    from mnapps.tasks.face.data.align import align_folder

    red, green, blue = (200, 0, 0), (0, 200, 0), (0, 0, 200)
    _solid_photos(tmp_path / "src", {"m.png": red, "m_1.png": green, "m_2.png": blue})
    aligner = _ColourFaces({red: 6})
    report = align_folder(tmp_path / "src", tmp_path / "dst", aligner=aligner, keep_all=True, progress=False)
    assert report.aligned == 3 and report.skipped_done == 0 and report.faces_written == 8
    dst = tmp_path / "dst"
    assert _crop_colour(dst / "m_1.png") == list(green) and _crop_colour(dst / "m_2.png") == list(blue)
    extras = sorted(p.name for p in dst.glob("m_*") if _crop_colour(p) == list(red))
    assert len(extras) == 5 and not {"m_1.png", "m_2.png"} & set(extras), extras
    again = align_folder(tmp_path / "src", dst, aligner=aligner, keep_all=True, progress=False)
    assert again.skipped_done == 3 and again.aligned == 0


def test_photos_whose_names_nest_get_distinct_crops(tmp_path):
    from mnapps.tasks.face.data.align import align_folder

    colours = {"x.jpg": (200, 0, 0), "x.png": (0, 200, 0), "x.jpg.png": (0, 0, 200)}
    _solid_photos(tmp_path / "src", colours)
    report = align_folder(tmp_path / "src", tmp_path / "dst", aligner=_ColourFaces({}), progress=False)
    assert report.aligned == 3 and report.skipped_done == 0
    crops = {p.name: _crop_colour(p) for p in (tmp_path / "dst").glob("*.png")}
    assert len(crops) == 3 and sorted(map(tuple, crops.values())) == sorted(colours.values()), crops
