"""Whole face pipelines for tools/face_pipeline_bench.py: a detector, the crops, an embedder.

This module owns the runtime side of that benchmark: the SSD face detector and the face
embedder run either as PyTorch modules or from the ONNX files ``tools/export.py`` writes (ONNX
Runtime, the exported graph's own pre- and post-processing), behind the same two calls:

* a *detector* is ``detect(image uint8[H, W, 3]) -> (boxes float32[N, 4], scores float32[N])``,
  what :class:`mnapps.data.box_crops.BoxFaceAligner` takes (:func:`ort_box_detector` for an
  exported SSD, :func:`mnapps.tasks.detection.box_detector` for a PyTorch one);
* an *embedder* is a module mapping ``[N, 3, S, S]`` images in [0, 1] to ``[N, D]`` embeddings
  (:class:`OrtEmbedder` for an exported one, which is what :func:`mnapps.tasks.face.evaluation.embed_faces`
  and :func:`mnapps.tasks.face.evaluate_face_verification` take), and :func:`embed_crops`
  embeds one photo's crops as the pipeline does, in one batch.

It also owns the measurement itself: :func:`detect_all` runs both pipelines photo by photo,
interleaved and timed; :func:`compare_boxes` matches their faces; :func:`write_pair_crops` cuts
the crops the pair scores are computed on. The tool only parses, wires and prints.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.ops import box_iou

from mnapps.tasks.face.data.align import FaceAligner, crop_names
from mnapps.data.box_crops import CROP_GEOMETRIES, BoxFaceAligner, crop_region, cut_crop
from mnapps.data.image_io import ImageReadError, load_rgb
from mnapps.data.transforms import sample_to_tensors
from mnapps.export.onnx import OrtModel, OrtSSD

__all__ = ["OrtEmbedder", "embed_crops", "ort_box_detector", "PhotoResult", "detect_all", "compare_boxes",
           "write_pair_crops"]

_NO_BOXES = np.zeros((0, 4), dtype=np.float32)
_NO_LABELS = np.zeros((0,), dtype=np.int64)


class OrtEmbedder(nn.Module):
    """An exported face embedder (``embeddings`` output) run by ONNX Runtime, as a module."""

    def __init__(self, path: str | os.PathLike, *, threads: int = 1) -> None:
        super().__init__()
        self.ort = OrtModel(path, threads=threads)
        if "embeddings" not in self.ort.output_names:
            raise ValueError(f"{path} has no 'embeddings' output ({self.ort.output_names}): export a face "
                             f"embedder checkpoint with tools/export.py")

    def forward(self, images: Tensor) -> Tensor:
        return torch.from_numpy(self.ort(images)["embeddings"])


def ort_box_detector(path: str | os.PathLike, *, label: int = 1, threads: int = 1
                     ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``detect`` (see the module docstring) for an SSD exported by ``tools/export.py``: the same
    photo tensor as the PyTorch detector gets, the graph, then mnapps' shared decoding and NMS."""
    ssd = OrtSSD(path, threads=threads)

    def detect(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = ssd([sample_to_tensors(image, _NO_BOXES, _NO_LABELS)[0]])[0]
        keep = found["labels"] == label
        return found["boxes"][keep].float().numpy(), found["scores"][keep].float().numpy()

    return detect


@torch.inference_mode()
def embed_crops(model: nn.Module, crops: Sequence[np.ndarray]) -> Tensor:
    """One photo's ``uint8[S, S, 3]`` crops embedded in one batch (``[N, D]``, L2-normalised rows).

    The crops go in as :func:`mnapps.tasks.face.evaluation.embed_faces` feeds them: RGB scaled to [0, 1].
    """
    if not crops:
        return torch.zeros(0, 0)
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)
    return torch.nn.functional.normalize(model(batch).float(), dim=1)


@dataclass
class PhotoResult:
    """Both detectors on one photo: boxes, scores, and the selected face's crops per pipeline."""

    path: Path
    mtcnn_boxes: np.ndarray
    mtcnn_scores: np.ndarray
    ssd_boxes: np.ndarray
    ssd_scores: np.ndarray
    crops: dict[str, np.ndarray] = field(default_factory=dict)


def _timed(clock: dict[str, float], key: str, fn):
    started = time.perf_counter()
    value = fn()
    clock[key] += time.perf_counter() - started
    return value


