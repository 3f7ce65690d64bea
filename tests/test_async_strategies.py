"""FedBuff and FedAsync: staleness, weighting, equivalence with FedAvg, resume mid-buffer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import initial
from fedhive.client import ClientApp
from fedhive.client.numpy_client import NumPyClient
from fedhive.client.state import StateStore
from fedhive.common.clock import VirtualClock
from fedhive.common.errors import ConfigError
from fedhive.common.records import Code, FitRes, RecordDict, Status, ndarrays_to_parameters
from fedhive.server import Engine, RoundCallback, ServerConfig, SimpleClientManager
from fedhive.server.asynchronous import BufferedAsync
from fedhive.server.checkpoint import Checkpointer
from fedhive.server.policy import SyncRounds, default_policy
from fedhive.server.strategy import FedAsync, FedAvg, FedBuff
from fedhive.server.strategy.staleness import StalenessFunction
from fedhive.simulation.runner import VirtualClientRunner
from fedhive.testing import FakeReply, FakeTransport
from fedhive.transport import InProcessTransport


class Sorted(SimpleClientManager):
    """Samples like SimpleClientManager, returned in id order (same fold order everywhere)."""

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        picked = super().sample(num_clients, min_num_clients, criterion)
        return sorted(picked, key=lambda c: c.cid)


class Step(NumPyClient):
    """A deterministic client whose update depends on the model and on its id."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fit(self, parameters, config):
        new = [p * np.float32(0.9) + np.float32(0.1 * (self.pid + 1)) for p in parameters]
        return new, 3 + 2 * self.pid, {}


class Models(RoundCallback):
    def __init__(self) -> None:
        self.models: list[list[np.ndarray]] = []

    def on_round_end(self, engine, record):
        self.models.append([a.copy() for a in engine.parameters.arrays])


class EqualStep(Step):
    """Step with the same example count everywhere (uniform and weighted means agree)."""

    def fit(self, parameters, config):
        new, _, metrics = super().fit(parameters, config)
        return new, 4, metrics


def _run(
    strategy, policy, num_clients=5, rounds=4, clock=None, checkpointer=None, cb=None, client=Step
):
    ids = [str(i) for i in range(num_clients)]
    store = StateStore()
    runner = VirtualClientRunner(
        ClientApp(lambda cid: client(int(cid))), store, {c: {} for c in ids}, {}
    )
    transport = InProcessTransport(runner, num_workers=2)
    callback = cb or Models()
    try:
        engine = Engine(
            strategy=strategy,
            transport=transport,
            client_manager=Sorted(ids, seed=0),
            config=ServerConfig(num_rounds=rounds),
            seed=0,
            policy=policy,
            clock=clock or VirtualClock(),
            callbacks=[callback],
            checkpointer=checkpointer,
        )
        history = engine.run()
    finally:
        transport.close()
        store.close()
    return history, callback


def _shape():
    return ndarrays_to_parameters([np.linspace(-1, 1, 7, dtype=np.float32), np.ones((2, 3))])


def test_staleness_functions():
    poly = StalenessFunction("poly", exponent=0.5)
    assert poly(0) == 1.0 and poly(3) == 0.5
    hinge = StalenessFunction("hinge", exponent=2.0, hinge_at=2)
    assert [hinge(t) for t in (0, 2, 3, 5)] == [1.0, 1.0, 1 / 3, 1 / 7]
    assert StalenessFunction("constant")(100) == 1.0
    with pytest.raises(ConfigError, match="staleness must be one of"):
        StalenessFunction("linear")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="staleness_exponent"):
        StalenessFunction("poly", exponent=-1.0)


def test_fedbuff_with_buffer_equal_to_concurrency_is_fedavg_bit_for_bit():
    n = 5
    _, fedavg = _run(
        FedAvg(
            fraction_fit=1.0,
            min_fit_clients=n,
            fraction_evaluate=0.0,
            initial_parameters=_shape(),
        ),
        SyncRounds(),
    )
    fedbuff_strategy = FedBuff(
        buffer_size=n,
        concurrency=n,
        staleness="constant",
        server_lr=1.0,
        fraction_fit=1.0,
        min_fit_clients=1,
        fraction_evaluate=0.0,
        initial_parameters=_shape(),
    )
    history, fedbuff = _run(fedbuff_strategy, None)  # the strategy picks its policy
    assert history.config["policy"] == "buffered-async"
    assert len(fedavg.models) == len(fedbuff.models) == 4
    for a, b in zip(fedavg.models, fedbuff.models, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)  # exactly, not approximately
    for record in history.rounds:
        assert [s["staleness"] for s in record["staleness"]] == [0] * n


