"""Face distillation: losses by hand, the frozen teacher's contract, the student head, teacher
caches, configs, the few-face recipe's pieces (mixed views, repeats, strong augmentation, pair
agreement), the stats rows, the mechanics of a short run, and the collapse guard on the real
teacher."""

from __future__ import annotations

import json
import math
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

from mnapps.backbones.mobilenet_v1 import BLOCK_SETTINGS
from mnapps.config import BackboneConfig, ConfigError, TrainConfig, save_config
from mnapps.tasks.face.distill.losses import DistillationLoss, DistillLossConfig, cosine_loss, relational_loss, squared_l2_loss
from mnapps.tasks.face.distill.teacher import (
    FacenetTeacher,
    TeacherWeightsError,
    build_teacher,
    cache_teacher_embeddings,
    reestimate_batchnorm_statistics,
)
from mnapps.heads.face_embedding import FaceModelConfig, build_face_embedder


# ---------------------------------------------------------------------------- losses


def test_losses_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # Row 0: ||(1,-1)||^2 = 2, cos 0; row 1: identical. Means: l2 1.0, 1 - cos 0.5.
    assert squared_l2_loss(s, t).item() == pytest.approx(1.0)
    assert cosine_loss(s, t).item() == pytest.approx(0.5)
    # Pairwise cosines: student rows are orthogonal (0), teacher rows identical (1): (0 - 1)^2.
    assert relational_loss(s, t).item() == pytest.approx(1.0)
    assert relational_loss(s[:1], t[:1]).item() == 0.0
    # For unit vectors the paper's squared L2 is 2 - 2 cos.
    a, b = torch.nn.functional.normalize(torch.randn(5, 8), dim=1), torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    assert squared_l2_loss(a, b).item() == pytest.approx(2 * cosine_loss(a, b).item(), rel=1e-5)


def test_distillation_loss_terms_and_validation():
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    terms = DistillationLoss(DistillLossConfig(l2_weight=2.0, cosine_weight=0.5, relational_weight=1.0))(s, t)
    assert set(terms) == {"loss_l2", "loss_cos", "loss_rel"}
    assert terms["loss_l2"].item() == pytest.approx(2.0 * squared_l2_loss(s, t).item())
    assert set(DistillationLoss()(s, t)) == {"loss_l2"}
    with pytest.raises(ValueError, match="at least one loss weight"):
        DistillationLoss(DistillLossConfig(l2_weight=0.0))
    with pytest.raises(ValueError, match=">= 0"):
        DistillationLoss(DistillLossConfig(cosine_weight=-1.0))
    with pytest.raises(ValueError, match="same shape"):
        squared_l2_loss(torch.randn(4, 8), torch.randn(4, 16))


# ---------------------------------------------------------------------------- teacher


