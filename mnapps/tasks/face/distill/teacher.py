"""The frozen FaceNet teacher: facenet-pytorch's InceptionResnetV1 behind mnapps' image contract.

This module owns everything about the teacher side of face distillation:

* :class:`FacenetTeacher` wraps any embedding network (normally facenet-pytorch's
  ``InceptionResnetV1``), puts it in eval mode with gradients off for good, and applies the
  teacher's *own* fixed standardisation ``(x * 255 - 127.5) / 128`` to mnapps images in [0, 1],
  resizing to its input size (160) when needed. The student standardises its own way
  ([-1, 1], :mod:`mnapps.heads.face_embedding`), so one batch of [0, 1] crops feeds both.
* :func:`build_teacher` makes one from a local state dict (``--teacher-weights``), from
  facenet-pytorch's own pretrained download (``vggface2`` / ``casia-webface``; offline this
  raises :class:`TeacherWeightsError` saying how to get the file), or with a seeded random
  initialisation for tests and the offline demo.
* :func:`reestimate_batchnorm_statistics` re-estimates BatchNorm statistics of a randomly
  initialised teacher on real images, changing what the network computes. Without it a random
  InceptionResnetV1 maps every image to nearly the same unit vector (mean pairwise cosine
  0.99995 on the generated faces), which any constant student matches. Re-estimating only the *embedding* BatchNorm (``last_bn``) centres and scales
  each output dimension over the data and leaves the network's own function alone; re-estimating
  *all* of them also standardises every hidden layer, which makes the random network chaotic
  (BatchNorm in a deep random network decorrelates nearby inputs: a 2-pixel shift of a crop
  moves its embedding to cosine 0.73, against 0.91 with the embedding scope and 0.99 for the
  real CASIA-WebFace teacher on the same generated faces).
* :func:`cache_teacher_embeddings` computes the teacher embeddings of un-augmented crops once
  into a memory-mapped ``.npy`` (with a JSON side file saying for which files and which teacher),
  so training does not run the teacher every epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mnapps.checkpoint import safe_load
from mnapps.choices import PRETRAINED_TEACHERS
from mnapps.tasks.face.data.faces import face_collate
from mnapps.weights import resolve_weights

__all__ = [
    "TEACHER_INPUT_SIZE",
    "TEACHER_EMBEDDING_DIM",
    "FacenetTeacher",
    "TeacherWeightsError",
    "build_teacher",
    "load_teacher_state_dict",
    "CALIBRATION_SCOPES",
    "reestimate_batchnorm_statistics",
    "cache_teacher_embeddings",
    "teacher_fingerprint",
]

TEACHER_INPUT_SIZE = 160
TEACHER_EMBEDDING_DIM = 512


class TeacherWeightsError(RuntimeError):
    """The teacher's weights could not be obtained (offline download, missing or unfit file)."""


