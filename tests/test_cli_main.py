"""The one `mnapps` command: its verbs cover every tool, and --help answers without torch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnapps.cli import choices
from mnapps.cli.main import VERBS, main

ROOT = Path(__file__).resolve().parents[1]
NOT_TOOLS = {"__init__", "main", "choices", "weight_importers"}


def test_every_tool_is_a_verb_and_an_entry_point():
    modules = {p.stem for p in (ROOT / "mnapps" / "cli").glob("*.py")} - NOT_TOOLS
    assert {module for module, _ in VERBS.values()} == modules
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'mnapps = "mnapps.cli.main:main"' in pyproject
    for verb, (module, _) in VERBS.items():
        assert f'mnapps-{verb} = "mnapps.cli.{module}:main"' in pyproject
        assert (ROOT / "tools" / f"{module}.py").is_file()


def test_help_lists_the_verbs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {verb} " in out for verb in VERBS)


def test_an_unknown_verb_is_one_line_with_a_suggestion(capsys):
    assert main(["train-dte"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'train-dte'" in err and "train-det" in err


def test_the_verb_usage_line_names_mnapps(capsys):
    with pytest.raises(SystemExit):
        main(["eval-det", "--help"])
    assert capsys.readouterr().out.startswith("usage: mnapps eval-det")


def test_help_of_every_verb_imports_no_torch():
    # bench-data is a developer benchmark whose defaults come from torch (its thread count).
    verbs = [verb for verb in VERBS if verb != "bench-data"]
    code = (
        "import sys\n"
        "from mnapps.cli.main import main\n"
        f"for verb in {verbs!r}:\n"
        "    try:\n"
        "        main([verb, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'pycocotools', 'albumentations', 'facenet_pytorch') "
        "if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr, result.stderr


def test_train_det_help_is_quick():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from mnapps.cli.main import main; main(['train-det', '--help'])"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    elapsed = time.perf_counter() - started
    assert "usage: mnapps train-det" in result.stdout
    # Python's own start-up is most of it; torch alone takes several seconds to import.
    assert elapsed < 3.0, f"mnapps train-det --help took {elapsed:.1f} s"


@pytest.mark.parametrize("names, table", [
    (choices.HEAD_NAMES, "mnapps.heads:HEADS"),
    (choices.PRETRAINED_TEACHER_NAMES, "mnapps.tasks.face.distill.teacher:PRETRAINED_TEACHERS"),
    (choices.CROP_GEOMETRY_NAMES, "mnapps.data.box_crops:CROP_GEOMETRIES"),
    (choices.THRESHOLD_RULE_NAMES, "mnapps.export.det_compare:THRESHOLD_RULES"),
])  # fmt: skip
def test_the_light_choice_lists_equal_their_tables(names, table):
    module, name = table.split(":")
    real = getattr(__import__(module, fromlist=[name]), name)
    assert sorted(names) == sorted(real)


@pytest.mark.parametrize("value, constant", [
    (choices.DEFAULT_MIN_FACE_SCORE, "mnapps.tasks.face.data.face_check:DEFAULT_MIN_FACE_SCORE"),
    (choices.SAME_PERSON_DISTANCE, "mnapps.tasks.face.data.persons:SAME_PERSON_DISTANCE"),
])  # fmt: skip
def test_the_light_defaults_equal_the_library_constants(value, constant):
    module, name = constant.split(":")
    assert value == getattr(__import__(module, fromlist=[name]), name)
