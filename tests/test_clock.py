"""The clocks: a discrete-event virtual clock, deterministic simulated latency, backoff.

A seeded simulation on a :class:`VirtualClock` with simulated latencies gives the same
history, timings included, on 1 or 4 workers and whatever the real compute times; hours
of simulated stragglers take seconds; deadlines turn late tasks into timeouts at exactly
the simulated deadline.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time

import numpy as np
import pytest

import fedhive as fl
from conftest import initial, noisy_client_fn
from fedhive.common import FitIns, Message, MessageType, RecordDict
from fedhive.common.clock import Arrival, ManualClock, SystemClock, VirtualClock, sleep_async
from fedhive.common.errors import ConfigError, TransportError
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation
from fedhive.transport import InProcessTransport, Replies
from fedhive.transport.base import content_length, wire_length

# -- the virtual clock alone ------------------------------------------------------------------


def test_arrivals_come_in_time_order_then_announcement_order():
    clock = VirtualClock()
    mailbox: queue.SimpleQueue[str] = queue.SimpleQueue()
    arrivals = {name: clock.schedule(mailbox, at) for name, at in
                [("c@5", 5.0), ("a@2", 2.0), ("d@5", 5.0), ("b@2", 2.0), ("e@9", 9.0)]}  # fmt: skip
    for name in ["e@9", "d@5", "b@2", "c@5", "a@2"]:  # computed in another order
        assert arrivals[name].put(name)
    got = [(clock.wait(mailbox, None), clock.now()) for _ in range(5)]
    assert got == [("a@2", 2.0), ("b@2", 2.0), ("c@5", 5.0), ("d@5", 5.0), ("e@9", 9.0)]


def test_the_earliest_arrival_is_awaited_until_computed():
    clock = VirtualClock()
    mailbox: queue.SimpleQueue[str] = queue.SimpleQueue()
    early, late = clock.schedule(mailbox, 1.0), clock.schedule(mailbox, 2.0)
    late.put("late")  # ready first, but it arrives later
    threading.Timer(0.05, early.put, ("early",)).start()
    assert clock.wait(mailbox, None) == "early" and clock.now() == 1.0
    assert clock.wait(mailbox, None) == "late" and clock.now() == 2.0


def test_next_at_tells_the_earliest_announced_time_without_waiting():
    clock = VirtualClock()
    mailbox: queue.SimpleQueue[str] = queue.SimpleQueue()
    assert clock.next_at(mailbox) is None
    late, early = clock.schedule(mailbox, 9.0), clock.schedule(mailbox, 4.0)
    assert clock.next_at(mailbox) == 4.0  # announced, not yet computed: still a bound
    early.put("early", delay=2.0)  # its upload makes it later than announced
    late.put("late")
    assert clock.next_at(mailbox) == 4.0  # a lower bound until the clock looks
    assert clock.wait(mailbox, None) == "early" and clock.now() == 6.0
    assert clock.next_at(mailbox) == 9.0
    mailbox.put("unannounced")  # waiting in the mailbox: it enters now
    assert clock.next_at(mailbox) == 6.0
    replies = Replies(clock)
    assert not replies.may_arrive_by(clock.now())
    replies.expect(clock.now() + 1.0)
    assert not replies.may_arrive_by(clock.now()) and replies.may_arrive_by(clock.now() + 1.0)
    assert Replies(SystemClock()).may_arrive_by(0.0)  # only get() knows on a real clock


def test_a_deadline_before_the_next_arrival_passes_at_once():
    clock = VirtualClock()
    mailbox: queue.SimpleQueue[str] = queue.SimpleQueue()
    clock.schedule(mailbox, 3600.0).put("an hour late")
    started = time.perf_counter()
    with pytest.raises(queue.Empty):
        clock.wait(mailbox, deadline=60.0)
    assert clock.now() == 60.0 and time.perf_counter() - started < 1.0
    assert clock.wait(mailbox, None) == "an hour late" and clock.now() == 3600.0
    with pytest.raises(queue.Empty):  # nothing announced: the deadline is the next event
        clock.wait(mailbox, deadline=4000.0)
    assert clock.now() == 4000.0


def test_an_arrival_at_the_deadline_is_in_time_and_time_never_goes_back():
    clock = VirtualClock(start=10.0)
    mailbox: queue.SimpleQueue[str] = queue.SimpleQueue()
    clock.schedule(mailbox, 20.0).put("on time")
    assert clock.wait(mailbox, deadline=20.0) == "on time"
    clock.advance(5.0)
    clock.schedule(mailbox, 21.0).put("in the past")
    assert clock.wait(mailbox, None) == "in the past" and clock.now() == 25.0


def test_an_item_put_with_a_delay_arrives_that_much_later_in_time_order():
    # announced times are lower bounds (a reply's upload is known once it is computed)
    clock = VirtualClock()
    mailbox: queue.SimpleQueue[str] = queue.SimpleQueue()
    a, b, c = (clock.schedule(mailbox, at) for at in (1.0, 2.0, 2.0))
    late = clock.schedule(mailbox, 7.0)
    b.put("b", delay=4.0)  # 6.0
    late.put("late", delay=10.0)  # 17.0
    c.put("c")
    a.put("a", delay=5.0)  # 6.0, announced before b: first of the tie
    got = [(clock.wait(mailbox, None), clock.now()) for _ in range(3)]
    assert got == [("c", 2.0), ("a", 6.0), ("b", 6.0)]
    with pytest.raises(queue.Empty):  # announced for 7, but it comes at 17
        clock.wait(mailbox, deadline=10.0)
    assert clock.now() == 10.0
    assert clock.wait(mailbox, None) == "late" and clock.now() == 17.0
    with pytest.raises(ConfigError, match="finite number of seconds >= 0"):
        clock.schedule(mailbox, 20.0).put("x", delay=-1.0)


def test_withdrawn_arrivals_are_not_awaited_and_give_back_their_items():
    clock = VirtualClock()
    mailbox: queue.SimpleQueue[str] = queue.SimpleQueue()
    never: Arrival[str] = clock.schedule(mailbox, 1.0)
    ready = clock.schedule(mailbox, 2.0)
    assert never.cancel() is None and not never.put("too late")
    assert ready.put("x") and clock.pending(mailbox) == 1
    assert clock.cancel(mailbox) == ["x"] and clock.pending(mailbox) == 0
    with pytest.raises(queue.Empty):
        clock.wait(mailbox, deadline=5.0)


def test_sleep_moves_simulated_time_and_real_time_on_the_system_clock():
    virtual, manual = VirtualClock(), ManualClock()
    started = time.perf_counter()
    virtual.sleep(3600.0)
    manual.sleep(7.5)
    assert virtual.now() == 3600.0 and manual.now() == 7.5
    assert time.perf_counter() - started < 0.5
    system = SystemClock()
    before = system.now()
    system.sleep(0.02)
    assert system.now() - before >= 0.02
    with pytest.raises(ConfigError, match="duration"):
        virtual.sleep(-1.0)
    import asyncio

    asyncio.run(sleep_async(virtual, 60.0))
    assert virtual.now() == 3660.0


# -- replies and the in-process transport on simulated time -----------------------------------


def _tasks(nodes, rnd=1):
    params = fl.common.ndarrays_to_parameters([np.zeros(2)])
    return [
        Message.task(run_id=1, node_id=n, server_round=rnd, model_version=0,
                     message_type=MessageType.FIT, content=FitIns(params, {}))
        for n in nodes
    ]  # fmt: skip


def _seeded_latency(task: Message) -> float:
    return float(np.random.default_rng(task.metadata.seed or 0).exponential(30.0))


def _jittery_runner(seed: int):
    """Answers each task after a random *real* delay: threads finish in any order."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def run(task: Message) -> Message:
        with lock:
            pause = rng.uniform(0, 0.004)
        time.sleep(pause)
        return task.reply(RecordDict(config_records={"n": {"node": task.metadata.node_id}}))

    return run


