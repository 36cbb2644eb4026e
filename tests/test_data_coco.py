"""CocoDetection and collate_fn: label mapping, box sanitising, image modes, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval

from mnapps.data.coco import CocoDetection, collate_fn
from mnapps.data.synthetic_det import ensure_shapes_detection

RED = (230, 20, 20)


def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def solid_image(path: Path, size: tuple[int, int], colour=(40, 40, 40), mode: str = "RGB") -> Path:
    Image.new(mode, size, colour).save(path)
    return path


def ann(ann_id: int, image_id: int, bbox: list[float], category_id: int = 3, iscrowd: int = 0) -> dict:
    area = float(bbox[2] * bbox[3]) if len(bbox) == 4 else 0.0
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd,
            "area": area}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes_detection(tmp_path_factory.mktemp("shapes") / "ds", num_train=12, num_val=4,
                                   image_size=128, progress=False)


# ----------------------------------------------------------------------------- category ids
def test_category_ids_map_to_contiguous_labels_and_back(shapes):
    ds = CocoDetection(shapes.train_ann, shapes.train_images)
    assert ds.cat_ids == [2, 5, 9, 11]
    assert ds.cat_id_to_label == {2: 1, 5: 2, 9: 3, 11: 4}
    assert ds.class_names == ["__background__", "circle", "square", "triangle", "cross"]
    assert ds.num_classes == 5
    for cat_id in ds.cat_ids:
        assert ds.label_to_cat_id[ds.cat_id_to_label[cat_id]] == cat_id
    # Every sample's labels map back to exactly the image's annotated category ids.
    for index, image_id in enumerate(ds.ids):
        _, target = ds[index]
        expected = sorted(a["category_id"] for a in ds.coco.imgToAnns[image_id])
        assert sorted(ds.label_to_cat_id[int(label)] for label in target["labels"]) == expected
        assert target["image_id"] == image_id


def test_labels_survive_a_results_file_round_trip(shapes, tmp_path):
    """Targets written as a COCO results file with label_to_cat_id score AP = 1 against the GT."""
    ds = CocoDetection(shapes.val_ann, shapes.val_images)
    results = []
    for index in range(len(ds)):
        _, target = ds[index]
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            results.append({"image_id": target["image_id"], "category_id": ds.label_to_cat_id[label],
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": 0.9})
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(ds.coco, ds.coco.loadRes(str(results_file)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # AP over IoU .5:.95


# ----------------------------------------------------------------------------- box sanitising
def test_crowd_degenerate_and_out_of_image_boxes(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        solid_image(tmp_path / "img" / name, (100, 80))
    images = [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
              {"id": 2, "file_name": "b.png", "width": 100, "height": 80},   # no annotations
              {"id": 3, "file_name": "c.png", "width": 100, "height": 80}]   # only a crowd box
    annotations = [
        ann(1, 1, [10, 20, 30, 40]),                 # kept as is
        ann(2, 1, [0, 0, 50, 50], iscrowd=1),         # crowd: dropped
        ann(3, 1, [90, 70, 20, 20], category_id=7),   # past the bottom-right: clipped to (90,70,100,80)
        ann(4, 1, [-5, -5, 15, 10]),                  # before the top-left: clipped to (0,0,10,5)
        ann(5, 1, [50, 50, 0.5, 10]),                 # 0.5 px wide: degenerate
        ann(6, 1, [120, 10, 10, 10]),                 # entirely right of the image: degenerate
        ann(7, 1, [5, 5, 10, 0]),                     # zero height: degenerate
        ann(8, 3, [1, 1, 20, 20], iscrowd=1),
    ]
    ann_file = write_coco(tmp_path / "ann.json", images, annotations,
                          [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}])
    ds = CocoDetection(ann_file, tmp_path / "img")

    assert ds.cat_id_to_label == {3: 1, 7: 2}
    stats = ds.box_stats.as_dict()
    assert stats == {"images": 3, "images_without_boxes": 2, "annotations": 8, "kept": 3, "crowd": 2,
                     "degenerate": 3, "clipped": 2}
    image, target = ds[0]
    assert image.shape == (3, 80, 100) and image.dtype == torch.float32
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 20, 40, 60], [90, 70, 100, 80], [0, 0, 10, 5]]))
    assert target["labels"].tolist() == [1, 2, 1]
    assert target["labels"].dtype == torch.int64

    for index in (1, 2):  # images without (usable) annotations are kept as background
        image, target = ds[index]
        assert image.shape == (3, 80, 100)
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    summary = ds.summary()
    assert "3 images (2 without boxes)" in summary and "3/8 boxes kept" in summary
    assert "2 crowd" in summary and "3 degenerate" in summary and "clipped 2" in summary


def test_image_ids_subset_keeps_the_given_order(shapes):
    full = CocoDetection(shapes.train_ann, shapes.train_images)
    subset = CocoDetection(shapes.train_ann, shapes.train_images, image_ids=[full.ids[3], full.ids[0]])
    assert subset.ids == [full.ids[3], full.ids[0]] and len(subset) == 2
    assert subset.box_stats.images == 2
    with pytest.raises(ValueError, match=r"image_ids \[424242\]"):
        CocoDetection(shapes.train_ann, shapes.train_images, image_ids=[424242])


# ----------------------------------------------------------------------------- image modes
def single_image_dataset(tmp_path: Path, file_name: str, size: tuple[int, int], bbox: list[float]) -> CocoDetection:
    image = {"id": 1, "file_name": file_name, "width": size[0], "height": size[1]}
    ann_file = write_coco(tmp_path / "ann.json", [image], [ann(1, 1, bbox)], [{"id": 3, "name": "thing"}])
    return CocoDetection(ann_file, tmp_path)


def test_grayscale_image_becomes_three_equal_channels(tmp_path):
    pixels = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (20, 1))  # 20 x 50 ramp
    Image.fromarray(pixels, mode="L").save(tmp_path / "gray.png")
    image, _ = single_image_dataset(tmp_path, "gray.png", (50, 20), [0, 0, 10, 10])[0]
    assert image.shape == (3, 20, 50)
    expected = torch.from_numpy(pixels).float() / 255
    for channel in range(3):
        torch.testing.assert_close(image[channel], expected)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[:, :15] = (200, 10, 10, 255)   # opaque red half
    rgba[:, 15:] = (0, 0, 0, 0)         # fully transparent half (stored colour black)
    rgba[0, 0] = (0, 0, 255, 128)        # half-transparent blue: (0,0,255)*128/255 + white*127/255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    image, _ = single_image_dataset(tmp_path, "rgba.png", (30, 20), [0, 0, 10, 10])[0]
    as_uint8 = (image * 255).round().to(torch.uint8).permute(1, 2, 0)
    assert as_uint8[5, 5].tolist() == [200, 10, 10]
    assert as_uint8[5, 20].tolist() == [255, 255, 255]
    assert as_uint8[0, 0].tolist() == [127, 127, 255]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    pixels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image, _ = single_image_dataset(tmp_path, "deep.png", (3, 4), [0, 0, 2, 2])[0]
    assert (image[0, 0] * 255).round().tolist() == [0.0, 100.0, 255.0]


def exif_rotated_jpeg(path: Path) -> None:
    """Stored 60x40 pixels with a red block at stored x 0..20, y 0..10, EXIF orientation 6."""
    stored = np.full((40, 60, 3), 40, dtype=np.uint8)
    stored[0:10, 0:20] = RED
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())


def test_exif_rotated_image_is_transposed_and_boxes_stay_on_the_object(tmp_path):
    exif_rotated_jpeg(tmp_path / "rot.jpg")
    # Rotating 90 deg clockwise maps stored (x, y) to displayed (39 - y, x): the block's stored
    # x 0..20, y 0..10 becomes displayed x 30..40, y 0..20 in a 40 x 60 image. COCO annotates
    # the displayed image, so that is where the box is.
    ds = single_image_dataset(tmp_path, "rot.jpg", (40, 60), [30, 0, 10, 20])
    image, target = ds[0]
    assert image.shape == (3, 60, 40)
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()
    assert (x1, y1, x2, y2) == (30, 0, 40, 20)
    inside = image[:, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].mean(dim=(1, 2)) * 255
    assert inside[0] > 200 and inside[1] < 60 and inside[2] < 60
    assert image[0, 30:, :20].mean() * 255 < 60  # the stored position of the block is not red


def test_exif_rotation_ignored_when_annotations_are_on_stored_pixels(tmp_path):
    exif_rotated_jpeg(tmp_path / "rot.jpg")
    ds = single_image_dataset(tmp_path, "rot.jpg", (60, 40), [0, 0, 20, 10])  # sizes of the stored pixels
    with pytest.warns(RuntimeWarning, match="stored 60x40 pixels"):
        image, target = ds[0]
    assert image.shape == (3, 40, 60)
    assert image[0, 2:8, 2:18].mean() * 255 > 200


# ----------------------------------------------------------------------------- unreadable images
def test_unreadable_images_are_skipped_warned_once_and_counted(tmp_path):
    solid_image(tmp_path / "good.png", (32, 24))
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    files = [("good.png", 32, 24), ("garbage.jpg", 32, 24), ("truncated.jpg", 64, 64)]
    images = [{"id": i + 1, "file_name": name, "width": w, "height": h} for i, (name, w, h) in enumerate(files)]
    ds = CocoDetection(write_coco(tmp_path / "ann.json", images, [ann(1, 1, [1, 1, 5, 5])], [{"id": 3, "name": "x"}]),
                       tmp_path)
    with pytest.warns(RuntimeWarning, match="unreadable image") as record:
        assert ds[1] is None
        assert ds[2] is None
    assert len(record) == 2 and "garbage.jpg" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second visit must not warn again
        assert ds[1] is None
    assert ds.num_unreadable == 2 and ds.unreadable_ids == {2, 3}
    assert ds.summary().endswith("2 unreadable images skipped")
    assert ds.summary(skipped_samples=5).endswith("5 unreadable samples skipped")

    images_out, targets, skipped = collate_fn([ds[0], ds[1], ds[2]])
    assert skipped == 2 and len(images_out) == 1 and targets[0]["image_id"] == 1
    assert collate_fn([None, None]) == ([], [], 2)


def test_collate_keeps_variable_sizes_as_lists(shapes):
    ds = CocoDetection(shapes.train_ann, shapes.train_images)
    images, targets, skipped = collate_fn([ds[0], ds[1]])
    assert skipped == 0
    assert [tuple(im.shape) for im in images] == [tuple(ds[0][0].shape), tuple(ds[1][0].shape)]
    assert [t["image_id"] for t in targets] == ds.ids[:2]


# ----------------------------------------------------------------------------- bad input
@pytest.fixture()
def valid_files(tmp_path):
    (tmp_path / "img").mkdir()
    solid_image(tmp_path / "img" / "a.png", (20, 20))
    images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}]
    return tmp_path, images


def test_missing_annotation_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotation file .*nope\.json not found"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


def test_missing_image_folder_is_a_clear_error(valid_files):
    root, images = valid_files
    ann_file = write_coco(root / "ann.json", images, [], [{"id": 1, "name": "a"}])
    with pytest.raises(FileNotFoundError, match=r"image folder .*missing_dir.* not found"):
        CocoDetection(ann_file, root / "missing_dir")


def test_wrong_image_folder_is_a_clear_error(valid_files):
    root, images = valid_files
    ann_file = write_coco(root / "ann.json", images, [], [{"id": 1, "name": "a"}])
    with pytest.raises(FileNotFoundError, match=r"holds none of the first 1 images .*'a\.png'"):
        CocoDetection(ann_file, root)  # the images are in root/img


def test_malformed_json_is_a_clear_error(valid_files):
    root, _ = valid_files
    (root / "bad.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON .*line 1"):
        CocoDetection(root / "bad.json", root / "img")


@pytest.mark.parametrize(
    "annotation, message",
    [
        (ann(1, 99, [0, 0, 5, 5], category_id=1),
         r"annotations\[0\] \(id 1\) refers to image_id 99, which is not in 'images'"),
        (ann(1, 1, [0, 0, 5, 5], category_id=42),
         r"refers to category_id 42, which is not in 'categories' \(ids \[1\]\)"),
        (ann(1, 1, [0, 0, 5], category_id=1), r"has bbox=\[0, 0, 5\]"),
    ],
)
def test_annotations_referencing_unknown_entries_are_clear_errors(valid_files, annotation, message):
    root, images = valid_files
    ann_file = write_coco(root / "ann.json", images, [annotation], [{"id": 1, "name": "a"}])
    with pytest.raises(ValueError, match=message) as info:
        CocoDetection(ann_file, root / "img")
    assert "ann.json" in str(info.value)


def test_file_without_categories_is_a_clear_error(valid_files):
    root, images = valid_files
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": []}))
    with pytest.raises(ValueError, match="'categories' is missing"):
        CocoDetection(root / "ann.json", root / "img")


# ----------------------------------------------------------------------------- real COCO files
@pytest.mark.parametrize("split, num_images, num_boxes", [("train", 4, 13), ("val", 4, 17)])
def test_real_coco8_files_load(shared_data, split, num_images, num_boxes):
    root = shared_data / "coco8"
    ds = CocoDetection(root / f"instances_{split}.json", root / "images" / split)
    assert len(ds) == num_images and ds.box_stats.kept == num_boxes
    assert ds.num_classes == 81 and ds.class_names[1] == "person" and ds.label_to_cat_id[80] == 90
    image, target = ds[0]
    info = ds.coco.imgs[ds.ids[0]]
    assert image.shape == (3, info["height"], info["width"])
    assert 0.0 <= image.min() and image.max() <= 1.0
    boxes = target["boxes"]
    assert (boxes[:, 2] <= info["width"]).all() and (boxes[:, 3] <= info["height"]).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_boxes_are_clipped_to_the_real_image_when_the_file_gives_no_size(tmp_path):
    solid_image(tmp_path / "a.png", (50, 40))
    ann_file = write_coco(tmp_path / "ann.json", [{"id": 1, "file_name": "a.png"}],  # no width/height
                          [ann(1, 1, [30, 20, 40, 40]), ann(2, 1, [60, 0, 10, 10])], [{"id": 3, "name": "x"}])
    ds = CocoDetection(ann_file, tmp_path)
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[30.0, 20.0, 50.0, 40.0]]))  # the second is outside


def test_image_smaller_than_annotated_is_warned_and_boxes_clipped(tmp_path):
    solid_image(tmp_path / "a.png", (50, 40))
    ann_file = write_coco(tmp_path / "ann.json", [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}],
                          [ann(1, 1, [30, 20, 40, 40])], [{"id": 3, "name": "x"}])
    with pytest.warns(RuntimeWarning, match=r"a\.png is 50x40 but ann\.json says 100x80"):
        _, target = CocoDetection(ann_file, tmp_path)[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[30.0, 20.0, 50.0, 40.0]]))
