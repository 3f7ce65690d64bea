"""Uploads staged on disk: the spill file, its page dropping, and a gRPC round through it.

A large upload is written to an anonymous temporary file as it arrives and read back
through a shared mapping; validation and the weighted-mean fold drop each part's pages
once read. These tests check that nothing about the values changes on the way (bit for
bit against the same data in memory), that a bad upload staged on disk is refused
whole, that disk failures are clear errors, and that pages really leave the process.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedhive.common import FitRes, Message, Status
from fedhive.common.errors import SerdeError, TransportError
from fedhive.common.records import Code, ndarrays_to_parameters, parameters_to_ndarrays
from fedhive.common.spill import SpillFile, page_dropper
from fedhive.server.strategy import WeightedMean
from fedhive.server.strategy.aggregate import FOLD_ELEMENTS, is_finite
from fedhive.transport.frames import Assembler
from fedhive.transport.grpc_server import GrpcServer
from grpc_helpers import engine_over_sessions, message_frames


def spilled(array: np.ndarray, directory: Path | None = None, pieces: int = 3) -> np.ndarray:
    """``array`` copied through a :class:`SpillFile` written in ``pieces`` writes."""
    raw = array.tobytes()
    spill = SpillFile(len(raw), directory)
    step = -(-len(raw) // pieces) or 1
    for start in range(0, len(raw), step):
        spill.write(raw[start : start + step])
    view = spill.finish()
    return np.frombuffer(view, array.dtype).reshape(array.shape)


def rss_file_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


# -- the spill file ------------------------------------------------------------------------------


def test_a_spilled_array_holds_the_same_values_and_stays_writable(tmp_path: Path) -> None:
    original = np.random.default_rng(0).standard_normal((300, 70)).astype(np.float32)
    array = spilled(original, tmp_path)
    assert np.array_equal(array, original) and array.flags.writeable
    assert os.listdir(tmp_path) == []  # the file never has a name
    drop = page_dropper(array)
    assert drop is not None
    array[-1, -1] = 42.0
    drop(0, array.size)  # dropped pages come back from the file, writes included
    assert array[-1, -1] == 42.0 and np.array_equal(array[:-1], original[:-1])


def test_only_arrays_read_from_a_spill_file_have_pages_to_drop() -> None:
    assert page_dropper(np.zeros(10_000)) is None
    assert page_dropper(np.frombuffer(bytearray(4096), np.float32)) is None
    assert page_dropper(spilled(np.zeros(10_000))[::2]) is None  # not contiguous


def test_a_spill_file_refuses_to_finish_short() -> None:
    spill = SpillFile(10)
    spill.write(b"12345")
    with pytest.raises(OSError, match="5 of 10 bytes"):
        spill.finish()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_validation_and_folding_keep_only_a_few_megabytes_of_a_spilled_upload() -> None:
    size = 16 << 20  # float32 elements: 64 MiB
    update = spilled(np.full(size, 0.5, np.float32), pieces=64)
    model = [np.zeros(size, np.float32)]
    mean = WeightedMean(model, accumulator="model")
    gc.collect()
    before = rss_file_kib()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            peak[0] = max(peak[0], rss_file_kib())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert is_finite(update)
        mean.add([update], 3, client_id="c", server_round=1, check=False)
    finally:
        stop.set()
        sampler.join()
    assert (peak[0] - before) * 1024 < 16 << 20  # a 64 MiB upload, under 16 MiB mapped
    assert rss_file_kib() - before < 8 << 10
    (result,) = mean.result() or [None]
    assert result is not None and np.all(result == 0.5)


@pytest.mark.parametrize("accumulator", ["float64", "model"])
def test_folding_a_spilled_upload_is_bit_identical_to_folding_it_from_memory(
    accumulator: str,
) -> None:
    rng = np.random.default_rng(1)
    model = [rng.standard_normal(3 * FOLD_ELEMENTS + 7).astype(np.float32), np.ones((9, 4))]
    updates = [[(m + rng.standard_normal(m.shape)).astype(m.dtype) for m in model]
               for _ in range(4)]  # fmt: skip
    results = []
    for spill in (False, True):
        mean = WeightedMean(model, accumulator=accumulator)
        for weight, update in enumerate(updates, start=1):
            arrays = [spilled(a) for a in update] if spill else update
            mean.add(arrays, weight, client_id="c", server_round=1)
        results.append(mean.result())
    assert all(a.tobytes() == b.tobytes() for a, b in zip(*results, strict=True))


def test_a_spilled_upload_with_nan_in_its_last_page_is_refused() -> None:
    values = np.ones(2 << 20, np.float32)
    values[-1] = np.nan
    assert not is_finite(spilled(values))
    values[-1] = np.inf
    assert not is_finite(spilled(values))
    values[-1] = 3.0e38  # finite values whose sum overflows are still finite
    values[-2] = 3.0e38
    assert is_finite(spilled(values))


# -- the assembler --------------------------------------------------------------------------------


def test_the_assembler_stages_large_messages_on_disk_and_small_ones_in_memory(
    tmp_path: Path,
) -> None:
    assembler = Assembler(1 << 20, spill_bytes=1000, spill_dir=tmp_path)
    big, small = os.urandom(5000), os.urandom(999)
    for mid, payload in (("big", big), ("small", small)):
        done = None
        for frame in message_frames(mid, [payload], chunk_bytes=64):
            done = assembler.add(frame)
        assert done is not None and done[0] == mid and bytes(done[1]) == payload
        assert isinstance(done[1].obj, np.ndarray) == (mid == "small")
    assert assembler.spills(1000) and not assembler.spills(999)
    assert not Assembler(1 << 20).spills(1 << 19)


def test_an_abandoned_spilled_message_leaves_nothing_behind(tmp_path: Path) -> None:
    assembler = Assembler(1 << 20, spill_bytes=1, spill_dir=tmp_path)
    frames = list(message_frames("m", [os.urandom(1000)], chunk_bytes=100))
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    assembler.add(frames[0])
    with pytest.raises(SerdeError, match="does not follow"):
        assembler.add(frames[2])  # a chunk skipped
    assembler.add(frames[0])
    assembler.clear()  # the client left part-way
    assert not assembler.is_open("m") and os.listdir(tmp_path) == []
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds


def test_disk_failures_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = Assembler(1 << 20, spill_bytes=1, spill_dir=tmp_path / "gone")
    frame = next(message_frames("m", [b"x" * 100], chunk_bytes=10))
    with pytest.raises(SerdeError, match="cannot stage it on disk"):
        missing.add(frame)

    def full(self: SpillFile, data: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SpillFile, "write", full)
    assembler = Assembler(1 << 20, spill_bytes=1, spill_dir=tmp_path)
    with pytest.raises(SerdeError, match=r"could not stage it on disk: .*No space left"):
        assembler.add(frame)
    assert not assembler.is_open("m")


def test_spill_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="spill_bytes"):
        GrpcServer("127.0.0.1:0", spill_bytes=0)
    with pytest.raises(TransportError, match="not a directory"):
        GrpcServer("127.0.0.1:0", spill_dir=tmp_path / "missing")


# -- a round over real gRPC -----------------------------------------------------------------------


def test_grpc_round_with_every_upload_on_disk_refuses_a_bad_one_whole(tmp_path: Path) -> None:
    model = [np.arange(200_000, dtype=np.float32) % 97, np.ones((30, 20), np.float32)]
    deltas = {"a": 1.0, "b": 5.0, "bad": 100.0}

    def handler(node: str) -> Any:
        def handle(task: Message) -> Message:
            params = [p + deltas[node] for p in parameters_to_ndarrays(task.content.parameters)]
            if node == "bad":
                params[-1][-1, -1] = np.nan  # in the last chunk: most of it arrived first
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), 1, {})
            return task.reply(res)

        return handle

    history, engine, staged = engine_over_sessions(
        model, handler, list(deltas), chunk_bytes=1 << 14, spill_bytes=1, spill_dir=tmp_path
    )
    assert [r["fit"]["num_results"] for r in history.rounds] == [2, 2]
    assert [[f["client_id"] for f in r["failures"]] for r in history.rounds] == [["bad"]] * 2
    assert all("NaN" in f["reason"] for r in history.rounds for f in r["failures"])
    expected = [m + 2 * 3.0 for m in model]  # the good clients' mean delta, 3, twice
    assert all(
        np.array_equal(a, b) for a, b in zip(engine.parameters.arrays, expected, strict=True)
    )
    assert staged == []  # no upload was staged in memory
    gc.collect()
    assert os.listdir(tmp_path) == []
