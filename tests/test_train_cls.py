"""Classification data and training: ImageFolder errors, image modes, the shapes set, a short run."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnapps.backbones import MobileNetV1
from mnapps.tasks.classification import ClsConfig, build_cls_datasets, train_classifier
from mnapps.config import load_config
from mnapps.data.image_io import load_rgb
from mnapps.data.imagefolder import ImageFolderDataset, build_cls_transforms, collate_cls
from mnapps.data.synthetic_cls import SHAPE_CLASSES, ensure_shapes_classification
from mnapps.backbones.trunk import load_backbone_weights
from mnapps.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _image(path: Path, mode: str = "RGB", size=(40, 30), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path)
    return path


# ------------------------------------------------------------------------------------------
# bad ImageFolder input


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder .*nope does not exist"):
        ImageFolderDataset(tmp_path / "nope")


def test_no_class_folders(tmp_path):
    _image(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"has no class folders \(found 1 loose images"):
        ImageFolderDataset(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    _image(tmp_path / "cat" / "1.png")
    (tmp_path / "dog").mkdir()
    with pytest.raises(ValueError, match=r"dog contain no images"):
        ImageFolderDataset(tmp_path)


def test_no_images_at_all(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(tmp_path)


def test_val_classes_must_match_train(tmp_path):
    _image(tmp_path / "val" / "cat" / "1.png")
    with pytest.raises(ValueError, match=r"differ from the expected classes \['cat', 'dog'\]"):
        ImageFolderDataset(tmp_path / "val", class_names=["cat", "dog"])


def test_unreadable_image_is_skipped_with_a_warning_and_counted(tmp_path):
    _image(tmp_path / "cat" / "good.png")
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    dataset = ImageFolderDataset(tmp_path, build_cls_transforms(False, 32))
    assert len(dataset) == 2
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable image: .*broken\.jpg"):
        items = [dataset[i] for i in range(len(dataset))]
    assert dataset.num_unreadable == 1
    images, labels, skipped = collate_cls(items)
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [0] and skipped == 1
    images, labels, skipped = collate_cls([None, None])
    assert images.numel() == 0 and labels.numel() == 0 and skipped == 2


# ------------------------------------------------------------------------------------------
# image modes


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16", "CMYK"])
def test_image_modes_become_rgb(tmp_path, mode):
    # The dataset reads through mnapps.data.image_io.load_rgb: upright RGB uint8 [H, W, 3].
    path = _image(tmp_path / "cat" / f"x_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}", mode)
    image = load_rgb(path)
    assert image.dtype == np.uint8 and image.shape == (30, 40, 3)
    pil, label = ImageFolderDataset(tmp_path)[0]
    assert pil.mode == "RGB" and pil.size == (40, 30) and label == 0


def test_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "a.png")
    image = load_rgb(tmp_path / "a.png")
    assert image[0, 0].tolist() == [10, 20, 30] and image[3, 3].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    upright = load_rgb(tmp_path / "rotated.jpg")
    assert upright.shape[:2] == (40, 20)  # height 40, width 20: turned upright
    top, bottom = upright[:20].mean(), upright[20:].mean()
    assert top > 200 and bottom < 50  # the white half is now on top


def test_transforms_scale_to_minus_one_one(tmp_path):
    image = Image.new("RGB", (50, 40), (255, 0, 128))
    for train in (True, False):
        x = build_cls_transforms(train, 32)(image)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        torch.testing.assert_close(x[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))
    with pytest.raises(ValueError, match="resolution must be >= 32"):
        build_cls_transforms(False, 16)


# ------------------------------------------------------------------------------------------
# the embedded dataset


def test_shapes_dataset_is_deterministic_and_cached(tmp_path):
    first = ensure_shapes_classification(tmp_path / "a", train_per_class=2, val_per_class=1, image_size=48)
    second = ensure_shapes_classification(tmp_path / "b", train_per_class=2, val_per_class=1, image_size=48)
    files = sorted(p.relative_to(first.root) for p in first.root.rglob("*.png"))
    assert len(files) == len(SHAPE_CLASSES) * 3
    for rel in files:
        assert (first.root / rel).read_bytes() == (second.root / rel).read_bytes()
    marker = first.train / SHAPE_CLASSES[0] / "00000.png"
    stamp = marker.stat().st_mtime_ns
    assert ensure_shapes_classification(tmp_path / "a", train_per_class=2, val_per_class=1, image_size=48) == first
    assert marker.stat().st_mtime_ns == stamp  # reused, not regenerated
    train = ImageFolderDataset(first.train)
    assert train.class_names == sorted(SHAPE_CLASSES) and len(train) == len(SHAPE_CLASSES) * 2


def test_shapes_dataset_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="train_per_class must be >= 1"):
        ensure_shapes_classification(tmp_path, train_per_class=0)
    with pytest.raises(ValueError, match="image_size must be >= 32"):
        ensure_shapes_classification(tmp_path, image_size=16)


# ------------------------------------------------------------------------------------------
# training


@pytest.fixture()
def tiny_shapes(tmp_path):
    return ensure_shapes_classification(tmp_path / "data", train_per_class=2, val_per_class=1, image_size=48)


@pytest.fixture()
def tiny_colours(tmp_path):
    """36 noisy images in three classes told apart by their tint: learnable in a few steps."""
    rng = np.random.default_rng(0)
    tints = {"blue": (40, 60, 200), "green": (40, 190, 60), "red": (200, 50, 40)}
    for name, tint in tints.items():
        for index in range(12):
            pixels = np.clip(np.array(tint) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            path = tmp_path / "colours" / name / f"{index:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return tmp_path / "colours"


def _tiny_cfg(train_dir: Path, epochs: int = 8):
    # A memorisation check: evaluated on the training images themselves, no augmentation.
    return load_config(
        None,
        ClsConfig,
        [
            f"data.train_dir={str(train_dir)!r}",
            f"data.val_dir={str(train_dir)!r}",
            "data.min_crop_area=1.0",
            "data.hflip=false",
            "data.eval_crop_fraction=1.0",
            "model.backbone.width_mult=0.25",
            "model.resolution=32",
            "model.backbone.bn_momentum=0.5",
            f"train.epochs={epochs}",
            "train.batch_size=6",
            "train.optimizer='adamw'",
            "train.lr=0.003",
            "train.weight_decay=0.0",
            "train.num_workers=0",
            "train.channels_last=false",
        ],
    )


@pytest.mark.slow
def test_short_training_run_learns(tiny_colours, tmp_path):
    (tiny_colours / "red" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    cfg = _tiny_cfg(tiny_colours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the broken image, counted below
        result = train_classifier(cfg, output_dir=tmp_path / "run", device="cpu")
    history = result.fit.history
    assert len(history) == 8
    first, last = history[0], history[-1]
    assert last.train.loss < 0.75 * first.train.loss
    # Chance is 1/3. Eval uses BN running statistics gathered from batches of 6, so single
    # epochs are noisy: the best epoch and the last one are checked with room to spare.
    assert max(h.metrics["top1"] for h in history) >= 0.8
    assert result.metrics["top1"] > 0.5 and result.metrics["top1"] > first.metrics["top1"]
    assert result.skipped_train_images >= 1  # the broken image was skipped and training went on
    assert result.metrics["num_skipped"] == 1  # and skipped once per evaluation

    checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    assert checkpoint["task"] == "classification"
    assert checkpoint["config"]["model"]["class_names"] == ["blue", "green", "red"]
    assert checkpoint["config"]["model"]["num_classes"] == 3
    assert (tmp_path / "run" / "config.yaml").is_file()
    # The trunk transfers into any model embedding it (here under a detector-like prefix).
    host = torch.nn.Module()
    host.backbone = MobileNetV1(0.25, 0).features_extractor(["block11", "block13"])
    report = load_backbone_weights(host, tmp_path / "run" / "best.pt", strict=True)
    assert report.loaded == 27 * 5


def test_default_data_is_the_embedded_shapes_set(tmp_path, monkeypatch):
    monkeypatch.setenv("MNAPPS_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, ClsConfig, ["data.shapes_train_per_class=2", "data.shapes_val_per_class=1",
                                        "data.shapes_image_size=48", "model.resolution=32"])
    train_set, val_set = build_cls_datasets(cfg)
    assert train_set.root.is_relative_to(tmp_path / "cache")
    assert (len(train_set), len(val_set)) == (12, 6)
    image, label = train_set[0]
    assert image.shape == (3, 32, 32) and label == 0 and -1.0 <= image.min() <= image.max() <= 1.0


def test_num_classes_must_match_the_data(tiny_shapes, tmp_path):
    cfg = load_config(None, ClsConfig, [f"data.train_dir={str(tiny_shapes.train)!r}",
                                        f"data.val_dir={str(tiny_shapes.val)!r}", "model.num_classes=10"])
    with pytest.raises(ValueError, match="model.num_classes is 10 but .* has 6 class folders"):
        train_classifier(cfg, output_dir=tmp_path / "run", device="cpu")


def _train_tool():
    module = importlib.import_module("mnapps.cli.train_cls")
    return module


def test_tool_needs_both_dirs(tmp_path, capsys):
    assert _train_tool().main(["--train-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "give both data.train_dir and data.val_dir" in capsys.readouterr().err


def test_tool_reports_config_errors(tmp_path, capsys):
    assert _train_tool().main(["--set", "train.lrr=1", "--output-dir", str(tmp_path)]) == 2
    assert "unknown key train.lrr" in capsys.readouterr().err


def test_tool_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as info:
        _train_tool().main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--train-dir", "--val-dir", "--epochs", "--batch-size", "--output-dir", "--resume", "--device", "--set"):
        assert flag in out
