"""Face detection and alignment with facenet-pytorch's MTCNN (its weights ship in the wheel).

This module owns turning photos into the 160x160 face crops every face model here takes:

* :class:`FaceAligner` runs MTCNN (default settings of facenet-pytorch unless told otherwise)
  on each image and cuts the chosen face (the largest, as facenet-pytorch does) with an
  optional margin. A list of photos of different sizes, some with no face at all, is fine:
  every image is detected on its own, and an image without a face gives ``None`` (MTCNN's own
  batch path needs equal-sized images and, on a batch mixing face and no-face images, builds a
  ragged numpy array that newer numpy refuses).
* :func:`align_folder` aligns a whole (identity-folder) dataset once into a mirror tree of
  PNG crops, with a progress bar, a report file listing every image where no face was found
  (and every unreadable one), and resumption: images already cropped or already reported are
  skipped when it is run again.

Crops are returned as ``uint8`` RGB ``[S, S, 3]`` arrays, i.e. the pixels themselves, before any
standardisation: the FaceNet teacher and the MobileNet student each standardise on their own.
``resize_shorter=512`` reproduces facenet-pytorch's CI preprocessing (the photo is resized so
its shorter side is 512 pixels before detection).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .faces import list_images
from mnapps.data.image_io import ImageReadError, load_rgb

__all__ = [
    "FaceAligner", "DetectedFace", "AlignReport", "align_folder", "crop_names", "extra_crop_names", "NO_FACE_REPORT",
    "UNREADABLE_REPORT",
]

#: Report files written into the destination folder by :func:`align_folder`.
NO_FACE_REPORT = "no_face.txt"
UNREADABLE_REPORT = "unreadable.txt"
SELECTIONS = ("largest", "probability")


@dataclass
class DetectedFace:
    """One face found by MTCNN.

    Attributes:
        crop: ``uint8[S, S, 3]`` RGB crop (box plus margin, resized to ``image_size``).
        box: ``(x1, y1, x2, y2)`` in the pixels of the image given to :meth:`FaceAligner.detect`.
        probability: MTCNN's face probability.
        landmarks: ``float[5, 2]`` eyes, nose, mouth corners (x, y).
    """

    crop: np.ndarray
    box: tuple[float, float, float, float]
    probability: float
    landmarks: np.ndarray


class FaceAligner:
    """MTCNN detection + cropping.

    Args:
        image_size: side of the square crops (160 for FaceNet).
        margin: extra pixels around the box *in the crop* (facenet-pytorch's convention; 0 by
            default, as in facenet-pytorch; davidsandberg/facenet used 32 on the source image).
        min_face_size, thresholds, factor: MTCNN's settings (facenet-pytorch defaults).
        select: which face to keep when several are found: ``"largest"`` (facenet-pytorch's
            default) or ``"probability"``.
        resize_shorter: resize the photo so its shorter side has this many pixels before
            detection (None: detect on the photo as it is).
        device: where the MTCNN networks run.
    """

    def __init__(
        self,
        image_size: int = 160,
        *,
        margin: int = 0,
        min_face_size: int = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        select: str = "largest",
        resize_shorter: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from facenet_pytorch import MTCNN

        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
        if not 0 <= margin < image_size:
            raise ValueError(f"margin must be in [0, image_size={image_size}), got {margin}")
        if select not in SELECTIONS:
            raise ValueError(f"select must be one of {list(SELECTIONS)}, got {select!r}")
        if len(thresholds) != 3 or not all(0 < t < 1 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities in (0, 1), got {list(thresholds)}")
        if resize_shorter is not None and resize_shorter < 32:
            raise ValueError(f"resize_shorter must be >= 32 pixels or None, got {resize_shorter}")
        self.image_size = int(image_size)
        self.margin = int(margin)
        self.select = select
        self.resize_shorter = resize_shorter
        # keep_all + our own selection: MTCNN's select_boxes/extract is where mixed batches break.
        self.mtcnn = MTCNN(image_size=image_size, margin=margin, min_face_size=min_face_size,
                           thresholds=list(thresholds), factor=factor, post_process=False,
                           keep_all=True, device=device)

    def _prepare(self, image: Image.Image | np.ndarray) -> Image.Image:
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an RGB uint8 array [H, W, 3], got {image.dtype} {tuple(image.shape)}")
            image = Image.fromarray(image)
        elif image.mode != "RGB":
            image = image.convert("RGB")
        if self.resize_shorter is not None:
            width, height = image.size
            scale = self.resize_shorter / min(width, height)
            # torchvision Resize(int) semantics: the shorter side becomes exactly resize_shorter.
            size = (self.resize_shorter, int(self.resize_shorter * height / width)) if width <= height else \
                   (int(self.resize_shorter * width / height), self.resize_shorter)
            if scale != 1.0:
                image = image.resize(size, Image.BILINEAR)
        return image

    def detect(self, image: Image.Image | np.ndarray, *, keep_all: bool = False) -> list[DetectedFace]:
        """Every face in ``image`` (or only the selected one), best first; ``[]`` if none.

        Args:
            image: a PIL image (any mode) or ``uint8[H, W, 3]`` RGB array.
            keep_all: return all faces (sorted by the selection rule) instead of one.
        """
        from facenet_pytorch.models.utils.detect_face import extract_face

        image = self._prepare(image)
        boxes, probs, points = self.mtcnn.detect(image, landmarks=True)
        if boxes is None or len(boxes) == 0:
            return []
        boxes, probs, points = np.asarray(boxes), np.asarray(probs, dtype=np.float64), np.asarray(points)
        if self.select == "largest":
            order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
        else:
            order = np.argsort(-probs, kind="stable")
        if not keep_all:
            order = order[:1]
        faces = []
        for i in order:
            crop = extract_face(image, boxes[i], self.image_size, self.margin)  # float [3,S,S] in 0..255
            crop = crop.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
            faces.append(DetectedFace(crop, tuple(float(v) for v in boxes[i]), float(probs[i]), points[i]))
        return faces

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> list[np.ndarray | None]:
        """The selected face crop of each image, or None where no face was found.

        Args:
            images: PIL images or ``uint8[H, W, 3]`` arrays, any sizes, faces or not.

        Returns:
            One ``uint8[S, S, 3]`` crop or ``None`` per image, in order.
        """
        results: list[np.ndarray | None] = []
        for image in images:
            faces = self.detect(image)
            results.append(faces[0].crop if faces else None)
        return results


@dataclass
class AlignReport:
    """What :func:`align_folder` did."""

    aligned: int = 0  # images cropped in this run
    skipped_done: int = 0  # already done by an earlier run (crop exists or already reported)
    faces_written: int = 0
    no_face: list[str] = field(default_factory=list)  # relative paths, all runs together
    unreadable: list[str] = field(default_factory=list)
    total: int = 0
    # Photos sharing a folder and a stem with another (x.jpg, x.png): their crops keep the
    # extension (x.jpg.png, x.png.png) so neither overwrites the other.
    shared_stems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"{self.total} images: {self.aligned} aligned now ({self.faces_written} face crops), "
                f"{self.skipped_done} already done, {len(self.no_face)} without a face, "
                f"{len(self.unreadable)} unreadable")
        if self.shared_stems:
            example = self.shared_stems[0]
            text += (f"; {len(self.shared_stems)} photos share a name with another apart from the extension, "
                     f"so their crops keep it (e.g. {example} -> {example}.png)")
        return text


def crop_names(relatives: Sequence[str]) -> dict[str, str]:
    """Relative photo path -> relative crop path, distinct for every photo.

    ``a/b.jpg`` -> ``a/b.png``, or ``a/b.jpg.png`` when another photo in the same folder is also
    called ``b`` (``a/b.png``, ``a/b.jpeg``). A photo whose own name is another's crop name
    (``x.jpg.png`` beside ``x.jpg`` and ``x.png``) also keeps its full name (``x.jpg.png.png``),
    repeated until no two photos share a crop: the full names are distinct, so this ends.
    """
    stems: dict[str, int] = {}
    for relative in relatives:
        stem = Path(relative).with_suffix("").as_posix()
        stems[stem] = stems.get(stem, 0) + 1
    names = {}
    for relative in relatives:
        stem = Path(relative).with_suffix("").as_posix()
        names[relative] = f"{relative}.png" if stems[stem] > 1 else f"{stem}.png"
    while True:
        owners: dict[str, list[str]] = {}
        for relative, name in names.items():
            owners.setdefault(name, []).append(relative)
        clashes = [r for group in owners.values() if len(group) > 1 for r in group if names[r] != f"{r}.png"]
        if not clashes:
            return names
        for relative in clashes:
            names[relative] = f"{relative}.png"


def extra_crop_names(target: Path, count: int, reserved: set[str] | frozenset[str] = frozenset()) -> list[Path]:
    """Where the ``count`` extra faces of the photo cropped to ``target`` go: ``NAME_1.png``, ...

    A name in ``reserved`` (another photo's main crop, as an absolute path string) is skipped
    with a trailing ``_`` (``NAME_1_.png``), so an extra face never takes, or is mistaken by a
    resumed run for, the crop of the photo ``NAME_1.jpg``.
    """
    stem = target.name[: -len(".png")]
    names = []
    for k in range(1, count + 1):
        candidate = target.with_name(f"{stem}_{k}.png")
        while str(candidate) in reserved:
            candidate = candidate.with_name(candidate.name[: -len(".png")] + "_.png")
        names.append(candidate)
    return names


def _read_report(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.split("\t", 1)[0] for line in path.read_text().splitlines() if line and not line.startswith("#")]


def _write_crops(faces: Sequence[DetectedFace], target: Path, reserved: set[str] | frozenset[str] = frozenset()) -> None:
    """The main crop at ``target``, extra faces beside it (:func:`extra_crop_names`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Extra faces first, the main crop last (atomically): its existence marks the image as done.
    for face, path in zip(faces[1:], extra_crop_names(target, len(faces) - 1, reserved)):
        Image.fromarray(face.crop).save(path)
    tmp = target.with_name(f".{target.name}.tmp.png")
    Image.fromarray(faces[0].crop).save(tmp)
    os.replace(tmp, target)


def _prepare_files(src: Path, files: Sequence[str | os.PathLike] | None) -> tuple[list[Path], list[Path]]:
    """(every image under ``src``, the ones to align), checking that the latter lie inside ``src``."""
    everything = list_images(src)
    if files is None:
        chosen = everything
    else:
        chosen = sorted({Path(os.path.abspath(f)) for f in files})
        outside = [f for f in chosen if not f.is_relative_to(src)]
        if outside:
            raise ValueError(f"{outside[0]} is not inside the source folder {src}")
    if not chosen:
        raise ValueError(f"no images found under {src}")
    return everything, chosen


def align_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    aligner: FaceAligner | None = None,
    keep_all: bool = False,
    resume: bool = True,
    progress: bool = True,
    files: Sequence[str | os.PathLike] | None = None,
) -> AlignReport:
    """Align every image under ``src`` into ``dst`` (same relative layout, ``.png`` crops).

    Args:
        src: a folder of photos (identity sub-folders optional, searched recursively).
        dst: output folder; ``a/b.jpg`` becomes ``dst/a/b.png`` (with ``keep_all`` the extra
            faces of one photo become ``b_1.png``, ``b_2.png``, ..., or ``b_1_.png`` when a photo
            ``b_1.jpg`` owns ``b_1.png``: :func:`extra_crop_names`); when ``a/b.jpg`` and
            ``a/b.png`` are both there, their crops are ``b.jpg.png`` and ``b.png.png``
            (:func:`crop_names`, no two photos share a crop), which pair lists still find.
        aligner: the :class:`FaceAligner` (default settings when None).
        keep_all: write every face found, not only the selected one.
        resume: skip images whose crop exists or that an earlier run reported; False redoes all.
        progress: show a tqdm bar.
        files: align only these images (paths inside ``src``) instead of every image under it.

    Returns:
        An :class:`AlignReport`. ``dst/no_face.txt`` lists (one relative path per line) every
        image where MTCNN found no face, ``dst/unreadable.txt`` every file that could not be
        decoded; both survive interruptions (lines are appended as they happen).

    Raises:
        FileNotFoundError: ``src`` is not a folder.
        ValueError: ``src`` holds no images, or ``dst`` is inside ``src``.
    """
    if Path(dst).resolve() == Path(src).resolve() or Path(dst).resolve().is_relative_to(Path(src).resolve()):
        raise ValueError(f"the destination {dst} must not be inside the source folder {src}")
    # Absolute but not symlink-resolved: a folder of symlinks keeps its own relative names.
    src, dst = Path(os.path.abspath(src)), Path(os.path.abspath(dst))
    everything, files = _prepare_files(src, files)
    aligner = aligner or FaceAligner()
    dst.mkdir(parents=True, exist_ok=True)
    no_face_path, unreadable_path = dst / NO_FACE_REPORT, dst / UNREADABLE_REPORT
    if not resume:
        for path in (no_face_path, unreadable_path):
            path.unlink(missing_ok=True)
    no_face = _read_report(no_face_path)
    unreadable = _read_report(unreadable_path)
    done = set(no_face) | set(unreadable)
    # Names over the whole folder, so aligning a subset (eval_face --align) names crops the same way.
    names = crop_names([path.relative_to(src).as_posix() for path in everything])
    report = AlignReport(total=len(files))
    report.shared_stems = sorted(r for r, name in names.items() if name == f"{r}.png")
    reserved = {str(dst / name) for name in names.values()}  # main crops: no extra face may take one
    bar = tqdm(files, desc=f"aligning {src.name}", unit="img", disable=not progress)
    for path in bar:
        relative = path.relative_to(src).as_posix()
        target = dst / names.get(relative, Path(relative).with_suffix(".png").as_posix())
        if resume and (relative in done or target.is_file()):
            report.skipped_done += 1
            continue
        try:
            image = load_rgb(path)
        except ImageReadError as err:
            warnings.warn(str(err), RuntimeWarning, stacklevel=2)
            unreadable.append(relative)
            with unreadable_path.open("a") as handle:
                handle.write(f"{relative}\t{err}\n")
            continue
        faces = aligner.detect(image, keep_all=keep_all)
        if not faces:
            no_face.append(relative)
            with no_face_path.open("a") as handle:
                handle.write(f"{relative}\n")
            continue
        _write_crops(faces, target, reserved)
        report.aligned += 1
        report.faces_written += len(faces)
        bar.set_postfix(no_face=len(no_face), refresh=False)
    report.no_face, report.unreadable = sorted(set(no_face)), sorted(set(unreadable))
    return report
