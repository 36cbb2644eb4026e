"""The task table's shared contract: every entry is the ``Task`` its key names, every task's config
is a ``TaskConfig`` (``model``, ``data``, ``train`` first, ``model.backbone`` in each), and every
training entry point takes the run as ``RunRequest``'s fields, by name."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from mnapps.config import BackboneConfig, TaskConfig, TrainConfig, load_config, save_config
from mnapps.tasks.classification import train_classifier
from mnapps.tasks.detection import train_detector
from mnapps.tasks.face import distill_face
from mnapps.tasks.table import TASKS
from mnapps.tasks.task import RunRequest, Task


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


def test_each_entry_is_the_task_its_key_names():
    assert sorted(TASKS) == ["classification", "detection", "face"]
    assert all(isinstance(task, Task) and task.name == name for name, task in TASKS.items())
    # Only detection fine-tunes a whole model, and evaluates checkpoints itself.
    assert [name for name, task in TASKS.items() if task.fine_tunes_whole_models] == ["detection"]
    assert [name for name, task in TASKS.items() if task.scored_by is None] == ["detection"]


@pytest.mark.parametrize("entry,whole", [(train_detector, True), (train_classifier, False), (distill_face, False)],
                         ids=["detection", "classification", "face"])
def test_the_entry_points_take_the_run_requests_fields_by_name(entry, whole):
    parameters = list(inspect.signature(entry).parameters.values())
    assert parameters[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD  # the config
    keywords = {p.name: p.default for p in parameters[1:] if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert len(keywords) == len(parameters) - 1  # no **run, no other positional
    fields = {f.name: f.default for f in dataclasses.fields(RunRequest) if whole or f.name != "weights"}
    # The same names with the same defaults (output_dir has none), and the device beside them.
    assert keywords == {**fields, "output_dir": inspect.Parameter.empty, "device": None}
