"""Optimisers and learning-rate schedules for every mnapps task, built from a ``TrainConfig``.

This module owns the parameter-group policy (weight decay on convolution and linear weights;
none on normalisation parameters and biases; depthwise filters their own, usually zero,
decay as the MobileNet paper advises in Sec. 3.2), the three optimisers (SGD, the TF-style
RMSprop the paper trained with, AdamW) and the per-iteration schedule (linear warm-up, then
cosine, step decay or constant).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mnapps.config import TrainConfig

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "RMSpropTF",
    "build_param_groups",
    "build_optimizer",
    "build_scheduler",
    "lr_factor_fn",
    "ScheduleWarning",
]


class ScheduleWarning(UserWarning):
    """A schedule that runs but cannot be what was meant (e.g. warm-up over every epoch)."""

OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("cosine", "step", "constant")

# Modules whose parameters are normalisation scales and shifts (never decayed by default).
_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def _is_depthwise_conv(module: nn.Module) -> bool:
    """One filter per input channel: ``groups == in_channels > 1`` (any channel multiplier)."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.in_channels > 1 and (
        module.groups == module.in_channels
    )


def build_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Split the trainable parameters of ``model`` into weight-decay groups.

    Groups (empty ones are left out), each a dict with ``name``, ``params`` and
    ``weight_decay``:

    * ``"decay"``: convolution and linear weights, and anything else not listed below;
      ``cfg.weight_decay``.
    * ``"depthwise"``: weights of depthwise convolutions (``groups == in_channels > 1``);
      ``cfg.depthwise_weight_decay`` (paper Sec. 3.2: little or no decay on these).
    * ``"no_decay"``: parameters of normalisation layers and every ``bias``;
      ``cfg.norm_bias_weight_decay``.

    Only parameters with ``requires_grad`` are included, and a parameter shared by several
    modules (tied weights) is included once.
    """
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "depthwise": [], "no_decay": []}
    seen: set[int] = set()
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, _NORM_TYPES) or param_name == "bias":
                groups["no_decay"].append(param)
            elif _is_depthwise_conv(module) and param_name == "weight":
                groups["depthwise"].append(param)
            else:
                groups["decay"].append(param)
    decay = {
        "decay": cfg.weight_decay,
        "depthwise": cfg.depthwise_weight_decay,
        "no_decay": cfg.norm_bias_weight_decay,
    }
    result = [
        {"name": name, "params": params, "weight_decay": decay[name]}
        for name, params in groups.items()
        if params
    ]
    if not result:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (every requires_grad is False); "
            f"unfreeze some layers (e.g. backbone.trainable_stages) before training"
        )
    return result


class RMSpropTF(torch.optim.Optimizer):
    """RMSprop with TensorFlow 1 semantics, the optimiser the MobileNet paper trained with.

    Differences from :class:`torch.optim.RMSprop`, which change the early steps a lot when
    ``eps`` is as large as the TF recipe's 1.0:

    * the mean square starts at 1 (TF's ``rms`` slot is initialised with ones), not 0;
    * ``eps`` is added inside the square root;
    * the learning rate is applied before the momentum accumulation.

    Per parameter ``p`` with gradient ``g`` (L2 weight decay ``wd`` added to ``g``)::

        ms  = alpha * ms + (1 - alpha) * g**2
        mom = momentum * mom + lr * g / sqrt(ms + eps)
        p   = p - mom

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        alpha: decay of the running mean square (TF's ``decay``, 0.9).
        eps: added to the mean square inside the square root (TF recipe: 1.0).
        momentum: momentum of the update (TF recipe: 0.9).
        weight_decay: L2 coefficient added to the gradient, as TF's regulariser loss does.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.01,
        alpha: float = 0.9,
        eps: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"RMSpropTF: lr must be > 0, got {lr}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"RMSpropTF: alpha must be in [0, 1), got {alpha}")
        if eps < 0:
            raise ValueError(f"RMSpropTF: eps must be >= 0, got {eps}")
        if momentum < 0:
            raise ValueError(f"RMSpropTF: momentum must be >= 0, got {momentum}")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    raise ValueError("RMSpropTF does not support sparse gradients")
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["square_avg"] = torch.ones_like(param, memory_format=torch.preserve_format)
                    if group["momentum"] > 0:
                        state["momentum_buffer"] = torch.zeros_like(
                            param, memory_format=torch.preserve_format
                        )
                state["step"] += 1
                square_avg = state["square_avg"]
                square_avg.mul_(group["alpha"]).addcmul_(grad, grad, value=1.0 - group["alpha"])
                denom = square_avg.add(group["eps"]).sqrt_()
                if group["momentum"] > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).addcdiv_(grad, denom, value=group["lr"])
                    param.sub_(buf)
                else:
                    param.addcdiv_(grad, denom, value=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer`` over :func:`build_param_groups` of ``model``.

    * ``sgd``: momentum ``cfg.momentum``, Nesterov if ``cfg.nesterov``.
    * ``rmsprop``: :class:`RMSpropTF` with ``cfg.rmsprop_alpha`` (0.9), ``cfg.rmsprop_eps``
      (1.0) and ``cfg.momentum`` (0.9), as the paper's TensorFlow training.
    * ``adamw``: decoupled weight decay, betas ``cfg.adamw_betas``.

    ``cfg.lr`` is the learning rate for the whole batch (see :class:`TrainConfig`); each
    group carries a ``name`` key (``decay``, ``depthwise``, ``no_decay``).
    """
    if cfg.lr <= 0:
        raise ValueError(f"train.lr must be > 0, got {cfg.lr}")
    for field_name in ("weight_decay", "depthwise_weight_decay", "norm_bias_weight_decay"):
        if getattr(cfg, field_name) < 0:
            raise ValueError(f"train.{field_name} must be >= 0, got {getattr(cfg, field_name)}")
    groups = build_param_groups(model, cfg)
    name = cfg.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if name == "rmsprop":
        return RMSpropTF(
            groups, lr=cfg.lr, alpha=cfg.rmsprop_alpha, eps=cfg.rmsprop_eps, momentum=cfg.momentum
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adamw_betas))
    raise ValueError(f"unknown train.optimizer {cfg.optimizer!r}; choose from {list(OPTIMIZERS)}")


def lr_factor_fn(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate multiplier as a function of the 0-based iteration.

    With ``W = round(cfg.warmup_epochs * steps_per_epoch)`` warm-up iterations and
    ``T = cfg.epochs * steps_per_epoch`` iterations in all:

    * warm-up, ``i < W``: linear from ``cfg.warmup_factor`` at ``i = 0`` towards 1 at ``i = W``
      (it multiplies the step schedule; the cosine only starts after it);
    * ``cosine``: ``r + (1 - r) * (1 + cos(pi * (i - W) / (T - W))) / 2`` with
      ``r = cfg.min_lr_ratio``, so 1 at ``i = W`` and half-way to ``r`` at the midpoint;
    * ``step``: ``cfg.step_gamma ** k`` where ``k`` counts the milestones (in epochs) already
      reached, i.e. ``i >= milestone * steps_per_epoch``;
    * ``constant``: 1.
    """
    schedule = cfg.schedule.lower()
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown train.schedule {cfg.schedule!r}; choose from {list(SCHEDULES)}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch} (is the train loader empty?)")
    if cfg.epochs < 1:
        raise ValueError(f"train.epochs must be >= 1, got {cfg.epochs}")
    if not 0.0 < cfg.warmup_factor <= 1.0:
        raise ValueError(f"train.warmup_factor must be in (0, 1], got {cfg.warmup_factor}")
    if cfg.warmup_epochs < 0:
        raise ValueError(f"train.warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if schedule == "step" and not cfg.step_milestones:
        raise ValueError("train.schedule 'step' needs train.step_milestones (epochs), e.g. [8, 11]")
    if list(cfg.step_milestones) != sorted(cfg.step_milestones) or any(
        m < 0 for m in cfg.step_milestones
    ):
        raise ValueError(f"train.step_milestones must be increasing epochs >= 0, got {cfg.step_milestones}")

    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)
    if warmup >= total and cfg.warmup_epochs > 0:
        warnings.warn(
            f"train.warmup_epochs={cfg.warmup_epochs:g} covers all {cfg.epochs} epoch(s) ({total} steps): the "
            f"learning rate never reaches train.lr={cfg.lr:g}" + (", and the cosine decay never starts"
            if schedule == "cosine" else "") + "; lower train.warmup_epochs or raise train.epochs",
            ScheduleWarning, stacklevel=2,
        )  # fmt: skip
    milestone_iters = [int(m) * steps_per_epoch for m in cfg.step_milestones]
    warmup_factor, min_ratio, gamma = cfg.warmup_factor, cfg.min_lr_ratio, cfg.step_gamma

    def factor(iteration: int) -> float:
        warm = 1.0
        if iteration < warmup:
            warm = warmup_factor + (1.0 - warmup_factor) * iteration / warmup
        if schedule == "cosine":
            if iteration < warmup:
                return warm
            progress = (iteration - warmup) / max(1, total - warmup)
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "step":
            reached = sum(1 for m in milestone_iters if iteration >= m)
            return warm * gamma**reached
        return warm

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """A :class:`LambdaLR` stepped once per iteration with :func:`lr_factor_fn`'s multiplier.

    Call ``scheduler.step()`` after every optimiser step; the lr used at 0-based iteration
    ``i`` is ``cfg.lr * lr_factor_fn(cfg, steps_per_epoch)(i)``.
    """
    return LambdaLR(optimizer, lr_factor_fn(cfg, steps_per_epoch))
