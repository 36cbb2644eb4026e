"""Shared fixtures: the real material in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


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
