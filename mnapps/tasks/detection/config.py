"""The detection config: :class:`DetConfig` (``model`` / ``data`` / ``train`` / ``distill``) and the model it describes.

This module owns the schema of ``configs/ssd*.yaml`` and friends and the few functions that
read it to build things: :func:`build_model` (the detector ``cfg.model`` describes),
:func:`model_input_size` and :func:`fine_tune_config` (the config for fine-tuning a whole
detector checkpoint). :class:`DetModelConfig` holds one optional settings section per head
section of :data:`mnapps.heads.HEADS`, generated from that table when this module is imported,
so adding a head adds its section here without an edit.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from torch import nn

from mnapps.checkpoint import Checkpoint, read_checkpoint
from mnapps.config import OMIT_IF_NONE, BackboneConfig, ConfigError, TaskConfig, load_config, read_yaml
from mnapps.data.transforms import RECIPES
from mnapps.heads import HEADS, head_spec

__all__ = ["DetModelConfig", "DetDataConfig", "DetDistillConfig", "DetConfig", "build_model", "model_input_size",
           "fine_tune_config"]

HeadName = Literal[tuple(HEADS)]  # type: ignore[valid-type]
RecipeName = Literal[tuple(RECIPES)]  # type: ignore[valid-type]


def _check_sections(self: Any) -> None:
    """Only the chosen head's section may be set; it is filled with its defaults when absent."""
    legacy = getattr(self, "ssd", None)
    if self.head == "ssd" and legacy is not None and legacy.lite:
        # Written before the head alone chose SSDLite: `head: ssd` with `ssd.lite: true` built one.
        object.__setattr__(self, "head", "ssdlite")
    spec = head_spec(self.head)
    for name in {other.section for other in HEADS.values()} - {spec.section}:
        if getattr(self, name) is not None:
            users = sorted(h for h, other in HEADS.items() if other.section == name)
            raise ConfigError(
                f"model.{name} holds settings of the {'/'.join(users)} head(s) but model.head is "
                f"{self.head!r}: remove the model.{name} section or change model.head"
            )
    if getattr(self, spec.section) is None:
        object.__setattr__(self, spec.section, spec.config_cls())


def _head_config(self: Any) -> Any:
    """The settings section of the chosen head (``ssd``, ``faster_rcnn``, ...)."""
    return getattr(self, head_spec(self.head).section)


def _sections() -> list[tuple[str, Any, Any]]:
    """One optional field per settings section of :data:`HEADS`, in table order."""
    seen: dict[str, type] = {}
    for spec in HEADS.values():
        seen.setdefault(spec.section, spec.config_cls)
    return [(name, cls | None, field(default=None, metadata=OMIT_IF_NONE)) for name, cls in seen.items()]


DetModelConfig = dataclasses.make_dataclass(
    "DetModelConfig",
    [
        ("head", HeadName, field(default="ssd")),
        ("backbone", BackboneConfig, field(default_factory=BackboneConfig)),
        *_sections(),
        ("num_classes", int | None, field(default=None)),
        ("class_names", tuple[str, ...], field(default=())),
        ("category_ids", tuple[int, ...], field(default=())),
    ],
    namespace={"__post_init__": _check_sections, "head_config": property(_head_config)},
    frozen=True,
)
DetModelConfig.__module__ = __name__
DetModelConfig.__doc__ = """Which detector, on which trunk, and what the data decided about its classes.

    Attributes:
        head: a key of :data:`mnapps.heads.HEADS` (``ssd``, ``ssdlite``, ...).
        backbone: MobileNetV1 settings (the same section in every task).
        ssd, faster_rcnn, ...: one section per ``HeadSpec.section`` of :data:`HEADS`; the chosen
            head's is filled with defaults when absent, another head's is an error to give.
        num_classes: classes including background; None takes it from the training data.
        class_names: ``class_names[label]`` (``[0]`` is background); filled in from the data.
        category_ids: the dataset category id of labels ``1..K``; filled in from the data.
    """


@dataclass(frozen=True)
class DetDataConfig:
    """Where the data is and how it is augmented.

    ``train_ann``/``train_images``/``val_ann``/``val_images`` name COCO-format annotation files
    and image folders; leaving all four None trains on the embedded shapes dataset (generated
    once into ``$MNAPPS_CACHE`` or ``~/.cache/mnapps``, sized by the ``shapes_*`` keys).

    Attributes:
        recipe: training augmentation, ``"ssd"`` (photometric, zoom out, IoU crop, flip,
            resize) or ``"basic"`` (photometric, flip).
        train_size: side of the training resize; None uses the model's input size for SSD
            heads (``model.ssd.size``) and no resize for heads that resize themselves.
        zoom_out_max_ratio: largest zoom-out canvas for the ``ssd`` recipe (paper: 4).
        min_visibility: fraction of its area a box must keep after a crop to stay a target.
        min_box_size: boxes thinner than this many pixels are dropped (counted).
        eval_batch_size: images per forward pass in evaluation.
        eval_max_images: evaluate on only the first N validation images (None: all).
        shapes_num_train, shapes_num_val, shapes_image_size, shapes_seed: size of the embedded
            dataset (see :func:`mnapps.data.synthetic_det.ensure_shapes_detection`; None keeps
            the generator's defaults). Each setting is generated once and cached.
    """

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    recipe: RecipeName = "ssd"
    train_size: int | None = None
    zoom_out_max_ratio: float = 4.0
    min_visibility: float = 0.2
    min_box_size: float = 1.0
    eval_batch_size: int = 8
    eval_max_images: int | None = None
    shapes_num_train: int | None = None
    shapes_num_val: int | None = None
    shapes_image_size: int | None = None
    shapes_seed: int = 0


