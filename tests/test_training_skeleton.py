"""The one training order (``Task.train``): every task's model starts from weights that depend only on train.seed.

Each task's real training entry point runs with ``fit`` replaced by a stub that records the model
it is handed (the initial weights) and the run options, so the check costs no training. What ran
before (here: random draws in between) must not change those weights; another seed must.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

import mnapps.tasks.task as task_module
from mnapps.config import BackboneConfig, TrainConfig
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.engine.run_folder import RunFolderError
from mnapps.heads.face_embedding import FaceModelConfig
from mnapps.heads.ssd import SSDConfig
from mnapps.tasks.classification import ClsConfig, ClsDataConfig, ClsModelConfig, train_classifier
from mnapps.tasks.detection import DetConfig, DetDataConfig, DetModelConfig, train_detector
from mnapps.tasks.face import FaceDataConfig, FaceDistillConfig, TeacherConfig, distill_face
from mnapps.tasks.table import TASKS

TINY = BackboneConfig(width_mult=0.25)


def _train(seed: int) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=4, num_workers=0, channels_last=False, seed=seed)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    shapes = ensure_shapes_detection(root / "shapes", num_train=4, num_val=2, image_size=96, progress=False)
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        (root / "faces" / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "faces" / split / f"{i}.png")
    return root, shapes


def _detection(data, seed: int):
    _, shapes = data
    cfg = DetConfig(
        model=DetModelConfig(head="ssd", backbone=TINY, head_settings=SSDConfig(size=96)),
        data=DetDataConfig(train_ann=str(shapes.train_ann), train_images=str(shapes.train_images),
                           val_ann=str(shapes.val_ann), val_images=str(shapes.val_images)),
        train=_train(seed),
    )
    return train_detector, cfg


def _classification(data, seed: int):
    cfg = ClsConfig(model=ClsModelConfig(backbone=TINY, resolution=32),
                    data=ClsDataConfig(shapes_train_per_class=2, shapes_val_per_class=1, shapes_image_size=32),
                    train=_train(seed))
    return train_classifier, cfg


def _face(data, seed: int):
    root, _ = data
    cfg = FaceDistillConfig(
        model=FaceModelConfig(backbone=TINY, input_size=64),
        teacher=TeacherConfig(name="random", input_size=96, calibration_images=8),
        data=FaceDataConfig(roots=[str(root / "faces" / "train")], val_root=str(root / "faces" / "val"),
                            image_size=64, eval_batch_size=8),
        train=_train(seed),
    )
    return distill_face, cfg


class _Stop(Exception):
    """Raised by the stub fit: the skeleton's work before training is all this test needs."""


@pytest.fixture
def initial_weights(monkeypatch, tmp_path):
    seen: list[tuple[dict[str, torch.Tensor], object]] = []

    def stub_fit(model, loader, cfg, hooks, options):
        seen.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, options))
        raise _Stop

    monkeypatch.setattr(task_module, "fit", stub_fit)

    def run(task, data, seed: int, noise: int):
        train, cfg = task(data, seed)
        # Whatever ran before must not matter: draw from every global RNG first.
        random.random(), np.random.rand(noise), torch.rand(noise)
        with pytest.raises(_Stop):
            train(cfg, output_dir=tmp_path / f"{task.__name__}_{seed}_{noise}", device="cpu")
        return seen[-1]

    return run


@pytest.mark.parametrize("task", [_detection, _classification, _face], ids=["detection", "classification", "face"])
def test_the_same_seed_gives_the_same_initial_weights(task, data, initial_weights):
    first, options = initial_weights(task, data, seed=3, noise=1)
    again, _ = initial_weights(task, data, seed=3, noise=17)
    other, _ = initial_weights(task, data, seed=4, noise=1)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    trainable = [k for k in first if first[k].is_floating_point() and "running" not in k]
    assert any(not torch.equal(first[k], other[k]) for k in trainable)
    # The skeleton checked the run folder itself and tells fit so (one check per run).
    assert options.folder_checked and options.task == task.__name__.lstrip("_")


def test_the_run_folder_is_checked_before_any_data_work(tmp_path, data):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"an earlier run's checkpoint")
    train, cfg = _detection(data, 0)
    cfg = DetConfig(model=cfg.model, data=DetDataConfig(train_ann=str(tmp_path / "missing.json"),
                                                        train_images=str(tmp_path), val_ann=str(tmp_path / "m.json"),
                                                        val_images=str(tmp_path)), train=cfg.train)
    with pytest.raises(RunFolderError, match="--resume to continue it"):  # not the missing annotation file
        train(cfg, output_dir=tmp_path / "run", device="cpu")


def test_weights_precedence():
    RunRequest, initial_weights = task_module.RunRequest, task_module.initial_weights
    assert initial_weights(RunRequest("out", weights_backbone="flag.pt"), "config.pt") == "flag.pt"
    assert initial_weights(RunRequest("out"), "config.pt") == "config.pt"
    assert initial_weights(RunRequest("out", resume=True, weights_backbone="flag.pt"), "c.pt") is None
    # A whole detector to fine-tune brings its own trunk: the config's trunk weights are not loaded first.
    assert initial_weights(RunRequest("out", weights="detector.pt"), "config.pt") is None
    with pytest.raises(ValueError, match="not both"):
        RunRequest("out", weights="detector.pt", weights_backbone="flag.pt")


def test_only_detection_fine_tunes_a_whole_model(tmp_path, data):
    _, cfg = _classification(data, 0)
    with pytest.raises(ValueError, match="the classification task fine-tunes no whole model"):
        TASKS["classification"].train(cfg, task_module.RunRequest(tmp_path / "run", weights="detector.pt"))
    assert not (tmp_path / "run").exists()  # refused before any work
