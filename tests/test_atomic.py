"""Atomic writes (fedhive.common.atomic): old or new file, never half, no leftovers."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from fedhive.common.atomic import atomic_open, atomic_write_bytes


def test_write_replaces_and_makes_folders(tmp_path):
    path = tmp_path / "a" / "b" / "file.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.npz"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_open(path) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


def test_streamed_writer_and_secret_mode(tmp_path):
    path = tmp_path / "key.pem"
    with atomic_open(path, mode=0o600) as fh:
        np.savez(fh, w=np.arange(3))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with np.load(path) as data:
        np.testing.assert_array_equal(data["w"], np.arange(3))


def test_a_link_is_replaced_not_written_through(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep me")
    link = tmp_path / "link"
    os.symlink(target, link)
    atomic_write_bytes(link, b"new")
    assert target.read_bytes() == b"keep me"
    assert not link.is_symlink() and link.read_bytes() == b"new"


def test_the_old_import_place_still_works():
    from fedhive.client.state import atomic_write_bytes as old

    assert old is atomic_write_bytes


def test_fsync_directory_syncs_a_folder_and_ignores_what_cannot_be_opened(tmp_path):
    from fedhive.common.atomic import fsync_directory

    fsync_directory(tmp_path)  # no error
    fsync_directory(tmp_path / "missing")  # nothing to sync: nothing done
