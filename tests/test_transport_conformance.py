"""Every transport must pass this suite: in-process, every simulation backend, gRPC, the fake.

A simulation backend runs client apps, not bare runners: the runner becomes the app's one
mod (it answers without building a client). Backends that cannot be made here (Ray
without its extra) are not listed. Ray runs in one local session for the whole module
(started when its first case runs; those cases are slow).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from fedhive.client import ClientApp, Context, StateStore
from fedhive.common import FitIns, Message, MessageType, RecordDict, ndarrays_to_parameters
from fedhive.common.clock import ManualClock, VirtualClock
from fedhive.common.errors import ConfigError, MissingDependency
from fedhive.simulation import ClientSetup, backend_names
from fedhive.simulation.backends import Backend, make_backend
from fedhive.testing import FakeTransport
from fedhive.transport import InProcessTransport, Replies, Transport


def echo_runner(task: Message) -> Message:
    if task.metadata.node_id == "boom":
        raise RuntimeError("runner exploded")
    return task.reply(RecordDict(config_records={"echo": {"node": task.metadata.node_id}}))


def echoed(reply: Message) -> str:
    return str(reply.content.config_records["echo"]["node"])


NODES = [str(i) for i in range(20)] + ["a", "b", "c", "boom"]


def make_in_process(runner: Callable[[Message], Message]) -> Transport:
    return InProcessTransport(runner, num_workers=2)


def make_in_process_single(runner: Callable[[Message], Message]) -> Transport:
    return InProcessTransport(runner, num_workers=1, window=1)


def make_in_process_starting(runner: Callable[[Message], Message]) -> Transport:
    """``start_tasks``: each list of tasks runs later on a thread of its own, which answers
    them (the way the Ray feeders do), never on the transport's thread."""

    def start(starts: list[tuple[Message, Callable[[Message], None]]]) -> None:
        def run() -> None:
            time.sleep(0.01)
            for task, answer in starts:
                try:
                    reply = runner(task)
                except Exception as exc:
                    reply = task.error_reply(f"{type(exc).__name__}: {exc}")
                answer(reply)

        threading.Thread(target=run, daemon=True).start()

    return InProcessTransport(None, num_workers=2, start_tasks=start)


class GrpcLoopback(Transport):
    """A gRPC server on 127.0.0.1 with one client session (thread) per node in NODES."""

    def __init__(self, runner: Callable[[Message], Message]) -> None:
        from fedhive.transport.grpc_client import ClientSecurity, ClientSession
        from fedhive.transport.grpc_server import GrpcServer

        def handle(task: Message) -> Message:  # what the client runtime does with failures
            try:
                return runner(task)
            except Exception as exc:
                return task.error_reply(f"{type(exc).__name__}: {exc}")

        self.server = GrpcServer("127.0.0.1:0", chunk_bytes=64).start()
        address = f"127.0.0.1:{self.server.port}"
        self.threads = []
        for node in NODES:
            session = ClientSession(
                address, node, handle, security=ClientSecurity(insecure=True), chunk_bytes=64
            )
            thread = threading.Thread(target=session.run, daemon=True)
            thread.start()
            self.threads.append(thread)
        if not self.server.client_manager.wait_for(len(NODES), timeout=20):
            raise TimeoutError("clients did not connect")

    def send(self, messages, replies):
        self.server.send(messages, replies)

    def close(self):
        self.server.close()
        for thread in self.threads:
            thread.join(5)


class RunnerMod:
    """A client mod that answers every task with ``runner`` (picklable if the runner is)."""

    def __init__(self, runner: Callable[[Message], Message]) -> None:
        self.runner = runner

    def __call__(self, message: Message, context: Context, call_next) -> Message:
        return self.runner(message)


def no_client(context: Context):
    raise AssertionError("the runner mod answers every task; no client is built")


