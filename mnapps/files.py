"""Writing files safely: atomic replacement, and output paths that never clobber inputs.

Every file mnapps writes that a later step reads (checkpoints, metrics, configs, exported
models) goes through :func:`atomic_write`: the bytes go to a hidden temporary file in the same
folder, are flushed to disk, and only then replace the target with ``os.replace``, so a run
killed mid-write leaves either the old file or the new one, never half of one. The temporary
files are named ``.<name>.<random>.tmp``; :func:`remove_stale_temporaries` deletes those that a
killed run left behind. :func:`check_output_path` refuses an output path that is, or lies
inside, one of the inputs, so a tool never writes over the user's data.

Files are created with the permissions the process umask allows (``0o666 & ~umask``, what
``open()`` gives), not the private ``0o600`` of ``mkstemp``, so a team folder can read a run.
Because :func:`atomic_write` replaces the directory entry instead of writing into the old file,
an output that is a hard link or symlink to an input never changes the input's bytes.

It also owns the path rules for files that inputs name (TF.js shards, COCO ``file_name``):
:func:`inside_folder` refuses an absolute name or one that climbs out of its folder with ``..``
unless the user set ``MNAPPS_ALLOW_OUTSIDE_PATHS=1``; and the output-folder rules of the tools
that write one file per input: :func:`unique_output_names` (no two inputs share an output),
:func:`refuse_existing_outputs` (nothing that existed before the run is replaced without
``--overwrite``) and :func:`check_writable_folder` (a read-only folder is a one-line error).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterable, Sequence

__all__ = [
    "atomic_write",
    "remove_stale_temporaries",
    "check_output_path",
    "file_mode",
    "inside_folder",
    "outside_paths_allowed",
    "unique_output_names",
    "refuse_existing_outputs",
    "check_writable_folder",
    "ALLOW_OUTSIDE_ENV",
]

#: Set to 1 to let input files name files outside their own folder (absolute or ``..`` paths).
ALLOW_OUTSIDE_ENV = "MNAPPS_ALLOW_OUTSIDE_PATHS"


def _umask() -> int:
    # /proc gives it without changing it (os.umask can only be read by setting it, which races
    # with other threads creating files); elsewhere fall back to set-and-restore.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file: ``0o666`` less the process umask."""
    return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Create or replace ``path`` with what ``write(handle)`` writes to a binary handle.

    The parent folder is created when missing. On any error the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would hide the file from the user's group
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


def outside_paths_allowed() -> bool:
    """True when the user set ``MNAPPS_ALLOW_OUTSIDE_PATHS=1`` (names may leave their folder)."""
    return os.environ.get(ALLOW_OUTSIDE_ENV, "").strip().lower() in ("1", "true", "yes")


def inside_folder(name: str, *, source: str, field: str) -> str | None:
    """Why ``name`` (a path an input file gives, relative to that file's folder) may not be used, or None.

    Absolute names (``/etc/passwd``, ``C:\\x``) and names that climb out with ``..`` would let a
    data file make a tool read anything on the machine; they are refused unless
    :func:`outside_paths_allowed`. Symlinks inside the folder are the user's own choice and are
    not followed here.

    Returns:
        None when the name is fine, else the one-line message naming ``source`` and ``field``.
    """
    if outside_paths_allowed():
        return None
    text = name.replace("\\", "/")
    if text.startswith("/") or (len(text) > 2 and text[0].isalpha() and text[1:3] == ":/"):
        problem = "is an absolute path"
    else:
        depth = 0
        for part in PurePosixPath(text).parts:
            depth += -1 if part == ".." else (0 if part == "." else 1)
            if depth < 0:
                break
        if depth >= 0:
            return None
        problem = "climbs out of its folder with '..'"
    return (f"{source}: {field} {name!r} {problem}; name files relative to the folder they are in, or set "
            f"{ALLOW_OUTSIDE_ENV}=1 if you trust this file to read outside it")


def unique_output_names(inputs: Sequence[Path], name: Callable[[Path], str]) -> dict[Path, str]:
    """One distinct output file name per input: ``name(path)``, or that name with ``~2``, ``~3``, ...
    before its suffix when another input already gives it (``c.bmp`` -> ``c.bmp.png`` and the
    photo ``c.bmp.png`` itself: the second in sorted order becomes ``c.bmp~2.png``)."""
    wanted = {path: name(path) for path in inputs}
    taken = set()
    # Inputs that keep their own name win it; appended names step aside.
    order = sorted(inputs, key=lambda p: (wanted[p] != p.name, str(p)))
    result: dict[Path, str] = {}
    for path in order:
        candidate = wanted[path]
        stem, dot, suffix = candidate.rpartition(".")
        k = 1
        while candidate in taken:
            k += 1
            candidate = f"{stem}~{k}.{suffix}" if dot else f"{candidate}~{k}"
        taken.add(candidate)
        result[path] = candidate
    return {path: result[path] for path in inputs}


def refuse_existing_outputs(targets: Iterable[Path], *, flag: str = "--out", overwrite: bool = False) -> None:
    """Raise ValueError when any of ``targets`` exists already and ``overwrite`` is False."""
    if overwrite:
        return
    existing = [path for path in targets if os.path.lexists(path)]
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise ValueError(
            f"{existing[0]}{more} already exist(s), written before this run; nothing is replaced unless you pass "
            f"--overwrite, or give {flag} another folder"
        )


def check_writable_folder(folder: str | os.PathLike, *, flag: str) -> Path:
    """Refuse a folder (or, when it does not exist yet, its nearest existing parent) that cannot be written.

    Mode bits count as well as access rights: root may write anywhere, yet a folder marked
    read-only (a shared dataset, a finished team run) is left alone.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{flag} {folder}: {probe} is a file, not a folder; give a folder")
    writable = os.access(probe, os.W_OK | os.X_OK) and bool(probe.stat().st_mode & stat.S_IWUSR)
    if not writable:
        raise ValueError(f"{flag} {folder}: {probe} is read-only (permission denied); choose a folder you can write to")
    return folder
