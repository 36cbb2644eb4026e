"""One training process per run folder: the lock, the resume checks made before any work, Ctrl-C.

This module owns what a training tool checks and holds about its run folder *before* the
long work starts and *while* it runs:

* :class:`RunLock`: ``<run>/.mnapps-run.lock`` holds the owner's pid and host and carries an
  exclusive ``flock``. A second run into the same folder stops at once with a message naming
  the owner instead of both writing ``last.pt`` and deleting each other's temporary files. The
  kernel drops a ``flock`` when its process dies, so a lock left by a killed run is detected as
  stale (and replaced, with a note) without guessing from pids; the file is removed at exit.
* :func:`claim_run_folder`: the one call a training CLI makes first. It refuses a run folder
  that is a file or read-only, checks that a ``--resume`` checkpoint exists and is a readable
  training checkpoint (before datasets are built), refuses ``--resume other_run/last.pt`` into a
  folder that holds *another* run unless ``--overwrite`` (which then removes that run's
  checkpoints and metrics), and takes the lock.
* :func:`report_interrupt`: the one line printed on Ctrl-C (where the last checkpoint is and
  the command that resumes it) and exit status 130, instead of a traceback.

Under ``torchrun`` only rank 0 locks (the other ranks belong to the same run).
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import os
import shlex
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from mnapps.checkpoint import read_checkpoint
from mnapps.files import check_writable_folder

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock", "claim_run_folder", "report_interrupt"]

LOCK_NAME = ".mnapps-run.lock"
#: What a run leaves in its folder that a different run must not silently replace.
RUN_FILES = ("last.pt", "best.pt", "metrics.json")
_CHECKPOINTS = ("last.pt", "best.pt")


class RunFolderBusy(ValueError):
    """Another live process holds the run folder."""


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


class RunLock:
    """An exclusive, self-cleaning lock on one run folder (see the module docstring).

    Use as a context manager, or call :meth:`acquire` / :meth:`release`. ``overwrite`` is what
    the caller passes on to training (see :func:`claim_run_folder`).
    """

    def __init__(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.overwrite = overwrite
        self._fd: int | None = None
        self._created_folder = False
        self.stale_owner: str | None = None

    def acquire(self) -> "RunLock":
        """Take the lock (creating the folder), or raise :class:`RunFolderBusy` naming the owner."""
        if not _is_rank_zero() or self._fd is not None:
            return self
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created_folder = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                self._forget_folder()
                raise RunFolderBusy(
                    f"the run folder {self.folder} is in use by {owner} (lock file {self.path}); wait for that run to "
                    f"finish, or give --output-dir another folder"
                ) from None
            # The holder may have removed the file between our open and our flock: then we
            # locked an orphan inode, and must try again on the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
        self.stale_owner = previous or None  # a lock file whose owner died without removing it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._redeliver_interrupt
        return self

    def _redeliver_interrupt(self, unraisable: Any) -> None:
        # A Ctrl-C that lands inside a finaliser (a progress bar's or a loader's __del__) is
        # "ignored" by Python and training would go on; deliver it again to the main code. Not
        # from here: Python handles a signal raised in this hook at once, inside the hook, and
        # ignores that KeyboardInterrupt too. A timer thread interrupts the main thread once it
        # has left the hook (and again, should that Ctrl-C land in a finaliser as well).
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            threading.Timer(0.1, _thread.interrupt_main).start()
            return
        self._previous_hook(unraisable)

    def release(self) -> None:
        """Remove the lock file and drop the lock (and the folder, if this lock made it and it is empty)."""
        if self._fd is None:
            return
        if sys.unraisablehook == self._redeliver_interrupt:
            sys.unraisablehook = self._previous_hook
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        self._forget_folder()

    def _forget_folder(self) -> None:
        if self._created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty: a run that failed at once leaves nothing behind
            self._created_folder = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _resume_path(folder: Path, resume: Any) -> Path | None:
    if not resume:
        return None
    return folder / "last.pt" if resume is True or resume == "last" else Path(resume)


def _check_resume_source(path: Path) -> None:
    """The checkpoint to resume from exists and is a readable training checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(
            f"cannot resume: checkpoint {path} does not exist; pass the last.pt of the run to continue, or leave "
            f"--resume out to start a new run"
        )
    checkpoint = read_checkpoint(path)  # every refusal of a bad file is a one-line ValueError
    if checkpoint.training is None:
        raise ValueError(
            f"{path} is not a training checkpoint (it holds no optimizer state); resume needs the last.pt or best.pt "
            f"written by a training run"
        )