class _Recorder(nn.Module):
    """Records its input and returns its mean colour, un-normalised, as a 3-d 'embedding'."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.seen = None

    def forward(self, x):
        self.seen = x.clone()
        return x.mean(dim=(2, 3)) * self.scale


def test_teacher_standardises_resizes_and_stays_frozen():
    inner = _Recorder()
    teacher = FacenetTeacher(inner, input_size=40)
    images = torch.zeros(2, 3, 20, 20)
    images[1] = 1.0
    out = teacher(images)
    assert inner.seen.shape == (2, 3, 40, 40)  # resized to its own input size
    assert inner.seen[0].unique().tolist() == [pytest.approx(-127.5 / 128)]  # (0 * 255 - 127.5) / 128
    assert inner.seen[1].unique().tolist() == [pytest.approx(127.5 / 128)]  # (1 * 255 - 127.5) / 128
    assert torch.allclose(out.norm(dim=1), torch.ones(2))
    teacher.train()
    assert not teacher.training and not inner.training
    assert not FacenetTeacher(_Recorder()).training  # frozen from construction on
    assert not inner.scale.requires_grad and not out.requires_grad
    with pytest.raises(ValueError, match=r"Tensor\[N, 3, H, W\]"):
        teacher(torch.zeros(3, 20, 20))


def test_pretrained_teacher_offline_gives_clear_error(monkeypatch, tmp_path):
    import facenet_pytorch.models.inception_resnet_v1 as irv1

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached download either
    monkeypatch.setattr(irv1, "download_url_to_file", offline)
    with pytest.raises(TeacherWeightsError, match="--teacher-weights") as info:
        build_teacher("vggface2")
    assert "20180402-114759-vggface2.pt" in str(info.value) and "offline" in str(info.value)


def test_teacher_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_teacher(weights=tmp_path / "missing.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(TeacherWeightsError, match="does not fit facenet_pytorch.InceptionResnetV1"):
        build_teacher(weights=tmp_path / "wrong.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(TeacherWeightsError, match="cannot read"):
        build_teacher(weights=tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher("imagenet")


def test_random_teacher_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_teacher("random", seed=7)
    after = torch.rand(1)
    b = build_teacher("random", seed=7)
    assert torch.equal(before, after)
    assert torch.equal(a.model.conv2d_1a.conv.weight, b.model.conv2d_1a.conv.weight)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["all", "embedding"])
def test_bn_recalibration_spreads_random_teacher_embeddings(scope):
    teacher = build_teacher("random", seed=0)
    norms = [m for m in teacher.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms[-1] is teacher.model.last_bn  # "embedding" means this layer
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 1, 1, generator=generator).expand(12, 3, 160, 160).contiguous()
    before = teacher(images)
    assert (before @ before.T).min() > 0.999  # default statistics: one direction for every image
    assert reestimate_batchnorm_statistics(teacher, [images[:6], images[6:]], scope=scope) == 12
    after = teacher(images)
    off_diagonal = ~torch.eye(12, dtype=torch.bool)
    assert (after @ after.T)[off_diagonal].mean() < 0.5
    assert not teacher.training
    # The last BN's statistics are now those of its inputs over the 12 images; hidden layers
    # keep the defaults (mean 0, var 1) in the embedding scope and change in the other.
    hidden_default = [bool((m.running_mean == 0).all() and (m.running_var == 1).all()) for m in norms[:-1]]
    assert all(hidden_default) if scope == "embedding" else not any(hidden_default)
    if scope == "embedding":  # hidden layers unchanged, so its inputs can be re-computed exactly
        features = []
        hook = teacher.model.last_linear.register_forward_hook(lambda module, inputs, output: features.append(output))
        teacher(images[:6]), teacher(images[6:])
        hook.remove()
        # cumulative average over the two batches of each batch's mean and unbiased variance
        torch.testing.assert_close(teacher.model.last_bn.running_mean, (features[0].mean(0) + features[1].mean(0)) / 2,
                                   rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(teacher.model.last_bn.running_var, (features[0].var(0) + features[1].var(0)) / 2,
                                   rtol=1e-3, atol=1e-9)


def test_bn_recalibration_scope_is_checked():
    teacher = build_teacher("random", seed=0)
    with pytest.raises(ValueError, match="'embedding', 'all'"):
        reestimate_batchnorm_statistics(teacher, [torch.rand(2, 3, 160, 160)], scope="last")


# ---------------------------------------------------------------------------- student


@pytest.mark.parametrize("width,size,channels", [(1.0, 160, 1024), (0.5, 128, 512), (0.25, 128, 256)])
def test_student_shapes_and_unit_norm(width, size, channels):
    model = build_face_embedder(FaceModelConfig(backbone=BackboneConfig(width_mult=width), input_size=size, dropout=0.2))
    assert model.backbone.num_features == channels and model.embedding.in_features == channels
    # Train mode: BatchNorm uses batch statistics (an untrained trunk in eval mode shrinks its
    # activations below normalize's epsilon, which says nothing about the head).
    out = model(torch.rand(2, 3, 160, 160))  # 160 crops are resized to 128 when needed
    assert out.shape == (2, 512)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert model.eval()(torch.rand(1, 3, size, size)).shape == (1, 512)


def test_student_applies_minus_one_one_standardisation():
    model = build_face_embedder(FaceModelConfig(backbone=BackboneConfig(width_mult=0.25), input_size=64)).eval()
    seen = {}
    model.backbone.stem.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    model(torch.stack([torch.zeros(3, 64, 64), torch.ones(3, 64, 64)]))
    assert seen["x"][0].unique().tolist() == [-1.0] and seen["x"][1].unique().tolist() == [1.0]


def test_student_loads_backbone_weights_from_any_checkpoint(tmp_path):
    from mnapps.backbones import MobileNetV1
    from mnapps.checkpoint import save_checkpoint

    classifier = MobileNetV1(0.25, 10)
    save_checkpoint({"task": "classification", "model": classifier.state_dict(), "config": {}}, tmp_path / "cls.pt")
    student = build_face_embedder(FaceModelConfig(backbone=BackboneConfig(width_mult=0.25)), weights_backbone=tmp_path / "cls.pt")
    assert torch.equal(student.backbone.block13.pointwise.conv.weight, classifier.block13.pointwise.conv.weight)
    with pytest.raises(ValueError, match="do not fit"):
        build_face_embedder(FaceModelConfig(backbone=BackboneConfig(width_mult=0.5)), weights_backbone=tmp_path / "cls.pt")


# ---------------------------------------------------------------------------- data + cache


def _write_faces(root, count=6, size=48):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"person_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


class _CountingTeacher(FacenetTeacher):
    calls = 0

    def forward(self, images):
        type(self).calls += 1
        return super().forward(images)


def test_face_folder_and_teacher_cache_reuse(tmp_path):
    from mnapps.tasks.face.data.faces import FaceFolder, face_collate, split_holdout

    _write_faces(tmp_path / "faces")
    (tmp_path / "faces" / "person_0" / "broken.png").write_bytes(b"nope")
    dataset = FaceFolder(tmp_path / "faces", image_size=32)
    assert len(dataset) == 7 and dataset.identities[0] == "person_0"
    with pytest.warns(RuntimeWarning, match="broken.png"):
        images, indices, skipped = face_collate([dataset[i] for i in range(len(dataset))])
    assert images.shape == (6, 3, 32, 32) and skipped == 1 and 0.0 <= images.min() and images.max() <= 1.0

    teacher = _CountingTeacher(_Recorder(), input_size=32)
    with pytest.warns(RuntimeWarning):
        cache = cache_teacher_embeddings(teacher, dataset, tmp_path / "cache" / "t.npy", keys=dataset.keys, batch_size=4)
    calls = _CountingTeacher.calls
    assert isinstance(cache, np.memmap) and cache.shape == (7, 3)
    broken = dataset.keys.index("person_0/broken.png")
    assert np.isnan(cache[broken]).all() and not np.isnan(np.delete(cache, broken, axis=0)).any()
    again = cache_teacher_embeddings(teacher, dataset, tmp_path / "cache" / "t.npy", keys=dataset.keys, batch_size=4)
    assert _CountingTeacher.calls == calls and np.array_equal(np.asarray(again), np.asarray(cache), equal_nan=True)
    subset = dataset.subset(range(3))  # other files: recomputed, not reused
    cache_teacher_embeddings(teacher, subset, tmp_path / "cache" / "t.npy", keys=subset.keys, batch_size=4)
    assert _CountingTeacher.calls > calls

    train, val = split_holdout(7, 0.3, seed=1)
    assert len(val) == 2 and sorted(train + val) == list(range(7))
    train, val = split_holdout(7, 0.5, groups=dataset.identities)
    assert {dataset.identities[i] for i in train}.isdisjoint({dataset.identities[i] for i in val})
    with pytest.raises(ValueError, match="no images"):
        FaceFolder(tmp_path / "cache")


def test_distill_config_keeps_face_defaults_for_partial_sections(tmp_path):
    from mnapps.tasks.face import load_distill_config

    path = tmp_path / "face.yaml"
    path.write_text("train:\n  epochs: 3\nmodel:\n  backbone:\n    width_mult: 0.5\n")
    cfg = load_distill_config(path, ["loss.cosine_weight=0.5"])
    assert cfg.train.epochs == 3 and cfg.train.optimizer == "adamw"  # face recipe kept
    assert cfg.model.backbone.width_mult == 0.5 and cfg.loss.cosine_weight == 0.5
    with pytest.raises(ConfigError, match="valid keys"):
        load_distill_config(path, ["teacher.nme=x"])
    assert load_distill_config(path).teacher.calibrate_bn == "embedding"
    with pytest.raises(ConfigError, match=r"teacher.calibrate_bn: True is not one of \['none', 'embedding', 'all'\]"):
        load_distill_config(path, ["teacher.calibrate_bn=true"])


# ---------------------------------------------------------------------------- stats rows


def _trunk_counts(width: float, size: int) -> tuple[int, int]:
    """Parameters and MACs of the MobileNetV1 trunk (no classifier), by the paper's formulas."""
    channels, resolution = 32, size // 2
    params = 3 * 3 * 3 * channels + 2 * channels  # stem conv + BN
    macs = resolution * resolution * 3 * 3 * 3 * channels
    for out, stride in BLOCK_SETTINGS:
        out = int(out * width)
        resolution //= stride
        params += 9 * channels + 2 * channels + channels * out + 2 * out
        macs += resolution * resolution * (9 * channels + channels * out)
        channels = out
    return params, macs


