"""A wheel that runs: built from this checkout, installed where the checkout cannot be seen.

The wheel is built offline with the environment's own setuptools, installed without its
dependencies into a fresh virtual environment in a temporary folder, which then borrows this
environment's installed packages (torch, ...) through a ``.pth`` line. From a temporary working
folder, ``mnapps train-det`` must then find its default config, and a config given by name,
inside the installed package, and train one epoch on a tiny generated dataset.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from mnapps.data.synthetic_det import ensure_shapes_detection

ROOT = Path(__file__).resolve().parents[1]
# What the build reads: the project files and the two folders that become the package.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "mnapps", "configs")


def _build_wheel(tmp_path: Path) -> Path:
    # Built from a copy, so the checkout gets no build/ or *.egg-info of the test's making.
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--wheel-dir", str(wheels), str(source)], check=True, timeout=300)  # fmt: skip
    (wheel,) = wheels.glob("mnapps-*.whl")
    return wheel


def _venv_with_wheel(tmp_path: Path, wheel: Path) -> Path:
    """A fresh environment holding the wheel; it sees this environment's packages, not the checkout."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # Installed first, while the environment sees nothing else: pip has no other mnapps to replace.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, timeout=300)  # fmt: skip
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # Appended after the environment's own site-packages, so its mnapps comes first.
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "borrowed_packages.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    return env_dir / "bin"


@pytest.mark.slow
def test_the_wheel_trains_from_its_shipped_configs_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    bin_dir = _venv_with_wheel(tmp_path, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["MNAPPS_CACHE"] = str(tmp_path / "cache")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=600)

    where = run(str(bin_dir / "python"), "-c", "import mnapps, mnapps.config as c; print(mnapps.__file__); "
                "print(c.CONFIG_DIR)")  # fmt: skip
    package_file, config_dir = where.stdout.split()
    assert Path(package_file).is_relative_to(tmp_path / "venv"), where.stdout
    assert Path(config_dir) == Path(package_file).parent / "configs"

    version = run(str(bin_dir / "mnapps"), "--version")
    metadata = run(str(bin_dir / "python"), "-c", "import importlib.metadata as m; print(m.version('mnapps'))")
    assert version.returncode == 0 and version.stdout.strip() == f"mnapps {metadata.stdout.strip()}"

    shapes = ensure_shapes_detection(tmp_path / "shapes", num_train=4, num_val=2, image_size=96, progress=False)
    small = ["--train-ann", str(shapes.train_ann), "--train-images", str(shapes.train_images),
             "--val-ann", str(shapes.val_ann), "--val-images", str(shapes.val_images),
             "--epochs", "1", "--batch-size", "2", "--device", "cpu",
             "--set", "train.num_workers=0", "--set", "train.num_threads=1", "--set", "train.warmup_epochs=0.0",
             "--set", "data.eval_batch_size=2"]  # fmt: skip
    default = run(str(bin_dir / "mnapps"), "train-det", "--head", "ssd", *small, "--output-dir", "ssd_run")
    assert default.returncode == 0, default.stderr[-3000:]
    assert (work / "ssd_run" / "best.pt").is_file()
    assert "head: ssd\n" in (work / "ssd_run" / "config.yaml").read_text()

    by_name = run(str(bin_dir / "mnapps"), "train-det", "--config", "ssdlite_mnv1_a050_r192_shapes", *small,
                  "--output-dir", "ssdlite_run")  # fmt: skip
    assert by_name.returncode == 0, by_name.stderr[-3000:]
    assert (work / "ssdlite_run" / "best.pt").is_file()
    assert "head: ssdlite\n" in (work / "ssdlite_run" / "config.yaml").read_text()