def test_fedbuff_server_lr_scales_the_step_and_a_stale_delta_counts_against_its_base():
    # one client, buffer 1: x1 = x0 + lr * (y - x0)
    s = FedBuff(
        buffer_size=1,
        concurrency=1,
        server_lr=0.5,
        min_fit_clients=1,
        min_available_clients=1,
        initial_parameters=initial((3,)),
    )
    x0 = s.initialize_parameters(SimpleClientManager(["a"]))
    assert x0 is not None
    from fedhive.server.client_manager import ClientProxy

    s.configure_fit(1, x0, SimpleClientManager(["a"], seed=0))
    agg = s.fit_aggregator(1, x0)
    y = ndarrays_to_parameters([np.full(3, 2.0, np.float32)])
    agg.add(ClientProxy("a"), FitRes(Status(Code.OK, ""), y, 4, {}))
    x1, metrics = agg.finalize()
    np.testing.assert_allclose(x1.arrays[0], 1.0)
    assert metrics["staleness_max"] == 0
    # a result from a client with no task on record is refused
    agg = s.fit_aggregator(2, x1)
    from fedhive.common.errors import InvalidUpdate

    with pytest.raises(InvalidUpdate, match="no fit task"):
        agg.add(ClientProxy("a"), FitRes(Status(Code.OK, ""), y, 4, {}))


def test_fedbuff_folds_stale_deltas_on_several_bases_as_the_formula_says():
    """x3 = x2 + lr * sum n s(tau) (y - x_b) / sum n, with results on two older bases
    (the correction is kept per base and expanded at publish time, also in a dump)."""
    from fedhive.server.client_manager import ClientProxy

    def fit_res(value: float, n: int) -> FitRes:
        params = ndarrays_to_parameters([np.full(3, value, np.float32)])
        return FitRes(Status(Code.OK, ""), params, n, {})

    s = FedBuff(buffer_size=1, concurrency=3, server_lr=0.5, min_fit_clients=1,
                min_available_clients=1, initial_parameters=initial((3,)))  # fmt: skip
    x0 = s.initialize_parameters(SimpleClientManager(["a", "b", "c"]))
    assert x0 is not None
    s.configure_fit(1, x0, SimpleClientManager(["a", "b", "c"], seed=0))  # all on x0
    agg = s.fit_aggregator(1, x0)
    agg.add(ClientProxy("a"), fit_res(2.0, 4))
    x1, _ = agg.finalize()
    s.configure_fit(2, x1, SimpleClientManager(["a"], seed=0))  # a again, on x1
    agg = s.fit_aggregator(2, x1)
    agg.add(ClientProxy("b"), fit_res(-1.0, 2))  # on x0, one version late
    x2, _ = agg.finalize()
    agg = s.fit_aggregator(3, x2)
    agg.add(ClientProxy("c"), fit_res(3.0, 5))  # on x0, two late
    agg.add(ClientProxy("a"), fit_res(1.0, 3))  # on x1, one late
    dumped = RecordDict()
    agg.dump(dumped)
    x3, metrics = agg.finalize()
    b0, b1, b2 = (p.arrays[0].astype(np.float64) for p in (x0, x1, x2))
    w = StalenessFunction("poly", 0.5, 4)
    want = b2 + 0.5 * (5 * w(2) * (3.0 - b0) + 3 * w(1) * (1.0 - b1)) / 8
    np.testing.assert_allclose(x3.arrays[0], want, rtol=1e-6)
    assert metrics["staleness_max"] == 2
    saved = dumped.array_records["fedbuff.buffer.c"]["0"]
    np.testing.assert_allclose(saved, 5 * w(2) * (b2 - b0) + 3 * w(1) * (b2 - b1))


def test_dispatches_of_one_version_share_one_task_content():
    # as a synchronous round's clients share one FitIns (its sizing and encoding done
    # once), a version's dispatches do; a new model or config gives a new content
    configs = iter([{"e": 1}, {"e": 1}, {"e": 2}, {"e": 2}, {"e": 2}])
    s = FedBuff(
        buffer_size=2,
        concurrency=2,
        min_fit_clients=1,
        min_available_clients=1,
        initial_parameters=initial((3,)),
        on_fit_config_fn=lambda _: next(configs),
    )
    manager = SimpleClientManager(["a", "b", "c"], seed=0)
    x0 = s.initialize_parameters(manager)
    assert x0 is not None
    first = s.configure_fit(1, x0, manager)[0][1]
    again = s.configure_fit(1, x0, manager)[0][1]
    assert again is first and again.config == {"e": 1}
    other = s.configure_fit(1, x0, manager)[0][1]  # the config changed
    assert other is not first and other.config == {"e": 2}
    x1 = ndarrays_to_parameters([np.full(3, 2.0, np.float32)])
    newer = s.configure_fit(2, x1, manager)[0][1]  # another model
    assert newer is not other and newer.parameters is x1
    assert s.configure_fit(2, x1, manager)[0][1] is newer


