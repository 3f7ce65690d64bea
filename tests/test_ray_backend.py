"""The Ray backend on real Ray: one local Ray session for the module (its start takes seconds).

The backend joins the session the fixture started, so it must leave it running; tests that
need a session of their own (``ray start --head``, the backend starting Ray) are slow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import initial, noisy_client_fn
from fedhive.client import ClientApp, Context, StateStore
from fedhive.common import FitIns, Message, MessageType, RecordDict, ndarrays_to_parameters
from fedhive.common.errors import ConfigError
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import ClientSetup, start_simulation
from fedhive.simulation.backends import make_backend
from fedhive.transport import Replies

ray = pytest.importorskip("ray")

from fedhive.simulation.ray_backend import RayBackend, _ModelRefs  # noqa: E402

TESTS = str(Path(__file__).parent)
# Ray's own start leaves files open for its daemons; that is Ray's, not a leak of ours
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _env_with_tests_on_path() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray session whose workers import this folder's modules (client_fn's home)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = _env_with_tests_on_path()["PYTHONPATH"]
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    yield
    ray.shutdown()


def simulate(backend, rounds=2, num_clients=6, **kwargs):
    strategy = FedAvg(
        fraction_fit=0.5,
        min_fit_clients=2,
        fraction_evaluate=0.5,
        initial_parameters=initial((16,)),
    )
    return start_simulation(
        client_fn=noisy_client_fn,
        num_clients=num_clients,
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
        seed=7,
        backend=backend,
        num_workers=2,
        **kwargs,
    )


class CountTasks:
    """A mod that answers every task with how many tasks its app instance has run."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, message: Message, context: Context, call_next) -> Message:
        self.count += 1
        records = {"seen": {"count": self.count, "pid": os.getpid()}}
        return message.reply(RecordDict(config_records=records))


def no_client(context: Context):
    raise AssertionError("the mod answers every task")


def fit_tasks(nodes, server_round=1):
    return [
        Message.task(run_id=1, node_id=n, server_round=server_round, model_version=0,
                     message_type=MessageType.FIT,
                     content=FitIns(ndarrays_to_parameters([np.zeros(2)]), {}))
        for n in nodes
    ]  # fmt: skip


def run_tasks(backend, app, nodes, rounds=1, timeout=60.0):
    """Send one batch per round to ``nodes`` through ``backend``; the replies in order."""
    store = StateStore()
    setup = ClientSetup(
        app=app, store=store, node_configs={n: {} for n in nodes}, run_config={}, num_workers=2
    )
    try:
        transport = backend.start(setup)
        out = []
        for rnd in range(1, rounds + 1):
            tasks = fit_tasks(nodes, rnd)
            replies = Replies()
            transport.send(tasks, replies)
            deadline = time.monotonic() + timeout
            got = {}
            while len(got) < len(tasks):
                reply = replies.get(deadline)
                assert reply is not None, f"only {len(got)} of {len(tasks)} replies came"
                got[reply.metadata.node_id] = reply
            out.extend(got[n] for n in nodes)
        return out
    finally:
        backend.close()
        store.close()


def test_ray_gives_the_thread_history_and_leaves_a_session_it_did_not_start(ray_session):
    thread = simulate("thread", rounds=3)
    on_ray = simulate("ray", rounds=3)
    assert on_ray.config["backend"] == "ray"
    rounds = on_ray.without_timings()["rounds"]
    assert rounds == thread.without_timings()["rounds"]
    assert [r["fit"]["num_results"] for r in rounds] == [3, 3, 3]
    assert ray.is_initialized()  # joined, so not shut down


@contextlib.contextmanager
def one_round(store, nodes, timeout=60.0):
    """The Ray backend started over ``store``, one fit task sent to each of ``nodes``
    (answered by ``CountTasks``): (transport, tasks, replies in arrival order)."""
    setup = ClientSetup(
        app=ClientApp(no_client, [CountTasks()]), store=store,
        node_configs={n: {} for n in nodes}, run_config={}, num_workers=2,
    )  # fmt: skip
    backend = RayBackend()
    transport = backend.start(setup)
    try:
        tasks = fit_tasks(nodes)
        replies = Replies()
        transport.send(tasks, replies)
        deadline = time.monotonic() + timeout
        yield transport, tasks, [replies.get(deadline) for _ in tasks]
    finally:
        backend.close()
        store.close()


