"""The task table's shared contract: every task's config is a ``TaskConfig`` (``model``, ``data``,
``train`` first, ``model.backbone`` in each), and every training entry point takes the run as
``RunRequest``'s fields, refusing a misspelt one by name before any work."""

from __future__ import annotations

import dataclasses

import pytest

from mnapps.config import BackboneConfig, TaskConfig, TrainConfig, load_config, save_config
from mnapps.tasks.table import TASKS


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_config_has_the_common_sections(task, tmp_path):
    cls = TASKS[task].config_cls
    assert issubclass(cls, TaskConfig)
    assert [f.name for f in dataclasses.fields(cls)][:3] == ["model", "data", "train"]
    cfg = cls()
    assert isinstance(cfg.model.backbone, BackboneConfig) and isinstance(cfg.train, TrainConfig)
    assert dataclasses.is_dataclass(cfg.data)
    # What a run saves loads back to the same config.
    assert load_config(save_config(cfg, tmp_path / "config.yaml"), cls) == cfg


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_misspelt_run_keyword_is_refused_by_name(task, tmp_path):
    spec = TASKS[task]
    with pytest.raises(TypeError, match="outptu_dir"):
        spec.train(spec.config_cls(), outptu_dir=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()
