"""The detection config: :class:`DetConfig` (``model`` / ``data`` / ``train`` / ``distill``) and the model it describes.

This module owns the schema of ``configs/ssd*.yaml`` and friends and the few functions that
read it to build things: :func:`build_model` (the detector ``cfg.model`` describes),
:func:`model_input_size` and :func:`fine_tune_config` (the config for fine-tuning a whole
detector checkpoint). :class:`DetModelConfig` holds the chosen head's settings as an instance of
that head's own dataclass (:attr:`mnapps.heads.HeadSpec.settings_cls`), looked up in
:data:`mnapps.heads.HEADS` when a config is read or built, so a head added to that table at any
time (a plug-in, after this module was imported) has its settings read, checked and saved here
without an edit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Sequence

from torch import nn

from mnapps.checkpoint import Checkpoint, read_checkpoint
from mnapps.choices import DEFAULT_HEAD, SSD, SSDLITE
from mnapps.config import (
    OMIT_IF_NONE,
    BackboneConfig,
    ConfigError,
    TaskConfig,
    fields_from_dict,
    from_dict,
    load_config,
    read_yaml,
    refuse_unknown_keys,
    to_dict,
)
from mnapps.data.transforms import RECIPES
from mnapps.heads import HEADS, HeadSpec

__all__ = ["DetModelConfig", "DetDataConfig", "DetDistillConfig", "DetConfig", "build_model", "model_input_size",
           "fine_tune_config"]

RecipeName = Literal[tuple(RECIPES)]  # type: ignore[valid-type]


def _head_spec(head: Any, where: str) -> HeadSpec:
    """The :data:`HEADS` entry of ``head`` as the config names it; ConfigError listing the heads otherwise."""
    if not isinstance(head, str) or head not in HEADS:
        raise ConfigError(f"{where}: {head!r} is not one of {sorted(HEADS)}")
    return HEADS[head]


@dataclass(frozen=True)
class DetModelConfig:
    """Which detector, on which trunk, and what the data decided about its classes.

    In YAML the head's settings sit under the head's section key (``model.ssd``,
    ``model.faster_rcnn``, a plug-in's own), read into :attr:`head_settings`; only the chosen
    head's section may be given, and a missing one is the head's defaults.

    Attributes:
        head: a key of :data:`mnapps.heads.HEADS` (``ssd``, ``ssdlite``, ...).
        backbone: MobileNetV1 settings (the same section in every task).
        head_settings: the chosen head's settings, an instance of its ``HeadSpec.settings_cls``
            (None when building one: the head's defaults).
        num_classes: classes including background; None takes it from the training data.
        class_names: ``class_names[label]`` (``[0]`` is background); filled in from the data.
        category_ids: the dataset category id of labels ``1..K``; filled in from the data.
    """

    head: str = DEFAULT_HEAD.name
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head_settings: Any = None
    num_classes: int | None = None
    class_names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        spec = _head_spec(self.head, "model.head")
        if self.head_settings is None:
            object.__setattr__(self, "head_settings", spec.settings_cls())
        elif not isinstance(self.head_settings, spec.settings_cls):
            raise ConfigError(
                f"model.head_settings is a {type(self.head_settings).__name__} but the {self.head} head takes a "
                f"{spec.settings_cls.__name__}"
            )
        if self.head == SSD.name and getattr(self.head_settings, "lite", False):
            # Written before the head alone chose SSDLite: `head: ssd` with `ssd.lite: true` built one.
            object.__setattr__(self, "head", SSDLITE.name)

    @property
    def section(self) -> str:
        """The ``model`` key the head's settings are written under (``ssd``, ``faster_rcnn``, ...)."""
        return HEADS[self.head].section

    @classmethod
    def from_config_dict(cls, data: dict[str, Any] | None, where: str = "model") -> DetModelConfig:
        """Read the ``model`` section: ``head`` picks the settings section and its dataclass.

        Raises:
            ConfigError: an unknown head (the valid ones listed), another head's settings
                section, or an unknown key (the valid ones listed).
        """
        data, where = ({} if data is None else data), where or "model"
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {data!r}")
        spec = _head_spec(data.get("head", DEFAULT_HEAD.name), f"{where}.head")
        for other in sorted({entry.section for entry in HEADS.values()} - {spec.section}):
            if other in data:
                users = sorted(name for name, entry in HEADS.items() if entry.section == other)
                raise ConfigError(
                    f"{where}.{other} holds settings of the {'/'.join(users)} head(s) but {where}.head is "
                    f"{data.get('head', DEFAULT_HEAD.name)!r}: remove the {where}.{other} section or change {where}.head"
                )
        plain = [f.name for f in fields(cls) if f.name != "head_settings"]
        refuse_unknown_keys(cls, data, [*plain[:2], spec.section, *plain[2:]], where)
        settings = from_dict(spec.settings_cls, data.get(spec.section), f"{where}.{spec.section}")
        rest = {key: value for key, value in data.items() if key != spec.section}
        return fields_from_dict(cls, {**rest, "head_settings": settings}, where)

    def to_config_dict(self) -> dict[str, Any]:
        """The ``model`` section as :meth:`from_config_dict` reads it (settings under their section key)."""
        written = {f.name: to_dict(getattr(self, f.name)) for f in fields(self)}
        settings = written.pop("head_settings")
        head_and_backbone = {key: written.pop(key) for key in ("head", "backbone")}
        return {**head_and_backbone, self.section: settings, **written}


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
    return HEADS[cfg.model.head].input_size(cfg.model.head_settings)


def build_model(
    cfg: DetConfig, num_classes: int, weights_backbone: str | os.PathLike | dict[str, Any] | None = None
) -> nn.Module:
    """The detector ``cfg.model`` describes (head, trunk, classes), trunk weights optional."""
    return HEADS[cfg.model.head].build(
        cfg.model.head_settings,
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
    """The config to fine-tune a whole detector checkpoint with.

    The model section is the checkpoint's (its architecture: head, backbone, head settings),
    with the classes left for the training data to decide; ``data`` and ``train`` come from
    ``config`` (None: defaults); ``overrides`` (``key=value``, ``model.*`` included) apply last.
    A ``model`` key that ``config`` writes must agree with the checkpoint (it would otherwise be
    lost without a word); ``config_is_default`` marks a file the user did not choose (the head's
    default config of ``tools/train_det.py``), whose model section is passed over. ``weights``
    may be the :class:`~mnapps.checkpoint.Checkpoint` already read, so that the caller loads
    the same record's tensors without reading the file again.

    Raises:
        ValueError: not a detection checkpoint, ``overrides`` change the head, or ``config``
            writes a model key that differs from the checkpoint's (named, with the fix).
    """
    checkpoint = read_checkpoint(weights)
    checkpoint.require_task(
        "detection", "pass a detector (train_det's best.pt, or tools/import_weights.py --kind ssd), or use "
        "--weights-backbone for a trunk"
    )
    decided_by_data = ("num_classes", "class_names", "category_ids")
    model = {k: v for k, v in checkpoint.model_config.items() if k not in decided_by_data}
    stored = load_config(None, DetConfig, [f"model={model!r}"]).model  # as read (legacy spellings too)
    if config is not None and not config_is_default:
        _refuse_other_model_keys(config, stored, checkpoint.origin)
    # The config loader's own steps (read, overrides, typed check), with the checkpoint's model
    # section placed between the file and the overrides.
    try:
        cfg = load_config(config, DetConfig, [f"model={model!r}", *overrides])
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the model section is that of {checkpoint.origin})") from None
    if cfg.model.head != stored.head:
        raise ValueError(
            f"--weights {checkpoint.origin} holds a {stored.head!r} detector but the head asked for is "
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


def _setting(model: DetModelConfig, key: str) -> Any:
    """The value of a dotted ``model`` key (``backbone.frozen_bn``; ``ssd.size`` is in the head's settings)."""
    names = key.split(".")
    value: Any = model
    if names[0] == model.section:
        value, names = model.head_settings, names[1:]
    for name in names:
        value = getattr(value, name, None)
    return value


def _refuse_other_model_keys(config: str | os.PathLike, stored: DetModelConfig, weights: str) -> None:
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