@dataclass(frozen=True)
class DetDistillConfig:
    """Soft targets: a teacher detector's per-anchor outputs added to the box loss.

    See :mod:`mnapps.tasks.detection.soft_targets`. The teacher must have the student's anchors
    (input size and anchor settings) and preprocessing; training refuses it otherwise.

    Attributes:
        teacher: detection checkpoint (path or weights name) whose outputs the student follows.
        weight: weight of the classification term (KL divergence of the student's per-anchor
            class probabilities from the teacher's, summed over anchors, divided by the number
            of anchors the teacher calls foreground).
        box_weight: weight of the box term (smooth L1 between the student's and the teacher's
            box offsets on those foreground anchors, divided by their number).
        foreground_score: an anchor is foreground when the teacher gives one of its object
            classes at least this probability.
    """

    teacher: str | None = None
    weight: float = 1.0
    box_weight: float = 1.0
    foreground_score: float = 0.5


@dataclass(frozen=True)
class DetConfig(TaskConfig):
    """A detection experiment (``configs/ssd*.yaml``, ``configs/faster_rcnn*.yaml``).

    ``model`` is the detector (:class:`DetModelConfig`), ``data`` the COCO-format files and
    their augmentation (:class:`DetDataConfig`), ``train`` the optimisation settings
    (:class:`mnapps.config.TrainConfig`, as in every task), ``distill`` optional soft targets
    from a teacher detector (:class:`DetDistillConfig`; absent: boxes only).
    """

    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    distill: DetDistillConfig | None = field(default=None, metadata=OMIT_IF_NONE)


def model_input_size(cfg: DetConfig) -> int | None:
    """Side of the training resize: ``data.train_size``, else the head's fixed input size (SSD's
    ``ssd.size``), else None (heads that resize themselves keeping the aspect ratio)."""
    if cfg.data.train_size is not None:
        return cfg.data.train_size
    return head_spec(cfg.model.head).input_size(cfg.model.head_config)


def build_model(
    cfg: DetConfig, num_classes: int, weights_backbone: str | os.PathLike | dict[str, Any] | None = None
) -> nn.Module:
    """The detector ``cfg.model`` describes (head, trunk, classes), trunk weights optional."""
    spec = head_spec(cfg.model.head)
    return spec.build(
        cfg.model.head_config,
        num_classes=num_classes,
        backbone_cfg=cfg.model.backbone,
        weights_backbone=weights_backbone,
    )


def fine_tune_config(
    weights: str | os.PathLike | Checkpoint,
    config: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    *,
    config_is_default: bool = False,
) -> DetConfig:
    """The config to fine-tune a whole detector checkpoint with (``weights``: its path, or the record
    already read, so that ``train_det --weights`` reads the file once for this and the training).

    The model section is the checkpoint's (its architecture: head, backbone, head settings),
    with the classes left for the training data to decide; ``data`` and ``train`` come from
    ``config`` (None: defaults); ``overrides`` (``key=value``, ``model.*`` included) apply last.
    A ``model`` key that ``config`` writes must agree with the checkpoint (it would otherwise be
    lost without a word); ``config_is_default`` marks a file the user did not choose (the head's
    default config of ``tools/train_det.py``), whose model section is passed over.

    Raises:
        ValueError: not a detection checkpoint, ``overrides`` change the head, or ``config``
            writes a model key that differs from the checkpoint's (named, with the fix).
    """
    checkpoint = read_checkpoint(weights)
    source = checkpoint.origin
    checkpoint.require_task(
        "detection", "pass a detector (train_det's best.pt, or tools/import_weights.py --kind ssd), or use "
        "--weights-backbone for a trunk"
    )
    decided_by_data = ("num_classes", "class_names", "category_ids")
    model = {k: v for k, v in checkpoint.model_config.items() if k not in decided_by_data}
    stored = load_config(None, DetConfig, [f"model={model!r}"]).model  # as read (legacy spellings too)
    if config is not None and not config_is_default:
        _refuse_other_model_keys(config, stored, source)
    # The config loader's own steps (read, overrides, typed check), with the checkpoint's model
    # section placed between the file and the overrides.
    try:
        cfg = load_config(config, DetConfig, [f"model={model!r}", *overrides])
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the model section is that of {source})") from None
    if cfg.model.head != stored.head:
        raise ValueError(
            f"--weights {source} holds a {stored.head!r} detector but the head asked for is "
            f"{cfg.model.head!r}; drop --head (the checkpoint decides the architecture)"
        )
    return cfg


def _written_keys(section: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys a YAML mapping sets, leaves only (``backbone.frozen_bn``, ``ssd.size``)."""
    keys = []
    for name, value in section.items():
        key = f"{prefix}{name}"
        keys += _written_keys(value, f"{key}.") if isinstance(value, dict) and value else [key]
    return keys


def _setting(model: Any, key: str) -> Any:
    for name in key.split("."):
        model = getattr(model, name, None)
    return model


def _refuse_other_model_keys(config: str | os.PathLike, stored: Any, weights: str) -> None:
    """ValueError naming the first ``model`` key of ``config`` whose value differs from the checkpoint's."""
    written = read_yaml(config).get("model")
    if not isinstance(written, dict):
        return  # nothing written, or not a mapping: the typed load names that
    own = load_config(config, DetConfig).model
    for key in _written_keys(written):
        if _setting(own, key) != _setting(stored, key):
            raise ValueError(
                f"{config}: model.{key} is {_setting(own, key)!r} but with --weights the model is that of {weights} "
                f"({_setting(stored, key)!r}); remove model.{key} from the file, or pass --set model.{key}=VALUE"
            )
