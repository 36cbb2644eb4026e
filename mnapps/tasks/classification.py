"""MobileNetV1 image classification: config, training, evaluation, loading and prediction.

This module owns the classification task: its config schema (:class:`ClsConfig`, loaded
from ``configs/cls_*.yaml``), building the classifier, the data pipeline (an ImageFolder
given by the user or, with no data given, the embedded shapes set of
:mod:`mnapps.data.synthetic_cls`), the loss (cross-entropy, optional label smoothing) and
the evaluation (top-1 / top-5 accuracy), the task itself (:class:`ClassificationTask`, the
classification :class:`mnapps.tasks.task.Task`), and inference: :func:`load_classifier` rebuilds the
model a checkpoint describes and :func:`classify_images` turns photos into named top-k
predictions, preparing each image the way the TF-slim reference inputs were made (upright RGB,
PIL bilinear resize of the whole image, scaled to [-1, 1]). The 1000 ImageNet class names ship in
``mnapps/resources/imagenet_classes.txt`` (torchvision's list). The loop itself is the shared engine
(:meth:`mnapps.tasks.task.Task.train` around :func:`mnapps.engine.loop.fit`); the
checkpoints it writes are ordinary mnapps checkpoints, so any head can start from the trained trunk with
:func:`mnapps.backbones.trunk.load_backbone_weights`.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mnapps.backbones import MobileNetV1, prepare_trunk
from mnapps.importers.tf_slim import TfSlimImport, build_from_tf_slim, read_tf_slim_tensors
from mnapps.checkpoint import Checkpoint, read_task_checkpoint
from mnapps.config import BackboneConfig, TaskConfig, replace, to_dict
from mnapps.data.image_io import ImageReadError, load_rgb
from mnapps.data.imagefolder import ImageFolderDataset, build_cls_transforms, collate_cls
from mnapps.engine.distributed import DistInfo, build_eval_loader, build_train_loader
from mnapps.data.synthetic_cls import ensure_shapes_classification
from mnapps.engine.loop import to_device
from mnapps.engine.result import FitResult
from mnapps.graph_kind import GraphKind

from .spec import ExportPlan
from .task import RunRequest, Task, TaskRun, WeightsPath

__all__ = [
    "ClsModelConfig",
    "ClsDataConfig",
    "ClsConfig",
    "build_classifier",
    "build_cls_datasets",
    "classification_loss",
    "evaluate_classifier",
    "ClassificationTask",
    "ClassificationRun",
    "ClassificationResult",
    "train_classifier",
    "Prediction",
    "imagenet_class_names",
    "class_names_for",
    "load_classifier",
    "cls_image_files",
    "cls_export_plan",
    "preprocess_image",
    "classify_images",
    "classify_files",
    "default_imagenet_checkpoint",
    "import_tf_slim_checkpoint",
]


@dataclass(frozen=True)
class ClsModelConfig:
    """The classifier: the trunk (``backbone``, as in every task) plus its classification layer.

    ``num_classes`` None takes the number of class folders of the training data; a number
    that disagrees with the data is an error. ``class_names`` is filled in from the data when
    training (so checkpoints know their labels); an empty tuple with 1000 (or 1001) classes
    means ImageNet's. ``backbone.weights`` starts the trunk from any mnapps checkpoint.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_classes: int | None = None
    dropout: float = 0.0
    resolution: int = 224
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClsDataConfig:
    """Where the images are and how they are augmented.

    ``train_dir``/``val_dir`` None uses the embedded shapes dataset (generated and cached,
    sized by the ``shapes_*`` keys). Augmentation follows the paper's advice for small
    models (Sec. 3.2: less augmentation than Inception, the smallest crops left out): a
    random resized crop of at least ``min_crop_area`` of the image and a horizontal flip.
    """

    train_dir: str | None = None
    val_dir: str | None = None
    min_crop_area: float = 0.25
    hflip: bool = True
    color_jitter: float = 0.0
    eval_crop_fraction: float = 0.875
    eval_batch_size: int | None = None  # None: train.batch_size
    shapes_train_per_class: int = 300
    shapes_val_per_class: int = 50
    shapes_image_size: int = 96
    shapes_seed: int = 0


@dataclass(frozen=True)
class ClsConfig(TaskConfig):
    """Top-level schema of ``configs/cls_*.yaml``: the common sections, and ``label_smoothing``
    of the cross-entropy loss (0 = none)."""

    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    label_smoothing: float = 0.0


