"""Whole face pipelines (lab.face_pipeline, tools/face_pipeline_bench.py --embedder):
crops embedded as the evaluation embeds them, ONNX Runtime runners equal to the PyTorch models,
and the benchmark timing and scoring the small pipeline beside MTCNN + the teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.ops import box_iou

from lab.face_pipeline import OrtEmbedder, embed_crops, ort_box_detector
from mnapps.checkpoint import Checkpoint
from lab import face_pipeline_bench_cli as face_pipeline_bench
from mnapps.config import BackboneConfig, to_dict
from mnapps.tasks.face.evaluation import embed_faces
from mnapps.export.pipeline import export_checkpoint
from mnapps.heads.face_embedding import FaceModelConfig, build_face_embedder
from mnapps.tasks.detection import box_detector, load_detector
from test_export import _write_pngs, settle_batchnorm
from test_tf_od_api_tools import faceapi_ckpt, mini_ckpt, mini_tfjs  # noqa: F401 - fixtures


class _Tiny(nn.Module):
    """A fixed, input-sensitive embedder: per-channel means of a 3x3 conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, images):
        return self.conv(images).mean(dim=(2, 3))


def test_embed_crops_feeds_the_embedder_as_embed_faces_does(tmp_path):
    rng = np.random.default_rng(1)
    crops = [rng.integers(0, 256, size=(160, 160, 3), dtype=np.uint8) for _ in range(3)]
    paths = []
    for i, crop in enumerate(crops):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(crop).save(paths[-1])
    model = _Tiny()
    expected = embed_faces(model, paths, image_size=160)
    got = embed_crops(model, crops)
    assert got.shape == (3, 8)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(3))
    assert embed_crops(model, []).numel() == 0


def _face_checkpoint(path):
    torch.manual_seed(0)
    cfg = FaceModelConfig(backbone=BackboneConfig(width_mult=0.25), input_size=160, embedding_dim=512)  # the teacher's
    model = build_face_embedder(cfg)
    settle_batchnorm(model, lambda: torch.rand(8, 3, 160, 160))
    Checkpoint(task="face", head="face_embedding", config={"model": to_dict(cfg)}, weights=model.state_dict()).save(path)
    return path, model.eval()


@pytest.mark.slow
def test_onnx_runners_equal_the_pytorch_models(mini_ckpt, tmp_path):  # noqa: F811 - fixture
    images = sorted(_write_pngs(tmp_path / "photos", 4, 96).iterdir())
    face, model = _face_checkpoint(tmp_path / "face.pt")
    export_checkpoint(face, tmp_path / "face.onnx", parity_images=images, num_parity=2)
    batch = torch.rand(3, 3, 160, 160)
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(OrtEmbedder(tmp_path / "face.onnx")(batch), model(batch))
    assert cosine.min() > 0.9999
    export_checkpoint(mini_ckpt, tmp_path / "ssd.onnx", parity_images=images, num_parity=2)
    detector, _ = load_detector(mini_ckpt)
    photo = np.asarray(Image.open(images[0]).convert("RGB"))
    boxes, scores = box_detector(detector)(photo)
    ort_boxes, ort_scores = ort_box_detector(tmp_path / "ssd.onnx")(photo)
    assert len(boxes) > 0 and len(ort_boxes) == len(boxes)
    confident = scores >= 0.3  # the low-score tail may reorder; these must be the same boxes
    iou = box_iou(torch.from_numpy(boxes[confident]), torch.from_numpy(ort_boxes))
    best = iou.max(dim=1)
    assert best.values.min() > 0.99
    assert np.abs(ort_scores[best.indices.numpy()] - scores[confident]).max() < 1e-3


def test_embedder_onnx_needs_the_checkpoint():
    with pytest.raises(SystemExit):
        face_pipeline_bench.parse_args(["--detector-weights", "d.pt", "--embedder-onnx", "s.onnx"])


@pytest.mark.slow
def test_bench_times_and_scores_the_small_pipeline(faceapi_ckpt, shared_data, deepface_four, tmp_path, capsys):  # noqa: F811
    checkpoint, _ = faceapi_ckpt
    photos, pairs, names = deepface_four
    face, _ = _face_checkpoint(tmp_path / "face.pt")
    export_checkpoint(face, tmp_path / "face.onnx", parity_images=[photos / names[0]], num_parity=1)
    out = tmp_path / "out"
    assert face_pipeline_bench.main([
        "--detector-weights", str(checkpoint), "--data", str(shared_data), "--photos", str(photos), "--pairs",
        str(pairs), "--pair-images", str(photos), "--out", str(out), "--threads", "1", "--embedder", str(face),
        "--embedder-onnx", str(tmp_path / "face.onnx"),
    ]) == 0
    printed = capsys.readouterr().out
    assert "the SSD + student pipeline is" in printed and "x the photos/s of MTCNN + the teacher" in printed
    report = json.loads((out / "face_pipeline.json").read_text())
    seconds = report["timing"]["seconds"]
    assert all(seconds[key] > 0 for key in ("mtcnn", "ssd", "mtcnn_embed", "ssd_embed"))
    assert "ONNX Runtime face.onnx" in report["embedders"]["ssd"]
    # the teacher's three crop sets as before, plus the student on the SSD's and on MTCNN's crops
    assert set(report["verification"]) == {"mtcnn", "ssd_mtcnn", "ssd_square", "ssd_mtcnn+student", "mtcnn+student"}
    assert all(v["pairs"] == 12 for v in report["verification"].values())
    assert report["verification"]["mtcnn"]["auc"] == 1.0  # the teacher, as the detector-only test finds