def _deliveries(
    workers: int, jitter_seed: int, deadline: float | None = None, inline: bool = False
):
    clock = VirtualClock()
    replies = Replies(clock)
    latency = {str(i): float((i * 37) % 11) * 10.0 for i in range(24)}  # ties included
    transport = InProcessTransport(
        _jittery_runner(jitter_seed), num_workers=workers,
        latency=lambda t: latency[t.metadata.node_id], inline=inline,
    )  # fmt: skip
    try:
        transport.send(_tasks([str(i) for i in range(24)]), replies)
        out = []
        while (reply := replies.get(deadline)) is not None:
            out.append((reply.metadata.node_id, clock.now()))
            if len(out) == 24:
                break
        return out, clock.now()
    finally:
        replies.cancel()
        transport.close()


def test_delivery_order_and_times_depend_only_on_simulated_latency():
    expected, _ = _deliveries(1, jitter_seed=0)
    times = [t for _, t in expected]
    assert times == sorted(times) and len(set(times)) < len(times)  # ties were broken
    for workers, seed in [(1, 1), (4, 2), (4, 3)]:
        assert _deliveries(workers, seed)[0] == expected
    tied = [node for node, t in expected if t == times[0]]
    assert tied == sorted(tied, key=int)  # same time: the order the tasks were sent