def detect_all(photos: list[Path], mtcnn: FaceAligner, ssd: BoxFaceAligner,
               embedders: dict[str, nn.Module | None], log: Callable[[str], None] | None = None
               ) -> tuple[list[PhotoResult], dict]:
    """Run both pipelines on every readable photo, interleaved; times cover detect + crop, and
    embedding every face found by a pipeline that has an embedder (``embedders[name]``). ``log``
    gets a line per photo (faces each found)."""
    results, unreadable = [], []
    clock = {"mtcnn": 0.0, "ssd": 0.0, "mtcnn_embed": 0.0, "ssd_embed": 0.0}
    warm = True  # the first photo runs once untimed: one-off costs (allocations, ORT set-up) are not per photo
    for path in photos:
        try:
            image = load_rgb(path)
        except ImageReadError as exc:
            unreadable.append(str(exc))
            continue
        for _ in range(2 if warm else 1):
            run_clock = clock if not warm else dict.fromkeys(clock, 0.0)
            found_m = _timed(run_clock, "mtcnn", lambda: mtcnn.detect(image, keep_all=True))
            if embedders["mtcnn"] is not None:
                _timed(run_clock, "mtcnn_embed", lambda: embed_crops(embedders["mtcnn"], [f.crop for f in found_m]))
            found_s = _timed(run_clock, "ssd", lambda: ssd.detect(image, keep_all=True))
            if embedders["ssd"] is not None:
                _timed(run_clock, "ssd_embed", lambda: embed_crops(embedders["ssd"], [f.crop for f in found_s]))
            warm = False
        result = PhotoResult(
            path,
            np.array([f.box for f in found_m]).reshape(-1, 4), np.array([f.probability for f in found_m]),
            np.array([f.box for f in found_s]).reshape(-1, 4), np.array([f.probability for f in found_s]),
        )
        if found_m:
            result.crops["mtcnn"] = found_m[0].crop
        if found_s:
            result.crops["ssd_mtcnn"] = found_s[0].crop
            result.crops["ssd_square"] = cut_crop(
                image, crop_region(found_s[0].box, CROP_GEOMETRIES["square"]), ssd.image_size, ssd.margin
            )
        results.append(result)
        if log is not None:
            log(f"  {path.name}: MTCNN {len(found_m)}, SSD {len(found_s)}")
    return results, {"seconds": clock, "unreadable": unreadable}


def compare_boxes(results: list[PhotoResult], match_iou: float, root: Path) -> dict:
    """Faces found by each detector, matched per photo; misses; MTCNN-vs-SSD box geometry."""
    misses: dict[str, list[str]] = {"ssd_missed": [], "mtcnn_missed": []}
    geometry, matched = [], 0
    for r in results:
        m, s = torch.as_tensor(r.mtcnn_boxes, dtype=torch.float64), torch.as_tensor(r.ssd_boxes, dtype=torch.float64)
        iou = box_iou(m, s) if len(m) and len(s) else torch.zeros(len(m), len(s), dtype=torch.float64)
        pairs = []
        while iou.numel() and iou.max() >= match_iou:  # greedy, best overlap first
            i, j = divmod(int(iou.argmax()), iou.shape[1])
            pairs.append((i, j))
            iou[i, :], iou[:, j] = -1, -1
        matched += len(pairs)
        name = _relative(r.path, root)
        for i in sorted(set(range(len(m))) - {p[0] for p in pairs}):
            misses["ssd_missed"].append(f"{name} box {_box_text(r.mtcnn_boxes[i])} MTCNN p={r.mtcnn_scores[i]:.3f}")
        for j in sorted(set(range(len(s))) - {p[1] for p in pairs}):
            misses["mtcnn_missed"].append(f"{name} box {_box_text(r.ssd_boxes[j])} SSD score={r.ssd_scores[j]:.3f}")
        for i, j in pairs:
            (mx1, my1, mx2, my2), (sx1, sy1, sx2, sy2) = r.mtcnn_boxes[i], r.ssd_boxes[j]
            longer = max(sx2 - sx1, sy2 - sy1)
            geometry.append([(mx2 - mx1) / (sx2 - sx1), (my2 - my1) / (sy2 - sy1),
                             ((mx1 + mx2) - (sx1 + sx2)) / 2 / longer, ((my1 + my2) - (sy1 + sy2)) / 2 / longer])
    medians = np.median(np.array(geometry), axis=0) if geometry else np.full(4, np.nan)
    keys = ("width_ratio", "height_ratio", "shift_x", "shift_y")
    return {"matched": matched, **misses, "geometry_faces": len(geometry),
            "geometry_median": {k: float(v) for k, v in zip(keys, medians)}}


def _box_text(box: np.ndarray) -> str:
    return str(np.round(box).astype(int).tolist())


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def write_pair_crops(results: list[PhotoResult], pair_files: set[Path], pair_root: Path, out: Path) -> dict[str, int]:
    """Crops of the pair photos per pipeline under ``out/<pipeline>/``; the fallback count per pipeline."""
    # Absolute but not symlink-resolved, as align_folder names crops.
    root = Path(os.path.abspath(pair_root))
    chosen = [r for r in results if Path(os.path.abspath(r.path)) in pair_files]
    relative = {id(r): Path(os.path.abspath(r.path)).relative_to(root).as_posix() for r in chosen}
    names = crop_names(list(relative.values()))
    fallbacks = {}
    for pipeline in ("mtcnn", "ssd_mtcnn", "ssd_square"):
        fallbacks[pipeline] = 0
        for r in chosen:
            crop = r.crops.get(pipeline)
            if crop is None:  # no face: the whole photo, as the teacher would otherwise see nothing
                fallbacks[pipeline] += 1
                crop = np.asarray(Image.fromarray(load_rgb(r.path)).resize((160, 160), Image.BILINEAR))
            target = out / pipeline / names[relative[id(r)]]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).save(target)
    return fallbacks
