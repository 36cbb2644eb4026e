"""The embedding warm start's view cache: a second identical start runs no network, gives the same layer."""

from __future__ import annotations

import torch
from torch import nn

from mnapps.tasks.face.distill.warm_start import ridge_embedding_init, views_cache_path
from mnapps.heads.face_embedding import FaceModelConfig, build_face_embedder
from mnapps.config import BackboneConfig


class CountingTeacher(nn.Module):
    """A linear 'teacher' on mean colours that counts the images it embeds."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.mixing = nn.Parameter(torch.randn(3, 6, generator=torch.Generator().manual_seed(seed)))
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += images.shape[0]
        return nn.functional.normalize(images.mean((2, 3)) @ self.mixing, dim=1)


def _student(seed: int):
    torch.manual_seed(seed)
    cfg = FaceModelConfig(backbone=BackboneConfig(width_mult=0.25, frozen_bn=True), input_size=32, embedding_dim=6,
                          frozen_embedding_bn=True)
    return build_face_embedder(cfg)


def test_a_second_identical_start_reads_the_cache_and_solves_the_same_layer(tmp_path):
    crops = tmp_path / "crops"
    crops.mkdir()
    files = [crops / f"{i}.png" for i in range(3)]
    for f in files:
        f.write_bytes(b"not read here, only named")
    views = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    settings = {"views": 24, "seed": 0}

    teacher, first = CountingTeacher(0), _student(0)
    path = views_cache_path(tmp_path / "cache", first, teacher, files, settings)
    report = ridge_embedding_init(first, teacher, [views[:10], views[10:]], max_views=24, cache=path)
    assert teacher.images_seen == 24 and report["cached"] == 0.0 and path.is_file()

    again = _student(0)
    assert views_cache_path(tmp_path / "cache", again, teacher, files, settings) == path
    repeat = ridge_embedding_init(again, teacher, [views[:10], views[10:]], max_views=24, cache=path)
    assert teacher.images_seen == 24, "the cached start ran the teacher again"
    assert repeat["cached"] == 1.0 and repeat["fit_cosine"] == report["fit_cosine"]
    torch.testing.assert_close(again.embedding.weight, first.embedding.weight, rtol=0, atol=0)
    torch.testing.assert_close(again.bn.bias, first.bn.bias, rtol=0, atol=0)


def test_the_cache_name_changes_with_weights_files_and_settings(tmp_path):
    crop = tmp_path / "a.png"
    crop.write_bytes(b"x")
    student, teacher = _student(0), CountingTeacher(0)
    base = views_cache_path(tmp_path, student, teacher, [crop], {"views": 24})
    assert views_cache_path(tmp_path, _student(1), teacher, [crop], {"views": 24}) != base  # other trunk weights
    assert views_cache_path(tmp_path, student, CountingTeacher(1), [crop], {"views": 24}) != base  # other teacher
    assert views_cache_path(tmp_path, student, teacher, [crop], {"views": 25}) != base
    crop.write_bytes(b"xy")  # the crop changed on disk
    assert views_cache_path(tmp_path, student, teacher, [crop], {"views": 24}) != base
    assert views_cache_path(tmp_path, student, lambda images: images, [crop], {"views": 24}) is None


def test_a_damaged_cache_file_is_recomputed(tmp_path):
    student, teacher = _student(0), CountingTeacher(0)
    path = tmp_path / "views.npz"
    path.write_bytes(b"truncated")
    views = torch.rand(8, 3, 32, 32)
    report = ridge_embedding_init(student, teacher, [views], max_views=8, cache=path)
    assert report["cached"] == 0.0 and teacher.images_seen == 8
