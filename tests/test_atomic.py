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
    from fedhive.common.atomic import fsync_dir

    fsync_dir(tmp_path)  # no error
    fsync_dir(tmp_path / "missing")  # nothing to sync: nothing done


def _record_syncs(monkeypatch):
    """Spies on os.fsync and os.replace: ("fsync", "file" | inode of the folder) and
    ("replace", name of the target), in order."""
    events: list[tuple[str, object]] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino if stat.S_ISDIR(info.st_mode) else "file"))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    return events


def test_the_file_is_synced_before_the_rename_and_its_folder_after(monkeypatch, tmp_path):
    events = _record_syncs(monkeypatch)
    atomic_write_bytes(tmp_path / "f.bin", b"data")
    folder = tmp_path.stat().st_ino
    assert events == [("fsync", "file"), ("replace", "f.bin"), ("fsync", folder)]


def test_state_store_dump_is_durable(monkeypatch, tmp_path):
    """Every state file is synced before its rename; the folder is synced after all of
    them and before index.tsv is renamed into place; then the index and its folder."""
    from fedhive.client.state import StateStore
    from fedhive.common.records import RecordDict

    store = StateStore(tmp_path / "spill")
    for node in ("a", "b", "c"):
        store.put(node, RecordDict({"s": {"0": np.full(3, ord(node), np.float32)}}))
    out = tmp_path / "ckpt" / "clients"
    events = _record_syncs(monkeypatch)
    store.dump(out)
    folder, parent = out.stat().st_ino, out.parent.stat().st_ino
    renames = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert [events[i][1] for i in renames][-1] == "index.tsv" and len(renames) == 4
    for i in renames:
        assert events[i - 1] == ("fsync", "file")  # the data is on disk before the rename
    index = renames[-1]
    assert ("fsync", folder) in events[renames[-2] + 1 : index]  # states' names are durable
    assert events[index + 1 :] == [("fsync", folder), ("fsync", parent)]
    reloaded = StateStore(tmp_path / "other")
    reloaded.load(out)
    assert reloaded.node_ids() == ["a", "b", "c"]
    store.close()
    reloaded.close()
