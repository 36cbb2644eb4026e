"""Typed experiment configuration: YAML files in ``configs/`` loaded into frozen dataclasses.

This module owns the config *machinery* (``load_config``, ``from_dict``, ``apply_overrides``,
``save_config``) and the schemas shared by several tools (``BackboneConfig``, ``TrainConfig``,
and ``TaskConfig``, the ``model``/``data``/``train`` sections every task's schema has). Each
task's own top-level schema (detection, classification, face distillation) is a subclass of
``TaskConfig`` defined next to the code that consumes it; loading is the same for all of them:

1. ``yaml.safe_load`` the file (no code runs),
2. build nested dataclasses, raising on unknown keys with the valid ones listed,
3. apply ``--set section.key=value`` overrides (values parsed with ``ast.literal_eval``),
4. ``save_config`` writes the resolved config next to the checkpoints.

The configs that ship with mnapps (``CONFIG_DIR``) are the checkout's top-level ``configs/`` in
a source tree or an editable install, and ``mnapps/configs/`` inside an installed wheel (the
build copies them there); ``--config`` takes a file or, through :func:`config_arg`, the bare
name of a shipped config (``ssd_mnv1_a050_r192_shapes``, with or without ``.yaml``).

Errors name where the bad value came from: the config file (its path) or the ``--set`` item;
a misspelt key gets the closest valid keys suggested (``difflib``). Numbers follow what users
write rather than what YAML 1.1 parses: ``lr: 1e-3`` (a string to PyYAML, which wants ``1.0e-3``)
is the number 0.001, and NaN or infinite values (``.nan``, ``.inf``) are refused at load time
instead of failing at the first training step.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar

import yaml

T = TypeVar("T")



def _shipped_config_dir() -> Path:
    # A wheel carries the configs inside the package; a checkout keeps them at its top level.
    package = Path(__file__).resolve().parent
    return package / "configs" if (package / "configs").is_dir() else package.parent / "configs"


#: The YAML configs that ship with mnapps (the tools' defaults): see the module docstring.
CONFIG_DIR = _shipped_config_dir()

__all__ = [
    "CONFIG_DIR",
    "shipped_config_names",
    "resolve_config_path",
    "config_arg",
    "OMIT_IF_NONE",
    "BackboneConfig",
    "TrainConfig",
    "TaskConfig",
    "ConfigError",
    "from_dict",
    "fields_from_dict",
    "refuse_unknown_keys",
    "to_dict",
    "load_config",
    "apply_overrides",
    "save_config",
]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# YAML 1.1 (PyYAML) reads 1e-3 and 5E+2 as strings: its floats need a dot. Users mean numbers.
_NUMBER_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class BackboneConfig:
    """MobileNetV1 settings, the same section (``model.backbone``) in every task's config.

    How ``weights``, ``strict_weights``, ``trainable_stages`` and ``frozen_bn`` act is defined
    once, in :func:`mnapps.backbones.trunk.prepare_trunk`, for every head, the face student and
    the classifier.
    """

    width_mult: float = 1.0
    variant: Literal["standard", "conv", "shallow"] = "standard"  # paper Tables 4 and 5
    activation: Literal["relu6", "relu"] = "relu6"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    tf_padding: bool = False
    frozen_bn: bool = False
    # Number of trunk stages (counted from the deepest) left trainable when fine-tuning;
    # None trains them all. 0 freezes the whole trunk (torchvision's trainable_layers).
    trainable_stages: int | None = None
    # An mnapps checkpoint (any task) whose trunk initialises this one; None starts from scratch.
    weights: str | None = None
    # A trunk tensor missing, in excess or of another shape in ``weights`` is an error unless false.
    strict_weights: bool = True


# ------------------------------------------------------------------------------------------
# dict <-> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if is_dataclass(tp):
        if not isinstance(value, dict):
            keys = ", ".join([f.name for f in fields(tp) if f.init][:3])
            raise ConfigError(f"{where} must be a section of keys ({keys}, ...), one 'key: value' per line under "
                              f"'{where}:', got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and not (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            if origin is tuple:
                if len(args) != len(value):
                    raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
                return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            inner = args[0]
        else:
            inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}; NaN and infinity are not settings")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are errors.

    A schema whose section is not simply its field list reads itself: it defines a
    ``from_config_dict(data, where)`` classmethod, which this calls instead (and
    ``to_config_dict()``, which :func:`to_dict` calls). Detection's ``model`` section is one:
    its ``head`` key decides which head's settings section may follow.
    """
    reader = getattr(cls, "from_config_dict", None)
    if reader is not None:
        return reader(data, where)
    return fields_from_dict(cls, data, where)