def test_inline_transport_runs_tasks_on_the_waiting_thread_in_the_same_order():
    expected, _ = _deliveries(1, jitter_seed=0)
    assert _deliveries(1, jitter_seed=5, inline=True)[0] == expected
    on_time, end = _deliveries(1, jitter_seed=6, deadline=50.0, inline=True)
    assert on_time == [d for d in expected if d[1] <= 50.0] and end == 50.0
    # no worker thread: each task runs on the thread that waits for its reply
    clock, ran_on = VirtualClock(), []
    replies = Replies(clock)

    def run(task: Message) -> Message:
        ran_on.append(threading.get_ident())
        if task.metadata.node_id == "bad":
            raise ValueError("client broke")
        return task.reply(RecordDict())

    transport = InProcessTransport(run, latency=lambda t: 1.0, inline=True)
    try:
        transport.send(_tasks(["a", "bad", "b"]), replies)
        got = [replies.get(None) for _ in range(3)]
        assert not transport._threads and ran_on == [threading.get_ident()] * 3
        assert got[1] is not None and "ValueError: client broke" in (got[1].error or "")
    finally:
        replies.cancel()
        transport.close()
    assert not clock._helpers  # closing stops the clock calling it
    # mailboxes on a second virtual clock: a worker thread serves them
    transport = InProcessTransport(run, latency=lambda t: 1.0, inline=True)
    first, second = Replies(VirtualClock()), Replies(VirtualClock())
    try:
        transport.send(_tasks(["a"]), first)
        transport.send(_tasks(["b"]), second)
        assert second.get(None) is not None and first.get(None) is not None
        assert len(transport._threads) == 1
    finally:
        first.cancel()
        second.cancel()
        transport.close()
    # more than one worker, or no virtual clock: worker threads as before
    assert not InProcessTransport(run, num_workers=2, inline=True).inline


