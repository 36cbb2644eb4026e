"""The cache of generated datasets: where it lives and how a finished dataset enters it.

This module owns what the three embedded datasets (shapes detection, shapes classification,
generated faces) share on disk. :func:`default_cache_dir` is ``$MNAPPS_CACHE`` or
``~/.cache/mnapps``. :func:`staged_folder` is the one way a dataset is written: into a hidden
staging folder beside its final place, then renamed there in one step, so a killed
generation never leaves half a dataset; and when several processes generate the same dataset
at once (every torchrun rank does), the first complete copy stays where it is, since the
others may already be reading it, and later copies are discarded. Staging folders are named
``.<name>.tmp-<pid>-<random>`` so that :func:`remove_abandoned_staging` can tell a dead
generation's leftovers from a live one. :func:`announce_generation` is the one line a first run
prints before it generates anything: what, how many images, about how long, and where.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["default_cache_dir", "staged_folder", "remove_abandoned_staging", "announce_generation", "SECONDS_PER_IMAGE"]

_STALE_STAGING_S = 3600.0  # generation takes seconds to minutes; an hour-old staging folder is abandoned


# Seconds to draw and encode one image on one core, measured on a 2-core Intel Xeon (AVX-512
# VNNI, AMX) shared with other jobs: 2200 detection images took 170 s, 250 classification
# images 4.9 s, 48 faces 7.4 s. Only the order of magnitude matters: it is a heads-up.
SECONDS_PER_IMAGE = {"shapes_det": 0.08, "shapes_cls": 0.02, "faces": 0.15}


def announce_generation(what: str, images: int, seconds_per_image: float, final: Path, workers: int = 1) -> str:
    """Print (stderr) and return the line a first use shows before generating ``images`` images."""
    seconds = images * seconds_per_image / max(1, min(workers, os.cpu_count() or 1))
    took = f"about {round(seconds / 60)} min" if seconds >= 90 else f"about {max(5, round(seconds, -1)):.0f} s"
    line = f"first use: generating {what}, {images} images ({took}) into {final}; later runs reuse it"
    print(line, file=sys.stderr, flush=True)
    return line


def default_cache_dir() -> Path:
    """``$MNAPPS_CACHE`` if set, else ``~/.cache/mnapps``."""
    env = os.environ.get("MNAPPS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mnapps"


@contextmanager
def staged_folder(final: Path, is_complete: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; when the block ends, rename it to ``final``.

    Args:
        final: where the dataset goes. It may be absent or an empty folder (which is replaced).
        is_complete: says whether a folder holds the finished dataset; used when ``final`` is
            taken, to tell a concurrent twin that finished first (its copy is kept, ours
            discarded) from anything else (an error).

    The staging folder is removed in every case: published, discarded, or the block raised.

    Raises:
        OSError: ``final`` is taken by something that is not the complete dataset.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        yield staging
        try:
            if final.is_dir() and not any(final.iterdir()):
                final.rmdir()
            os.rename(staging, final)
        except OSError:
            if not is_complete(final):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_abandoned_staging(final: Path) -> None:
    """Delete staging folders of killed generations of ``final``: over an hour old, process gone.

    The age test keeps a generation running on another machine that shares the cache folder
    (multi-node training) safe, since its process id means nothing here.
    """
    for staging in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if time.time() - staging.stat().st_mtime < _STALE_STAGING_S:
                continue
            pid = int(staging.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except (ValueError, IndexError, OSError):
            continue
