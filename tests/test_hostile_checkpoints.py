"""Hostile and foreign .pt files: nothing in them runs, and every refusal is one plain line.

A pickle can name any importable callable and have the unpickler call it. The files built here
call ``pathlib.Path.touch`` on a canary path when unpickled with ``weights_only=False``; the
tests check first that they really do (so a test cannot pass because the file is harmless),
then that every mnapps path that reads a checkpoint refuses them and the canary never appears.
"""

from __future__ import annotations

import importlib
import pathlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mnapps.checkpoint import load_checkpoint, safe_load, save_checkpoint
from mnapps.config import TrainConfig
from mnapps.engine.loop import RunOptions, TaskHooks, fit

PYTORCH_ADVICE = ("weights_only=False", "trust", "add_safe_globals", "safe_globals")


class _TouchOnLoad:
    """Unpickling this calls ``pathlib.Path(target).touch()``: code run by merely loading a file."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.target),)


def _hostile_checkpoint(path: pathlib.Path, canary: pathlib.Path) -> pathlib.Path:
    """A file shaped like an mnapps checkpoint whose unpickling creates ``canary``."""
    payload = {"format": "mnapps-checkpoint", "version": 1, "task": "detection", "head": "ssd", "config": {},
               "model": {"w": torch.zeros(1)}, "epoch": 1, "hook": _TouchOnLoad(canary)}  # fmt: skip
    torch.save(payload, path)
    return path


def _assert_plain_refusal(message: str, path: pathlib.Path) -> None:
    assert "\n" not in message.strip() and str(path) in message
    assert "weights_only loading refuses" in message and "can run code" in message
    assert not any(advice in message for advice in PYTORCH_ADVICE), message


def test_the_crafted_file_does_run_code_when_loaded_unsafely(tmp_path):
    canary = tmp_path / "proof"
    path = _hostile_checkpoint(tmp_path / "evil.pt", canary)
    torch.load(path, weights_only=False)
    assert canary.exists()  # the test files below are really hostile


def test_load_checkpoint_refuses_and_runs_nothing(tmp_path):
    canary = tmp_path / "canary"
    path = _hostile_checkpoint(tmp_path / "evil.pt", canary)
    with pytest.raises(ValueError) as caught:
        load_checkpoint(path)
    _assert_plain_refusal(str(caught.value), path)
    assert "pathlib" in str(caught.value)  # names what the file wanted to import
    assert not canary.exists()


def test_resume_from_a_hostile_checkpoint_runs_nothing(tmp_path):
    canary = tmp_path / "canary"
    path = _hostile_checkpoint(tmp_path / "evil.pt", canary)
    model = torch.nn.Linear(2, 1)
    cfg = TrainConfig(epochs=1, batch_size=2, num_workers=0, channels_last=False)
    with pytest.raises(ValueError) as caught:
        fit(model, [torch.zeros(2, 2)], cfg, TaskHooks(lambda m, b, d: {"loss": m(b).sum()}),
            RunOptions(tmp_path / "run", resume=path))  # fmt: skip
    _assert_plain_refusal(str(caught.value), path)
    assert not canary.exists() and not (tmp_path / "run" / "last.pt").exists()


def test_a_legacy_format_pickle_is_refused(tmp_path):
    # Not a zip archive: a bare pickle, which torch.load reads as its legacy format.
    canary = tmp_path / "canary"
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(_TouchOnLoad(canary), protocol=2))
    with pytest.raises(ValueError) as caught:
        load_checkpoint(path)
    _assert_plain_refusal(str(caught.value), path)
    assert not canary.exists()
    pickle.loads(path.read_bytes())
    assert canary.exists()  # it was hostile


def test_numpy_pickles_are_refused_too(tmp_path):
    # What checkpoints held before RNG states became tensors: a pickled numpy array needs
    # numpy's reconstruct functions, which weights_only loading does not allow.
    path = tmp_path / "old.pt"
    torch.save({"format": "mnapps-checkpoint", "model": {}, "rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(ValueError) as caught:
        load_checkpoint(path)
    _assert_plain_refusal(str(caught.value), path)
    assert "numpy" in str(caught.value)


def test_damaged_and_foreign_files_get_one_line(tmp_path):
    saved = save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(saved.read_bytes()[:200])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch")
    for path, expected in ((truncated, "could not be read"), (garbage, "could not be read"), (onnx, "ONNX model")):
        with pytest.raises(ValueError, match=expected) as caught:
            load_checkpoint(path)
        message = str(caught.value)
        assert "\n" not in message and str(path) in message
        assert not any(advice in message for advice in PYTORCH_ADVICE), message


def test_save_refuses_what_it_could_not_load_back(tmp_path):
    target = tmp_path / "c.pt"
    with pytest.raises(TypeError, match=r"checkpoint\['metrics'\]\['classes'\] holds a builtins.set"):
        save_checkpoint({"model": {}, "metrics": {"classes": {1, 2}}}, target)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left
    # numpy values are turned into what weights_only can read: Python numbers and tensors.
    save_checkpoint({"model": {}, "metrics": {"AP": np.float64(0.5), "per_image": np.arange(3)}}, target)
    loaded = torch.load(target, weights_only=True)
    assert type(loaded["metrics"]["AP"]) is float and loaded["metrics"]["AP"] == 0.5
    assert torch.equal(loaded["metrics"]["per_image"], torch.arange(3))
    assert safe_load(target)["metrics"]["AP"] == 0.5


def _tool_cases(tmp_path: pathlib.Path, evil: pathlib.Path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(images / "a.png")
    out = tmp_path / "out"
    return [
        ("eval_det", ["--checkpoint", str(evil), "--out-dir", str(out)]),
        ("infer_det", ["--checkpoint", str(evil), "--out", str(out), str(images)]),
        ("classify", ["--checkpoint", str(evil), str(images / "a.png")]),
        ("export", ["--checkpoint", str(evil), "--out", str(out / "m.onnx")]),
        ("embed_faces", ["--checkpoint", str(evil), "--out", str(out / "e.npz"), str(images)]),
        ("embed_faces", ["--teacher-weights", str(evil), "--out", str(out / "e.npz"), str(images)]),
    ]


@pytest.mark.parametrize("case", range(6))
def test_tools_refuse_a_hostile_checkpoint(tmp_path, capsys, case):
    canary = tmp_path / "canary"
    evil = _hostile_checkpoint(tmp_path / "evil.pt", canary)
    tool, argv = _tool_cases(tmp_path, evil)[case]
    main = importlib.import_module(f"mnapps.cli.{tool}").main
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert not canary.exists(), f"{tool} ran code from {evil}"
    assert code == 2, (tool, code, err)
    _assert_plain_refusal(err.splitlines()[-1], evil)
    assert "Traceback" not in err