def build_classifier(
    cfg: ClsModelConfig, num_classes: int | None = None, *, weights_backbone: str | os.PathLike | None = None
) -> MobileNetV1:
    """A :class:`MobileNetV1` classifier with ``num_classes`` outputs (default ``cfg.num_classes``).

    The trunk comes from :func:`mnapps.backbones.prepare_trunk` (weights, frozen stages and BN
    as in every head); its load report is ``model.backbone_load_report``.
    """
    classes = cfg.num_classes if num_classes is None else num_classes
    if classes is None or classes < 1:
        raise ValueError(f"model.num_classes must be >= 1 for a classifier, got {classes}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
    model, report = prepare_trunk(cfg.backbone, num_classes=classes, weights=weights_backbone, dropout=cfg.dropout)
    model.backbone_load_report = report
    return model


def build_cls_datasets(cfg: ClsConfig) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The training and validation ImageFolders of ``cfg.data`` (embedded shapes when unset)."""
    data = cfg.data
    if (data.train_dir is None) != (data.val_dir is None):
        raise ValueError(
            "give both data.train_dir and data.val_dir (--train-dir/--val-dir), or neither for the "
            f"embedded shapes dataset; got train_dir={data.train_dir!r}, val_dir={data.val_dir!r}"
        )
    if data.train_dir is None:
        paths = ensure_shapes_classification(
            train_per_class=data.shapes_train_per_class,
            val_per_class=data.shapes_val_per_class,
            image_size=data.shapes_image_size,
            seed=data.shapes_seed,
        )
        train_dir, val_dir = paths.train, paths.val
    else:
        train_dir, val_dir = Path(data.train_dir), Path(data.val_dir)
    resolution = cfg.model.resolution
    train_tf = build_cls_transforms(
        True, resolution, min_crop_area=data.min_crop_area, hflip=data.hflip, color_jitter=data.color_jitter
    )
    eval_tf = build_cls_transforms(False, resolution, eval_crop_fraction=data.eval_crop_fraction)
    train_set = ImageFolderDataset(train_dir, train_tf)
    val_set = ImageFolderDataset(val_dir, eval_tf, class_names=train_set.class_names)
    return train_set, val_set


def classification_loss(
    model: nn.Module, images: Tensor, labels: Tensor, device: str | torch.device, *, label_smoothing: float = 0.0,
    channels_last: bool = False,
) -> dict[str, Tensor]:
    """``{"loss_cls": cross-entropy}`` of a batch: ``images Tensor[N,3,H,W]`` in [-1,1], ``labels Int64[N]``.

    The images go to ``device`` in channels_last layout when the engine stores the model that
    way (``train.channels_last``); a batch whose every image was unreadable gives a zero loss.
    """
    if labels.numel() == 0:
        param = next(p for p in model.parameters() if p.requires_grad)
        return {"loss_cls": param.sum() * 0.0}
    images = to_device(images, device, channels_last=channels_last, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    logits = model(images)
    return {"loss_cls": F.cross_entropy(logits, labels, label_smoothing=label_smoothing)}


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader,
    device: str | torch.device = "cpu",
    *,
    desc: str = "eval",
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) and mean cross-entropy over ``loader``.

    ``loader`` yields :func:`collate_cls` batches. Top-5 becomes top-``k`` with
    ``k = min(5, num_classes)``. Returns ``{"top1", "top5", "loss", "num_images",
    "num_skipped"}``; the model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = skipped = 0
    loss_sum = 0.0
    for images, labels, num_skipped in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        skipped += int(num_skipped)
        if labels.numel() == 0:
            continue
        images = to_device(images, device, channels_last=channels_last)
        labels = labels.to(device)
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        seen += labels.numel()
    model.train(was_training)
    if seen == 0:
        raise ValueError("evaluation saw no readable images")
    return {
        "top1": correct1 / seen,
        "top5": correct5 / seen,
        "loss": loss_sum / seen,
        "num_images": float(seen),
        "num_skipped": float(skipped),
    }


@dataclass
class ClassificationRun(TaskRun[ClsConfig]):
    """The state of one classification training run (see :class:`mnapps.tasks.task.TaskRun`).

    Attributes:
        train_set, val_set: the ImageFolders.
        skipped_train_images: unreadable training images :func:`collate_cls` dropped (the count
            rides in each batch, so images dropped inside loader worker processes count too).
        val_loader: the validation loader (set when training starts).
    """

    train_set: ImageFolderDataset
    val_set: ImageFolderDataset
    skipped_train_images: int = 0
    val_loader: DataLoader | None = None


@dataclass(frozen=True)
class ClassificationResult:
    """What :func:`train_classifier` returns.

    Attributes:
        metrics: the last evaluation's ``top1``, ``top5``, ``loss``, ``num_images`` and
            ``num_skipped`` (:func:`evaluate_classifier`); empty when none ran.
        skipped_train_images: unreadable training images dropped.
        fit: what the engine reports (history, best top-1, checkpoints).
    """

    metrics: dict[str, float]
    skipped_train_images: int
    fit: FitResult


class ClassificationTask(Task[ClsConfig, ClassificationRun, ClassificationResult]):
    """Classification: a MobileNetV1 classifier on an ImageFolder (or the embedded shapes)."""

    name = "classification"
    config_cls = ClsConfig
    best_metric = "top1"
    scored_by = "tools/train_cls.py (top-1 on its validation folder after every epoch)"

    def prepare(self, cfg: ClsConfig, request: RunRequest, info: DistInfo) -> ClassificationRun:
        """Both ImageFolders, with what the data decided recorded so the checkpoint alone rebuilds
        the model and its labels."""
        train_set, val_set = build_cls_datasets(cfg)
        if cfg.model.num_classes is not None and cfg.model.num_classes != train_set.num_classes:
            raise ValueError(
                f"model.num_classes is {cfg.model.num_classes} but {train_set.root} has "
                f"{train_set.num_classes} class folders {train_set.class_names[:10]}; "
                "set model.num_classes to null to take it from the data"
            )
        model = replace(cfg.model, num_classes=train_set.num_classes, class_names=tuple(train_set.class_names))
        return ClassificationRun(replace(cfg, model=model), request, info, train_set, val_set)

    def build_model(self, run: ClassificationRun, weights: WeightsPath) -> nn.Module:
        return build_classifier(run.cfg.model, weights_backbone=weights)

    def start(self, run: ClassificationRun, model: nn.Module) -> DataLoader:
        cfg = run.cfg
        run.val_loader = build_eval_loader(
            run.val_set, cfg.data.eval_batch_size or cfg.train.batch_size, collate_cls, cfg.train.num_workers
        )
        return build_train_loader(run.train_set, cfg.train, collate_cls, run.info)

    def training_step(self, run: ClassificationRun, model: nn.Module, batch: Any, device: torch.device
                      ) -> dict[str, Tensor]:
        images, labels, num_skipped = batch
        run.skipped_train_images += int(num_skipped)
        return classification_loss(model, images, labels, device, label_smoothing=run.cfg.label_smoothing,
                                   channels_last=run.cfg.train.channels_last)

    def evaluate_epoch(self, run: ClassificationRun, model: nn.Module, epoch: int) -> dict[str, float]:
        return evaluate_classifier(model, run.val_loader, run.device, desc=f"eval epoch {epoch}",
                                   channels_last=run.cfg.train.channels_last)

    def finish(self, run: ClassificationRun, model: nn.Module, fitted: FitResult, time_s: float
               ) -> ClassificationResult:
        if run.skipped_train_images and run.info.is_main:
            print(f"warning: {run.skipped_train_images} unreadable training image(s) were skipped")
        return ClassificationResult(dict(fitted.last_metrics), run.skipped_train_images, fitted)

    def load(self, checkpoint: Checkpoint) -> tuple[nn.Module, ClsConfig]:
        model, cfg, _ = load_classifier(checkpoint)
        return model, cfg

    def datasets(self, cfg: ClsConfig) -> tuple[ImageFolderDataset, ImageFolderDataset]:
        return build_cls_datasets(cfg)

    def image_files(self, cfg: ClsConfig, split: str) -> list[Path]:
        return cls_image_files(cfg, split)

    def export(self, checkpoint: Checkpoint, model: nn.Module, cfg: ClsConfig) -> ExportPlan:
        return cls_export_plan(checkpoint, model, cfg)


def train_classifier(
    cfg: ClsConfig,
    *,
    output_dir: str | os.PathLike,
    resume: str | os.PathLike | bool | None = None,
    overwrite: bool = False,
    weights_backbone: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> ClassificationResult:
    """Train a MobileNetV1 classifier with the shared engine.

    ``output_dir`` receives ``config.yaml`` (the resolved config), ``last.pt`` every epoch and
    ``best.pt`` at the best validation top-1 (mnapps checkpoints, ``task="classification"``); a
    folder that already holds checkpoints is refused unless ``resume`` (continue it; True means
    ``output_dir/last.pt``) or ``overwrite`` (start over) is given. ``weights_backbone`` starts
    the trunk (default ``model.backbone.weights``); ``device`` as in every task (None: CUDA
    when available).
    """
    request = RunRequest(output_dir, resume=resume, overwrite=overwrite, weights_backbone=weights_backbone)
    return ClassificationTask().train(cfg, request, device=device)


# ------------------------------------------------------------------------------------------
# inference


@dataclass(frozen=True)
class Prediction:
    """One ranked label: class index, its name and softmax probability."""

    index: int
    label: str
    probability: float


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index = the usual (torchvision) class index."""
    text = resources.files("mnapps.resources").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:
        raise ValueError(f"mnapps/resources/imagenet_classes.txt should list 1000 classes, found {len(names)}")
    return names


def class_names_for(num_classes: int, recorded: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Names for a classifier's outputs.

    The checkpoint's own names when it recorded them; ImageNet's for 1000 outputs, and for
    1001 (TF-slim's layout, index 0 = background) with "background" first; otherwise
    ``class_<i>``.
    """
    if recorded:
        if len(recorded) != num_classes:
            raise ValueError(f"the checkpoint lists {len(recorded)} class names for {num_classes} outputs")
        return list(recorded)
    if num_classes == 1000:
        return list(imagenet_class_names())
    if num_classes == 1001:
        return ["background", *imagenet_class_names()]
    return [f"class_{i}" for i in range(num_classes)]


def load_classifier(
    checkpoint: str | os.PathLike | dict | Checkpoint, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ClsConfig, list[str]]:
    """Rebuild the classifier stored in an mnapps classification checkpoint.

    Returns:
        ``(model in eval mode on device, its ClsConfig, class names)``.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not a classification checkpoint, or weights that do not fit its config.
    """
    fix = "use tools/import_weights.py or tools/train_cls.py to make one"
    record, cfg = read_task_checkpoint(checkpoint, "classification", ClsConfig, fix)
    name = record.origin
    num_classes = cfg.model.num_classes or int(record.weights["classifier.weight"].shape[0])
    model = build_classifier(cfg.model, num_classes)
    try:
        model.load_state_dict(record.weights)
    except RuntimeError as exc:
        raise ValueError(f"{name}: weights do not fit the model its config describes: {exc}") from None
    return model.to(device).eval(), cfg, class_names_for(num_classes, cfg.model.class_names)


def cls_image_files(cfg: ClsConfig, split: str) -> list[Path]:
    """The image files of the validation (``"parity"``) or training (``"calibration"``) split."""
    train_set, val_set = build_cls_datasets(cfg)
    return [path for path, _ in (val_set if split == "parity" else train_set).samples]


def cls_export_plan(checkpoint: Checkpoint, model: nn.Module, cfg: ClsConfig) -> ExportPlan:
    """How export makes a graph of the classifier: ``images [N, 3, S, S]`` in [-1, 1] -> ``logits``."""
    size = cfg.model.resolution
    eval_tf = build_cls_transforms(False, size, eval_crop_fraction=cfg.data.eval_crop_fraction)

    def to_input(image: Tensor) -> Tensor:
        # The evaluation transform of training (central crop, resize, [-1, 1]) on a PIL image.
        pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return eval_tf(Image.fromarray(pixels))

    metadata = {
        "task": "classification",
        "input": f"images [N, 3, {size}, {size}] RGB standardised to [-1, 1] (x / 127.5 - 1)",
        "class_names": list(cfg.model.class_names),
    }
    return ExportPlan(GraphKind.TENSOR, metadata, input_size=size, output_names=("logits",), to_input=to_input, top1=True,
                      accuracy="top1")


def preprocess_image(image: Image.Image | str | os.PathLike, resolution: int) -> Tensor:
    """Image (or path) -> ``Tensor[3, resolution, resolution]`` in [-1, 1].

    The whole image is resized with PIL bilinear (no crop) and scaled as ``x / 127.5 - 1``:
    exactly how the TF reference inputs in ``reference_tf_outputs.npz`` were made.
    """
    if not isinstance(image, Image.Image):
        image = Image.fromarray(load_rgb(image))
    elif image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize((resolution, resolution), Image.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def classify_images(
    model: nn.Module,
    images: list[Image.Image | str | os.PathLike],
    class_names: list[str],
    *,
    resolution: int,
    topk: int = 5,
    device: str | torch.device = "cpu",
) -> list[list[Prediction]]:
    """Top-``topk`` predictions (highest first) for each image.

    Probabilities are the softmax over the model's outputs (for a 1001-way TF-slim model
    that includes the background class).
    """
    if not images:
        raise ValueError("give at least one image")
    batch = torch.stack([preprocess_image(image, resolution) for image in images])
    return _top_predictions(model, batch, class_names, topk, device)


@torch.no_grad()
def _top_predictions(
    model: nn.Module, batch: Tensor, class_names: list[str], topk: int, device: str | torch.device
) -> list[list[Prediction]]:
    probabilities = model(batch.to(device)).softmax(dim=1).cpu()
    k = min(topk, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=1)
    return [
        [Prediction(int(i), class_names[int(i)], float(p)) for p, i in zip(row_values, row_indices)]
        for row_values, row_indices in zip(values, indices)
    ]


def classify_files(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    class_names: list[str],
    *,
    resolution: int,
    topk: int = 5,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> tuple[list[tuple[Path, list[Prediction]]], list[ImageReadError]]:
    """:func:`classify_images` over image files, ``batch_size`` at a time.

    Returns:
        ``(results, unreadable)``: ``(path, top-k predictions)`` for every readable file in
        order, and the :class:`ImageReadError` of each file that could not be read (skipped, so
        that one bad photo does not stop a folder).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[tuple[Path, list[Prediction]]] = []
    unreadable: list[ImageReadError] = []
    batch: list[tuple[Path, Tensor]] = []

    def flush() -> None:
        if batch:
            tensors = torch.stack([tensor for _, tensor in batch])
            predictions = _top_predictions(model, tensors, class_names, topk, device)
            results.extend(zip([path for path, _ in batch], predictions))
            batch.clear()

    for path in map(Path, paths):
        try:
            batch.append((path, preprocess_image(path, resolution)))
        except ImageReadError as exc:
            unreadable.append(exc)
        if len(batch) == batch_size:
            flush()
    flush()
    return results, unreadable


def default_imagenet_checkpoint(root: str | os.PathLike | None = None) -> Path:
    """Where ``tools/import_weights.py`` writes the ImageNet classifier by default."""
    base = Path(root) if root is not None else Path.cwd()
    return base / "runs" / "weights" / "mobilenet_v1_1.0_224_imagenet.pt"


def import_tf_slim_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    keep_background: bool = False,
    resolution: int = 224,
) -> tuple[Path, TfSlimImport]:
    """Convert TF-slim ImageNet weights at ``source`` into an mnapps classification checkpoint.

    The checkpoint's config is a full :class:`ClsConfig` recording the settings the weights
    need (``tf_padding=True``, ReLU6, eps 1e-3, input ``resolution``), so ``tools/classify.py``
    and every head rebuild the right model from it.
    """
    try:
        tensors = read_tf_slim_tensors(source)
    except (FileNotFoundError, ImportError):
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:  # truncated or not an .npz at all
        raise ValueError(
            f"{source} could not be read as TF-slim tensors ({type(exc).__name__}: {exc}); pass an intact .npz "
            f"of name -> array or the official .ckpt prefix"
        ) from None
    model, info = build_from_tf_slim(tensors, keep_background=keep_background)
    backbone = BackboneConfig(width_mult=info.width_mult, activation="relu6", bn_eps=1e-3, tf_padding=True)
    cfg = ClsConfig(model=ClsModelConfig(backbone=backbone, num_classes=info.num_classes, resolution=resolution))
    checkpoint = Checkpoint(
        task="classification", head=None, config=to_dict(cfg), weights=model.state_dict(),
        source=f"TF-slim {Path(source).name}",
    )
    return checkpoint.save(output), info