def test_face_stats_rows_match_hand_counts():
    from lab.paper_tables import ROWS, measure

    rows = {row.name: row for row in ROWS}
    face = measure(rows["face_mobilenet_v1_1.0_160"])
    trunk_params, trunk_macs = _trunk_counts(1.0, 160)
    # Embedding: Linear(1024, 512) without bias, BatchNorm1d(512) scale + shift.
    assert face["params"] == trunk_params + 1024 * 512 + 2 * 512
    assert face["macs"] == trunk_macs + 1024 * 512
    assert abs(face["macs"] - 286e6) / 286e6 < rows["face_mobilenet_v1_1.0_160"].macs_tolerance
    assert rows["face_mobilenet_v1_1.0_160"].paper_params == 4.9e6


def test_teacher_stats_row(shared_data):
    from lab.paper_tables import ROWS, measure

    row = next(r for r in ROWS if r.name == "facenet_inception_resnet_v1_160")
    result = measure(row)
    state = torch.load(shared_data / "facenet_casia" / "20180408-102900-casia-webface-features.pt", weights_only=True)
    learnable = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert result["params"] == learnable  # the real file, counted independently
    assert 23.4e6 < result["params"] < 23.6e6 and 1.40e9 < result["macs"] < 1.44e9


# ---------------------------------------------------------------------------- end to end