def test_replies_come_with_their_wire_length_measured_by_the_actor(ray_session, monkeypatch):
    from fedhive.transport import base
    from fedhive.transport.base import wire_length

    measure = base._content_length
    driver_counts = []  # contents whose length the driver computed itself
    monkeypatch.setattr(base, "_content_length", lambda m: driver_counts.append(m) or measure(m))
    store = StateStore()
    with one_round(store, list("abcde")) as (transport, tasks, got):
        assert all(r is not None and r.error is None for r in got)
        sizes = [transport.wire_bytes(r) for r in got]
        assert driver_counts == []  # every length came from an actor
        assert sizes == [wire_length(r) for r in got]
        driver_counts.clear()
        size = transport.wire_bytes(tasks[0])  # a task: computed
        assert driver_counts == [tasks[0]]
        assert size == wire_length(tasks[0])


def test_a_state_that_cannot_be_read_fails_its_task_only(ray_session):
    class BrokenForB(StateStore):
        def get(self, node_id):
            if node_id == "b":
                raise OSError("disk gone")
            return super().get(node_id)

    with one_round(BrokenForB(), list("abc")) as (_, _, replies):
        got = {r.metadata.node_id: r for r in replies}
        assert got["b"].error == "OSError: disk gone"
        assert got["a"].error is None and got["c"].error is None


class BigReply:
    """A mod that answers with ``size`` float32 values of the node's number."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, message: Message, context: Context, call_next) -> Message:
        value = float(ord(message.metadata.node_id))
        records = {"big": {"x": np.full(self.size, value, np.float32)}}
        return message.reply(RecordDict(array_records=records))


@pytest.mark.parametrize("size", [16, 600_000])  # small, and 2.4 MB replies
def test_small_and_large_replies_come_back_whole(ray_session, size):
    replies = run_tasks(RayBackend(), ClientApp(no_client, [BigReply(size)]), list("abcd"))
    for reply in replies:
        x = reply.content.array_records["big"]["x"]
        assert x.shape == (size,) and (x == ord(reply.metadata.node_id)).all()


@pytest.mark.slow
def test_actors_keep_the_client_app_between_tasks(ray_session):
    backend = RayBackend()
    replies = run_tasks(backend, ClientApp(no_client, [CountTasks()]), list("abcdefgh"), 2)
    seen = [r.content.config_records["seen"] for r in replies]
    pids = {int(s["pid"]) for s in seen}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # two actors, not the driver
    counts = sorted(int(s["count"]) for s in seen)
    assert counts[-1] >= 8  # 16 tasks on two actors: each app instance ran many of them
    assert backend.pool is None and ray.is_initialized()


def test_resources_no_actor_can_get_are_refused_at_start(ray_session):
    with pytest.raises(ConfigError, match=r"no client actor fits the cluster.*num_gpus"):
        simulate("ray", rounds=1, client_resources={"num_cpus": 1, "num_gpus": 1})
    with pytest.raises(ConfigError, match=r"unknown keys \['cores'\]"):
        simulate("ray", rounds=1, client_resources={"cores": 1})


def test_the_global_model_is_put_once_per_model():
    puts = []

    class FakeRay:
        def put(self, value):
            puts.append(value)
            return f"ref{len(puts)}"

    refs = _ModelRefs(FakeRay())
    model = ndarrays_to_parameters([np.ones(3)])
    same = [refs.ref(FitIns(model, {"i": i})) for i in range(100)]
    assert same == ["ref1"] * 100 and len(puts) == 1
    assert refs.ref(FitIns(ndarrays_to_parameters([np.zeros(3)]), {})) == "ref2"
    assert refs.ref(FitIns(model, {})) == "ref1"  # the last two models are kept
    assert refs.ref("not a model") is None
    assert make_backend("ray").name == "ray"


class Crashing:
    """A mod that ends its actor's process for the nodes named (as a segfault would)."""

    def __init__(self, how: dict[str, str]) -> None:
        self.how = how

    def __call__(self, message: Message, context: Context, call_next) -> Message:
        how = self.how.get(message.metadata.node_id)
        if how == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if how == "exit":
            os._exit(3)
        if how == "hang":
            time.sleep(3600)
        return message.reply(RecordDict(config_records={"ok": {"pid": os.getpid()}}))


