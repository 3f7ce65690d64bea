"""Fuzzing the message decoder: mutated frames never crash, hang or allocate without bound.

Every mutated input must either decode or raise :class:`SerdeError`; the frame parser
never raises. The short run is in the default suite, 100,000 frames in the slow one.
"""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest

from fedhive.common import Message, MessageType, RecordDict, ndarrays_to_parameters
from fedhive.common.errors import SerdeError
from fedhive.common.records import FitIns, FitRes, Status
from fedhive.transport.codec import decode_wire, encode_wire
from fedhive.transport.frames import Assembler
from fedhive.transport.limits import reply_bound
from fedhive.transport.wire import message_frame_bytes, parse_frame

MODEL = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(5, np.float64)]
BOUND = reply_bound(MODEL)


def _seeds() -> list[bytes]:
    task = Message.task(run_id=3, node_id="n1", server_round=2, model_version=1,
                        message_type=MessageType.FIT,
                        content=FitIns(ndarrays_to_parameters(MODEL), {"lr": 0.1}))  # fmt: skip
    extras = RecordDict(config_records={"c": {"i": 7, "s": "x", "b": b"\x01"}},
                        metric_records={"m": {"f": 0.5}})  # fmt: skip
    fit = task.reply(FitRes(Status(), ndarrays_to_parameters(MODEL), 10, {"acc": 0.9},
                            extras=extras))  # fmt: skip
    frame = RecordDict({"codec": {"frame": np.arange(200, dtype=np.uint8)}})
    packed = task.reply(FitRes(Status(), ndarrays_to_parameters([]), 10,
                               {"loss": 0.5, "n": 3, "s": "x"}, extras=frame))  # fmt: skip
    messages = (task, fit, packed, task.error_reply("boom"))
    return [b"".join(encode_wire(m)) for m in messages]


def _mutate(rng: random.Random, data: bytes) -> bytearray:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.5 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op < 0.65 and out:
            i = rng.randrange(len(out))
            del out[i : i + rng.randint(1, 16)]
        elif op < 0.8:
            i = rng.randrange(len(out) + 1)
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op < 0.9 and out:  # a digit in the JSON header: sizes, offsets, counts
            digits = [i for i, b in enumerate(out[:2048]) if 0x30 <= b <= 0x39]
            if digits:
                out[rng.choice(digits)] = rng.choice(b"0123456789")
        elif out:
            out = out[: rng.randrange(len(out))]
    return out


def fuzz(count: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    seeds = _seeds()
    outcomes = {"decoded": 0, "refused": 0, "frames": 0}
    for i in range(count):
        data = _mutate(rng, rng.choice(seeds))
        try:
            decode_wire(data, BOUND.header if i % 2 else None)
            outcomes["decoded"] += 1
        except SerdeError:
            outcomes["refused"] += 1
        if i % 10 == 0:  # the same bytes as MESSAGE frames, themselves mutated
            assembler = Assembler(BOUND.max_bytes)
            for raw in message_frame_bytes(f"m{i}", [bytes(data)], 97):
                frame = parse_frame(bytes(_mutate(rng, raw)) if rng.random() < 0.3 else raw)
                outcomes["frames"] += 1
                if frame.kind != 3:  # not MESSAGE: refused by the server
                    continue
                try:
                    done = assembler.add(frame)
                    if done is not None:
                        decode_wire(done[1], BOUND.header)
                except SerdeError:
                    break
    return outcomes


def test_short_fuzz_of_the_decoder():
    tracemalloc.start()
    try:
        outcomes = fuzz(800, seed=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcomes["refused"] > 0 and outcomes["decoded"] > 0
    assert peak < 32 << 20, peak


@pytest.mark.slow
def test_one_hundred_thousand_mutated_frames():
    before = _status_kib("VmRSS")
    outcomes = fuzz(100_000, seed=2)
    assert outcomes["decoded"] + outcomes["refused"] == 100_000
    assert outcomes["frames"] > 10_000
    assert _status_kib("VmHWM") - before < 64 << 10  # peak within 64 MiB of the start


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
