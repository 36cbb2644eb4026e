"""staged_folder: how every generated dataset enters the cache (atomic, first complete copy wins)."""

from __future__ import annotations

import pytest

from mnapps.data.cache import staged_folder


def _complete(folder):
    return (folder / "DONE").is_file()


def _leftovers(parent, final):
    return sorted(p.name for p in parent.iterdir() if p.name != final.name)


def test_a_finished_block_is_renamed_into_place(tmp_path):
    final = tmp_path / "cache" / "ds"
    with staged_folder(final, _complete) as staging:
        assert staging.parent == final.parent and staging.name.startswith(".ds.tmp-") and not final.exists()
        (staging / "DONE").write_text("ok")
    assert _complete(final) and _leftovers(final.parent, final) == []


def test_an_empty_folder_at_the_destination_is_replaced(tmp_path):
    final = tmp_path / "ds"
    final.mkdir()
    with staged_folder(final, _complete) as staging:
        (staging / "DONE").write_text("ok")
    assert _complete(final)


def test_a_twin_that_finished_first_is_kept(tmp_path):
    final = tmp_path / "ds"
    with staged_folder(final, _complete) as staging:
        (staging / "DONE").write_text("ours")
        final.mkdir()  # the other rank publishes while we are still writing
        (final / "DONE").write_text("theirs")
    assert (final / "DONE").read_text() == "theirs" and _leftovers(tmp_path, final) == []


def test_a_foreign_folder_at_the_destination_is_an_error(tmp_path):
    final = tmp_path / "ds"
    with pytest.raises(OSError):
        with staged_folder(final, _complete) as staging:
            (staging / "DONE").write_text("ours")
            final.mkdir()
            (final / "holiday.jpg").write_text("not ours")
    assert sorted(p.name for p in final.iterdir()) == ["holiday.jpg"] and _leftovers(tmp_path, final) == []


def test_a_failed_generation_leaves_nothing(tmp_path):
    final = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(final, _complete) as staging:
            (staging / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
