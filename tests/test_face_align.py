"""MTCNN alignment: real face photos, generated no-face images in the same batch, the folder tool
(report + resume), and the real FaceNet teacher against its published reference numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mnapps.tasks.face.data.align import NO_FACE_REPORT, UNREADABLE_REPORT, FaceAligner, align_folder, crop_names


def _no_face_image(size=(200, 150)) -> Image.Image:
    """A smooth colour gradient: nothing MTCNN could take for a face."""
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    pixels = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                             np.full((height, width, 1), 0.5)], axis=2)
    return Image.fromarray((pixels * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def aligner():
    # The shared photos are up to 2048 pixels; MTCNN's pyramid on a 320-pixel copy finds the
    # same single large face in a fraction of the time.
    return FaceAligner(resize_shorter=320)


def test_no_face_image_gives_none_not_a_crash(aligner):
    assert aligner([_no_face_image(), _no_face_image((64, 64))]) == [None, None]
    assert aligner.detect(np.asarray(_no_face_image())) == []


def test_generated_no_face_image_is_reported_by_the_folder_tool(tmp_path, aligner):
    src = tmp_path / "src"
    (src / "nobody").mkdir(parents=True)
    _no_face_image().save(src / "nobody" / "gradient.png")
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        report = align_folder(src, tmp_path / "dst", aligner=aligner, progress=False)
    assert report.no_face == ["nobody/gradient.png"] and report.unreadable == ["broken.jpg"]
    assert report.aligned == 0 and report.total == 2
    assert (tmp_path / "dst" / NO_FACE_REPORT).read_text().split() == ["nobody/gradient.png"]
    assert (tmp_path / "dst" / UNREADABLE_REPORT).read_text().startswith("broken.jpg\t")
    again = align_folder(src, tmp_path / "dst", aligner=aligner, progress=False)  # resumes: nothing to redo
    assert again.skipped_done == 2 and again.no_face == ["nobody/gradient.png"]


def test_bad_aligner_settings():
    with pytest.raises(ValueError, match="select"):
        FaceAligner(select="biggest")
    with pytest.raises(ValueError, match="margin"):
        FaceAligner(margin=200)


def test_real_face_and_no_face_in_one_batch(shared_data, aligner):
    photo = Image.open(shared_data / "facenet_test_images" / "test_images" / "angelina_jolie" / "1.jpg")
    other = Image.open(shared_data / "facenet_test_images" / "test_images" / "paul_rudd" / "1.jpg")
    crops = aligner([photo, _no_face_image(), other])  # different sizes, a no-face image between
    assert crops[1] is None
    for crop in (crops[0], crops[2]):
        assert crop.shape == (160, 160, 3) and crop.dtype == np.uint8 and crop.std() > 20
    face = aligner.detect(photo)[0]
    x1, y1, x2, y2 = face.box  # in the pixels of the 320-pixel copy
    scale = 320 / min(photo.size)
    assert face.probability > 0.99 and 0 <= x1 < x2 <= photo.width * scale and 0 <= y1 < y2 <= photo.height * scale
    assert face.landmarks.shape == (5, 2)


@pytest.mark.slow
def test_multiface_photo_keep_all(shared_data):
    # multiface.jpg holds six faces (facenet-pytorch's own test expects 6), at full size.
    multi = Image.open(shared_data / "facenet_test_images" / "multiface.jpg")
    faces = FaceAligner().detect(multi, keep_all=True)
    assert len(faces) == 6
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert areas == sorted(areas, reverse=True)  # largest first


def test_align_folder_real_photos_and_resume(shared_data, tmp_path, aligner):
    src = tmp_path / "src"
    (src / "angelina_jolie").mkdir(parents=True)
    (src / "angelina_jolie" / "1.jpg").symlink_to(shared_data / "facenet_test_images" / "test_images" / "angelina_jolie" / "1.jpg")
    _no_face_image().save(src / "wall.png")
    dst = tmp_path / "dst"
    report = align_folder(src, dst, aligner=aligner, progress=False)
    assert report.aligned == 1 and report.no_face == ["wall.png"]
    crop = Image.open(dst / "angelina_jolie" / "1.png")
    assert crop.size == (160, 160) and crop.mode == "RGB"
    again = align_folder(src, dst, aligner=aligner, progress=False)
    assert again.aligned == 0 and again.skipped_done == 2


def test_teacher_reproduces_tensorflow_reference_embeddings(shared_data):
    from mnapps.tasks.face.distill.teacher import build_teacher

    reference = np.load(shared_data / "facenet_casia" / "reference_tf_outputs.npz")
    teacher = build_teacher(weights=shared_data / "facenet_casia" / "20180408-102900-casia-webface-features.pt")
    # The reference inputs are already standardised; map them back to [0, 1] images so the
    # teacher's own (x * 255 - 127.5) / 128 is exercised on the way in.
    images = (torch.from_numpy(reference["inputs_nchw"]).double() * 128.0 + 127.5) / 255.0
    embeddings = teacher(images.float()).numpy()
    assert np.abs(embeddings - reference["tf_embeddings"]).max() < 1e-5


@pytest.mark.slow
def test_teacher_distance_matrix_of_facenet_pytorch_ci(shared_data):
    """facenet-pytorch's CI distances for casia-webface embeddings of MTCNN crops (4x4 subset:
    bradley_cooper's photo is not shipped). Its CI resizes photos to a 512-pixel shorter side."""
    from mnapps.tasks.face.distill.teacher import build_teacher

    names = ["angelina_jolie", "kate_siegel", "paul_rudd", "shea_whigham"]
    expected = np.array([
        [0.0, 0.992931, 1.414197, 1.329544],
        [0.992931, 0.0, 1.358875, 1.337322],
        [1.414197, 1.358875, 0.0, 1.204118],
        [1.329544, 1.337322, 1.204118, 0.0],
    ])
    teacher = build_teacher(weights=shared_data / "facenet_casia" / "20180408-102900-casia-webface-features.pt")
    aligner = FaceAligner(resize_shorter=512)
    photos = [Image.open(shared_data / "facenet_test_images" / "test_images" / n / "1.jpg") for n in names]
    crops = aligner(photos)
    images = torch.stack([torch.from_numpy(c).permute(2, 0, 1).float() / 255.0 for c in crops])
    embeddings = teacher(images)
    distances = torch.cdist(embeddings, embeddings).numpy()
    assert np.linalg.norm(distances - expected) < 0.01