def test_a_clock_helper_computes_what_the_waiting_thread_waits_for():
    clock = VirtualClock()
    mailbox: queue.SimpleQueue[str] = queue.SimpleQueue()
    late, early = clock.schedule(mailbox, 9.0), clock.schedule(mailbox, 4.0)
    todo = [(early, "early"), (late, "late")]

    def helper() -> bool:
        if not todo:
            return False
        arrival, item = todo.pop(0)
        return arrival.put(item)

    clock.assist(helper)
    assert clock.wait(mailbox, None) == "early" and clock.now() == 4.0
    assert clock.wait(mailbox, None) == "late" and clock.now() == 9.0
    clock.unassist(helper)
    clock.unassist(helper)  # unknown: ignored

    class Stop(BaseException):  # e.g. Ctrl-C while a client trains on the waiting thread
        pass

    def stopping() -> bool:
        raise Stop

    stuck = clock.schedule(mailbox, 10.0)
    clock.assist(stopping)
    with pytest.raises(Stop):
        clock.wait(mailbox, None)
    clock.unassist(stopping)
    other = threading.Thread(target=stuck.put, args=("after",))
    other.start()  # the clock's lock was given back: another thread can still use it
    other.join(2.0)
    assert not other.is_alive()
    assert clock.wait(mailbox, None) == "after" and clock.now() == 10.0
    pending = clock.schedule(mailbox, 12.0)
    threading.Timer(0.05, pending.put, ("threaded",)).start()  # no helper: a real wait
    assert clock.wait(mailbox, None) == "threaded"


def test_late_tasks_time_out_at_the_simulated_deadline():
    on_time, end = _deliveries(4, jitter_seed=4, deadline=50.0)
    assert on_time == [d for d in _deliveries(1, jitter_seed=0)[0] if d[1] <= 50.0]
    assert end == 50.0


def test_a_later_send_that_arrives_first_is_not_held_back_by_the_bound():
    # Tasks of the first send, arriving later, fill the bound; the task of a second send
    # arrives before them, so the clock waits for it: it must start all the same.
    clock = VirtualClock()
    replies = Replies(clock)
    arrive = {f"a{i}": 10.0 * (i + 1) for i in range(6)} | {"b0": 1.0}
    transport = InProcessTransport(
        _jittery_runner(0), num_workers=1, max_pending=4,
        latency=lambda t: arrive[t.metadata.node_id],
    )  # fmt: skip
    try:
        transport.send(_tasks([f"a{i}" for i in range(6)]), replies)
        first = replies.get(deadline=None)
        assert first is not None and first.metadata.node_id == "a0" and clock.now() == 10.0
        time.sleep(0.2)  # a1..a3 computed too: the worker waits, held back by the bound
        transport.send(_tasks(["b0"], rnd=2), replies)
        time.sleep(0.1)  # b0 waits too: a0, which arrives before it, is still held
        got = [replies.get(deadline=100.0) for _ in range(6)]
        assert [(r.metadata.node_id if r else None) for r in got] == [
            "b0",
            "a1",
            "a2",
            "a3",
            "a4",
            "a5",
        ]
        assert clock.now() == 60.0
    finally:
        replies.cancel()
        transport.close()


def test_one_task_sends_start_in_arrival_order_across_sends_and_skip_a_cancelled_mailbox():
    # An asynchronous run sends one task per freed slot: many one-task sends at once.
    # The worker starts them by announced arrival, whichever send came first; the tasks
    # of a mailbox whose consumer has gone never start.
    clock = VirtualClock()
    replies, gone = Replies(clock), Replies(clock)
    started: list[str] = []
    gate = threading.Event()

    def run(task: Message) -> Message:
        gate.wait(5.0)
        started.append(task.metadata.node_id)
        return task.reply(RecordDict())

    arrive = {f"c{i}": float((i * 7) % 20) for i in range(20)} | {"g0": 0.5, "g1": 1.5}
    transport = InProcessTransport(
        run, num_workers=1, window=64, latency=lambda t: arrive[t.metadata.node_id]
    )
    try:
        transport.send(_tasks(["c0"]), replies)  # the worker takes it and waits
        time.sleep(0.1)
        for name in ("g0", "g1"):
            transport.send(_tasks([name]), gone)
        for i in range(1, 20):
            transport.send(_tasks([f"c{i}"], rnd=i), replies)
        gone.cancel()
        gate.set()
        got = [replies.get(deadline=None) for _ in range(20)]
        assert [r.metadata.node_id for r in got if r is not None] == sorted(
            arrive.keys() - {"g0", "g1"}, key=lambda n: arrive[n]
        )
        later = sorted((f"c{i}" for i in range(1, 20)), key=lambda n: arrive[n])
        assert started == ["c0", *later]
    finally:
        replies.cancel()
        transport.close()


