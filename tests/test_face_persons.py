"""The identity-disjoint protocol: person labels, person splits, seen/unseen pairs, clean crops.

Worked out by hand on small labelled sets; the real-data tests (skipped without ../shared) use
the CASIA-WebFace teacher on facenet-pytorch's aligned test crops and MTCNN on a real photo.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnapps.tasks.face.data.persons import (
    check_person_disjoint,
    name_from_identity,
    person_labels,
    split_by_person,
)
from mnapps.tasks.face.distill.protocol import pair_image_name, score_subsets, seen_pairs


def test_names_come_from_identity_folders_not_from_generic_ones():
    assert name_from_identity("knn_examples/train/obama") == "obama"
    assert name_from_identity("test_images/Angelina_Jolie") == "angelina_jolie"
    assert name_from_identity("knn_examples/test") is None
    assert name_from_identity("test_images") is None
    assert name_from_identity("") is None
    assert pair_image_name("Aaron_Peirsol/Aaron_Peirsol_0001", "lfw") == "aaron_peirsol"
    assert pair_image_name("img12.jpg", "csv") is None
    assert pair_image_name("kate_siegel/1.jpg", "csv") == "kate_siegel"


def _labelled_set(seed: int = 0):
    """12 crops of 5 people: 3 named by folder, 2 unnamed (file names say nothing), with
    embeddings that put each person's crops 0.3-0.6 apart and different people >= 1.3 apart."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:5] * 1.0  # unit vectors, pairwise distance sqrt(2) = 1.41
    person = [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4]
    names = ["ann", None, "ann", "bob", None, "cy", "cy", None, None, None, None, None]
    noise = torch.randn(len(person), 8, generator=generator) * 0.08
    embeddings = F.normalize(centres[person] + noise, dim=1)
    return person, names, embeddings


def test_person_labels_join_names_and_teacher_distance():
    person, names, embeddings = _labelled_set()
    labels = person_labels(names, embeddings, keys=[f"k{i}" for i in range(12)])
    # Exactly the true grouping: one label per person.
    for i in range(12):
        for j in range(12):
            assert (labels[i] == labels[j]) == (person[i] == person[j]), (i, j, labels)
    assert labels[1] == "ann" and labels[4] == "bob" and labels[7] == "?k7"
    # Names alone cannot place the unnamed crops: each is its own group.
    by_name = person_labels(names, None, keys=[f"k{i}" for i in range(12)])
    assert by_name[1] == "?k1" and by_name[0] == by_name[2] == "ann"


def test_average_linkage_does_not_chain_through_a_lookalike():
    # A - B - C on a line: AB = BC = 1.0 < 1.1, AC = 2.0. Single linkage would make one person;
    # the average distance from {A, B} to C is 1.5, so C stays apart.
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    labels = person_labels([None] * 3, points, keys=["a", "b", "c"], threshold=1.1)
    assert labels[0] == labels[1] != labels[2]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_from_a_small_labelled_set_keeps_every_person_on_one_side(seed):
    person, names, embeddings = _labelled_set(seed)
    labels = person_labels(names, embeddings)
    train, val = split_by_person(labels, 0.4, seed=seed)
    assert train and val and sorted(train + val) == list(range(12))
    assert not {person[i] for i in train} & {person[i] for i in val}
    # The guard every person split runs names the persons on both sides.
    with pytest.raises(ValueError, match="share"):
        check_person_disjoint(["ann", "bob"], ["bob"])


def test_seen_pairs_by_name_distance_and_same_pair():
    # Images 0..4; training knows "ann" by name and one crop close to image 2.
    names = ["ann", None, None, None, "zed"]
    image_embeddings = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.6, 0.8, 0], [-1.0, 0, 0]])
    train_embeddings = torch.tensor([[0, 0.1, 0.995]])  # ~0.1 from image 2
    index_pairs = [(0, 1), (2, 3), (3, 4), (1, 4), (4, 1)]
    issame = np.array([False, True, False, False, False])
    seen = seen_pairs(index_pairs, issame, image_names=names, train_names={"ann"},
                      image_embeddings=image_embeddings, train_embeddings=train_embeddings)
    # 0 by name, 2 by distance, 3 through the same pair (2, 3); 1 and 4 unseen.
    assert seen.image_seen == [True, False, True, True, False]
    assert (seen.by_name, seen.by_distance, seen.by_same_pair) == (1, 1, 1)
    assert seen.seen.tolist() == [True, True, True, False, False]
    parts = score_subsets({"m": np.array([0.5, 0.2, 0.9, 1.0, 1.2])}, issame, seen)
    assert "unseen" not in parts  # only different pairs among the unseen: no ROC
    assert parts["seen"]["m"]["pairs"] == 3 and parts["seen"]["m"]["auc"] == 1.0


def test_real_teacher_groups_lookalikes_and_split_keeps_them_together(shared_data):
    from mnapps.tasks.face.data.faces import FaceFolder
    from mnapps.tasks.face.distill.teacher import build_teacher
    from mnapps.tasks.face.evaluation import embed_faces

    folder = FaceFolder(shared_data / "facenet_test_images" / "test_images_aligned")
    teacher = build_teacher(None, weights=shared_data / "facenet_casia" / "20180408-102900-casia-webface-features.pt")
    embeddings = embed_faces(teacher, folder)
    names = [name_from_identity(i) for i in folder.identities]
    labels = person_labels(names, embeddings)
    # facenet-pytorch's CI matrix puts Jolie and Siegel 0.99 apart and Cooper and Whigham 1.08:
    # below 1.1, one "person" each for a split (merging is the safe error); Rudd stays alone.
    jolie, siegel = names.index("angelina_jolie"), names.index("kate_siegel")
    assert labels[jolie] == labels[siegel] == "angelina_jolie+kate_siegel"
    assert labels[names.index("bradley_cooper")] == "bradley_cooper+shea_whigham"
    assert labels[names.index("paul_rudd")] == "paul_rudd"
    for seed in range(4):
        train, val = split_by_person(labels, 0.3, seed=seed)
        assert not {names[i] for i in train} & {names[i] for i in val}
        assert ({jolie, siegel} <= set(train)) or ({jolie, siegel} <= set(val))


def test_keep_all_writes_no_background_patches(shared_data, tmp_path, capsys):
    from mnapps.cli.align_faces import main

    # MTCNN finds three "faces" in this photo: Jolie (probability 1.0) and two patches of
    # background (0.85 and 0.80) that --keep-all used to write as 1_1.png and 1_2.png.
    src = tmp_path / "photos" / "angelina_jolie"
    src.mkdir(parents=True)
    (src / "1.jpg").symlink_to(shared_data / "facenet_test_images" / "test_images" / "angelina_jolie" / "1.jpg")
    assert main([str(tmp_path / "photos"), str(tmp_path / "clean"), "--keep-all"]) == 0
    out = capsys.readouterr().out
    assert "(1 face crops)" in out and "2 detection(s) dropped as not faces" in out
    assert sorted(p.name for p in (tmp_path / "clean" / "angelina_jolie").iterdir()) == ["1.png"]
    assert main([str(tmp_path / "photos"), str(tmp_path / "all"), "--keep-all", "--min-face-score", "0"]) == 0
    assert sorted(p.name for p in (tmp_path / "all" / "angelina_jolie").iterdir()) == ["1.png", "1_1.png", "1_2.png"]