@pytest.mark.slow
def test_a_dead_actor_fails_its_task_only_and_is_replaced(ray_session):
    backend = RayBackend(task_timeout=20.0)
    app = ClientApp(no_client, [Crashing({"b": "segfault", "d": "exit"})])
    replies = run_tasks(backend, app, list("abcdef"), rounds=2, timeout=90.0)
    failed = {r.metadata.node_id: r.error for r in replies if r.error}
    assert set(failed) == {"b", "d"}, failed
    for reason in failed.values():
        assert "died during the task" in reason and "replaced" in reason
    assert sum(1 for r in replies if r.error is None) == 8  # the rest of both rounds


@pytest.mark.slow
def test_a_hung_client_meets_its_task_timeout(ray_session):
    backend = RayBackend(task_timeout=3.0)
    app = ClientApp(no_client, [Crashing({"a": "hang"})])
    start = time.monotonic()
    # 12 cheap tasks a round: in round 2 the hung one is in a batch, retried alone
    replies = run_tasks(backend, app, list("abcdefghijkl"), rounds=2, timeout=60.0)
    assert time.monotonic() - start < 40
    errors = [r.error for r in replies if r.error]
    assert len(errors) == 2 and all("task_timeout=3 s" in e for e in errors)


@pytest.mark.slow
def test_thread_process_and_ray_give_the_same_seeded_history(ray_session):
    thread = simulate("thread", rounds=3).without_timings()["rounds"]
    assert simulate("process", rounds=3).without_timings()["rounds"] == thread
    assert simulate("ray", rounds=3).without_timings()["rounds"] == thread


def test_a_client_fn_ray_cannot_send_is_a_clear_error(ray_session):
    import threading

    lock = threading.Lock()

    def client_fn(context):
        with lock:
            return noisy_client_fn(context)

    with pytest.raises(ConfigError, match=r"serializable by cloudpickle.*lock"):
        start_simulation(client_fn=client_fn, num_clients=4, backend="ray", num_workers=1)
    assert ray.is_initialized()


def test_batches_follow_what_clients_cost():
    from fedhive.simulation.ray_feed import ActorFeed

    class NoActors:
        live = ()

    feed = ActorFeed(None, NoActors(), task_timeout=10.0, start_timeout=1.0, tick=0.1, max_batch=32)
    try:
        assert feed.batch_size() == 1  # nothing known yet: one task per call
        feed.learn(32, 32 * 1e-4, 32 * 100)  # cheap and small: a full batch
        assert feed.batch_size() == 32
        for _ in range(20):
            feed.learn(4, 4 * 0.5, 4 * 100)  # half a second each: one per call
        assert feed.batch_size() == 1 and feed.slack() == pytest.approx(5.1, rel=0.05)
        for _ in range(20):
            feed.learn(4, 4 * 1e-4, 4 * (4 << 20))  # cheap but 4 MiB replies: 8 MiB a call
        assert feed.batch_size() == 2
    finally:
        feed.close()