class _UploadLatency:
    """Every task starts its upload at t = 1 + its number; the upload takes a second
    per 100 bytes of its reply's content."""

    def __init__(self):
        self.sizes: dict[str, int] = {}

    def __call__(self, task: Message) -> float:
        return 1.0 + int(task.metadata.node_id[1:])

    def upload_seconds(self, task: Message, reply_bytes: int) -> float:
        self.sizes[task.metadata.node_id] = reply_bytes
        return reply_bytes / 100.0


def _sized_runner(seed: int):
    jitter = _jittery_runner(seed)

    def run(task: Message) -> Message:
        jitter(task)
        n = (int(task.metadata.node_id[1:]) * 7) % 5  # replies of different sizes
        return task.reply(RecordDict(config_records={"pad": {"x": "p" * 300 * n}}))

    return run


def _upload_deliveries(workers: int, seed: int, max_pending: int | None = None):
    clock = VirtualClock()
    replies = Replies(clock)
    latency = _UploadLatency()
    transport = InProcessTransport(
        _sized_runner(seed), num_workers=workers, latency=latency, max_pending=max_pending
    )
    try:
        transport.send(_tasks([f"t{i}" for i in range(10)]), replies)
        out = []
        for _ in range(10):
            reply = replies.get(None)
            assert reply is not None
            size = content_length(reply)
            assert latency.sizes[reply.metadata.node_id] == size
            # the engine's byte count is the size the upload was timed with, plus headers
            assert transport.wire_bytes(reply) == wire_length(reply)
            out.append((reply.metadata.node_id, clock.now(), size))
        return out
    finally:
        replies.cancel()
        transport.close()


@pytest.mark.timeout(60)
def test_a_reply_arrives_after_its_upload_of_its_real_size():
    expected = _upload_deliveries(1, seed=0)
    for node, at, size in expected:
        assert at == 1.0 + int(node[1:]) + size / 100.0
    assert [at for _, at, _ in expected] == sorted(at for _, at, _ in expected)
    assert [n for n, _, _ in expected] != [f"t{i}" for i in range(10)]  # uploads reorder
    for workers, seed in [(1, 1), (3, 2), (4, 3)]:
        assert _upload_deliveries(workers, seed) == expected
    # held replies arrive later than announced: the bound still lets the awaited one start
    assert _upload_deliveries(1, seed=4, max_pending=2) == expected


def test_latency_needs_a_virtual_clock():
    transport = InProcessTransport(_jittery_runner(0), latency=lambda t: 1.0)
    try:
        with pytest.raises(ConfigError, match="VirtualClock"):
            transport.send(_tasks(["a"]), Replies(SystemClock()))
        with pytest.raises(ConfigError, match="seconds >= 0"):
            bad = InProcessTransport(_jittery_runner(0), latency=lambda t: -1.0)
            bad.send(_tasks(["a"]), Replies(VirtualClock()))
    finally:
        transport.close()


def test_without_latency_the_virtual_clock_is_an_instant_transport():
    clock = VirtualClock(start=5.0)
    replies = Replies(clock)
    transport = InProcessTransport(_jittery_runner(0), num_workers=3)
    try:
        transport.send(_tasks([str(i) for i in range(9)]), replies)
        got = [replies.get(deadline=5.0) for _ in range(9)]
        assert [r.metadata.node_id for r in got if r] == [str(i) for i in range(9)]
        assert clock.now() == 5.0
    finally:
        transport.close()


# -- whole simulations ---------------------------------------------------------------------------


