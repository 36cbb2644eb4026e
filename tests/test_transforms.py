"""Detection transforms: boxes stay on their objects, inside the image; eval is the identity."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from mnapps.data.transforms import (
    MEAN_RGB_UINT8,
    DetTransform,
    SSDRandomCrop,
    ZoomOut,
    build_det_transforms,
    sample_to_tensors,
)

RED, GREEN = 1, 2


def scene(height: int = 160, width: int = 200, seed: int = 0):
    """Gray noise background with a solid red and a solid green rectangle (the two objects)."""
    rng = np.random.default_rng(seed)
    gray = rng.integers(60, 160, (height, width, 1), dtype=np.uint8)
    image = np.repeat(gray, 3, axis=2)
    boxes = np.array([[20, 30, 90, 100], [120, 50, 180, 140]], dtype=np.float32)
    image[30:100, 20:90] = (255, 0, 0)
    image[50:140, 120:180] = (0, 255, 0)
    return image, boxes, np.array([RED, GREEN], dtype=np.int64)


def dominant_colour_inside(image: torch.Tensor, box: torch.Tensor) -> tuple[float, float]:
    """Mean (R - max(G, B), G - max(R, B)) over the inner half of a box."""
    x1, y1, x2, y2 = box.tolist()
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 4, (y2 - y1) / 4
    top, left = int(cy - hh), int(cx - hw)
    patch = image[:, top : max(int(cy + hh), top + 1), left : max(int(cx + hw), left + 1)]
    r, g, b = patch.mean(dim=(1, 2)).tolist()
    return r - max(g, b), g - max(r, b)


@pytest.mark.parametrize("recipe, size", [("ssd", 96), ("basic", None)])
def test_training_transforms_keep_boxes_on_their_objects(recipe, size):
    image, boxes, labels = scene()
    transform = build_det_transforms(True, size, recipe)
    torch.manual_seed(0)
    seen_boxes = 0
    for _ in range(40):
        out, out_boxes, out_labels = transform(image, boxes, labels)
        height, width = out.shape[1:]
        if size is not None:
            assert (height, width) == (size, size)
        else:
            assert (height, width) == image.shape[:2]
        assert out.dtype == torch.float32 and 0.0 <= out.min() and out.max() <= 1.0
        assert out_boxes.shape == (len(out_labels), 4) and out_labels.dtype == torch.int64
        assert (out_boxes[:, 0] >= 0).all() and (out_boxes[:, 1] >= 0).all()
        assert (out_boxes[:, 2] <= width).all() and (out_boxes[:, 3] <= height).all()
        assert ((out_boxes[:, 2:] - out_boxes[:, :2]) >= 1.0).all()
        for box, label in zip(out_boxes, out_labels.tolist()):
            red_excess, green_excess = dominant_colour_inside(out, box)
            # Photometric distortion shifts hue by at most 18 degrees: the colour stays dominant.
            if label == RED:
                assert red_excess > 0.25, (box, red_excess)
            else:
                assert green_excess > 0.25, (box, green_excess)
            seen_boxes += 1
    assert seen_boxes >= 40  # most samples keep their objects


def test_ssd_recipe_actually_varies_geometry():
    image, boxes, labels = scene()
    transform = build_det_transforms(True, 96, "ssd")
    torch.manual_seed(1)
    outputs = [transform(image, boxes, labels)[1] for _ in range(30)]
    red_boxes = {tuple(b[0].round().int().tolist()) for b in outputs if len(b)}
    assert len(red_boxes) > 10  # zoom out, crops and flips move the first box around


def test_same_torch_seed_same_augmentation():
    image, boxes, labels = scene()
    transform = build_det_transforms(True, 64, "ssd")
    torch.manual_seed(123)
    first = [transform(image, boxes, labels) for _ in range(5)]
    torch.manual_seed(123)
    second = [transform(image, boxes, labels) for _ in range(5)]
    for (im_a, b_a, l_a), (im_b, b_b, l_b) in zip(first, second):
        assert torch.equal(im_a, im_b) and torch.equal(b_a, b_b) and torch.equal(l_a, l_b)


class _SameImageDataset(torch.utils.data.Dataset):
    """Every index is the same sample: only the augmentation can make outputs differ."""

    def __init__(self):
        self.transform = build_det_transforms(True, 64, "ssd")
        self.image, self.boxes, self.labels = scene()

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return self.transform(self.image, self.boxes, self.labels)[0]


def test_dataloader_workers_do_not_repeat_each_other():
    # Forked workers copy the transform's state; seeding from torch (which seeds each worker
    # differently) is what keeps their augmentations apart.
    torch.manual_seed(0)
    batches = list(torch.utils.data.DataLoader(_SameImageDataset(), batch_size=1, num_workers=2))
    # Worker 0 yields samples 0, 2, 4 and worker 1 samples 1, 3, 5: with copied random states the
    # two streams would be identical pair by pair.
    assert not all(torch.equal(batches[i], batches[i + 1]) for i in (0, 2, 4))


def test_eval_transform_is_the_identity_on_content():
    image, boxes, labels = scene(seed=3)
    out, out_boxes, out_labels = build_det_transforms(False, None)(image, boxes, labels)
    torch.testing.assert_close(out, torch.from_numpy(image).permute(2, 0, 1).float() / 255, rtol=0, atol=0)
    assert torch.equal(out_boxes, torch.from_numpy(boxes)) and out_labels.tolist() == [RED, GREEN]
    # The recipe does not matter for evaluation.
    out_basic, _, _ = build_det_transforms(False, None, "basic")(image, boxes, labels)
    assert torch.equal(out, out_basic)


def test_eval_resize_scales_boxes_exactly():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    boxes = np.array([[20, 10, 60, 50]], dtype=np.float32)
    out, out_boxes, _ = build_det_transforms(False, 50)(image, boxes, np.array([1]))
    assert out.shape == (3, 50, 50)
    # x scale 50/200 = 0.25, y scale 50/100 = 0.5
    torch.testing.assert_close(out_boxes, torch.tensor([[5.0, 5.0, 15.0, 25.0]]))


def test_tiny_images_and_empty_targets_go_through_the_ssd_recipe():
    rng = np.random.default_rng(0)
    tiny = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
    transform = build_det_transforms(True, 32, "ssd")
    torch.manual_seed(0)
    for _ in range(50):
        out, boxes, labels = transform(tiny, np.array([[2, 2, 9, 8]], np.float32), np.array([1]))
        assert out.shape == (3, 32, 32)
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all() and (boxes >= 0).all() and (boxes <= 32).all()
        out, boxes, labels = transform(tiny, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
        assert out.shape == (3, 32, 32) and boxes.shape == (0, 4) and labels.shape == (0,)


def test_zoom_out_places_image_on_mean_canvas_and_shifts_boxes():
    image = np.full((10, 20, 3), 200, dtype=np.uint8)
    zoom = ZoomOut(max_ratio=3.0, p=1.0)
    canvas = zoom.apply(image, canvas_size=(50, 30), offset=(7, 4))
    assert canvas.shape == (30, 50, 3)
    assert (canvas[4:14, 7:27] == 200).all()
    assert (canvas[0, 0] == MEAN_RGB_UINT8).all() and (canvas[29, 49] == MEAN_RGB_UINT8).all()
    # Box (2, 3, 12, 8) in the 20x10 image, normalised -> (9, 7, 19, 12) on the 50x30 canvas.
    normalised = np.array([[2 / 20, 3 / 10, 12 / 20, 8 / 10, 5.0]])
    out = zoom.apply_to_bboxes(normalised, canvas_size=(50, 30), offset=(7, 4), shape=(10, 20, 3))
    np.testing.assert_allclose(out[0, :4] * [50, 30, 50, 30], [9, 7, 19, 12], atol=1e-6)
    assert out[0, 4] == 5.0  # the label column rides along


def test_ssd_crop_keeps_only_boxes_centred_in_the_patch():
    crop = SSDRandomCrop()
    shape = (100, 200, 3)
    boxes_px = np.array([[10, 10, 50, 50],      # centre (30, 30): inside the patch
                         [90, 60, 130, 120],    # centre (110, 90): outside (below)
                         [0, 0, 200, 100]])     # centre (100, 50): inside, much larger than the patch
    normalised = np.concatenate([boxes_px / [200, 100, 200, 100], [[1], [2], [3]]], axis=1)
    out = crop.apply_to_bboxes(normalised, crop_coords=(20, 20, 120, 80), shape=shape)
    assert out[:, 4].tolist() == [1, 3]
    # Shifted by (20, 20) and re-normalised to the 100x60 patch, not yet clipped.
    np.testing.assert_allclose(out[:, :4] * [100, 60, 100, 60], [[-10, -10, 30, 30], [-20, -20, 180, 80]], atol=1e-6)


@pytest.mark.parametrize("min_iou", [0.5, 0.9])
def test_ssd_crop_satisfies_its_minimum_iou(min_iou):
    crop = SSDRandomCrop(min_ious=(min_iou,), trials=200)
    crop.set_random_seed(0)
    height, width = 100, 100
    box = np.array([10.0, 10.0, 90.0, 90.0])  # area 6400
    data = {"bboxes": np.array([[*(box / 100), 1.0]])}
    for _ in range(20):
        x1, y1, x2, y2 = crop.get_params_dependent_on_data({"shape": (height, width, 3)}, data)["crop_coords"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert 0.5 <= (x2 - x1) / (y2 - y1) <= 2.0
        inter = max(0, min(x2, 90) - max(x1, 10)) * max(0, min(y2, 90) - max(y1, 10))
        iou = inter / (6400 + (x2 - x1) * (y2 - y1) - inter)
        assert iou >= min_iou
        assert x1 < 50 < x2 and y1 < 50 < y2  # the box centre is inside


def test_boxes_mostly_cropped_away_are_dropped_and_the_rest_clipped():
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    boxes = np.array([[40, 40, 60, 60],    # 50% inside the crop x < 50
                      [45, 0, 70, 10]],    # 20% inside: 5 of 25 px wide
                     dtype=np.float32)
    transform = DetTransform([A.Crop(0, 0, 50, 100)], min_visibility=0.3, stochastic=False)
    out, out_boxes, out_labels = transform(image, boxes, np.array([1, 2]))
    assert out.shape == (3, 100, 50)
    assert out_labels.tolist() == [1]
    torch.testing.assert_close(out_boxes, torch.tensor([[40.0, 40.0, 50.0, 60.0]]))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown augmentation recipe 'yolo'"):
        build_det_transforms(True, 300, "yolo")
    for bad in (0, -3, "300", 2.5):
        with pytest.raises(ValueError, match="size must be a positive int"):
            build_det_transforms(True, bad)
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        build_det_transforms(True, 32)(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 4), np.float32), np.zeros(1))
    with pytest.raises(ValueError, match="RGB uint8 image"):
        sample_to_tensors(np.zeros((8, 8), np.uint8), np.zeros((0, 4)), np.zeros(0))


def test_boxes_outside_the_image_are_dropped_not_fatal():
    image, boxes, labels = scene(80, 80)  # the green box (x from 120) lies outside an 80 px wide image
    out, out_boxes, out_labels = build_det_transforms(True, 48, "basic")(image, boxes, labels)
    assert out.shape == (3, 48, 48) and out_labels.tolist() == [RED]