def test_a_call_queued_behind_a_running_one_takes_only_a_full_batch():
    from fedhive.simulation.ray_feed import ActorFeed, FeedItem

    class NoActors:
        live = ()

    def item(n: int) -> FeedItem:
        task = Message.task(
            run_id=1, node_id=str(n), server_round=1, model_version=0,
            message_type=MessageType.FIT, content=FitIns(ndarrays_to_parameters([]), {}),
        )  # fmt: skip
        context = Context(node_id=str(n), node_config={}, state=RecordDict(), run_config={})
        return FeedItem(task, task, None, lambda: context, None)

    feed = ActorFeed(None, NoActors(), task_timeout=10.0, start_timeout=1.0, tick=0.1, max_batch=32)
    try:
        feed.learn(8, 8 * 1e-4, 8 * 100)  # cheap: batches of max_batch (32)
        feed.submit([item(n) for n in range(20)])
        assert feed.take(block=False, full=True) == []  # 20 queued: wait for more
        assert len(feed.take(block=False)) == 20  # an idle actor takes what there is
        feed.submit([item(n) for n in range(40)])
        assert len(feed.take(block=False, full=True)) == 32
        assert feed.take(block=False, full=True) == []
        assert len(feed.take(block=True, full=True)) == 8  # blocking: never waits for more
    finally:
        feed.close()


@pytest.mark.slow
def test_cheap_tasks_share_calls_and_a_crash_in_a_batch_fails_its_task_only(ray_session):
    nodes = [f"n{i}" for i in range(40)]
    backend = RayBackend()
    started = []
    start = backend.start
    backend.start = lambda setup: started.append(start(setup)) or started[-1]
    replies = run_tasks(backend, ClientApp(no_client, [Crashing({})]), nodes, rounds=3)
    assert all(r.error is None for r in replies) and len(replies) == 120
    assert started[0].feed.calls <= 40  # after the first calls, dozens of tasks a call

    # A crash in a batch: its tasks run again one a call; only the crashing one fails.
    app = ClientApp(no_client, [Crashing({"n17": "exit", "n30": "segfault"})])
    replies = run_tasks(RayBackend(task_timeout=30.0), app, nodes, rounds=3, timeout=120.0)
    failed = [(r.metadata.server_round, r.metadata.node_id) for r in replies if r.error]
    assert sorted(failed) == [(rnd, n) for rnd in (1, 2, 3) for n in ("n17", "n30")]
    assert all("died during the task" in r.error for r in replies if r.error)
    assert sum(1 for r in replies if r.error is None) == 3 * 38


def test_tasks_fail_rather_than_wait_once_no_feeder_is_left():
    from fedhive.simulation.ray_feed import ActorFeed, FeedItem

    class BrokenPool:
        live = (object(),)

        def checkout(self):
            raise RuntimeError("no actor for you")

    task = Message.task(
        run_id=1, node_id="a", server_round=1, model_version=0,
        message_type=MessageType.FIT, content=FitIns(ndarrays_to_parameters([]), {}),
    )  # fmt: skip
    context = Context(node_id="a", node_config={}, state=RecordDict(), run_config={})
    feed = ActorFeed(None, BrokenPool(), task_timeout=None, start_timeout=1.0, tick=0.05)
    item = FeedItem(task, task, None, lambda: context, None)
    feed.submit([item])
    assert item.done.wait(10.0)
    assert item.reply is not None and "closed" in item.reply.error


class VisitsInState:
    """A mod that counts a client's tasks in its persistent state and clears the count at 2."""

    def __call__(self, message: Message, context: Context, call_next) -> Message:
        visits = int(context.state.config_records.get("visits", {}).get("n", 0)) + 1
        if visits == 2:
            context.state.config_records.pop("visits")  # state empty again: must be stored
        else:
            context.state.config_records["visits"] = {"n": visits}
        return message.reply(RecordDict(config_records={"seen": {"count": visits}}))


def test_client_state_set_and_cleared_travels_with_batched_tasks(ray_session):
    nodes = [f"n{i}" for i in range(30)]
    app = ClientApp(no_client, [VisitsInState()])
    replies = run_tasks(RayBackend(), app, nodes, rounds=4)
    counts = [int(r.content.config_records["seen"]["count"]) for r in replies]
    assert counts == [1] * 30 + [2] * 30 + [1] * 30 + [2] * 30
