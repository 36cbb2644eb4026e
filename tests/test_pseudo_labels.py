"""tools/pseudo_label.py: face-api.js's real detector labels real photos as a COCO annotation file.

Checked against face-api.js's own detections of the same photos (its reference file, not this
project's output): every face scoring >= 0.5 becomes a box that overlaps face-api.js's by IoU >=
0.98, faces under the threshold are left out, the photo without a face stays as an image without
boxes, sizes are the photos' own; then the file goes through eval_det --val-ann and CocoDetection.
Skipped when ../shared is absent.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from mnapps.cli import eval_det, import_weights, pseudo_label
from mnapps.data.coco import CocoDetection
from mnapps.data.transforms import build_det_transforms

# Reference names in reference_detections.json: two with faces under and over 0.5, one without any.
PHOTOS = ("multiface", "kit_with_rose", "obama_and_biden", "coffee")
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def teacher(shared_data, tmp_path_factory):
    source = shared_data / "faceapi_ssd_mobilenetv1"
    output = tmp_path_factory.mktemp("teacher") / "faceapi_ssd.pt"
    assert import_weights.main(["--kind", "ssd", str(source), "--output", str(output)]) == 0
    reference = json.loads((source / "reference_detections.json").read_text())
    return output, {name: reference[name] for name in PHOTOS}


@pytest.fixture(scope="module")
def labelled(teacher, shared_data, tmp_path_factory):
    checkpoint, reference = teacher
    folder = tmp_path_factory.mktemp("labels")
    photo_list = folder / "photos.txt"
    photo_list.write_text("# the test's photos\n" + "\n".join(entry["photo"] for entry in reference.values()) + "\n")
    output = folder / "pseudo.json"
    args = [str(shared_data), "--list", str(photo_list), "--checkpoint", str(checkpoint), "--output", str(output)]
    assert pseudo_label.main(args + ["--score-threshold", str(THRESHOLD)]) == 0
    return output, args


def test_boxes_are_the_teachers_faces_above_the_threshold(labelled, teacher, shared_data):
    output, _ = labelled
    _, reference = teacher
    coco = json.loads(output.read_text())
    assert coco["categories"] == [{"id": 1, "name": "face", "supercategory": "face"}]
    by_name = {image["file_name"]: image for image in coco["images"]}
    assert list(by_name) == [entry["photo"] for entry in reference.values()]
    for name, entry in reference.items():
        image = by_name[entry["photo"]]
        assert (image["height"], image["width"]) == tuple(entry["height_width"])
        with Image.open(shared_data / image["file_name"]) as photo:
            assert photo.size == (image["width"], image["height"])
        want = torch.tensor([d[1:] for d in entry["detections"] if d[0] >= THRESHOLD], dtype=torch.float64)
        found = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(found) == len(want), name
        if not len(want):
            continue
        as_xyxy = lambda b: torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)  # noqa: E731
        iou = box_iou(as_xyxy(torch.tensor([a["bbox"] for a in found], dtype=torch.float64)), as_xyxy(want))
        assert iou.max(dim=0).values.min() >= 0.98, name
        assert all(a["score"] >= THRESHOLD and a["iscrowd"] == 0 and a["category_id"] == 1 for a in found)
        assert all(a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], rel=1e-3) for a in found)
    # Two faces of the reference score under 0.5 (0.325 in obama_and_biden, plus none elsewhere).
    assert len(coco["annotations"]) == 6 + 2 + 2 + 0


def test_the_photo_without_a_face_stays_as_an_image_without_boxes(labelled):
    coco = json.loads(labelled[0].read_text())
    coffee = next(image for image in coco["images"] if image["file_name"].endswith("coffee.png"))
    assert not [a for a in coco["annotations"] if a["image_id"] == coffee["id"]]
    assert (coffee["width"], coffee["height"]) == (600, 400)


def test_info_records_the_teacher_and_the_threshold(labelled, teacher):
    checkpoint, _ = teacher
    info = json.loads(labelled[0].read_text())["info"]
    assert info["teacher_checkpoint"] == str(checkpoint)
    assert info["teacher_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert info["score_threshold"] == THRESHOLD
    assert info["nms_threshold"] == 0.5  # face-api.js's own, recorded by the import


def test_eval_det_and_training_data_read_the_file(labelled, teacher, shared_data, tmp_path):
    # The teacher against its own labels: every label is one of its detections (IoU 1) and its
    # detections under 0.5 rank below all of them, so AP is 1 at every IoU threshold.
    output, _ = labelled
    checkpoint, _ = teacher
    args = ["--checkpoint", str(checkpoint), "--val-ann", str(output), "--val-images", str(shared_data)]
    assert eval_det.main(args + ["--out-dir", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    dataset = CocoDetection(output, shared_data, build_det_transforms(True, 128, "ssd"))
    assert len(dataset) == len(PHOTOS)
    counts = sorted(len(dataset[i][1]["boxes"]) for i in range(len(dataset)) if dataset.annotations(i)[0].size == 0)
    assert counts == [0]  # the face-less photo is a background sample


def test_an_existing_output_is_kept_unless_overwrite(labelled, capsys):
    output, args = labelled
    before = output.read_bytes()
    assert pseudo_label.main(args + ["--score-threshold", "0.9"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == before
    assert pseudo_label.main(args + ["--score-threshold", "0.9", "--overwrite"]) == 0
    coco = json.loads(output.read_text())
    assert coco["info"]["score_threshold"] == 0.9
    assert all(a["score"] >= 0.9 for a in coco["annotations"])
    output.write_bytes(before)  # the other tests read the 0.5 file