def _resume_into_other_run(folder: Path, source: Path, overwrite: bool) -> bool:
    """Refuse (or, with ``overwrite``, clear) a folder holding another run than ``source``'s.

    Returns:
        True when ``overwrite`` was asked for and the folder is now free of another run (the
        caller then resumes without overwriting).
    """
    if source.resolve().parent == folder.resolve():
        return False
    found = [name for name in RUN_FILES if (folder / name).is_file()]
    if not any(name in _CHECKPOINTS for name in found):
        return overwrite  # nothing to clear; resuming wins over a start from scratch
    if not overwrite:
        raise ValueError(
            f"--resume {source} continues the run of {source.parent}, but --output-dir {folder} holds another run "
            f"({', '.join(found)}); resuming there would mix the two. Give --output-dir {source.parent} (or a new "
            f"folder), or add --overwrite to replace the run in {folder}"
        )
    if _is_rank_zero():  # under torchrun the other ranks only learn that the folder was cleared
        for name in found:
            (folder / name).unlink(missing_ok=True)
        print(f"--overwrite: removed {', '.join(found)} of the previous run in {folder}")
    return True


def claim_run_folder(output_dir: str | os.PathLike, *, resume: Any = None, overwrite: bool = False) -> RunLock:
    """Check the run folder and the resume checkpoint, then lock the folder (one call per CLI).

    Args:
        output_dir: the run folder (created if missing; removed again if the run stops while
            it is still empty).
        resume: the CLI's ``--resume`` (a path, True / ``"last"`` for ``output_dir/last.pt``,
            or None).
        overwrite: ``--overwrite``.

    Returns:
        The acquired :class:`RunLock` (a context manager that releases it). Its ``overwrite``
        is what to pass on to training: False when this call already cleared the folder for a
        resume from another run (the engine refuses ``resume`` together with ``overwrite``).

    Raises:
        ValueError: the folder is a file or read-only, the resume checkpoint is unreadable or
            not a training checkpoint, it belongs to another run than the folder's, or
            another live process holds the folder (:class:`RunFolderBusy`).
        FileNotFoundError: the resume checkpoint does not exist.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the run folder {folder} is a file; give --output-dir a folder")
    check_writable_folder(folder, flag="--output-dir")
    source = _resume_path(folder, resume)
    if source is not None:
        _check_resume_source(source)
    lock = RunLock(folder, overwrite=overwrite).acquire()
    try:
        if source is not None and _resume_into_other_run(folder, source, overwrite):
            lock.overwrite = False
    except BaseException:
        lock.release()
        raise
    if lock.stale_owner:
        print(f"note: {folder} held a lock of a run that is no longer running ({lock.stale_owner}); taken over")
    return lock


def _resume_command(tool: str, argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
            if not arg.startswith("-"):
                continue
        if arg == "--overwrite" or arg.startswith("--resume="):
            continue
        if arg == "--resume":
            skip_value = True
            continue
        kept.append(arg)
    return shlex.join(["python", tool, *kept, "--resume"])


def report_interrupt(output_dir: str | os.PathLike | None, tool: str, argv: Sequence[str] | None = None) -> int:
    """Print the one line a Ctrl-C leaves (the last checkpoint and how to resume); return 130.

    Args:
        output_dir: the run folder.
        tool: the script as the user runs it, e.g. ``tools/train_det.py``.
        argv: the arguments of the interrupted run (default ``sys.argv[1:]``); the suggested
            command is them without ``--overwrite``/``--resume`` plus ``--resume``.
    """
    last = Path(output_dir or ".") / "last.pt"
    if output_dir is None or not last.is_file():
        print(f"interrupted before the first checkpoint was written in {output_dir}; nothing to resume: run the "
              f"command again", file=sys.stderr)
        return 130
    try:
        epoch = f" (after epoch {int(read_checkpoint(last).epoch)})"
    except (ValueError, KeyError, TypeError, OSError):
        epoch = ""
    print(f"interrupted: the last checkpoint is {last}{epoch}; continue with: {_resume_command(tool, argv)}",
          file=sys.stderr)
    return 130
