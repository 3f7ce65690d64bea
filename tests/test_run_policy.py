"""Run policies: synchronous rounds and buffered asynchronous aggregation, both finished,
evaluated, checkpointed and resumed alike."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from conftest import AddClient, initial
from fedhive.client import ClientApp
from fedhive.client.state import StateStore
from fedhive.common.clock import ManualClock
from fedhive.common.errors import CheckpointError, ConfigError
from fedhive.server import Engine, RoundCallback, ServerConfig, SimpleClientManager
from fedhive.server.asynchronous import BufferedAsync
from fedhive.server.checkpoint import Checkpointer
from fedhive.server.policy import SyncRounds
from fedhive.server.strategy import FedAvg
from fedhive.simulation.runner import VirtualClientRunner
from fedhive.transport import InProcessTransport


class Versions(RoundCallback):
    def __init__(self) -> None:
        self.ended: list[int] = []
        self.started = 0
        self.finished = 0

    def on_run_start(self, engine):
        self.started += 1

    def on_round_end(self, engine, record):
        self.ended.append(record["model_version"])

    def on_run_end(self, engine, history):
        self.finished += 1


def _strategy():
    return FedAvg(
        fraction_fit=0.5,
        fraction_evaluate=0.5,
        initial_parameters=initial((3,)),
        evaluate_fn=lambda rnd, params, cfg: (float(np.mean(params[0])), {"rnd": rnd}),
    )


def _engine(policy, num_clients=6, workers=2, checkpointer=None, callbacks=(), **kw):
    ids = [str(i) for i in range(num_clients)]
    store = StateStore()
    runner = VirtualClientRunner(
        ClientApp(lambda cid: AddClient(int(cid))), store, {c: {} for c in ids}, {}
    )
    transport = InProcessTransport(runner, num_workers=workers)
    try:
        engine = Engine(
            strategy=kw.pop("strategy", None) or _strategy(),
            transport=transport,
            client_manager=SimpleClientManager(ids, seed=0),
            seed=0,
            policy=policy,
            checkpointer=checkpointer,
            callbacks=callbacks,
            **kw,
        )
    except BaseException:
        transport.close()
        store.close()
        raise
    return engine, transport, store


def _run(engine, transport, store, num_rounds=None):
    try:
        return engine.run(num_rounds)
    finally:
        transport.close()
        store.close()


def test_sync_rounds_is_the_default_policy():
    engine, transport, store = _engine(None, config=ServerConfig(num_rounds=2))
    assert isinstance(engine.policy, SyncRounds)
    history = _run(engine, transport, store)
    assert [r["model_version"] for r in history.rounds[1:]] == [1, 2]
    assert history.config["policy"] == "sync"


def test_async_policy_evaluates_records_and_calls_back_every_version():
    calls = Versions()
    engine, transport, store = _engine(
        BufferedAsync(buffer_size=2, concurrency=3),
        config=ServerConfig(num_rounds=5),
        callbacks=[calls],
    )
    history = _run(engine, transport, store)
    versions = history.rounds[1:]  # round 0 is the initial centralized evaluation
    assert [r["model_version"] for r in versions] == [1, 2, 3, 4, 5]
    assert calls.ended == [1, 2, 3, 4, 5] and calls.started == calls.finished == 1
    for record in versions:
        assert record["fit"]["num_results"] == 2 and record["fit"]["updated"]
        assert "loss" in record["centralized"]
        distributed = record["distributed"]
        assert distributed is not None and distributed["num_results"] >= 1
        assert len(record["staleness"]) == 2
        assert record["elapsed_s"] >= 0
    assert history.config["policy"] == "buffered-async"


def test_async_checkpoint_mid_run_and_resume_continues_the_versions(tmp_path):
    whole, t, s = _engine(BufferedAsync(buffer_size=2, concurrency=2), workers=1)
    full = _run(whole, t, s, num_rounds=6)

    first_policy = BufferedAsync(buffer_size=2, concurrency=2)
    first, t, s = _engine(first_policy, workers=1, checkpointer=Checkpointer(tmp_path))
    _run(first, t, s, num_rounds=3)
    latest = Checkpointer(tmp_path).latest()
    saved = json.loads((latest / "meta.json").read_text())["policy"]
    assert saved["name"] == "buffered-async"
    saved_dispatches = saved["state"]["dispatched"]
    assert 0 < saved_dispatches <= first_policy.dispatched

    resumed_policy = BufferedAsync(buffer_size=2, concurrency=2)
    calls = Versions()
    checkpointer = Checkpointer(tmp_path)
    second, t, s = _engine(resumed_policy, workers=1, checkpointer=checkpointer, callbacks=[calls])
    assert checkpointer.restore(second)
    assert second.current_round == 3 and second.model_version == 3
    assert resumed_policy.dispatched == saved_dispatches  # the seed sequence continues
    history = _run(second, t, s, num_rounds=6)
    assert calls.ended == [4, 5, 6]  # only the versions not yet published
    assert [r.get("model_version") for r in history.rounds] == [
        r.get("model_version") for r in full.rounds
    ]
    assert [r["round"] for r in history.rounds] == [0, 1, 2, 3, 4, 5, 6]
    assert all(r.get("distributed") for r in history.rounds[1:])


def test_a_checkpoint_resumes_only_under_its_own_policy(tmp_path):
    engine, t, s = _engine(None, config=ServerConfig(num_rounds=1), checkpointer=None)
    engine.checkpointer = Checkpointer(tmp_path)
    _run(engine, t, s)
    other, t, s = _engine(BufferedAsync(buffer_size=1, concurrency=1))
    try:
        with pytest.raises(CheckpointError, match=r"'sync' run policy.*'buffered-async'"):
            Checkpointer(tmp_path).restore(other)
    finally:
        t.close()
        s.close()


class Hangs(AddClient):
    def __init__(self, pid, release):
        super().__init__(pid)
        self.release = release

    def fit(self, parameters, config):
        if self.pid == 0:
            self.release.wait(30)
        return super().fit(parameters, config)


class Advance(RoundCallback):
    """Moves the clock past every deadline once the first version is out."""

    def __init__(self, clock):
        self.clock = clock

    def on_round_end(self, engine, record):
        if record["round"] == 1:
            self.clock.advance(1.0)


def test_async_task_past_the_round_timeout_frees_its_slot(release: threading.Event):
    clock = ManualClock()
    ids = [str(i) for i in range(4)]
    store = StateStore()
    runner = VirtualClientRunner(
        ClientApp(lambda cid: Hangs(int(cid), release)), store, {c: {} for c in ids}, {}
    )
    transport = InProcessTransport(runner, num_workers=4)
    engine = Engine(
        strategy=FedAvg(fraction_evaluate=0.0, initial_parameters=initial((3,))),
        transport=transport,
        client_manager=SimpleClientManager(ids, seed=0),
        seed=0,
        config=ServerConfig(num_rounds=4, round_timeout=0.5),
        policy=BufferedAsync(buffer_size=2, concurrency=4),
        clock=clock,
        callbacks=[Advance(clock)],
    )
    history = _run(engine, transport, store)
    failures = [f for r in history.rounds for f in r.get("failures", [])]
    assert "0" in [f["client_id"] for f in failures]
    assert all("round timeout of 0.5 s" in f["reason"] for f in failures)
    assert [r["model_version"] for r in history.rounds] == [1, 2, 3, 4]


def test_async_policy_refuses_what_needs_a_synchronous_round():
    from fedhive.secagg import SecAggPlusWorkflow

    with pytest.raises(ConfigError, match=r"secagg\+.*synchronous round"):
        _engine(BufferedAsync(buffer_size=1, concurrency=1), stages=[SecAggPlusWorkflow()])
    with pytest.raises(ConfigError, match="custom fit_workflow"):
        _engine(BufferedAsync(buffer_size=1, concurrency=1), fit_workflow=lambda driver: None)
    with pytest.raises(ConfigError, match="buffer_size must be an int >= 1"):
        BufferedAsync(buffer_size=0, concurrency=1)
    with pytest.raises(ConfigError, match="policy must be a fedhive RunPolicy"):
        _engine("async")


def test_the_legacy_buffered_async_run_call_still_works():
    engine, transport, store = _engine(None)
    try:
        history = BufferedAsync(buffer_size=1, concurrency=2).run(engine, num_updates=3)
    finally:
        transport.close()
        store.close()
    assert [r["model_version"] for r in history.rounds[1:]] == [1, 2, 3]


@pytest.mark.timeout(180)
def test_async_policy_over_grpc_with_real_client_processes(tmp_path):
    """start_server(policy=BufferedAsync): four client processes, one slow one; versions
    are published without waiting for it, and the run resumes from its checkpoint."""
    from fedhive.common import ndarrays_to_parameters
    from grpc_helpers import ServerThread, client_process, finish

    def serve(num_rounds, resume):
        return ServerThread(
            config=ServerConfig(num_rounds=num_rounds, round_timeout=60),
            strategy=FedAvg(
                min_fit_clients=1,
                min_available_clients=3,
                min_evaluate_clients=1,  # evaluation runs on the idle clients only
                fraction_evaluate=0.5,
                initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
                evaluate_fn=lambda rnd, params, cfg: (float(params[0].mean()), {}),
            ),
            policy=BufferedAsync(buffer_size=2, concurrency=3),
            checkpoint_dir=tmp_path,
            resume=resume,
            seed=0,
            wait_timeout=30,
        ).start()

    server = serve(4, resume=False)
    procs = [client_process(server.address, "--pid", str(i)) for i in range(3)]
    procs.append(client_process(server.address, "--pid", "3", "--mode", "slow"))
    history = server.join(timeout=120)
    finish(procs)
    versions = [r["model_version"] for r in history.rounds[1:]]
    assert versions == [1, 2, 3, 4]
    assert all(r["distributed"] is not None for r in history.rounds[1:])

    server = serve(6, resume=True)
    procs = [client_process(server.address, "--pid", str(i)) for i in range(3)]
    resumed = server.join(timeout=120)
    finish(procs)
    assert [r["model_version"] for r in resumed.rounds[1:]] == [1, 2, 3, 4, 5, 6]


def _async_on_virtual_clock(workers: int):
    from conftest import noisy_client_fn
    from fedhive.common.clock import VirtualClock
    from fedhive.simulation import start_simulation

    def latency(task):  # deterministic per task; client 5 is a heavy straggler
        if task.metadata.node_id == "5":
            return 900.0
        return float(task.metadata.seed % 97) + 1.0

    return start_simulation(
        client_fn=noisy_client_fn,
        num_clients=10,
        config=ServerConfig(num_rounds=6),
        strategy=FedAvg(
            fraction_evaluate=0.3,
            min_evaluate_clients=1,
            initial_parameters=initial((16,)),
            evaluate_fn=lambda rnd, params, cfg: (float(np.mean(params[0])), {}),
        ),
        policy=BufferedAsync(buffer_size=3, concurrency=5),
        seed=5,
        num_workers=workers,
        clock=VirtualClock(),
        latency=latency,
    )


def test_async_on_a_virtual_clock_is_bit_reproducible_on_any_number_of_workers():
    one = _async_on_virtual_clock(1)
    four = _async_on_virtual_clock(4)
    assert one.to_dict() == four.to_dict()  # folds, staleness and elapsed_s included
    versions = one.rounds[1:]
    assert [r["model_version"] for r in versions] == [1, 2, 3, 4, 5, 6]
    assert versions[-1]["elapsed_s"] > 0
    folded = [s["client_id"] for r in versions for s in r["staleness"]]
    assert "5" not in folded[:6]  # the straggler held up no version


class _Crash(BaseException):
    """Stands for the process dying (nothing catches it)."""


def test_async_crash_while_evaluating_a_version_resumes_it_released(tmp_path):
    seen: dict[int, list[tuple[bytes, float]]] = {}
    crash = [2]

    def evaluate_fn(rnd, params, cfg):
        seen.setdefault(rnd, []).append((params[0].tobytes(), float(np.mean(params[0]))))
        if crash and rnd == crash[0]:
            crash.clear()
            raise _Crash
        return float(np.mean(params[0])), {}

    def strategy():
        return FedAvg(
            fraction_fit=0.5, fraction_evaluate=0.5, initial_parameters=initial((3,)),
            evaluate_fn=evaluate_fn,
        )  # fmt: skip

    policy = BufferedAsync(buffer_size=2, concurrency=2)
    checkpointer = Checkpointer(tmp_path)
    first, t, s = _engine(policy, workers=1, checkpointer=checkpointer, strategy=strategy())
    with pytest.raises(_Crash):
        _run(first, t, s, num_rounds=4)
    assert (tmp_path / "LATEST").read_text() == "round-000002-released"

    calls = Versions()
    checkpointer = Checkpointer(tmp_path)
    second, t, s = _engine(
        BufferedAsync(buffer_size=2, concurrency=2), workers=1, checkpointer=checkpointer,
        callbacks=[calls], strategy=strategy(),
    )  # fmt: skip
    assert checkpointer.restore(second)
    assert second.current_round == 2 and second.model_version == 2
    history = _run(second, t, s, num_rounds=4)
    assert calls.ended == [2, 3, 4]  # version 2 is evaluated, never aggregated again
    assert [r["round"] for r in history.rounds] == [0, 1, 2, 3, 4]
    assert seen[2][0] == seen[2][1]
    assert history.rounds[2]["centralized"]["loss"] == seen[2][0][1]