def _fake_async(strategy, delays, rounds):
    """FakeTransport clients: each returns the model + 1 after ``delays[cid]`` seconds."""

    def answer(task):
        arrays = [a + 1 for a in task.content.parameters.arrays]
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})
        return FakeReply(res, delay=delays[task.metadata.node_id])

    transport = FakeTransport(answer)
    engine = Engine(
        strategy=strategy,
        transport=transport,
        client_manager=Sorted(list(delays), seed=0),
        config=ServerConfig(num_rounds=rounds),
        seed=0,
        clock=VirtualClock(),
    )
    return engine.run(), transport


def test_staleness_is_counted_in_versions_published_meanwhile_under_interleavings():
    # a answers in 1 s, b in 3 s, c in 10 s; one result per version (FedAsync)
    strategy = FedAsync(
        alpha=0.5, concurrency=3, fraction_evaluate=0.0, initial_parameters=initial((2,))
    )
    history, transport = _fake_async(strategy, {"a": 1.0, "b": 3.0, "c": 10.0}, rounds=16)
    folded = [
        (r["staleness"][0]["client_id"], r["staleness"][0]["staleness"]) for r in history.rounds
    ]
    # t=1 a (v0 -> v1), t=2 a (v1), t=3 b then a arrive together: b trained on v0 with v2
    # out (staleness 2), a on v2 with v3 out (1); both are sent v4 only after both folded.
    assert folded[:4] == [("a", 0), ("a", 0), ("b", 2), ("a", 1)]
    # every result's staleness is the versions published since its task was sent
    sent_version = {}
    for task in transport.sent:
        sent_version.setdefault(task.metadata.node_id, []).append(task.metadata.model_version)
    for record in history.rounds:
        (entry,) = record["staleness"]
        base = sent_version[entry["client_id"]].pop(0)
        assert entry["staleness"] == record["round"] - 1 - base
    c = [s for cid, s in folded if cid == "c"]
    assert c and c[0] >= 8  # the straggler's first result is very stale
    shares = {e["client_id"]: e["share"] for e in history.rounds[-1]["contributions"]}
    assert shares and all(0 < v <= 1 for v in shares.values())


def test_fedasync_mixes_with_alpha_times_the_staleness_weight():
    strategy = FedAsync(
        alpha=0.5,
        concurrency=1,
        staleness="constant",
        fraction_evaluate=0.0,
        initial_parameters=initial((2,)),
    )
    history, _ = _fake_async(strategy, {"a": 1.0}, rounds=2)
    # x1 = 0.5 * 0 + 0.5 * (0 + 1) = 0.5; x2 = 0.5 * 0.5 + 0.5 * 1.5 = 1.0
    assert history.rounds[-1]["virtual_time_s"] == 2.0
    assert strategy.ledger.version == 2


def test_max_staleness_refuses_old_results():
    strategy = FedAsync(
        alpha=0.5,
        concurrency=2,
        max_staleness=1,
        fraction_evaluate=0.0,
        initial_parameters=initial((2,)),
    )
    history, _ = _fake_async(strategy, {"a": 1.0, "b": 5.0}, rounds=6)
    reasons = [f["reason"] for r in history.rounds for f in r.get("failures", [])]
    assert any("exceeds max_staleness 1" in reason for reason in reasons)
    assert all(s["staleness"] <= 1 for r in history.rounds for s in r["staleness"])


def test_default_policy_follows_the_strategy():
    assert isinstance(default_policy(FedAvg()), SyncRounds)
    policy = default_policy(FedBuff(buffer_size=3, concurrency=7, max_staleness=2))
    assert isinstance(policy, BufferedAsync)
    assert (policy.buffer_size, policy.concurrency, policy.max_staleness) == (3, 7, 2)
    assert default_policy(FedAsync(concurrency=4)).buffer_size == 1
    with pytest.raises(ConfigError, match="server_optimizer"):
        FedBuff(server_optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="alpha"):
        FedAsync(alpha=0.0)


