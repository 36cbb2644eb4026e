"""Parameter groups, the TF-style RMSprop and the lr schedule, against hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mnapps.backbones.mobilenet_v1 import MobileNetV1
from mnapps.config import TrainConfig, replace
from mnapps.engine.optim import RMSpropTF, build_optimizer, build_param_groups, build_scheduler


def _group_sizes(groups) -> dict[str, int]:
    return {g["name"]: sum(p.numel() for p in g["params"]) for g in groups}


def _small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),  # 216 decayed
        nn.BatchNorm2d(8),  # 16 not decayed
        nn.Conv2d(8, 8, 3, groups=8, bias=False),  # depthwise: 72
        nn.BatchNorm2d(8),  # 16
        nn.Conv2d(8, 16, 1),  # weight 128 decayed, bias 16 not
        nn.Flatten(),
        nn.Linear(16, 4),  # weight 64 decayed, bias 4 not
    )


def test_param_groups_counted_by_hand():
    cfg = TrainConfig(weight_decay=1e-4, depthwise_weight_decay=1e-5)
    groups = build_param_groups(_small_net(), cfg)
    assert _group_sizes(groups) == {"decay": 216 + 128 + 64, "depthwise": 72, "no_decay": 16 + 16 + 16 + 4}
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay == {"decay": 1e-4, "depthwise": 1e-5, "no_decay": 0.0}


def test_frozen_and_shared_parameters():
    net = _small_net()
    net[0].weight.requires_grad_(False)  # frozen stem: left out entirely
    tied = nn.Linear(16, 4)
    tied.weight = net[6].weight  # the same Parameter in two modules counts once
    model = nn.ModuleDict({"net": net, "tied": tied})
    groups = build_param_groups(model, TrainConfig())
    sizes = _group_sizes(groups)
    assert sizes["decay"] == 128 + 64
    assert sizes["no_decay"] == 16 + 16 + 16 + 4 + 4  # the tied module's own bias is separate
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))


def test_mobilenet_v1_quarter_width_groups_match_table_1():
    # Paper Table 1: (in, out) channels of the 13 depthwise-separable blocks at width 1.0.
    blocks = [(32, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512)]
    blocks += [(512, 512)] * 5 + [(512, 1024), (1024, 1024)]
    blocks = [(cin // 4, cout // 4) for cin, cout in blocks]  # width 0.25, all multiples of 8
    stem = 3 * 3 * 3 * 8
    pointwise = sum(cin * cout for cin, cout in blocks)
    depthwise = sum(cin * 9 for cin, _ in blocks)
    bn = 2 * (8 + sum(cin + cout for cin, cout in blocks))  # gamma and beta of every BN
    model = MobileNetV1(width_mult=0.25, num_classes=0)
    sizes = _group_sizes(build_param_groups(model, TrainConfig()))
    assert sizes == {"decay": stem + pointwise, "depthwise": depthwise, "no_decay": bn}
    assert depthwise == 11160  # 1240 input channels x 9 taps


def test_no_trainable_parameters_is_an_error():
    net = _small_net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(net, TrainConfig())


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("rmsprop", RMSpropTF), ("adamw", torch.optim.AdamW)])
def test_build_optimizer_kinds(name, cls):
    optimizer = build_optimizer(_small_net(), TrainConfig(optimizer=name, lr=0.5))
    assert isinstance(optimizer, cls)
    assert all(g["lr"] == 0.5 for g in optimizer.param_groups)


def test_unknown_optimizer_lists_choices():
    with pytest.raises(ValueError, match=r"unknown train.optimizer 'lamb'.*sgd.*rmsprop.*adamw"):
        build_optimizer(_small_net(), TrainConfig(optimizer="lamb"))


def test_rmsprop_tf_two_steps_by_hand():
    # loss = 2p: gradient 2. TF RMSprop: ms starts at 1, eps inside the sqrt, lr inside momentum.
    param = nn.Parameter(torch.tensor([1.0]))
    optimizer = RMSpropTF([param], lr=0.1, alpha=0.9, eps=1.0, momentum=0.9)
    ms1 = 0.9 * 1.0 + 0.1 * 4.0  # 1.3
    mom1 = 0.1 * 2.0 / math.sqrt(ms1 + 1.0)
    ms2 = 0.9 * ms1 + 0.1 * 4.0  # 1.57
    mom2 = 0.9 * mom1 + 0.1 * 2.0 / math.sqrt(ms2 + 1.0)
    expected = [1.0 - mom1, 1.0 - mom1 - mom2]
    for value in expected:
        optimizer.zero_grad()
        (2 * param).sum().backward()
        optimizer.step()
        assert param.item() == pytest.approx(value, rel=1e-6)
    assert expected[1] == pytest.approx(0.624679, abs=1e-6)


def _lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine_hand_values():
    cfg = TrainConfig(lr=1.0, epochs=5, warmup_epochs=1, warmup_factor=0.1, schedule="cosine", min_lr_ratio=0.1)
    lrs = _lrs(cfg, steps_per_epoch=10)  # 50 iterations, 10 of warm-up, cosine over 40
    assert lrs[0] == pytest.approx(0.1)  # warm-up start
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 5 / 10)  # 0.55, half-way up
    assert lrs[10] == pytest.approx(1.0)  # warm-up end = cosine start
    assert lrs[30] == pytest.approx(0.55)  # cosine midpoint: half-way between 1 and 0.1
    assert lrs[49] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warm-up


def test_step_schedule_hand_values():
    cfg = TrainConfig(
        lr=0.2, epochs=6, schedule="step", step_milestones=(2, 4), step_gamma=0.1, warmup_epochs=0.5,
        warmup_factor=0.5,
    )
    lrs = _lrs(cfg, steps_per_epoch=4)  # warm-up 2 iterations; milestones at iterations 8 and 16
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.15)
    assert lrs[2] == pytest.approx(0.2) and lrs[7] == pytest.approx(0.2)
    assert lrs[8] == pytest.approx(0.02) and lrs[15] == pytest.approx(0.02)
    assert lrs[16] == pytest.approx(0.002) and lrs[23] == pytest.approx(0.002)


def test_constant_schedule():
    assert set(_lrs(TrainConfig(lr=0.3, epochs=2, schedule="constant"), 3)) == {0.3}


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"schedule": "poly"}, "unknown train.schedule 'poly'"),
        ({"schedule": "step"}, "needs train.step_milestones"),
        ({"warmup_factor": 0.0}, "warmup_factor must be in"),
        ({"step_milestones": (5, 3), "schedule": "step"}, "must be increasing"),
    ],
)
def test_schedule_config_errors(changes, message):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        build_scheduler(optimizer, replace(TrainConfig(), **changes), steps_per_epoch=10)