@pytest.mark.slow
def test_teacher_on_deepface_pairs(shared_data, tmp_path):
    """The real teacher with MTCNN crops verifies deepface's 300 pairs at >= 0.99."""
    from mnapps.tasks.face.distill.teacher import build_teacher
    from mnapps.tasks.face.evaluation import read_pairs
    from mnapps.tasks.face import align_pair_images, evaluate_face_verification

    deepface = shared_data / "faces" / "deepface"
    pairs = read_pairs(deepface / "master.csv")
    # Align only the 25 photos the pairs use (the other photos are irrelevant here).
    report = align_pair_images(pairs, deepface, tmp_path / "aligned")
    assert report.startswith("25 images: 25 aligned now") and "0 without a face" in report
    teacher = build_teacher(weights=shared_data / "facenet_casia" / "20180408-102900-casia-webface-features.pt")
    verification = evaluate_face_verification(pairs, tmp_path / "aligned", {"teacher": teacher}, threshold=1.1)
    result = verification.results["teacher"]
    assert not verification.spreads["teacher"]["collapsed"]
    assert result["accuracy"] >= 0.99
    assert result["accuracy_at_threshold"] >= 0.99
    assert result["auc"] > 0.99


class _CentreCrop:
    """A stand-in aligner for naming tests: every image "has" one face, its centre 16x16 pixels."""

    def detect(self, image, *, keep_all=False):
        from mnapps.tasks.face.data.align import DetectedFace

        image = np.asarray(image)
        h, w = image.shape[:2]
        crop = image[h // 2 - 8: h // 2 + 8, w // 2 - 8: w // 2 + 8]
        return [DetectedFace(crop.copy(), (w / 2 - 8, h / 2 - 8, w / 2 + 8, h / 2 + 8), 1.0, np.zeros((5, 2)))]


def test_photos_sharing_a_stem_keep_both_crops_and_pairs_find_each(tmp_path):
    from mnapps.tasks.face.evaluation import read_pairs, resolve_pairs

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(src / "x.jpg", quality=100)
    Image.new("RGB", (40, 40), (0, 0, 255)).save(src / "x.png")
    Image.new("RGB", (40, 40), (0, 255, 0)).save(src / "y.jpg", quality=100)
    assert crop_names(["x.jpg", "x.png", "y.jpg", "a/x.jpg"]) == {
        "x.jpg": "x.jpg.png", "x.png": "x.png.png", "y.jpg": "y.png", "a/x.jpg": "a/x.png"}
    report = align_folder(src, tmp_path / "dst", aligner=_CentreCrop(), progress=False)
    assert report.aligned == 3 and report.skipped_done == 0  # before: "1 already done", one photo lost
    assert report.shared_stems == ["x.jpg", "x.png"] and "keep it" in str(report)
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["x.jpg.png", "x.png.png", "y.png"]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("file_x,file_y,Decision\nx.jpg,y.jpg,No\nx.png,y.jpg,No\n")
    resolved = resolve_pairs(read_pairs(pairs, n_folds=2), tmp_path / "dst")
    colours = [np.asarray(Image.open(first))[0, 0].tolist() for first, _ in resolved]
    assert colours[0][0] > 200 and colours[0][2] < 50  # x.jpg -> the red crop
    assert colours[1][2] > 200 and colours[1][0] < 50  # x.png -> the blue crop
    assert align_folder(src, tmp_path / "dst", aligner=_CentreCrop(), progress=False).skipped_done == 3


def test_align_faces_tool_refuses_a_file_as_destination_and_a_bad_device(tmp_path, capsys):
    from mnapps.cli.align_faces import main

    src = tmp_path / "src"
    src.mkdir()
    _no_face_image().save(src / "wall.png")
    (tmp_path / "taken").write_text("keep me")
    assert main([str(src), str(tmp_path / "taken")]) == 2
    assert "is an existing file" in capsys.readouterr().err and (tmp_path / "taken").read_text() == "keep me"
    assert main([str(src), str(tmp_path / "dst"), "--device", "cuda:9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert main([str(src), str(src / "crops")]) == 2
    assert "must not be inside the source folder" in capsys.readouterr().err
