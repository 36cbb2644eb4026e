"""The one `mnapps` command: its verbs cover every tool, and --help answers without torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnapps import choices
from mnapps.cli.main import VERBS, main

ROOT = Path(__file__).resolve().parents[1]
NOT_TOOLS = {"__init__", "main", "weight_importers"}


def test_one_door_per_verb_the_mnapps_command_and_its_script():
    modules = {p.stem for p in (ROOT / "mnapps" / "cli").glob("*.py")} - NOT_TOOLS
    assert {module for module, _ in VERBS.values()} == modules
    pyproject = (ROOT / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    assert scripts.splitlines() == ['mnapps = "mnapps.cli.main:main"']
    for module, _ in VERBS.values():
        assert (ROOT / "tools" / f"{module}.py").is_file()


def test_no_text_names_a_command_of_its_own_per_verb():
    texts = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "mnapps" / "cli").glob("*.py")), *sorted((ROOT / "tools").rglob("*.py")),
             *sorted((ROOT / "tests").glob("*.py"))]  # fmt: skip
    verbs = "|".join(re.escape(verb) for verb in VERBS) + "|benchmark|bench-data|face-pipeline-bench|model-stats"
    command = re.compile(rf"\bmnapps-({verbs})\b")
    found = [f"{path.relative_to(ROOT)}: {match.group(0)}" for path in texts
             for match in command.finditer(path.read_text())]
    assert not found


def test_version(capsys):
    assert main(["--version"]) == 0
    version = capsys.readouterr().out.strip()
    assert re.fullmatch(r"mnapps \d+\.\d+\.\d+", version)
    # The number pip records comes from the same place (pyproject.toml reads mnapps.__version__).
    assert 'version = { attr = "mnapps.__version__" }' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize("argv", [["--help"], ["weights", "list"]])
def test_a_reader_that_stops_early_gets_no_traceback(argv):
    # The pipe's reading end is closed before mnapps starts, as after `mnapps --help | head -0`.
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-c", f"import sys; from mnapps.cli.main import main; "
                                 f"sys.exit(main({argv!r}))"], stdout=write, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT, timeout=60)  # fmt: skip
    finally:
        os.close(write)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr


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
    verbs = list(VERBS)
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


def test_the_choices_module_imports_only_the_standard_library():
    code = ("import sys, mnapps.choices\n"
            "print(sorted(m for m in ('torch', 'numpy', 'yaml', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_library_tables_are_keyed_by_the_choices():
    from mnapps.data.box_crops import CROP_GEOMETRIES, MTCNN_LIKE, SQUARE
    from mnapps.heads import HEADS
    from mnapps.heads.faster_rcnn import build_faster_rcnn_fpn
    from mnapps.heads.ssd import build_ssdlite

    assert tuple(HEADS) == choices.HEAD_NAMES == ("ssd", "ssdlite", "faster_rcnn", "faster_rcnn_fpn")
    assert HEADS["ssdlite"].build is build_ssdlite and HEADS["faster_rcnn_fpn"].build is build_faster_rcnn_fpn
    for head in choices.SHIPPED_HEADS:
        assert HEADS[head.name].default_config == head.default_config
        assert (ROOT / "configs" / head.default_config).is_file()
    assert CROP_GEOMETRIES == {"mtcnn": MTCNN_LIKE, "square": SQUARE}


@pytest.mark.parametrize("rule", choices.THRESHOLD_RULE_NAMES)
def test_every_threshold_rule_choice_is_one_the_library_runs(rule):
    from mnapps.export.det_compare import threshold_for_recall

    # Ten found faces scoring 0.1 .. 1.0, target 0.5: conformal m = floor(11 * 0.5) = 5, the 5th
    # lowest score 0.5; val-recall keeps ceil(0.5 * 10) = 5 faces, the 5th highest score 0.6.
    threshold, reached = threshold_for_recall([i / 10 for i in range(1, 11)], 10, 0.5, rule)
    assert reached and threshold == pytest.approx({"conformal": 0.5, "val-recall": 0.6}[rule])
    with pytest.raises(ValueError, match="unknown threshold rule 'majority'"):
        threshold_for_recall([0.5], 1, 0.5, "majority")
