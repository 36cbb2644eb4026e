"""Writing files safely: atomic replacement, and output paths that never clobber inputs.

Every file mnapps writes that a later step reads (checkpoints, metrics, configs, exported
models) goes through :func:`atomic_write`: the bytes go to a hidden temporary file in the same
folder, are flushed to disk, and only then replace the target with ``os.replace``, so a run
killed mid-write leaves either the old file or the new one, never half of one. The temporary
files are named ``.<name>.<random>.tmp``; :func:`remove_stale_temporaries` deletes those that a
killed run left behind. :func:`check_output_path` refuses an output path that is, or lies
inside, one of the inputs, so a tool never writes over the user's data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterable

__all__ = ["atomic_write", "remove_stale_temporaries", "check_output_path"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Create or replace ``path`` with what ``write(handle)`` writes to a binary handle.

    The parent folder is created when missing. On any error the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def remove_stale_temporaries(folder: str | os.PathLike, name: str) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files an interrupted :func:`atomic_write` left in ``folder``.

    Returns:
        the paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(folder.glob(f".{name}.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_output_path(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, what: str = "output") -> Path:
    """Return ``output`` if it is neither one of ``inputs`` nor inside an input folder.

    Raises:
        ValueError: naming the clash and how to avoid it.
    """
    output = Path(output)
    resolved = output.resolve()
    for source in map(Path, inputs):
        source_resolved = source.resolve()
        if resolved == source_resolved or (source.is_dir() and resolved.is_relative_to(source_resolved)):
            raise ValueError(
                f"the {what} {output} is, or is inside, the input {source}: writing there could replace the "
                f"user's files; choose an {what} outside {source}"
            )
    return output
