"""Simulated device heterogeneity on the virtual clock: durations, traces, availability,
dropout, deadlines with over-selection and partial work, and determinism."""

from __future__ import annotations

import time

import numpy as np
import pytest

import fedhive as fl
from conftest import initial, noisy_client_fn
from fedhive.common.errors import ConfigError
from fedhive.common.message import Message, MessageType
from fedhive.common.records import FitIns, ndarrays_to_parameters
from fedhive.server import ServerConfig
from fedhive.server.deadline import DeadlineRounds
from fedhive.server.history import WIRE_KEYS
from fedhive.server.strategy import FedAvg, FedBuff
from fedhive.simulation import SystemModel, start_simulation
from fedhive.simulation.system import AvailableClients, read_trace
from fedhive.transport.base import content_length, wire_length


def _task(cid="0", epochs=2, seed=7, nbytes=4000):
    params = ndarrays_to_parameters([np.zeros(nbytes // 4, np.float32)])
    return Message.task(
        run_id=0,
        node_id=cid,
        server_round=1,
        model_version=0,
        message_type=MessageType.FIT,
        content=FitIns(params, {"local_epochs": epochs}),
        seed=seed,
    )


def test_duration_is_compute_plus_transfer_both_ways():
    model = SystemModel(latency="constant", speed=50.0, bandwidth_mbps=1.0, num_examples={"0": 100})
    task = _task(epochs=3, nbytes=4000)
    plan = model.plan(task)
    compute = 100 * 3 / 50.0
    down = content_length(task) * 8 / 1e6  # the content's encoding: arrays and headers
    assert 4000 < content_length(task) < wire_length(task) < 5000
    assert plan.epochs == 3 and not plan.dropped
    assert plan.duration_s == pytest.approx(compute + down, rel=1e-12)  # until the upload
    # the upload is the reply's own length, known once it is computed
    assert model.upload_seconds(task, 500) == pytest.approx(500 * 8 / 1e6, rel=1e-12)
    assert model.transport_latency()(task) == plan.duration_s
    # bytes count: a bigger model takes longer on the same link
    assert model.plan(_task(nbytes=400_000)).duration_s > model.plan(_task()).duration_s


def test_the_upload_takes_the_recorded_bytes_of_each_reply():
    """Every round's simulated time is computing plus the download and upload of the
    bytes the engine records per client (headers aside): a compressed update (TopK)
    uploads faster."""
    examples = {str(i): 20 for i in range(4)}

    def run(compression):
        return start_simulation(
            client_fn=noisy_client_fn,
            num_clients=4,
            config=ServerConfig(num_rounds=2),
            strategy=FedAvg(
                fraction_fit=1.0, fraction_evaluate=0.0, initial_parameters=initial((20_000,))
            ),
            system=SystemModel(
                latency="constant", speed=100.0, bandwidth_mbps=2.0, num_examples=examples
            ),
            compression=compression,
            seed=3,
            num_workers=2,
        )

    times = {}
    for name, compression in (("plain", None), ("topk", fl.compression.TopK(ratio=0.01))):
        history = run(compression)
        start = 0.0
        rounds = [r for r in history.rounds if r["round"] > 0]
        assert len(rounds) == 2
        for record in rounds:
            per_client = record["bytes_clients"]
            assert len(per_client) == 4
            transfer = max((b["up"] + b["down"]) * 8 / 2e6 for b in per_client.values())
            # the message headers (< 500 bytes each way) do not count
            took = record["virtual_time_s"] - start
            assert 0.2 + transfer - 4e-3 < took < 0.2 + transfer
            start = record["virtual_time_s"]
        times[name] = rounds[0]["virtual_time_s"]
        ups = [b["up"] for b in rounds[0]["bytes_clients"].values()]
        assert (max(ups) > 80_000) == (compression is None)
    assert times["topk"] < times["plain"] - 0.2  # 80 kB less at 2 Mbit/s: 0.32 s


@pytest.mark.parametrize("kind", ["lognormal", "pareto", "halfnormal", "exponential"])
def test_speeds_spread_per_client_and_are_fixed_by_the_seed(kind):
    model = SystemModel(latency=kind, sigma=1.0, seed=3)
    speeds = [model.profile(str(i)).speed for i in range(50)]
    assert len(set(speeds)) == 50  # every client its own device
    assert speeds == [
        SystemModel(latency=kind, sigma=1.0, seed=3).profile(str(i)).speed for i in range(50)
    ]
    if kind != "lognormal":  # slowness factors >= 1: nobody is faster than the median
        assert max(speeds) <= model.speed
    spread = SystemModel(latency="lognormal", sigma=0.0)
    assert {spread.profile(str(i)).speed for i in range(5)} == {spread.speed}


def test_bad_system_values_are_refused_by_name():
    with pytest.raises(ConfigError, match="latency must be one of"):
        SystemModel(latency="gamma")
    with pytest.raises(ConfigError, match="dropout must be a probability"):
        SystemModel(dropout=1.5)
    with pytest.raises(ConfigError, match="bandwidth_mbps"):
        SystemModel(bandwidth_mbps=0)
    with pytest.raises(ConfigError, match='latency = "trace" needs trace'):
        SystemModel(latency="trace")
    with pytest.raises(ConfigError, match="only with latency"):
        SystemModel(trace="devices.csv")


def test_trace_file_gives_devices_and_availability(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(
        "client,speed,up_mbps,down_mbps,availability\n0,100,1,10,\n1,10,0.5,2,0-100;200-300\n"
    )
    model = SystemModel(latency="trace", trace=str(path), num_examples={"0": 100, "1": 100})
    assert model.profile("1").speed == 10.0 and model.profile("1").windows == ((0, 100), (200, 300))
    assert model.online("0", 150) and model.online("1", 50) and not model.online("1", 150)
    assert model.next_online(["1"], 150) == 200
    assert model.plan(_task("1", epochs=1)).duration_s > model.plan(_task("0", epochs=1)).duration_s
    with pytest.raises(ConfigError, match="not in the system trace"):
        model.profile("9")
    bad = tmp_path / "bad.csv"
    bad.write_text("client,speed,up_mbps,down_mbps,availability\n0,fast,1,1,\n")
    with pytest.raises(ConfigError, match="row 2: speed, up_mbps and down_mbps must be numbers"):
        read_trace(bad)
    bad.write_text("client,speed,up_mbps,down_mbps,availability\n0,1,1,1,50-10\n")
    with pytest.raises(ConfigError, match="row 2: availability window '50-10'"):
        read_trace(bad)


def test_offline_clients_are_not_sampled_and_time_waits_for_someone(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("client,speed,up_mbps,down_mbps,availability\n0,1,1,1,0-10\n1,1,1,1,50-60\n")
    model = SystemModel(latency="trace", trace=str(path))
    clock = fl.testing.VirtualClock()
    view = AvailableClients(fl.server.SimpleClientManager(["0", "1"], seed=0), model, clock)
    assert [c.cid for c in view.sample(1)] == ["0"]
    clock.advance(20.0)
    assert view.num_available() == 0
    assert [c.cid for c in view.sample(1)] == ["1"]  # simulated time moved to t = 50
    assert clock.now() == 50.0


def _strategy(**kw):
    return FedAvg(
        fraction_fit=kw.pop("fraction_fit", 0.5),
        fraction_evaluate=0.2,
        min_evaluate_clients=1,
        initial_parameters=initial((16,)),
        evaluate_fn=lambda rnd, params, cfg: (float(np.mean(params[0])), {}),
        **kw,
    )


def _fedbuff_run(workers, rounds=6):
    return start_simulation(
        client_fn=noisy_client_fn,
        num_clients=20,
        config=ServerConfig(num_rounds=rounds),
        strategy=FedBuff(
            buffer_size=3,
            concurrency=6,
            fraction_evaluate=0.2,
            min_evaluate_clients=1,
            initial_parameters=initial((16,)),
            evaluate_fn=lambda rnd, params, cfg: (float(np.mean(params[0])), {}),
        ),
        system=SystemModel(sigma=1.5, dropout=0.1, jitter=0.2, bandwidth_mbps=1.0),
        seed=11,
        num_workers=workers,
    )


def _without_wire(value):
    if isinstance(value, dict):
        return {k: _without_wire(v) for k, v in value.items() if k not in WIRE_KEYS}
    if isinstance(value, list):
        return [_without_wire(v) for v in value]
    return value


def test_seeded_system_runs_are_bit_reproducible_on_one_and_two_workers():
    one = _fedbuff_run(1)
    two = _fedbuff_run(2)
    # models, staleness, virtual and elapsed times included; the byte counts hold message
    # ids, which number a process's messages (WIRE_KEYS), and simulated time leaves them out
    assert _without_wire(one.to_dict()) == _without_wire(two.to_dict())
    times = [r["virtual_time_s"] for r in one.rounds if "virtual_time_s" in r]
    assert len(times) == 6 and times == sorted(times) and times[-1] > 0
    assert any(s["staleness"] > 0 for r in one.rounds for s in r.get("staleness", []))


def test_one_worker_on_the_virtual_clock_trains_on_the_engines_thread(monkeypatch):
    import threading

    from conftest import NoisyClient

    threads: set[int] = set()
    fit = NoisyClient.fit

    def recording_fit(self, parameters, config):
        threads.add(threading.get_ident())
        return fit(self, parameters, config)

    monkeypatch.setattr(NoisyClient, "fit", recording_fit)
    one = _fedbuff_run(1)
    assert threads == {threading.get_ident()}  # no worker thread, no hand-over per task
    threads.clear()
    two = _fedbuff_run(2)
    assert threading.get_ident() not in threads  # two workers: threads, as before
    assert _without_wire(one.to_dict()) == _without_wire(two.to_dict())


def test_hours_of_simulated_stragglers_take_seconds():
    started = time.monotonic()
    history = start_simulation(
        client_fn=noisy_client_fn,
        num_clients=10,
        config=ServerConfig(num_rounds=3),
        strategy=_strategy(),
        system=SystemModel(sigma=2.0, speed=0.05, default_examples=100),  # ~2000 s a task
        seed=1,
        num_workers=1,
    )
    assert history.rounds[-1]["virtual_time_s"] > 3600
    assert time.monotonic() - started < 30


def test_dropout_fails_tasks_midway_with_a_reason():
    history = start_simulation(
        client_fn=noisy_client_fn,
        num_clients=10,
        config=ServerConfig(num_rounds=3),
        strategy=_strategy(fraction_fit=1.0),
        system=SystemModel(latency="constant", dropout=0.5),
        seed=2,
        num_workers=1,
    )
    reasons = [f["reason"] for r in history.rounds for f in r.get("failures", [])]
    assert reasons and all("dropped out mid-task" in reason for reason in reasons)


def _deadline_run(policy, **system):
    examples = {str(i): 10 * (i + 1) for i in range(10)}  # client i takes (i + 1) s an epoch
    return start_simulation(
        client_fn=noisy_client_fn,
        num_clients=10,
        config=ServerConfig(num_rounds=2),
        strategy=_strategy(on_fit_config_fn=lambda rnd: {"local_epochs": 3}),
        policy=policy,
        system=SystemModel(
            latency="constant", speed=10.0, bandwidth_mbps=1e6, num_examples=examples, **system
        ),
        seed=4,
        num_workers=2,
    )


def test_over_selection_keeps_the_first_results_and_drops_the_rest():
    history = _deadline_run(DeadlineRounds(over_selection=0.4))
    for record in history.rounds[1:]:
        fit = record["fit"]
        assert fit["num_clients"] == 7 and fit["wanted"] == 5  # 140% of the 5 asked for
        assert fit["num_results"] == 5 and fit["discarded"] == 2
        assert not record["failures"]


def test_deadline_cuts_stragglers_and_partial_work_brings_them_in():
    cut = _deadline_run(DeadlineRounds(deadline_s=7.5))
    partial = _deadline_run(DeadlineRounds(deadline_s=7.5, partial_work=True))
    for c, p in zip(cut.rounds[1:], partial.rounds[1:], strict=True):
        # 3 epochs of (i + 1) s: only clients 0 and 1 finish within 7.5 s ...
        late = [f for f in c["failures"] if "round deadline of 7.5 s" in f["reason"]]
        assert c["fit"]["num_results"] + len(late) == 5
        assert all(f["client_id"] not in ("0", "1") for f in late)
        # ... with partial work clients 2-6 train the epochs that fit and arrive in time
        p_late = {f["client_id"] for f in p["failures"]}
        assert p_late <= {"7", "8", "9"}
        assert p["fit"]["num_results"] > c["fit"]["num_results"] or not late
    waiting = _deadline_run(DeadlineRounds())  # no deadline: every round waits for all
    assert cut.rounds[-1]["virtual_time_s"] < waiting.rounds[-1]["virtual_time_s"]
    with pytest.raises(ConfigError, match="partial_work needs a deadline_s"):
        DeadlineRounds(partial_work=True)
    with pytest.raises(ConfigError, match="over_selection"):
        DeadlineRounds(over_selection=-0.1)


def test_a_tasks_draws_are_kept_and_give_what_fresh_draws_give(monkeypatch):
    # a task is planned when sent and by the client's mod, and its upload timed later:
    # its jitter and dropout are drawn once, and equal those of a model that never saw it
    import fedhive.simulation.system as system

    monkeypatch.setattr(system, "_DRAWS_KEPT", 8)
    kept = SystemModel(sigma=1.0, dropout=0.3, jitter=0.4, num_examples={"0": 100})
    tasks = [_task(seed=s) for s in range(20)]
    kept.profile("0")  # the device's own draw, once per client
    made = []
    real = np.random.default_rng
    monkeypatch.setattr(system.np.random, "default_rng", lambda *a: made.append(a) or real(*a))
    for task in tasks:
        first = kept.plan(task)
        assert kept.plan(task) == first
        kept.upload_seconds(task, 500)
    assert len(made) == len(tasks)  # one generator per task, not three
    assert len(kept._task_draws) <= 8  # bounded
    for task in tasks:  # earlier tasks, drawn again after the store was cleared
        fresh = SystemModel(sigma=1.0, dropout=0.3, jitter=0.4, num_examples={"0": 100})
        assert kept.plan(task) == fresh.plan(task)
        assert kept.upload_seconds(task, 500) == fresh.upload_seconds(task, 500)