def refuse_unknown_keys(cls: type, data: dict[str, Any], valid: list[str], where: str = "") -> None:
    """ConfigError naming the first key of ``data`` not in ``valid``, the closest valid ones and all of them."""
    unknown = sorted(set(data) - set(valid), key=str)
    if unknown:
        place = f"{where}." if where else ""
        close = difflib.get_close_matches(str(unknown[0]), valid, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(place + c for c in close)}? " if close else ""
        raise ConfigError(
            f"unknown key {place}{unknown[0]!s} in {cls.__name__}; {hint}valid keys are: {', '.join(valid)}"
        )


def fields_from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` field by field from a (nested) dict; unknown keys are errors."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    refuse_unknown_keys(cls, data, [f.name for f in fields(cls) if f.init], where)
    kwargs = {}
    factories = {f.name: f.default_factory for f in fields(cls) if f.default_factory is not dataclasses.MISSING}
    for name, value in data.items():
        default = factories[name]() if name in factories else None
        if isinstance(value, dict) and is_dataclass(default) and default != type(default)():
            # A partial section keeps the keys of the section's own default (e.g. the face task's
            # TrainConfig recipe), not the bare dataclass defaults.
            value = _merge(to_dict(default), value)
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without default
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


#: Field metadata: leave the field out of :func:`to_dict` while it is None (e.g. the settings
#: section of a head the run does not use), so a saved config holds only what its run used.
OMIT_IF_NONE = {"omit_if_none": True}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merge(base[key], value) if nested else value
    return merged


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict/list values, suitable for YAML or a checkpoint."""
    writer = getattr(obj, "to_config_dict", None)
    if writer is not None and is_dataclass(obj) and not isinstance(obj, type):
        return writer()
    if is_dataclass(obj):
        return {
            f.name: to_dict(getattr(obj, f.name))
            for f in fields(obj)
            if not (f.metadata.get("omit_if_none") and getattr(obj, f.name) is None)
        }
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------------------
# overrides and files


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("null", "none"):
            return None
        return text  # a bare string such as a path or a name


def apply_overrides(data: dict[str, Any], overrides: Iterable[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config dict (returns a new dict)."""
    result = _deepcopy_dict(data)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has no key")
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = _parse_value(raw)
    return result


def _deepcopy_dict(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in data.items()}


def shipped_config_names() -> list[str]:
    """The names ``--config`` accepts without a path: the stems of ``CONFIG_DIR/*.yaml``."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(value: str | os.PathLike) -> Path:
    """An existing config file as given, else the shipped config of that bare name (``.yaml`` optional).

    Raises:
        ConfigError: for neither, listing the shipped names.
    """
    path = Path(value)
    if path.is_file():
        return path
    if path.name == str(value):  # a bare name, no folder: look among the shipped configs
        shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if shipped.is_file():
            return shipped
    raise ConfigError(f"config {str(value)!r} is neither a file nor a shipped config; give a YAML file or one of: "
                      f"{', '.join(shipped_config_names())}")


def config_arg(value: str) -> Path:
    """``argparse`` ``type=`` of every ``--config`` option: a YAML file, or a shipped config by name."""
    try:
        return resolve_config_path(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (configs live in configs/*.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty; give at least one section (model, data, train) or leave --config out for the defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    path: str | os.PathLike | None, cls: type[T], overrides: Iterable[str] | None = None
) -> T:
    """Load YAML ``path`` (or only defaults when None) into ``cls``, with overrides applied.

    Raises:
        ConfigError: naming the file for a problem in the file, or ``--set KEY=VALUE`` for a
            problem an override brought in (a bad value, a misspelt key, a key below a value).
    """
    data = read_yaml(path) if path is not None else {}
    source = f"{path}" if path is not None else "defaults"
    overrides = list(overrides or ())
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except ConfigError as combined:
        first_error = combined
    # Find who is to blame: the file alone, else the first override that breaks it.
    try:
        from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    applied: list[str] = []
    for item in overrides:
        applied.append(item)
        try:
            from_dict(cls, apply_overrides(data, applied))
        except ConfigError as exc:
            message = str(exc).removeprefix(f"override {item!r}: ")
            raise ConfigError(f"--set {item}: {message}") from None
    raise ConfigError(f"{source}: {first_error}") from None


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (next to checkpoints, so a run can be repeated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` re-exported for frozen configs."""
    return dataclasses.replace(cfg, **changes)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings consumed by :func:`mnapps.engine.loop.fit` (every task).

    ``batch_size`` and ``lr`` are for the whole batch: under ``torchrun`` each of the
    ``world_size`` processes loads ``batch_size // world_size`` images and the learning rate
    is used as given (scale it yourself when you change the total batch size).
    """

    epochs: int = 10
    batch_size: int = 16  # images per optimisation step, all processes together
    optimizer: Literal["sgd", "rmsprop", "adamw"] = "sgd"
    lr: float = 0.01  # for the whole batch (all processes together)
    momentum: float = 0.9  # sgd and rmsprop
    nesterov: bool = False  # sgd only
    adamw_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 4e-5
    # The paper (Sec. 3.2): little or no weight decay on depthwise filters; none on BN/bias.
    depthwise_weight_decay: float = 0.0
    # Decay on normalisation scales/shifts and on every bias (0 = none, the usual choice).
    norm_bias_weight_decay: float = 0.0
    # TF-style RMSprop (the paper's optimiser): decay 0.9, epsilon 1.0 inside the square root.
    rmsprop_alpha: float = 0.9
    rmsprop_eps: float = 1.0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: tuple[int, ...] = ()  # epochs at which step decay multiplies lr by step_gamma
    step_gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up length; fractions of an epoch are allowed
    warmup_factor: float = 0.001  # lr multiplier at the first iteration of the warm-up
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    grad_clip_norm: float | None = None  # max global L2 norm of the gradients; None = no clipping
    amp: bool = True  # used on CUDA only
    channels_last: bool = True
    num_workers: int = 2
    # torch intra-op threads of the training process; None keeps torch's default (one per core).
    # 1 plus a data worker is fastest for small CPU models and robust on a busy machine.
    num_threads: int | None = None
    seed: int = 0
    eval_every: int = 1  # evaluate every N epochs (and after the last); 0 = never
    log_every: int = 10  # progress-bar refresh, in iterations
    find_unused_parameters: bool = False  # DistributedDataParallel, for heads with unused branches


@dataclass(frozen=True)
class TaskConfig:
    """The sections every task's top-level config has: ``model``, ``data`` and ``train``.

    A task's schema (:class:`mnapps.tasks.detection.DetConfig`, ``ClsConfig``,
    ``FaceDistillConfig``) subclasses it, narrowing ``model`` and ``data`` to its own sections
    (``model`` always holds ``backbone``, a :class:`BackboneConfig`) and adding any others; the
    training order (:meth:`mnapps.tasks.task.Task.train`) reads a run's seed, trunk
    weights and optimisation settings through these three names.
    """

    model: Any = None
    data: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
