"""Config loading: unknown keys, overrides, type errors, round trip, the shipped cls configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnapps.tasks.classification import ClsConfig
from mnapps.config import (
    CONFIG_DIR,
    BackboneConfig,
    ConfigError,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    resolve_config_path,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    path = _write(tmp_path, "model:\n  backbone:\n    widht_mult: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ClsConfig)
    message = str(info.value)
    assert "model.backbone.widht_mult" in message
    assert "width_mult" in message and "trainable_stages" in message  # the valid keys are listed
    assert str(path) in message


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key optim .*valid keys are: model, data, train"):
        load_config(_write(tmp_path, "optim: {lr: 1}\n"), ClsConfig)


def test_overrides_apply_and_parse_values(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.1\n  epochs: 3\n")
    cfg = load_config(
        path,
        ClsConfig,
        [
            "train.lr=0.05",
            "model.backbone.width_mult=0.25",
            "data.train_dir=/data/my images/train",  # a bare string stays a string
            "train.step_milestones=[3, 5]",
            "model.num_classes=null",
            "data.hflip=false",
        ],
    )
    assert cfg.train.lr == 0.05 and cfg.train.epochs == 3
    assert cfg.model.backbone.width_mult == 0.25
    assert cfg.data.train_dir == "/data/my images/train"
    assert cfg.train.step_milestones == (3, 5)
    assert cfg.model.num_classes is None
    assert cfg.data.hflip is False


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert from_dict(TrainConfig, {"lr": 1}).lr == 1.0
    with pytest.raises(ConfigError, match="epochs: expected an integer, got 2.5"):
        from_dict(TrainConfig, {"epochs": 2.5})


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.epochs=ten", "train.epochs: expected an integer, got 'ten'"),
        ("model.backbone.width_mult=true", "model.backbone.width_mult: expected a number, got True"),
        ("data.hflip=3", "data.hflip: expected true/false, got 3"),
        ("train.step_milestones=5", "train.step_milestones: expected a list, got 5"),
    ],
)
def test_type_errors_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, ClsConfig, [override])
    assert fragment in str(info.value)


def test_bad_override_syntax_and_sections():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="'lr' is not a section"):
        apply_overrides({"train": {"lr": 0.1}}, ["train.lr.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", ClsConfig)
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(_write(tmp_path, "- a\n- b\n"), ClsConfig)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "train: {lr: [\n"), ClsConfig)


def test_a_checkout_finds_its_shipped_configs_at_the_top_level():
    # No mnapps/configs in a checkout: the build copies configs/ there only inside the wheel.
    assert CONFIG_DIR == ROOT / "configs"


def test_config_by_file_or_by_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nowhere near configs/: a name must not depend on the working folder
    shipped = ROOT / "configs" / "ssd_mnv1_a050_r192_shapes.yaml"
    assert resolve_config_path("ssd_mnv1_a050_r192_shapes") == shipped
    assert resolve_config_path("ssd_mnv1_a050_r192_shapes.yaml") == shipped
    own = _write(tmp_path, "train:\n  lr: 0.1\n")
    assert resolve_config_path(own) == own
    # A file of the working folder wins over a shipped config of the same name.
    (tmp_path / "cls_mnv1_a050_r64_shapes.yaml").write_text("train:\n  lr: 0.2\n")
    assert resolve_config_path("cls_mnv1_a050_r64_shapes.yaml") == Path("cls_mnv1_a050_r64_shapes.yaml")


@pytest.mark.parametrize("value", ["ssd_mnv1_a050_r192_shape", "elsewhere/ssd_mnv1_a050_r192_shapes.yaml"])
def test_an_unknown_config_lists_the_shipped_names(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        resolve_config_path(value)
    message = str(info.value)
    assert repr(value) in message
    shipped = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert len(shipped) > 10 and all(name in message for name in shipped)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ClsConfig, ["model.backbone.width_mult=0.75", "model.class_names=['a', 'b']", "train.step_milestones=[2]"])
    path = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(path, ClsConfig) == cfg


def test_every_task_nests_the_backbone_the_same_way():
    from mnapps.tasks.detection import DetConfig
    from mnapps.tasks.face import FaceDistillConfig

    for cls in (ClsConfig, DetConfig, FaceDistillConfig):
        cfg = load_config(None, cls, ["model.backbone.width_mult=0.75", "model.backbone.trainable_stages=3"])
        assert isinstance(cfg.model.backbone, BackboneConfig)
        assert (cfg.model.backbone.width_mult, cfg.model.backbone.trainable_stages) == (0.75, 3)


def test_an_empty_config_file_is_an_error_not_the_defaults(tmp_path):
    with pytest.raises(ConfigError, match="is empty"):
        load_config(_write(tmp_path, "# only a comment\n"), ClsConfig)


@pytest.mark.parametrize("name", ["cls_mnv1_a050_r64_shapes.yaml", "cls_mnv1_a100_r224_imagenet.yaml"])
def test_shipped_classification_configs_load(name):
    cfg = load_config(ROOT / "configs" / name, ClsConfig)
    assert cfg.train.epochs >= 1 and cfg.model.backbone.width_mult > 0


def test_imagenet_config_is_the_paper_recipe():
    cfg = load_config(ROOT / "configs" / "cls_mnv1_a100_r224_imagenet.yaml", ClsConfig)
    assert cfg.train.optimizer == "rmsprop"  # paper Sec. 3.2: RMSprop, asynchronous gradient descent
    assert cfg.train.depthwise_weight_decay < cfg.train.weight_decay  # little or no decay on depthwise filters
    assert cfg.model.backbone.width_mult == 1.0 and cfg.model.resolution == 224


# ------------------------------------------------------------------------------------------
# who is to blame, YAML 1.1 numbers, non-finite values


@pytest.mark.parametrize(
    "text, overrides, blamed, expected",
    [
        # train: 5 is the file's mistake, even when an option also sets train.epochs.
        ("train: 5\n", ["train.epochs=1"], "file", "train must be a section"),
        ("train:\n  lr: .nan\n", [], "file", "train.lr: expected a finite number, got nan"),
        ("train:\n  lr: .inf\n", [], "file", "train.lr: expected a finite number, got inf"),
        ("train:\n  lr: 0.1\n", ["train.lr=abc"], "--set train.lr=abc", "train.lr: expected a number, got 'abc'"),
        ("train:\n  lr: 0.1\n", ["train.lr=nan"], "--set train.lr=nan", "expected a number"),
        ("train:\n  lr: 0.1\n", ["train.epochs=2", "train.lrr=0.1"], "--set train.lrr=0.1",
         "unknown key train.lrr in TrainConfig; did you mean train.lr?"),
        ("model:\n  backbone:\n    widht_mult: 0.5\n", [], "file", "did you mean model.backbone.width_mult?"),
        ("train:\n  lr: 0.1\n", ["train=5", "train.epochs=1"], "--set train=5", "train must be a section"),
    ],
)
def test_errors_blame_the_file_or_the_set_item(tmp_path, text, overrides, blamed, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, ClsConfig, overrides)
    message = str(info.value)
    assert message.startswith(f"{path}: " if blamed == "file" else f"{blamed}: "), message
    assert expected in message, message
    if blamed != "file":
        assert str(path) not in message  # the file is fine: do not send the user there


@pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("5E+2", 500.0), ("-2.5e-4", -0.00025), ("3", 3.0)])
def test_yaml_1_1_exponent_numbers_are_numbers(tmp_path, text, value):
    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3'; what the user wrote is a number.
    assert load_config(_write(tmp_path, f"train:\n  lr: {text}\n"), ClsConfig).train.lr == value


def test_strings_that_are_not_numbers_stay_errors(tmp_path):
    for text in ("fast", "1e", "e5", "'1,5'"):
        with pytest.raises(ConfigError, match="train.lr: expected a number"):
            load_config(_write(tmp_path, f"train:\n  lr: {text}\n"), ClsConfig)