def _simulate(
    workers: int, hour: bool = False, timeout: float | None = None, backend: str = "thread"
):
    clock = VirtualClock()
    seen: list[float] = []

    class Times(fl.server.RoundCallback):
        def on_round_end(self, engine, record):
            seen.append(clock.now())

    def latency(task: Message) -> float:
        if hour and task.metadata.node_id == "3":
            return 3600.0
        return _seeded_latency(task)

    history = start_simulation(
        client_fn=noisy_client_fn,
        num_clients=8,
        config=ServerConfig(num_rounds=3, round_timeout=timeout),
        strategy=FedAvg(fraction_fit=0.75, min_fit_clients=2, fraction_evaluate=0.5,
                        initial_parameters=initial((16,))),
        seed=11,
        num_workers=workers,
        backend=backend,
        clock=clock,
        latency=latency,
        callbacks=[Times()],
    )  # fmt: skip
    return history, seen


def test_seeded_simulation_with_latency_is_identical_timings_included():
    one, times_one = _simulate(1)
    four, times_four = _simulate(4)
    assert one.to_dict() == four.to_dict()  # elapsed_s is on the engine's clock
    assert times_one == times_four and times_one[-1] > 0
    assert [r["elapsed_s"] for r in one.rounds] == times_one


def test_a_seeded_runs_byte_counts_do_not_depend_on_the_messages_made_before(monkeypatch):
    # Message ids come from a process-wide counter; a run made after many others (a long
    # test session, a notebook) must still count the same bytes on the wire.
    import itertools

    import fedhive.common.message as message_module

    monkeypatch.setattr(message_module, "_ids", itertools.count(1))
    early, _ = _simulate(1)
    monkeypatch.setattr(message_module, "_ids", itertools.count(10**9 - 20))
    late, _ = _simulate(1)
    assert early.to_dict() == late.to_dict()


def test_worker_processes_give_the_same_simulated_history():
    processes, threads = _simulate(2, backend="process")[0], _simulate(1)[0]

    def rounds(history):  # byte counts include message ids, numbered per process
        return [{k: v for k, v in r.items() if not k.startswith("bytes_")} for r in history]

    # timings included
    assert rounds(processes.to_dict()["rounds"]) == rounds(threads.to_dict()["rounds"])


def test_an_hour_of_simulated_stragglers_runs_in_seconds():
    started = time.perf_counter()
    history, times = _simulate(4, hour=True)
    assert time.perf_counter() - started < 10.0
    assert times[-1] >= 3600.0  # client 3 was sampled and waited for
    again, _ = _simulate(2, hour=True)
    assert again.to_dict() == history.to_dict()


def test_deadlines_on_the_virtual_clock_turn_late_tasks_into_timeouts():
    history, times = _simulate(4, hour=True, timeout=120.0)
    failed = [f["client_id"] for r in history.rounds for f in r.get("failures", [])]
    assert "3" in failed  # an hour late, timed out after 120 simulated seconds
    assert times[-1] < 3600.0
    assert history.to_dict() == _simulate(1, hour=True, timeout=120.0)[0].to_dict()


# -- backoff and heartbeats go through the clock ------------------------------------------------


def test_client_backoff_waits_on_the_given_clock():
    clock = VirtualClock()
    started = time.perf_counter()
    with pytest.raises(TransportError, match="giving up after 4 attempts"):
        fl.client.start_client(
            server_address="127.0.0.1:1", client=object(),  # type: ignore[arg-type]
            insecure=True, max_retries=3, clock=clock,
        )  # fmt: skip
    # three waits of 0.25, 0.5 and 1 s, each with jitter in [0.5, 1]
    assert 0.875 <= clock.now() <= 1.75
    assert time.perf_counter() - started < 10.0


def test_client_max_wait_time_is_measured_on_the_given_clock():
    clock = VirtualClock()
    with pytest.raises(TransportError, match="giving up"):
        fl.client.start_client(
            server_address="127.0.0.1:1", client=object(),  # type: ignore[arg-type]
            insecure=True, max_wait_time=120.0, clock=clock,
        )  # fmt: skip
    assert clock.now() == pytest.approx(120.0)