def _flat_images(root, count, seed, size=160):
    """Two-colour horizontal gradients: a 6-number family of images a student can learn."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None]
    root.mkdir(parents=True)
    for i in range(count):
        left, right = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        image = np.broadcast_to(left * (1 - ramp) + right * ramp, (size, size, 3))
        Image.fromarray(image.astype(np.uint8)).save(root / f"{i:03d}.png")


def _smoke_config(tmp_path, **data):
    """A seconds-long distillation: random teacher at 96 pixels, MobileNetV1-0.25 student at 64."""
    from mnapps.tasks.face import FaceDataConfig, FaceDistillConfig, TeacherConfig

    return FaceDistillConfig(
        model=FaceModelConfig(backbone=BackboneConfig(width_mult=0.25, bn_momentum=0.1), input_size=64),
        teacher=TeacherConfig(name="random", seed=0, input_size=96, calibration_images=32),
        data=FaceDataConfig(roots=[str(tmp_path / "train")], val_root=str(tmp_path / "val"), image_size=64,
                            eval_batch_size=32, **data),
        train=TrainConfig(epochs=2, batch_size=8, optimizer="adamw", lr=3e-3, weight_decay=1e-4,
                          num_workers=0, channels_last=False, log_every=50),
    )


def test_distillation_mechanics_run_resume_refusal_and_summary(tmp_path, monkeypatch):
    """The mechanics, not quality: a short run writes what it promises and reports throughput,
    spread and the reference points; a second run into the same folder is refused before any
    data work unless --overwrite; a mixed-view run needs the online teacher."""
    from mnapps.config import replace
    from mnapps.tasks.face.distill.warm_start import WarmStartConfig
    from mnapps.engine.loop import RunFolderError
    from mnapps.tasks.face import distill_face, load_face_embedder

    monkeypatch.setenv("MNAPPS_CACHE", str(tmp_path / "cache"))  # the warm start's view cache stays here
    _flat_images(tmp_path / "train", 16, seed=0, size=64)
    _flat_images(tmp_path / "val", 8, seed=1, size=64)
    cfg = _smoke_config(tmp_path)
    summary = distill_face(cfg, output_dir=tmp_path / "run", device="cpu")
    saved = json.loads((tmp_path / "run" / "distill_summary.json").read_text())
    assert list(saved) == ["train_images", "views_per_epoch", "val_images", "teacher", "start_cosine",
                           "start_pair_agreement", "constant_baseline_cosine", "teacher_val_spread_cosine",
                           "final_cosine", "best_cosine", "final_pair_agreement", "final_spread", "collapsed",
                           "throughput", "checkpoint", "best_checkpoint"]  # the layout older runs wrote
    assert saved["final_cosine"] == pytest.approx(summary.final_cosine) and saved["checkpoint"].endswith("last.pt")
    assert summary.train_images == 16 and summary.val_images == 8
    assert -1.0 <= summary.reference.constant_baseline_cosine <= 1.0 and summary.throughput.targets == "cached"
    assert summary.throughput.images_per_s > 0 and summary.throughput.teacher_share == 0.0
    assert 1.0 <= summary.final_spread.effective_rank <= 8.0
    # NaN when every held-out pair has the same cosine (a tiny untrained student may): no geometry to compare.
    assert math.isnan(summary.final_pair_agreement) or -1.0 <= summary.final_pair_agreement <= 1.0
    model, checkpoint = load_face_embedder(tmp_path / "run" / "last.pt")
    assert checkpoint.task == "face" and checkpoint.epoch == 2 and not model.training
    before = (tmp_path / "run" / "best.pt").read_bytes()
    with pytest.raises(RunFolderError, match="--resume to continue it, --overwrite to start over"):
        distill_face(cfg, output_dir=tmp_path / "run", device="cpu")
    assert (tmp_path / "run" / "best.pt").read_bytes() == before
    with pytest.raises(ValueError, match="data.mix_prob=0.5 needs data.cache_teacher=false"):
        distill_face(_smoke_config(tmp_path, mix_prob=0.5), output_dir=tmp_path / "mixed", device="cpu")
    online = _smoke_config(tmp_path, mix_prob=0.5, cache_teacher=False, augment_strength="strong",
                           random_erasing=0.5, repeats=2)
    online = replace(online, warm_start=WarmStartConfig(views=24, ridge=1.0))
    summary = distill_face(online, output_dir=tmp_path / "run", device="cpu", overwrite=True)
    warm = summary.reference.warm_start
    assert summary.views_per_epoch == 32 and summary.throughput.targets == "online teacher"
    assert warm.views == 24 and -1.0 <= warm.cosine <= 1.0
    assert 0.0 < summary.throughput.teacher_share < 1.0
    # The same start again: the views come from the cache, the solved layer is the same.
    again = distill_face(online, output_dir=tmp_path / "again", device="cpu")
    assert warm.cached == 0.0 and again.reference.warm_start.cached == 1.0
    assert again.reference.warm_start.fit_cosine == warm.fit_cosine


def test_backbone_weights_come_from_the_config_or_the_flag(tmp_path):
    """model.backbone.weights (the one config key) starts the student; --weights-backbone and its
    alias --backbone-weights override it; a resumed run ignores both."""
    from mnapps.backbones import MobileNetV1
    from mnapps.checkpoint import save_checkpoint
    from mnapps.cli.distill_face import parse_args
    from mnapps.config import replace
    from mnapps.tasks.face import distill_face, load_face_embedder

    assert parse_args(["--backbone-weights", "a.pt"]).weights_backbone == "a.pt"
    assert parse_args(["--weights-backbone", "a.pt"]).weights_backbone == "a.pt"
    torch.manual_seed(3)
    source = MobileNetV1(0.25, 0)
    save_checkpoint({"task": "classification", "model": source.state_dict(), "config": {}}, tmp_path / "trunk.pt")
    _flat_images(tmp_path / "train", 16, seed=0, size=64)
    _flat_images(tmp_path / "val", 8, seed=1, size=64)
    cfg = _smoke_config(tmp_path)
    cfg = replace(cfg, model=replace(cfg.model, backbone=replace(cfg.model.backbone, weights=str(tmp_path / "trunk.pt"),
                                                                 trainable_stages=0)))
    cfg = replace(cfg, train=replace(cfg.train, epochs=1))
    distill_face(cfg, output_dir=tmp_path / "run", device="cpu")
    student, _ = load_face_embedder(tmp_path / "run" / "last.pt")
    # trainable_stages=0 froze the whole trunk, so it still holds the loaded weights.
    assert torch.equal(student.backbone.block13.pointwise.conv.weight, source.block13.pointwise.conv.weight)
    with pytest.raises(FileNotFoundError):
        distill_face(cfg, output_dir=tmp_path / "other", device="cpu", weights_backbone=tmp_path / "missing.pt")


def test_mix_faces_by_hand():
    from mnapps.tasks.face.distill.views import mix_faces

    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    assert mix_faces(images, prob=0.0) is images
    torch.manual_seed(0)
    mixed = mix_faces(images, prob=1.0, alpha=1.0, cutmix_share=0.0)
    # mixup of a black and a white image: each becomes a uniform grey lam*own + (1-lam)*other.
    for i in range(2):
        assert mixed[i].unique().numel() == 1
    lam0 = 1.0 - float(mixed[0, 0, 0, 0])  # image 0 is black: its value is (1 - lam) * 1
    assert 0.0 <= lam0 <= 1.0 and torch.equal(images, torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]))
    torch.manual_seed(1)
    cut = mix_faces(images, prob=1.0, alpha=1.0, cutmix_share=1.0)
    # cutmix: only 0s and 1s; the black image got a white box (a rectangle), and vice versa.
    assert set(cut.unique().tolist()) <= {0.0, 1.0}
    box = cut[0, 0] == 1.0
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    if box.any():
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    with pytest.raises(ValueError, match="alpha"):
        mix_faces(images, prob=0.5, alpha=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix_faces(images, prob=1.5)


def test_pair_agreement_by_hand():
    from mnapps.tasks.face import pair_agreement

    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Pairwise cosines of the teacher: (0,1) 0, (0,2) 0.707, (1,2) 0.707.
    assert pair_agreement(teacher * 3.0, teacher) == pytest.approx(1.0)  # same geometry, other lengths
    stretched = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])  # cosines -1, 0, 0: other values
    # Centred: teacher (-0.471, 0.236, 0.236), student (-0.667, 0.333, 0.333): perfectly correlated.
    assert pair_agreement(stretched, teacher) == pytest.approx(1.0)
    other = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])  # cosines 0.995, 0, 0.0995
    expected = np.corrcoef([0.995037, 0.0, 0.099504], [0.0, 0.707107, 0.707107])[0, 1]
    assert pair_agreement(other, teacher) == pytest.approx(expected, abs=1e-5)
    assert np.isnan(pair_agreement(teacher[:2], teacher[:2]))


def test_repeated_faces_and_strong_augmentation(tmp_path):
    from mnapps.tasks.face.data.faces import FaceFolder, RepeatedFaces, build_face_transforms

    _write_faces(tmp_path / "faces", count=3, size=40)
    folder = FaceFolder(tmp_path / "faces", transform=build_face_transforms(True, 32, strength="strong", erasing=1.0))
    repeated = RepeatedFaces(folder, 4)
    assert len(repeated) == 12 and [repeated[k][1] for k in (0, 3, 5, 11)] == [0, 0, 2, 2]
    torch.manual_seed(0)
    first, second = repeated[0][0], repeated[3][0]
    assert first.shape == (3, 32, 32) and not torch.equal(first, second)  # fresh views of one crop
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        RepeatedFaces(folder, 0)
    with pytest.raises(ValueError, match="strength"):
        build_face_transforms(True, 32, strength="extreme")


@pytest.mark.slow
def test_calibration_scope_decides_how_stable_the_random_teacher_is(tmp_path):
    """Why the demo re-estimates only the embedding BatchNorm: on generated faces, both scopes
    spread the embeddings (a constant prediction scores low), but re-estimating every layer
    makes the random network chaotic: a 2-pixel shift of the crop moves its embedding far
    (the README's table: cosine 0.73 for "all", 0.91 for "embedding", 0.99 for the real
    CASIA-WebFace teacher on the same crops)."""
    import torch.nn.functional as F

    from mnapps.tasks.face.data.faces import FaceFolder, build_face_transforms
    from mnapps.tasks.face.data.synthetic_faces import ensure_synthetic_faces

    paths = ensure_synthetic_faces(tmp_path, train_identities=8, val_identities=1, images_per_identity=3)
    crops = FaceFolder(paths.train, transform=build_face_transforms(False, 160))
    images = torch.stack([crops[i][0] for i in range(len(crops))])
    stability = {}
    for scope in ("embedding", "all"):
        teacher = build_teacher("random", seed=0)
        reestimate_batchnorm_statistics(teacher, [images], scope=scope)
        embeddings = teacher(images)
        constant = F.normalize(embeddings.mean(0, keepdim=True), dim=1)
        assert float((embeddings @ constant.T).mean()) < 0.35, scope  # embeddings spread out
        shifted = teacher(torch.roll(images, shifts=2, dims=3))
        stability[scope] = float(F.cosine_similarity(embeddings, shifted).mean())
    assert stability["embedding"] > 0.85 and stability["all"] < 0.8, stability


# ---------------------------------------------------------------------------- collapse guard


def test_collapse_guard_catches_generated_faces_with_the_real_teacher(shared_data, tmp_path, capsys):
    """The case the guard exists for: distilling the real CASIA-WebFace teacher on generated faces.

    To the real teacher every generated face looks alike (its best constant prediction already
    scores a held-out cosine of ~0.8), so the student learns one answer and maps real faces to
    one point: verification at AUC 0.5 that a loss curve does not show. The distillation run
    and the evaluation must both say so, loudly; the teacher on the same real faces must not
    trip the guard."""
    from mnapps.data.image_io import list_images
    from mnapps.tasks.face.data.synthetic_faces import ensure_synthetic_faces
    from mnapps.tasks.face.evaluation import collapse_warning, embed_faces, embedding_spread
    from mnapps.tasks.face import FaceDataConfig, FaceDistillConfig, TeacherConfig, distill_face, load_face_embedder

    weights = shared_data / "facenet_casia" / "20180408-102900-casia-webface-features.pt"
    paths = ensure_synthetic_faces(tmp_path / "generated", train_identities=8, val_identities=1, images_per_identity=4)
    cfg = FaceDistillConfig(
        model=FaceModelConfig(backbone=BackboneConfig(width_mult=0.25, bn_momentum=0.1), input_size=64),
        teacher=TeacherConfig(weights=str(weights)),
        data=FaceDataConfig(roots=[str(paths.train)], val_root=str(paths.val), augment=False),
        train=TrainConfig(epochs=5, batch_size=8, optimizer="adamw", lr=2e-3, weight_decay=1e-4, warmup_epochs=0,
                          num_workers=0, channels_last=False, log_every=50),
    )
    summary = distill_face(cfg, output_dir=tmp_path / "run", device="cpu")
    assert summary.reference.constant_baseline_cosine > 0.7  # the teacher hardly tells generated faces apart
    assert summary.collapsed and summary.final_spread.mean_pairwise_cosine > 0.99
    assert "COLLAPSED" in capsys.readouterr().err
    real_faces = list_images(shared_data / "facenet_test_images" / "test_images_aligned")
    student, _ = load_face_embedder(tmp_path / "run" / "last.pt")
    spread = embedding_spread(embed_faces(student, real_faces))
    assert spread["collapsed"] and spread["effective_rank"] < 1.1 and "COLLAPSED" in collapse_warning("student", spread)
    teacher = build_teacher(weights=weights)
    teacher_spread = embedding_spread(embed_faces(teacher, real_faces))
    assert not teacher_spread["collapsed"] and teacher_spread["effective_rank"] > 3


def test_distill_face_tool_errors_are_one_line_and_benchmark_prints(tmp_path, capsys):
    from mnapps.checkpoint import save_checkpoint
    from mnapps.cli.distill_face import main

    _flat_images(tmp_path / "train", 8, seed=0, size=64)
    _flat_images(tmp_path / "val", 4, seed=1, size=64)
    config = save_config(_smoke_config(tmp_path), tmp_path / "face.yaml")
    (tmp_path / "file").write_text("keep me")
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "file")]) == 2
    assert "is an existing file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "keep me"
    assert main(["--config", str(config), "--device", "cuda:5", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device" in err
    (tmp_path / "old").mkdir()
    save_checkpoint({"task": "face", "model": {}, "config": {}}, tmp_path / "old" / "best.pt")
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "old")]) == 2
    assert "--resume to continue it, --overwrite to start over" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--resume", "--overwrite"])
    capsys.readouterr()


def test_the_distillation_step_benchmark_times_both_ways(tmp_path, capsys):
    from bench_distill_step import main as bench_main

    _flat_images(tmp_path / "train", 8, seed=0, size=64)
    _flat_images(tmp_path / "val", 4, seed=1, size=64)
    config = save_config(_smoke_config(tmp_path), tmp_path / "face.yaml")
    assert bench_main(["--config", str(config), "--steps", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "teacher embeddings cached" in out and "teacher in the step" in out and "% of it" in out


def test_ridge_warm_start_solves_the_embedding_layer_in_closed_form():
    """The student's Linear+BatchNorm must compute x_std @ W with W the ridge solution worked out
    here independently (numpy, normal equations), in eval mode and, with frozen_embedding_bn,
    in train mode too."""
    from mnapps.tasks.face.distill.warm_start import ridge_embedding_init

    torch.manual_seed(0)
    cfg = FaceModelConfig(backbone=BackboneConfig(width_mult=0.25, frozen_bn=True), input_size=32,
                          embedding_dim=6, frozen_embedding_bn=True)
    student = build_face_embedder(cfg)
    mixing = torch.randn(3, 6)

    def teacher(images):
        return torch.nn.functional.normalize(images.mean((2, 3)) @ mixing, dim=1)

    views = torch.rand(40, 3, 32, 32)
    report = ridge_embedding_init(student, teacher, [views[:16], views[16:]], max_views=40, ridge=0.5)
    assert report["views"] == 40 and -1.0 <= report["fit_cosine"] <= 1.0
    with torch.no_grad():
        x = student.backbone(views * 2 - 1).double().numpy()
    t = teacher(views).double().numpy()
    xs = (x - x.mean(0)) / (x.std(0, ddof=1) + 1e-6)
    w = np.linalg.solve(xs.T @ xs + 0.5 * 40 * np.eye(xs.shape[1]), xs.T @ t)
    expected = torch.nn.functional.normalize(torch.from_numpy(xs @ w).float(), dim=1)
    student.eval()
    torch.testing.assert_close(student(views), expected, atol=1e-4, rtol=1e-4)
    student.train()  # frozen trunk BN + frozen embedding BN: training mode computes the same
    torch.testing.assert_close(student(views), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="ridge must be > 0"):
        ridge_embedding_init(student, teacher, [views], max_views=4, ridge=0.0)
