"""The detection ``model`` section: ``head`` picks which settings section may follow and its dataclass.

:class:`mnapps.tasks.detection.DetModelConfig` is an ordinary frozen dataclass; the chosen head's
settings are looked up in :data:`mnapps.heads.HEADS` when a config is read or built, so a head
registered after the task layer was imported is read like a shipped one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mnapps.config import ConfigError, from_dict, load_config, to_dict
from mnapps.graph_kind import GraphKind
from mnapps.heads import HEADS, HeadSpec
from mnapps.heads.faster_rcnn import FasterRCNNConfig
from mnapps.heads.ssd import SSDConfig
from mnapps.tasks.detection import DetConfig, DetModelConfig


def _model(*overrides: str) -> DetModelConfig:
    return load_config(None, DetConfig, list(overrides)).model


def test_the_head_decides_the_settings_class_and_missing_settings_are_its_defaults():
    assert _model().head == "ssd" and _model().head_settings == SSDConfig()
    model = _model("model.head=faster_rcnn_fpn", "model.faster_rcnn.min_size=320")
    assert model.head_settings == FasterRCNNConfig(min_size=320)
    assert DetModelConfig(head="faster_rcnn").head_settings == FasterRCNNConfig()


def test_only_the_chosen_heads_section_is_written_under_its_own_key():
    model = _model("model.ssd.size=96", "model.num_classes=3")
    written = to_dict(model)
    assert list(written) == ["head", "backbone", "ssd", "num_classes", "class_names", "category_ids"]
    assert written["ssd"]["size"] == 96 and written["num_classes"] == 3
    assert from_dict(DetModelConfig, written) == model


def test_another_heads_section_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"--set model\.faster_rcnn\.min_size=320: model\.faster_rcnn holds "
                                          r"settings of the faster_rcnn/faster_rcnn_fpn head\(s\) but model\.head "
                                          r"is 'ssd': remove the model\.faster_rcnn section or change model\.head"):
        _model("model.faster_rcnn.min_size=320")


def test_unknown_keys_and_heads_name_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key model\.sdd in DetModelConfig; did you mean model\.ssd\? "
                                          r"valid keys are: head, backbone, ssd, num_classes, class_names, category_ids"):
        _model("model.sdd.size=96")
    with pytest.raises(ConfigError, match=r"unknown key model\.head_settings in DetModelConfig"):
        _model("model.head_settings={}")  # the Python name is not a YAML key
    with pytest.raises(ConfigError, match=r"model\.head: 'yolo' is not one of \['faster_rcnn', 'faster_rcnn_fpn', "
                                          r"'ssd', 'ssdlite'\]"):
        _model("model.head=yolo")


def test_settings_of_another_head_class_are_refused_when_built_by_hand():
    with pytest.raises(ConfigError, match="model.head_settings is a SSDConfig but the faster_rcnn head takes a "
                                          "FasterRCNNConfig"):
        DetModelConfig(head="faster_rcnn", head_settings=SSDConfig())


def test_a_legacy_ssd_with_lite_settings_is_read_as_ssdlite():
    # Configs and checkpoints written before the head alone chose SSDLite said `head: ssd`, `ssd.lite: true`.
    assert _model("model.head=ssd", "model.ssd.lite=true").head == "ssdlite"
    assert _model("model.head=ssd").head == "ssd"


@dataclass(frozen=True)
class _PluginSettings:
    depth: int = 4


def test_a_head_registered_after_the_task_layer_was_imported_is_read(monkeypatch):
    # DetConfig was imported at the top of this file, before the head exists.
    monkeypatch.setitem(HEADS, "plugin", HeadSpec(lambda *a, **k: None, _PluginSettings, "plugin", "unused.yaml",
                                                  lambda settings: None, graph=GraphKind.DETECTOR))
    model = _model("model.head=plugin", "model.plugin.depth=7")
    assert model.head_settings == _PluginSettings(depth=7) and to_dict(model)["plugin"] == {"depth": 7}
    with pytest.raises(ConfigError, match=r"unknown key model\.plugin\.deep in _PluginSettings; did you mean "
                                          r"model\.plugin\.depth\?"):
        _model("model.head=plugin", "model.plugin.deep=7")
    with pytest.raises(ConfigError, match=r"model\.ssd holds settings of the ssd/ssdlite head\(s\) but model\.head "
                                          r"is 'plugin'"):
        _model("model.head=plugin", "model.ssd.size=96")
