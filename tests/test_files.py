"""mnapps.files: atomic replacement, clean-up after a killed save, outputs that never clobber inputs."""

from __future__ import annotations

import os

import pytest

from mnapps.files import atomic_write, check_output_path, remove_stale_temporaries


def test_atomic_write_creates_folders_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "metrics.json"
    assert atomic_write(target, lambda handle: handle.write(b"first")) == target
    atomic_write(target, lambda handle: handle.write(b"second"))
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"good")

    def fail_halfway(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail_halfway)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_killed_write_leaves_a_temporary_that_remove_stale_temporaries_finds(tmp_path):
    # Simulate the kill: the temporary is written but os.replace never runs.
    target = tmp_path / "last.pt"

    def killed(handle):
        handle.write(b"half")
        raise KeyboardInterrupt  # a BaseException still cleans up in-process ...

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, killed)
    assert list(tmp_path.iterdir()) == []
    # ... so what a SIGKILL leaves behind is made by hand, with atomic_write's naming.
    leftovers = [tmp_path / ".last.pt.x81kd0.tmp", tmp_path / ".last.pt.77aa2b.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    others = [tmp_path / ".best.pt.q1w2e3.tmp", tmp_path / "last.pt.tmp", tmp_path / ".last.pt"]
    for path in others:
        path.write_bytes(b"keep")
    assert remove_stale_temporaries(tmp_path, "last.pt") == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in others)
    assert remove_stale_temporaries(tmp_path / "missing", "last.pt") == []


def test_check_output_path_refuses_inputs_and_what_lies_inside_them(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = photos / "cat.jpg"
    photo.write_bytes(b"jpeg")
    for output, clash in ((photos, photos), (photos / "drawn", photos), (photo, photo)):
        with pytest.raises(ValueError) as caught:
            check_output_path(output, [photo if clash == photo else photos], what="--out folder")
        message = str(caught.value)
        assert f"the --out folder {output} is, or is inside, the input {clash}" in message
        assert "\n" not in message
    # The same places reached through a relative path or a symlink are still caught.
    link = tmp_path / "link"
    link.symlink_to(photos, target_is_directory=True)
    with pytest.raises(ValueError):
        check_output_path(link / "out", [photos])
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        with pytest.raises(ValueError):
            check_output_path("photos/../photos/x", [photos])
    finally:
        os.chdir(cwd)
    # A sibling folder, or a file next to the input file, is fine and returned as given.
    assert check_output_path(tmp_path / "drawn", [photos]) == tmp_path / "drawn"
    assert check_output_path(photos / "cat.png", [photo]) == photos / "cat.png"
