"""Shared fixtures: the real material in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
# The lab (tools/lab: benchmarks, paper tables) is no part of the package; its scripts find it
# beside them, and the tests find it here.
sys.path.insert(0, str(PROJECT_ROOT / "tools"))


@pytest.fixture(autouse=True)
def _few_threads():
    # CI has 2 cores; keep every test deterministic and off the other core's back.
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the checkout; tests using it skip on a plain user checkout."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test material not found at {SHARED_DATA} (only CI and developers have ../shared)")
    return SHARED_DATA


@pytest.fixture
def deepface_four(shared_data: Path, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """Four deepface photos linked into ``tmp_path/photos`` and a pairs file of deepface's own labels
    for them (3 same, 3 different pairs, twice over to make 10 folds): ``(photos, pairs, names)``."""
    deepface = shared_data / "faces" / "deepface"
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["img1.jpg", "img2.jpg", "img3.jpg", "img4.jpg"]
    for name in names:
        (photos / name).symlink_to(deepface / name)
    rows = [line for line in (deepface / "master.csv").read_text().splitlines()[1:]
            if set(line.split(",")[:2]) <= set(names)]
    assert len(rows) == 6
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("file_x,file_y,Decision\n" + "\n".join(rows * 2) + "\n")
    return photos, pairs, names


@pytest.fixture
def checkpoint_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The checkpoint files read from the disk from now on, one entry per read.

    Every loader reads a file through ``mnapps.checkpoint.load_checkpoint`` (``read_checkpoint``
    calls it by its module-global name), so counting there sees them all; a record passed on
    instead of a path is no new entry."""
    import mnapps.checkpoint

    reads: list[Path] = []
    reader = mnapps.checkpoint.load_checkpoint

    def counting(path, *args, **kwargs):
        reads.append(Path(path))
        return reader(path, *args, **kwargs)

    monkeypatch.setattr(mnapps.checkpoint, "load_checkpoint", counting)
    return reads