def test_server_heartbeat_silence_is_measured_on_the_servers_clock():
    from fedhive.transport.grpc_client import ClientSecurity, ClientSession
    from fedhive.transport.grpc_server import GrpcServer

    clock = ManualClock()
    gate = threading.Event()
    server = GrpcServer("127.0.0.1:0", heartbeat_timeout=30.0, clock=clock).start()
    session = ClientSession(
        f"127.0.0.1:{server.port}", "n1", lambda task: (gate.wait(20), task.reply(None))[1],
        security=ClientSecurity(insecure=True), heartbeat_interval=600.0,
    )  # fmt: skip

    def run() -> None:
        with contextlib.suppress(TransportError):  # dropped: the connection ends
            session.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert server.client_manager.wait_for(1, timeout=20)
        replies = Replies(clock)
        server.send(_tasks(["n1"]), replies)
        time.sleep(1.5)  # real time passes: the manual clock says nobody was silent
        assert server.connected == ["n1"]
        clock.advance(31.0)
        reply = replies.get(deadline=None)
        assert reply is not None and "no heartbeat for 30 s" in str(reply.error)
        assert server.connected == []
    finally:
        gate.set()
        server.close()
        thread.join(5)


# -- the shipped fake transport ----------------------------------------------------------------


def _fake_engine(answer, timeout=60.0):
    from fedhive.common import FitRes, Status
    from fedhive.common.records import Code
    from fedhive.server.client_manager import SimpleClientManager
    from fedhive.server.engine import Engine
    from fedhive.testing import FakeTransport
    from fedhive.testing import VirtualClock as Exported

    assert Exported is VirtualClock

    def fit(task, **plan):
        res = FitRes(Status(Code.OK, ""), task.content.parameters, 1, {})
        return fl.testing.FakeReply(res, **plan)

    clock = VirtualClock()
    transport = FakeTransport(lambda task: answer(task, fit))
    engine = Engine(
        strategy=FedAvg(min_fit_clients=4, min_available_clients=4, fraction_evaluate=0.0,
                        initial_parameters=initial((3,))),
        transport=transport,
        client_manager=SimpleClientManager([str(i) for i in range(4)], seed=0),
        config=ServerConfig(num_rounds=2, round_timeout=timeout),
        seed=0,
        clock=clock,
    )  # fmt: skip
    return engine, transport, clock


def test_fake_transport_delays_drops_and_duplicates_on_simulated_time():
    from fedhive.testing import DROP

    def answer(task, fit):
        node = task.metadata.node_id
        if node == "0":
            return fit(task, delay=600.0)  # a straggler, ten minutes late
        if node == "1":
            return DROP
        if node == "2":
            return fit(task, delay=5.0, copies=2)
        return fit(task, delay=10.0)

    engine, transport, clock = _fake_engine(answer)
    started = time.perf_counter()
    history = engine.run()
    assert time.perf_counter() - started < 5.0
    assert len(transport.sent) == 8
    for record in history.rounds:
        assert record["fit"]["num_results"] == 2
        assert sorted(f["client_id"] for f in record["failures"]) == ["0", "1"]
        assert any("already answered" in r for r in record["refused"])  # the duplicate
    assert [r["elapsed_s"] for r in history.rounds] == [60.0, 120.0]
    assert clock.now() == 120.0


def test_fake_transport_turns_an_exception_into_an_error_reply():
    def answer(task, fit):
        if task.metadata.node_id == "3":
            raise ValueError("no data on this site")
        return fit(task)

    history = _fake_engine(answer)[0].run()
    reasons = [f["reason"] for f in history.rounds[0]["failures"]]
    assert reasons == ["ValueError: no data on this site"]


def test_fake_transport_delays_in_real_time_on_the_system_clock():
    from fedhive.testing import FakeReply, FakeTransport

    transport = FakeTransport(lambda task: FakeReply(None, delay=0.05))
    replies = Replies(SystemClock())
    started = time.monotonic()
    transport.send(_tasks(["a"]), replies)
    assert replies.get(started + 2.0) is not None
    assert time.monotonic() - started >= 0.05
    with pytest.raises(ConfigError, match="copies"):
        FakeReply(copies=-1)
    transport.close()
