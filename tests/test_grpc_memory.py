"""What keeps a gRPC round lean: frames without copies, bounded staging, no stray references.

Covers the wire codec (byte for byte what protobuf writes and reads), record payloads as
zero-copy pieces, the recycling of message buffers, the staging slots of the server, the
release of a reply once the engine is done with it, and the float64 and float32
accumulators of FedAvg (exactness and the documented error bound).
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import numpy as np
import pytest

from fedhive.common import FitRes, Message, MessageType, RecordDict, Status
from fedhive.common.errors import ConfigError, InvalidUpdate
from fedhive.common.records import Code, ndarrays_to_parameters, parameters_to_ndarrays
from fedhive.common.serde import decode_record_dict, encode_record_dict, encode_record_pieces
from fedhive.server import ServerConfig
from fedhive.server.client_manager import SimpleClientManager
from fedhive.server.engine import Engine
from fedhive.server.strategy import FedAvg, WeightedMean
from fedhive.server.strategy.aggregate import FOLD_ELEMENTS
from fedhive.transport import Replies, Transport
from fedhive.transport.frames import PROTOCOL_VERSION, Assembler, BufferPool
from fedhive.transport.proto.fleet_pb2 import Frame
from fedhive.transport.uploads import Staging as _Staging
from fedhive.transport.wire import message_frame_bytes, parse_frame
from grpc_helpers import engine_over_sessions, message_frames

FRAME_FIELDS = ("kind", "message_id", "total_size", "offset", "last", "protocol_version",
                "node_id", "token", "text")  # fmt: skip


# -- the wire codec ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_message_frames_are_what_protobuf_writes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pieces: list[Any] = [rng.bytes(int(rng.integers(0, 300))) for _ in range(rng.integers(0, 5))]
    pieces.append(memoryview(rng.standard_normal(int(rng.integers(0, 50)))).cast("B"))
    chunk = int(rng.integers(1, 200))
    message_id = f"m{seed}" if seed % 5 else ""
    joined = b"".join(pieces)
    expected = [
        Frame(
            kind=Frame.MESSAGE,
            message_id=message_id,
            total_size=len(joined),
            offset=start,
            data=joined[start : start + chunk],
            last=start + chunk >= len(joined),
        ).SerializeToString()
        for start in range(0, max(len(joined), 1), chunk)
    ]
    assert list(message_frame_bytes(message_id, pieces, chunk)) == expected
    assert [f.SerializeToString() for f in message_frames(message_id, pieces, chunk)] == expected


def test_frames_are_cut_lazily_from_views() -> None:
    model = np.arange(10_000, dtype=np.float32)
    original = model.tobytes()
    frames = message_frame_bytes("m", [b"head", memoryview(model).cast("B")], 1000)
    first = next(frames)
    model[:] = -1  # frames not yet built see the change: nothing was copied up front
    rest = b"".join(parse_frame(raw).data for raw in frames)
    assert parse_frame(first).data == b"head" + original[:996]
    assert rest == np.full(10_000, -1, np.float32).tobytes()[996:]


@pytest.mark.parametrize(
    "frame",
    [
        Frame(kind=Frame.HELLO, protocol_version=2**32 - 1, node_id="nødé", token="t0k"),
        Frame(kind=Frame.BYE, text="the run is finished"),
        Frame(kind=Frame.MESSAGE, message_id="x", total_size=2**64 - 1, offset=7, data=b"\0\1"),
        Frame(kind=7, last=True),
        Frame(kind=-3),
        Frame(),
    ],
)
def test_parse_frame_reads_what_protobuf_reads(frame: Frame) -> None:
    raw = frame.SerializeToString()
    parsed, reference = parse_frame(raw), Frame.FromString(raw)
    for name in FRAME_FIELDS:
        assert getattr(parsed, name) == getattr(reference, name), name
    assert bytes(parsed.data) == reference.data


def test_parse_frame_skips_unknown_fields_and_never_raises() -> None:
    known = Frame(kind=Frame.MESSAGE, message_id="m").SerializeToString()
    assert parse_frame(b"\x58\x05" + known + b"\x62\x01z").message_id == "m"  # fields 11, 12
    rng = np.random.default_rng(7)
    valid = Frame(
        kind=Frame.HELLO, node_id="n", token="t", protocol_version=PROTOCOL_VERSION
    ).SerializeToString()
    for _ in range(500):
        raw = bytearray(valid)
        for _ in range(int(rng.integers(1, 4))):
            raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
        parse_frame(bytes(raw[: int(rng.integers(len(raw) + 1))]))
    bad = parse_frame(b"\x12\x05ab")  # a string running past the end
    assert bad.kind == Frame.KIND_UNSPECIFIED and "malformed" in bad.text


def test_assembler_accepts_parsed_frames_with_views() -> None:
    payload = bytes(range(256)) * 40
    assembler = Assembler(1 << 20)
    done = None
    for raw in message_frame_bytes("m", [payload], 999):
        done = assembler.add(parse_frame(raw))
    assert done is not None and bytes(done[1]) == payload


# -- payloads as pieces ----------------------------------------------------------------------


def test_record_pieces_view_the_arrays_and_join_to_the_payload() -> None:
    big = np.arange(1000, dtype=np.float32)
    rd = RecordDict({"p": {"w": big, "b": np.ones(3, np.int64)}}, {"c": {"k": 1}})
    pieces = encode_record_pieces(rd)
    assert b"".join(pieces) == encode_record_dict(rd)
    views = [p for p in pieces if isinstance(p, memoryview)]
    assert any(np.shares_memory(np.frombuffer(v, np.uint8), big) for v in views)
    assert all(v.readonly for v in views)
    assert decode_record_dict(bytearray(b"".join(pieces))) == rd


# -- recycled message buffers ----------------------------------------------------------------


def test_buffer_pool_recycles_a_buffer_only_once_nothing_views_it() -> None:
    pool = BufferPool(max_free=1, min_bytes=1000)
    first = pool.take(5500)
    array = np.frombuffer(memoryview(first), np.float32)
    del first
    assert pool.idle_bytes == 0  # the array still views it
    del array
    gc.collect()
    assert pool.idle_bytes == 6000  # sizes are rounded up to whole min_bytes
    again = pool.take(5600)  # so a slightly longer message fits the same buffer
    assert pool.idle_bytes == 0 and again.size == 5600
    assert pool.take(100).base is None  # small messages are not pooled


def test_buffer_pool_keeps_nothing_when_told_no_message_is_coming() -> None:
    coming = [False]
    pool = BufferPool(max_free=2, min_bytes=1024, keep=lambda: coming[0])
    view = pool.take(4096)
    del view
    assert pool.idle_bytes == 0
    coming[0] = True
    views = [pool.take(4096) for _ in range(3)]
    del views
    assert pool.idle_bytes == 2 * 4096  # at most max_free


# -- staging slots ------------------------------------------------------------------------------


def test_staging_admits_one_large_upload_at_a_time_in_arrival_order() -> None:
    async def scenario() -> list[str]:
        staging = _Staging(count=3, budget=100)
        order: list[str] = []

        async def upload(name: str, nbytes: int) -> None:
            await staging.acquire(nbytes)
            order.append(name)

        await staging.acquire(80)  # the first upload is always admitted, whatever its size
        tasks = [asyncio.create_task(upload(n, s)) for n, s in (("a", 80), ("b", 10), ("c", 5))]
        await asyncio.sleep(0)
        assert order == [] and staging.waiting == 3  # "a" does not fit, the others queue
        staging.release(80)
        await asyncio.sleep(0)
        assert order == ["a", "b", "c"] and staging.held == 3 and staging.bytes == 95
        late = asyncio.create_task(upload("d", 1))
        await asyncio.sleep(0)
        assert order == ["a", "b", "c"]  # the count cap
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)
        assert staging.waiting == 0
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["a", "b", "c"]


def test_staging_without_a_budget_is_a_count_cap() -> None:
    async def scenario() -> int:
        staging = _Staging(count=2, budget=None)
        await staging.acquire(10**12)
        await staging.acquire(10**12)
        return staging.held

    assert asyncio.run(scenario()) == 2


# -- replies released when the engine is done ----------------------------------------------


def test_a_reply_is_released_when_the_next_is_asked_for() -> None:
    replies = Replies()
    released: list[int] = []
    task = Message.task(run_id=1, node_id="n", server_round=1, model_version=0,
                        message_type=MessageType.FIT, content=None)  # fmt: skip
    for i in range(3):
        replies.put(task.reply(None), release=lambda i=i: released.append(i))
    assert replies.get(0) is not None and released == []  # taken, still in use
    assert replies.get(0) is not None and released == [0]
    replies.cancel()
    assert released == [0, 1, 2]


class _TrackingTransport(Transport):
    """Replies with fresh arrays and checks, as each is released, that nobody holds it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.alive_at_release: list[bool] = []

    def send(self, messages: Any, replies: Replies) -> None:
        for task in messages:
            arrays = [np.full(self.shape, 2.0, np.float32)]
            ref = weakref.ref(arrays[0])
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})
            del arrays
            replies.put(task.reply(res), release=lambda ref=ref: self._released(ref))

    def _released(self, ref: weakref.ref[np.ndarray]) -> None:
        self.alive_at_release.append(ref() is not None)