class BackendTransport(Transport):
    """The transport a registered simulation backend builds, closed with its backend."""

    def __init__(self, name: str, runner: Callable[[Message], Message]) -> None:
        self.backend: Backend = make_backend(name)
        self.store = StateStore()
        setup = ClientSetup(
            app=ClientApp(no_client, [RunnerMod(runner)]),
            store=self.store,
            node_configs={node: {} for node in NODES},
            run_config={},
            num_workers=2,
        )
        self.inner = self.backend.start(setup)

    def send(self, messages, replies):
        self.inner.send(messages, replies)

    def close(self):
        self.backend.close()
        self.store.close()


def _available(name: str) -> bool:
    try:
        make_backend(name).close()
    except (MissingDependency, ConfigError):  # e.g. Ray without its extra
        return False
    return True


_RAY_SESSION: list[bool] = []


def _ray_session() -> None:
    """Start the module's Ray session once; its workers import this folder's modules."""
    if _RAY_SESSION:
        return
    import warnings

    import ray

    saved = os.environ.get("PYTHONPATH")
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, saved) if p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray's start-up tips and its daemons' files
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    _RAY_SESSION.append(True)


@pytest.fixture(scope="module", autouse=True)
def _stop_ray_session():
    yield
    if _RAY_SESSION:
        import ray

        ray.shutdown()
        _RAY_SESSION.clear()


def _backend_factory(name: str):
    def make_backend_transport(runner):
        if name != "thread" and runner is not echo_runner:
            return None  # other processes: only the module-level runner travels there
        if name == "ray":
            _ray_session()
        return BackendTransport(name, runner)

    make_backend_transport.__name__ = f"backend_{name}"
    return make_backend_transport


def make_fake(runner: Callable[[Message], Message]) -> Transport:
    return FakeTransport(runner)


# Ray's start and stop leave files open for its daemons: Ray's, not a leak of ours
_RAY_MARKS = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

TRANSPORTS = [
    make_in_process,
    make_in_process_single,
    make_in_process_starting,
    *(
        pytest.param(_backend_factory(name), marks=_RAY_MARKS, id=f"backend_{name}")
        if name == "ray"
        else _backend_factory(name)
        for name in backend_names()
        if _available(name)
    ),
    GrpcLoopback,
    make_fake,
]


def tasks(nodes, rnd=1):
    params = ndarrays_to_parameters([np.zeros(2)])
    return [
        Message.task(
            run_id=9, node_id=n, server_round=rnd, model_version=0,
            message_type=MessageType.FIT, content=FitIns(params, {}),
        )
        for n in nodes
    ]  # fmt: skip


def drain(replies: Replies, count: int, timeout: float = 30.0) -> list[Message]:
    # generous: worker processes start slowly on a loaded machine; a pass returns at once
    deadline = time.monotonic() + timeout
    out = []
    while len(out) < count:
        reply = replies.get(deadline)
        assert reply is not None, f"only {len(out)} of {count} replies arrived"
        out.append(reply)
    return out


@pytest.fixture(params=TRANSPORTS, ids=lambda f: f.__name__)
def make(request):
    made = []

    def factory(runner=echo_runner):
        transport = request.param(runner)
        if transport is not None:
            made.append(transport)
        return transport

    yield factory
    for transport in made:
        transport.close()


def test_exactly_one_reply_per_task_with_matching_metadata(make):
    transport = make()
    sent = tasks([str(i) for i in range(20)])
    replies = Replies()
    transport.send(sent, replies)
    got = drain(replies, 20)
    assert sorted(r.metadata.reply_to for r in got) == sorted(t.metadata.message_id for t in sent)
    for reply in got:
        assert echoed(reply) == reply.metadata.node_id
        assert reply.metadata.run_id == 9 and reply.metadata.server_round == 1
    assert replies.get(time.monotonic() + 0.05) is None  # nothing extra


def test_runner_failure_becomes_an_error_reply(make):
    transport = make()
    replies = Replies()
    transport.send(tasks(["a", "boom", "b"]), replies)
    got = {r.metadata.node_id: r for r in drain(replies, 3)}
    assert got["boom"].error and "runner exploded" in got["boom"].error
    assert got["a"].error is None and got["b"].error is None