def test_secure_aggregation_with_an_asynchronous_strategy_is_refused_with_the_reason():
    from conftest import add_client_fn
    from fedhive.simulation import start_simulation

    with pytest.raises(ConfigError, match="staleness"):
        start_simulation(
            client_fn=add_client_fn,
            num_clients=4,
            strategy=FedBuff(buffer_size=2, concurrency=2, initial_parameters=initial((3,))),
            secure_aggregation={"threshold": 3},
        )


class Crash(Exception):
    pass


class CrashingCheckpointer(Checkpointer):
    """Saves like Checkpointer, then crashes the run after ``after`` saves."""

    def __init__(self, directory, after):
        super().__init__(directory)
        self.after = after
        self.saves = 0

    def __call__(self, engine):
        super().__call__(engine)
        self.saves += 1
        if self.saves == self.after:
            raise Crash


def test_resume_mid_buffer_keeps_the_buffered_results(tmp_path):
    def strategy():
        return FedBuff(
            buffer_size=4,
            concurrency=2,
            fraction_evaluate=0.0,
            initial_parameters=_shape(),
        )

    def policy():
        return BufferedAsync(buffer_size=4, concurrency=2, checkpoint_every=1)

    # saves: after results 1, 2, 3, version 1, results 5, 6 -> crash after the 6th
    with pytest.raises(Crash):
        _run(strategy(), policy(), checkpointer=CrashingCheckpointer(tmp_path, after=6))
    meta = json.loads((Checkpointer(tmp_path).latest() / "meta.json").read_text())
    assert meta["round"] == 1 and meta["policy"]["state"]["open"]["num_results"] == 2

    histories = []
    for _ in range(2):  # resuming twice from the same checkpoint gives the same run
        resumed = strategy()
        pol = policy()
        checkpointer = Checkpointer(tmp_path)
        ids = [str(i) for i in range(5)]
        store = StateStore()
        runner = VirtualClientRunner(
            ClientApp(lambda cid: Step(int(cid))), store, {c: {} for c in ids}, {}
        )
        transport = InProcessTransport(runner, num_workers=2)
        engine = Engine(
            strategy=resumed,
            transport=transport,
            client_manager=Sorted(ids, seed=0),
            config=ServerConfig(num_rounds=3),
            seed=0,
            policy=pol,
            clock=VirtualClock(),
        )
        try:
            assert checkpointer.restore(engine)
            history = engine.run()
        finally:
            transport.close()
            store.close()
        histories.append(history.without_timings())
        version2 = history.rounds[1]
        assert version2["round"] == 2 and version2["fit"]["num_results"] == 4
        # the two results buffered before the crash are part of version 2
        assert len(version2["staleness"]) == 4
    assert histories[0] == histories[1]
    from fedhive.server.history import History

    saved = History.from_dict(meta["history"]).without_timings()
    assert histories[0]["rounds"][0] == saved["rounds"][0]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fedbuff_over_grpc_makes_progress_without_waiting_for_slow_clients(tmp_path):
    """start_server(strategy=FedBuff(...)): three client processes answer at once, two
    sleep for a minute in fit; versions are published from the fast ones (no round
    barrier), and the run resumes from its checkpoint with the version counter."""
    import time

    from grpc_helpers import ServerThread, client_process, finish

    def serve(num_rounds, resume):
        strategy = FedBuff(
            buffer_size=2,
            concurrency=4,
            staleness="poly",
            min_fit_clients=1,
            min_available_clients=5,
            min_evaluate_clients=1,
            fraction_evaluate=0.2,
            initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
            evaluate_fn=lambda rnd, params, cfg: (float(params[0].mean()), {}),
        )
        server = ServerThread(
            config=ServerConfig(num_rounds=num_rounds, round_timeout=120),
            strategy=strategy,
            checkpoint_dir=tmp_path,
            resume=resume,
            seed=0,
            wait_timeout=30,
        ).start()
        return server, strategy

    server, _ = serve(5, resume=False)
    started = time.monotonic()
    fast = [client_process(server.address, "--pid", str(i)) for i in range(3)]
    slow = [client_process(server.address, "--pid", str(i), "--mode", "hang") for i in (3, 4)]
    try:
        history = server.join(timeout=120)
        took = time.monotonic() - started
    finally:
        for proc in slow:
            proc.kill()
        finish(fast)
        finish(slow)
    versions = history.rounds[1:]
    assert [r["model_version"] for r in versions] == [1, 2, 3, 4, 5]
    assert history.config["policy"] == "buffered-async"
    assert took < 55  # the slow clients sleep 60 s: nobody waited for them
    assert all(len(r["staleness"]) == 2 for r in versions)
    assert all(s["staleness"] >= 0 for r in versions for s in r["staleness"])

    server, resumed_strategy = serve(7, resume=True)
    fast = [client_process(server.address, "--pid", str(i)) for i in range(5)]
    try:
        resumed = server.join(timeout=120)
    finally:
        finish(fast)
    assert [r["model_version"] for r in resumed.rounds[1:]] == [1, 2, 3, 4, 5, 6, 7]
    assert resumed_strategy.ledger.version == 7  # the counter continued from the checkpoint


