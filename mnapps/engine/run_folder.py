"""The run folder: refusing to start a new run over an old run's checkpoints, and tidying it.

Training tasks check the folder once, before any data work (:func:`check_run_folder`), so a
re-run into an old folder stops at once instead of replacing its ``best.pt`` an epoch later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mnapps.engine.distributed import DistInfo
from mnapps.files import remove_stale_temporaries

__all__ = ["RunFolderError", "CHECKPOINT_NAMES", "check_run_folder", "tidy_run_folder"]


class RunFolderError(ValueError):
    """The run folder already holds a run's checkpoints and neither resume nor overwrite was asked."""


CHECKPOINT_NAMES = ("last.pt", "best.pt")


def check_run_folder(output_dir: str | os.PathLike, *, resume: Any, overwrite: bool) -> None:
    """Refuse to start a new run over the checkpoints of another one.

    Tasks call this once, before any data work (:func:`fit` calls it only when its caller has not), so a re-run into an
    old folder stops at once instead of replacing its ``best.pt`` an epoch later.

    Args:
        output_dir: the run folder (need not exist yet).
        resume: the ``resume`` given to :func:`fit` (a path, True, or None/False).
        overwrite: start over in a folder that holds checkpoints (``fit`` then removes them).

    Raises:
        RunFolderError: ``output_dir`` is a file, both ``resume`` and ``overwrite`` were given,
            or it holds ``last.pt``/``best.pt`` and neither was given.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"the run folder {folder} is a file; give --output-dir a folder")
    if resume and overwrite:
        raise RunFolderError(
            f"--resume and --overwrite both given for {folder}: resume continues the run there, overwrite "
            f"starts it over; pick one"
        )
    if resume or overwrite:
        return
    found = [name for name in CHECKPOINT_NAMES if (folder / name).is_file()]
    if found:
        raise RunFolderError(
            f"{folder} already holds the checkpoints of a run ({', '.join(found)}); pass --resume to continue "
            f"it, --overwrite to start over, or --output-dir for a new folder"
        )


def tidy_run_folder(folder: Path, overwrite: bool, resume: Any, info: DistInfo) -> None:
    """Rank 0: delete what a killed save left behind and, on ``overwrite``, the old checkpoints."""
    if not info.is_main:
        return
    for name in CHECKPOINT_NAMES:
        stale = remove_stale_temporaries(folder, name)
        if stale:
            tqdm.write(
                f"removed {len(stale)} temporary file(s) left in {folder} by a save that was interrupted: "
                + ", ".join(path.name for path in stale)
            )
    if overwrite and not resume:
        old = [folder / name for name in CHECKPOINT_NAMES if (folder / name).is_file()]
        for path in old:
            path.unlink()
        if old:
            tqdm.write(f"--overwrite: removed {', '.join(p.name for p in old)} of the previous run in {folder}")