def test_start_tasks_keeps_at_most_num_workers_unanswered():
    lock = threading.Lock()
    given: list[list[tuple[Message, Callable[[Message], None]]]] = []
    unanswered = [0]
    peak = [0]

    def start(starts):
        with lock:
            unanswered[0] += len(starts)
            peak[0] = max(peak[0], unanswered[0])
            given.append(starts)

    transport = InProcessTransport(None, num_workers=3, start_tasks=start)
    try:
        replies = Replies()
        transport.send(tasks([str(i) for i in range(10)]), replies)
        answered = 0
        deadline = time.monotonic() + 10
        while answered < 10 and time.monotonic() < deadline:
            with lock:
                pending = [pair for starts in given for pair in starts]
                given.clear()
            for task, answer in pending:
                with lock:
                    unanswered[0] -= 1
                answer(task.reply(RecordDict()))
                answered += 1
            time.sleep(0.01)
        assert len(drain(replies, 10)) == 10
        assert peak[0] == 3
    finally:
        transport.close()
    with pytest.raises(ValueError, match="exactly one"):
        InProcessTransport(None, num_workers=1)


def test_several_sends_share_one_mailbox(make):
    transport = make()
    replies = Replies()
    transport.send(tasks(["a", "b"]), replies)
    transport.send(tasks(["c"], rnd=2), replies)
    assert sorted(r.metadata.node_id for r in drain(replies, 3)) == ["a", "b", "c"]


def test_in_process_cancel_drops_tasks_not_started(make):
    gate = threading.Event()
    started = []

    def slow(task):
        started.append(task.metadata.node_id)
        gate.wait(5)
        return task.reply(RecordDict())

    transport = make(slow)
    if isinstance(transport, BackendTransport):
        transport = transport.inner
    if not isinstance(transport, InProcessTransport):
        return  # a network or fake transport has already delivered every task
    replies = Replies()
    transport.send(tasks([str(i) for i in range(10)]), replies)
    time.sleep(0.1)
    replies.cancel()
    gate.set()
    time.sleep(0.2)
    assert len(started) <= 2  # only the tasks already running went on


def test_deadline_on_a_manual_clock():
    clock = ManualClock()
    gate = threading.Event()
    transport = InProcessTransport(lambda t: (gate.wait(5), t.reply(None))[1], num_workers=1)
    replies = Replies(clock)
    try:
        transport.send(tasks(["slow"]), replies)
        result: list[Message | None] = []
        waiter = threading.Thread(target=lambda: result.append(replies.get(deadline=10.0)))
        waiter.start()
        time.sleep(0.05)
        assert waiter.is_alive()  # real time passes, the manual clock does not
        clock.advance(10.0)
        waiter.join(2)
        assert result == [None]
    finally:
        gate.set()
        transport.close()


def test_window_bounds_how_far_ahead_tasks_start():
    running = []
    peak_ahead = []
    lock = threading.Lock()
    done: set[int] = set()

    def runner(task):
        index = int(task.metadata.node_id)
        with lock:
            oldest = min(set(range(40)) - done)
            peak_ahead.append(index - oldest)
            running.append(index)
        time.sleep(0.002 if index % 5 else 0.02)
        with lock:
            done.add(index)
        return task.reply(None)

    transport = InProcessTransport(runner, num_workers=2, window=4)
    replies = Replies()
    try:
        transport.send(tasks([str(i) for i in range(40)]), replies)
        drain(replies, 40)
    finally:
        transport.close()
    assert max(peak_ahead) < 4


def test_on_a_virtual_clock_every_reply_arrives_at_once(make):
    transport = make()
    if isinstance(transport, GrpcLoopback):
        return  # replies over a network come in real time; simulated time is for simulation
    clock = VirtualClock(start=100.0)
    replies = Replies(clock)
    sent = tasks([str(i) for i in range(12)])
    transport.send(sent, replies)
    got = [replies.get(deadline=100.0) for _ in sent]  # no simulated time passes
    assert [r.metadata.reply_to for r in got if r] == [t.metadata.message_id for t in sent]
    assert clock.now() == 100.0
    assert replies.get(clock.now() + 3600.0) is None and clock.now() == 3700.0