def test_dp_fedbuff_clips_each_delta_noises_each_version_and_accounts_participation():
    from fedhive.privacy.accounting import Release
    from fedhive.privacy.asynchronous import DifferentialPrivacyFedBuff

    def answer(task):  # a huge update; a answers every second, b after 10 s
        arrays = [a + 100.0 for a in task.content.parameters.arrays]
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 5, {})
        return FakeReply(res, delay={"a": 1.0, "b": 10.0}[task.metadata.node_id])

    inner = FedBuff(
        buffer_size=2, concurrency=2, fraction_evaluate=0.0, initial_parameters=initial((4,))
    )
    strategy = DifferentialPrivacyFedBuff(
        inner, noise_multiplier=0.0, clipping_norm=1.0, noise_seed=3
    )
    models = Models()
    engine = Engine(
        strategy=strategy,
        transport=FakeTransport(answer),
        client_manager=Sorted(["a", "b"], seed=0),
        config=ServerConfig(num_rounds=2),
        seed=0,
        clock=VirtualClock(),
        callbacks=[models],
    )
    history = engine.run()
    assert history.config["policy"] == "buffered-async"  # it is still FedBuff's shape
    first = history.rounds[0]
    # a's two results land in version 1: its contribution counts twice
    assert [s["client_id"] for s in first["staleness"]] == ["a", "a"]
    assert first["fit"]["metrics"]["dp_max_contributions"] == 2
    assert strategy.accountant.segments[0][0] == Release(0.0)
    # clipped: two deltas of norm <= 1 over K = 2 move the model by at most 1
    (x1,) = models.models[0]
    assert 0.5 < np.linalg.norm(x1) <= 1.0 + 1e-6  # not +100: clipped
    assert strategy.accountant.rounds == 2
    noisy = DifferentialPrivacyFedBuff(
        FedBuff(buffer_size=2, concurrency=2), noise_multiplier=1.0, clipping_norm=1.0
    )
    assert noisy.traits.weighting == "uniform" and not noisy.traits.weighted_mean
    with pytest.raises(ConfigError, match="wraps a FedBuff"):
        DifferentialPrivacyFedBuff(FedAvg(), noise_multiplier=1.0, clipping_norm=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("optimizer", [{"server_momentum": 0.9}, {"server_optimizer": "adam"}])
def test_dp_fedbuff_steps_the_server_optimizer_with_the_released_mean(optimizer):
    """Without noise and clipping, DP-FedBuff with server momentum or Adam is FedBuff with
    it (equal example counts: its uniform mean is FedBuff's weighted one); the optimizer's
    state is part of the checkpoint."""
    from fedhive.privacy.asynchronous import DifferentialPrivacyFedBuff

    def fedbuff():
        return FedBuff(
            buffer_size=2,
            concurrency=2,
            server_lr=0.5,
            fraction_evaluate=0.0,
            initial_parameters=_shape(),
            **optimizer,
        )

    policy = BufferedAsync(buffer_size=2, concurrency=2)
    _, plain = _run(fedbuff(), policy, client=EqualStep)
    dp = DifferentialPrivacyFedBuff(fedbuff(), noise_multiplier=0.0, clipping_norm=1e9)
    _, private = _run(dp, BufferedAsync(buffer_size=2, concurrency=2), client=EqualStep)
    assert len(plain.models) == len(private.models) == 4
    for a, b in zip(plain.models, private.models, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    moved = [np.linalg.norm(m[0] - plain.models[0][0]) for m in plain.models[1:]]
    assert max(moved) > 0
    state = dp.state_dict()
    again = DifferentialPrivacyFedBuff(fedbuff(), noise_multiplier=0.0, clipping_norm=1e9)
    again.load_state_dict(state)
    assert again.state_dict().array_records.keys() == state.array_records.keys()
    saved = [k for k in state.array_records if k.startswith("server_optimizer")]
    assert saved  # the momentum or Adam moments travel with the accountant's ledger
    for key in saved:
        for i, arr in state.array_records[key].items():
            np.testing.assert_array_equal(again.state_dict().array_records[key][i], arr)