@pytest.mark.parametrize("ordered", [False, True])
def test_engine_drops_each_folded_reply_before_asking_for_the_next(ordered: bool) -> None:
    transport = _TrackingTransport((1000,))
    manager = SimpleClientManager()
    for i in range(5):
        manager.register(f"c{i}")
    strategy = FedAvg(
        min_fit_clients=5, min_available_clients=5, fraction_evaluate=0.0,
        initial_parameters=ndarrays_to_parameters([np.zeros(1000, np.float32)]),
    )  # fmt: skip
    engine = Engine(strategy=strategy, transport=transport, client_manager=manager,
                    config=ServerConfig(num_rounds=2), seed=0, ordered=ordered)  # fmt: skip
    history = engine.run()
    assert [r["fit"]["num_results"] for r in history.rounds] == [5, 5]
    assert np.array_equal(engine.parameters.arrays[0], np.full(1000, 2.0, np.float32))
    if not ordered:  # ordered folding keeps a reorder buffer by design
        assert transport.alive_at_release == [False] * 10


# -- accumulators -------------------------------------------------------------------------------


def _whole_layer_mean(reference: list[np.ndarray], updates: list[Any]) -> list[np.ndarray]:
    """The float64 weighted mean folded one whole layer at a time."""
    acc = [np.zeros(r.shape) for r in reference]
    total = 0.0
    for arrays, weight in updates:
        for a, x in zip(acc, arrays, strict=True):
            a += np.multiply(x, weight, dtype=np.float64)
        total += weight
    return [(a / total).astype(r.dtype) if r.dtype.kind == "f" else a / total
            for a, r in zip(acc, reference, strict=True)]  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_float64_accumulator_is_bit_identical_to_whole_layer_folding(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = [(3 * FOLD_ELEMENTS + 17,), (2, FOLD_ELEMENTS // 2 + 1), (), (0,)]
    dtypes = [np.float32, np.float64, np.float16, np.int64]
    reference = [np.zeros(s, d) for s, d in zip(sizes, dtypes, strict=True)]
    updates = []
    for k in range(int(rng.integers(1, 6))):
        arrays = [np.asarray(rng.standard_normal(r.shape) * 10.0 ** rng.integers(-4, 4))
                  .astype(r.dtype if k % 2 else np.float64) for r in reference]  # fmt: skip
        updates.append((arrays, int(rng.integers(1, 10**6)) if seed % 2 else float(rng.random())))
    mean = WeightedMean(reference)
    for arrays, weight in updates:
        mean.add(arrays, weight, client_id="c", server_round=1)
    got = mean.result()
    assert got is not None
    for a, b in zip(got, _whole_layer_mean(reference, updates), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("seed", range(12))
def test_float32_accumulator_stays_within_its_bound(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    model = (rng.standard_normal(2 * FOLD_ELEMENTS + 5) * 10.0 ** rng.integers(-3, 3)).astype(
        np.float32
    )
    n = int(rng.integers(1, 60))
    spread = 10.0 ** rng.integers(-6, 2) * float(np.abs(model).max())
    updates = [(model + rng.standard_normal(model.size) * spread).astype(np.float32)
               for _ in range(n)]  # fmt: skip
    weights = [int(rng.integers(0, 500)) for _ in range(n)]
    weights[0] += 1
    compact = WeightedMean([model], accumulator="model")
    for update, weight in zip(updates, weights, strict=True):
        compact.add([update], weight, client_id="c", server_round=1)
    (got,) = compact.result() or [None]
    assert got is not None and got.dtype == np.float32
    exact = sum(w * u.astype(np.float64) for u, w in zip(updates, weights, strict=True))
    exact = exact / sum(weights)
    largest = max(float(np.abs(u.astype(np.float64) - model).max()) for u in updates)
    rounding = 0.5 * np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert (np.abs(got - exact) <= rounding + 6 * n * 2.0**-24 * largest * 1.001).all()


def test_float32_accumulator_is_exact_for_identical_updates_and_halves_memory() -> None:
    model = [np.random.default_rng(0).standard_normal(50_000).astype(np.float32),
             np.arange(6, dtype=np.int64)]  # fmt: skip
    mean = WeightedMean(model, accumulator="model")
    assert [a.dtype for a in mean._acc] == [np.float32, np.float64]
    for weight in (0, 3, 1, 0, 7):
        mean.add([model[0].copy(), model[1].copy()], weight, client_id="c", server_round=1)
    got = mean.result()
    assert got is not None
    assert np.array_equal(got[0], model[0]) and got[0].dtype == np.float32
    assert np.array_equal(got[1], model[1]) and got[1].dtype == np.float64


def test_accumulator_choice_is_checked() -> None:
    with pytest.raises(ValueError, match="accumulator"):
        WeightedMean([np.zeros(2)], accumulator="float16")
    strategy = FedAvg()
    strategy.accumulator = "float16"
    with pytest.raises(ConfigError, match="accumulator"):
        strategy.fit_aggregator(1, ndarrays_to_parameters([np.zeros(2)]))


def test_unchecked_updates_of_the_wrong_shape_are_refused_before_folding() -> None:
    mean = WeightedMean([np.zeros((2, 3))])
    with pytest.raises(InvalidUpdate):
        mean.add([np.zeros(6)], 1, client_id="c", server_round=1, check=False)
    assert mean.count == 0 and mean.total_weight == 0


# -- a round over real gRPC ----------------------------------------------------------------------


def test_grpc_round_stages_one_large_upload_at_a_time() -> None:
    model = [np.arange(300_000, dtype=np.float32) % 1000, np.ones((40, 25), np.float32)]
    deltas = {"a": 1.0, "b": 2.0, "c": 6.0}

    def handler(node: str) -> Any:
        def handle(task: Message) -> Message:
            params = parameters_to_ndarrays(task.content.parameters)
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
                [p + deltas[node] for p in params]), 1, {})  # fmt: skip
            return task.reply(res)

        return handle

    history, engine, staged = engine_over_sessions(
        model, handler, list(deltas), accumulator="model", max_staged_bytes=1 << 20
    )
    assert [r["fit"]["num_results"] for r in history.rounds] == [3, 3]
    expected = [m + 2 * 3.0 for m in model]  # every round adds the mean delta, 3
    assert all(
        np.array_equal(a, b) for a, b in zip(engine.parameters.arrays, expected, strict=True)
    )
    held = [slots for _, slots in staged]
    assert held and max(held) == 1  # 1.2 MB uploads, a 1 MiB budget: one at a time