class FacenetTeacher(nn.Module):
    """A frozen face-embedding network that takes mnapps images.

    Args:
        model: the embedding network; called on ``(x * 255 - 127.5) / 128`` standardised
            ``Tensor[N, 3, input_size, input_size]`` and returning ``Tensor[N, D]``
            (facenet-pytorch's ``InceptionResnetV1()`` returns L2-normalised 512-d vectors).
        input_size: side the network expects; other inputs are resized (bilinear, antialiased).
        name: a label for logs and metrics (``"casia-webface"``, a file name, ``"random"``).

    Forward:
        ``images: Tensor[N, 3, H, W]`` RGB in [0, 1] -> ``Tensor[N, D]`` L2-normalised, float32,
        computed under ``torch.no_grad()``.

    The wrapped model stays in eval mode whatever ``.train()`` is called with (its BatchNorm
    statistics and dropout must not change while a student learns from it), and its
    parameters have ``requires_grad=False``, so optimisers built on a parent module skip them.
    """

    def __init__(self, model: nn.Module, *, input_size: int = TEACHER_INPUT_SIZE, name: str = "custom") -> None:
        super().__init__()
        if input_size < 32:
            raise ValueError(f"teacher input_size must be >= 32 pixels, got {input_size}")
        self.model = model.eval().requires_grad_(False)
        self.input_size = int(input_size)
        self.name = name
        super().train(False)  # nn.Module starts in training mode; the teacher never is

    def train(self, mode: bool = True) -> "FacenetTeacher":
        # Frozen on purpose: a parent's .train() must not switch BN/dropout of the teacher.
        super().train(False)
        return self

    @staticmethod
    def standardize(images: Tensor) -> Tensor:
        """[0, 1] RGB -> facenet's fixed standardisation ``(x * 255 - 127.5) / 128``."""
        return (images * 255.0 - 127.5) / 128.0

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FacenetTeacher expects images Tensor[N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images.float(), size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        embeddings = self.model(self.standardize(images.float()))
        return F.normalize(embeddings.float(), dim=1)


def teacher_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers (names, shapes and values).

    Used to tell whether cached teacher embeddings were made by this very teacher.
    """
    digest = hashlib.sha1()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_teacher_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read an ``InceptionResnetV1`` state dict from ``path``.

    Accepts a bare state dict (the shared ``*-features.pt``), facenet-pytorch's downloaded
    file (its ``logits.*`` classifier is dropped: the teacher only embeds) or a dict with a
    ``state_dict``/``model`` entry. ``path`` may be a weights name (``facenet_casia_webface``,
    :mod:`mnapps.weights`), read from the cache.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsError: ``path`` names weights that are not in the cache yet.
        TeacherWeightsError: the file cannot be read or holds no tensors.
    """
    path = resolve_weights(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file {path} does not exist (--teacher-weights)")
    try:
        data = safe_load(path)  # weights_only, with one-line refusals (no PyTorch advice to turn it off)
    except ValueError as exc:
        raise TeacherWeightsError(f"cannot read teacher weights: {exc}") from None
    if isinstance(data, dict) and not all(isinstance(v, Tensor) for v in data.values()):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not data or not all(isinstance(v, Tensor) for v in data.values()):
        raise TeacherWeightsError(f"{path} is not a state dict of tensors (an InceptionResnetV1 state dict is expected)")
    return {k: v for k, v in data.items() if not k.startswith("logits.")}


def _inception_resnet_v1() -> nn.Module:
    from facenet_pytorch import InceptionResnetV1

    return InceptionResnetV1(pretrained=None, classify=False)


def _download_help(name: str) -> str:
    file_name = PRETRAINED_TEACHERS[name]
    return (
        f"On a machine with internet access run\n"
        f"    python -c \"from facenet_pytorch import InceptionResnetV1; InceptionResnetV1(pretrained='{name}')\"\n"
        f"which saves ~/.cache/torch/checkpoints/{file_name} (or $TORCH_HOME/checkpoints/); copy that file "
        f"here and pass it with --teacher-weights PATH (or put it in this machine's $TORCH_HOME/checkpoints/). "
        f"facenet-pytorch's release page lists the same files: "
        f"https://github.com/timesler/facenet-pytorch/releases/tag/v2.2.9"
    )


def build_teacher(
    name: str | None = None,
    *,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    input_size: int = TEACHER_INPUT_SIZE,
    device: str | torch.device = "cpu",
) -> FacenetTeacher:
    """Build the frozen teacher.

    Args:
        name: ``"vggface2"`` or ``"casia-webface"`` (facenet-pytorch downloads the weights on a
            connected machine), ``"random"`` (seeded random initialisation), or None when
            ``weights`` is given.
        weights: a local ``InceptionResnetV1`` state dict; loaded with ``strict=True`` (a
            classifier in the file is ignored). Takes precedence over ``name``.
        seed: the initialisation seed of ``"random"`` (the global RNG is left untouched).
        input_size: the side the teacher runs at (160 for every FaceNet release).
        device: where the teacher runs.

    Returns:
        A :class:`FacenetTeacher` in eval mode with frozen parameters.

    Raises:
        ValueError: an unknown ``name``.
        FileNotFoundError: ``weights`` does not exist.
        TeacherWeightsError: the download failed (offline) or the file does not fit.
    """
    if weights is not None:
        state = load_teacher_state_dict(weights)
        model = _inception_resnet_v1()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise TeacherWeightsError(
                f"{weights} does not fit facenet_pytorch.InceptionResnetV1: {str(exc).splitlines()[0]} "
                f"(first keys in the file: {list(state)[:3]})"
            ) from None
        label = Path(weights).name
    elif name in PRETRAINED_TEACHERS:
        from facenet_pytorch import InceptionResnetV1

        try:
            model = InceptionResnetV1(pretrained=name, classify=False)
        except Exception as exc:  # URLError, HTTPError, socket errors, a truncated cache file
            raise TeacherWeightsError(
                f"could not load facenet-pytorch's pretrained '{name}' teacher "
                f"({type(exc).__name__}: {exc}); this machine seems to be offline. {_download_help(name)}"
            ) from None
        label = name
    elif name == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _inception_resnet_v1()
        label = f"random(seed={seed})"
    else:
        choices = sorted(PRETRAINED_TEACHERS) + ["random"]
        raise ValueError(f"unknown teacher {name!r}; choose from {choices} or pass weights=PATH (--teacher-weights)")
    teacher = FacenetTeacher(model, input_size=input_size, name=label)
    return teacher.to(device)


#: What :func:`reestimate_batchnorm_statistics` re-estimates: every BatchNorm, or the embedding's alone.
CALIBRATION_SCOPES = ("embedding", "all")


@torch.no_grad()
def reestimate_batchnorm_statistics(
    teacher: FacenetTeacher,
    batches: Iterable[Tensor],
    device: str | torch.device = "cpu",
    *,
    scope: str = "all",
) -> int:
    """Re-estimate BatchNorm running means/variances of ``teacher`` on ``batches``.

    The statistics become the exact average over all the given batches (cumulative, not an
    exponential average); the weights are unchanged, so the eval-mode output changes (unlike
    :func:`mnapps.tasks.detection.students.reparametrize_batchnorm_keeping_output`, which keeps
    it). Meant for a *randomly initialised* teacher: its default statistics (mean 0, variance 1)
    do not match its activations, which collapses all embeddings onto one direction.

    Args:
        teacher: the teacher to modify in place (it stays frozen and in eval mode).
        batches: iterable of ``Tensor[N, 3, H, W]`` images in [0, 1] (e.g. un-augmented crops).
        device: where to run.
        scope: ``"all"`` re-estimates every BatchNorm; ``"embedding"`` only the last one in
            module order (``last_bn``, on the 512-d embedding, for ``InceptionResnetV1``), so
            the hidden layers keep their default statistics and the network its own function.

    Returns:
        The number of images seen.

    Raises:
        ValueError: ``batches`` was empty, the teacher has no BatchNorm layer, or ``scope`` is
            not one of :data:`CALIBRATION_SCOPES`.
    """
    if scope not in CALIBRATION_SCOPES:
        raise ValueError(f"BatchNorm calibration scope must be one of {list(CALIBRATION_SCOPES)}, got {scope!r}")
    norms = [m for m in teacher.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("the teacher has no BatchNorm layers to recalibrate")
    if scope == "embedding":
        norms = norms[-1:]
    saved_momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative moving average: every batch weighs the same
    seen = 0
    try:
        # Only the calibrated layers switch to training mode: the others keep normalising
        # with their stored statistics while the batches pass through.
        for module in norms:
            module.train()
        for images in batches:
            images = images.to(device)
            if images.shape[-2:] != (teacher.input_size, teacher.input_size):
                images = F.interpolate(images, size=(teacher.input_size,) * 2, mode="bilinear",
                                       align_corners=False, antialias=True)
            teacher.model(teacher.standardize(images))
            seen += images.shape[0]
    finally:
        for module, momentum in zip(norms, saved_momenta):
            module.momentum = momentum
        teacher.model.eval()
    if seen == 0:
        raise ValueError("reestimate_batchnorm_statistics got no images")
    return seen


def cache_teacher_embeddings(
    teacher: FacenetTeacher,
    dataset: torch.utils.data.Dataset,
    path: str | os.PathLike,
    *,
    keys: Sequence[str],
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "teacher embeddings",
) -> np.memmap:
    """Teacher embeddings of every item of ``dataset``, computed once into a memory-mapped .npy.

    Args:
        teacher: the frozen teacher.
        dataset: yields ``(image Tensor[3,H,W] in [0,1], index)`` or None for an unreadable
            item (see :class:`mnapps.tasks.face.data.faces.FaceFolder`), *without* augmentation.
        path: the ``.npy`` file; ``path.with_suffix('.json')`` records which files (a hash of
            ``keys``, in dataset order) and which teacher (:func:`teacher_fingerprint`) it holds. A cache
            that matches both is reused; any other is recomputed.
        keys: one string per dataset item (e.g. its relative path), in order.
        batch_size, num_workers: the loader's settings.
        device: where the teacher runs.

    Returns:
        ``np.memmap`` float32 ``[len(dataset), D]`` opened read-only; rows of unreadable images
        are NaN (the training loader skips those images anyway).
    """
    path = Path(path)
    if len(keys) != len(dataset):
        raise ValueError(f"cache keys ({len(keys)}) must match the dataset length ({len(dataset)})")
    meta_path = path.with_suffix(".json")
    keys_digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()
    meta = {"count": len(keys), "keys_sha1": keys_digest, "teacher": teacher_fingerprint(teacher.model),
            "input_size": teacher.input_size}
    if path.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == meta:
                cached = np.load(path, mmap_mode="r")
                if cached.shape[0] == len(dataset):
                    return cached
        except (OSError, ValueError):
            pass  # unreadable or stale cache: rebuild it below
    path.parent.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=face_collate)
    tmp_path = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    out = None
    try:
        for images, indices, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
            if images.shape[0] == 0:
                continue
            embeddings = teacher(images.to(device)).cpu().numpy()
            if out is None:
                out = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float32,
                                                shape=(len(dataset), embeddings.shape[1]))
                out[:] = np.nan
            out[indices.numpy()] = embeddings
        if out is None:
            raise ValueError(f"no readable image in the dataset to cache teacher embeddings for ({path})")
        out.flush()
        del out
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    meta_path.write_text(json.dumps(meta))
    return np.load(path, mmap_mode="r")
