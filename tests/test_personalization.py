"""Personalized FL: methods, personal layers that never leave, state, honest evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedhive.client.context import Context  # noqa: E402
from fedhive.client.state import StateStore  # noqa: E402
from fedhive.common.errors import ConfigError, StateError  # noqa: E402
from fedhive.common.records import FitRes, ndarrays_to_parameters  # noqa: E402
from fedhive.common.serde import decode_record_dict  # noqa: E402
from fedhive.data.partition import client_splits, shards  # noqa: E402
from fedhive.models.torch_models import (  # noqa: E402
    CNN1D,
    evaluate_torch,
    get_weights,
    set_weights,
)
from fedhive.personalization import (  # noqa: E402
    SUMMARY_KEYS,
    PersonalizationConfig,
    PersonalizationReport,
    PersonalizedTorchClient,
    SharedSplit,
    report,
    select_personal,
    summarize,
)
from fedhive.personalization.client import STATE_RECORD  # noqa: E402
from fedhive.server.config import ServerConfig  # noqa: E402
from fedhive.server.engine import RoundCallback  # noqa: E402
from fedhive.server.strategy import FedAvg  # noqa: E402
from fedhive.simulation import start_simulation  # noqa: E402

NUM_CLIENTS = 6
FIT = {"local_epochs": 1, "batch_size": 10, "lr": 0.1, "momentum": 0.0}


def _data(seed: int = 0, n: int = 900, dim: int = 40):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(10, dim))
    y = rng.integers(0, 10, n)
    x = (centres[y] + rng.normal(size=(n, dim))).astype(np.float32)
    return x, y


X, Y = _data()
PARTITION = shards(Y, NUM_CLIENTS, 2, seed=0)
SPLITS = client_splits(PARTITION, val_fraction=0.1, test_fraction=0.2, seed=0)


def _model(batch_norm: bool = False) -> torch.nn.Module:
    return CNN1D(10, length=40, channels=4, seed=0, batch_norm=batch_norm)


def _client(config, cid, model=None, **kw):
    part = SPLITS[cid]
    return PersonalizedTorchClient(
        model if model is not None else _model(config.method == "fedbn"),
        config,
        train=(X[part.train], Y[part.train]),
        test=(X[part.test], Y[part.test]),
        val=(X[part.val], Y[part.val]),
        **kw,
    )


class Spy:
    """The outermost client mod: records every reply that leaves a client."""

    def __init__(self):
        self.uploads: list[tuple[str, FitRes]] = []

    def __call__(self, message, context, call_next):
        reply = call_next(message, context)
        if isinstance(reply.content, FitRes):
            self.uploads.append((context.node_id, reply.content))
        return reply


_LAST: dict = {}


class _Capture(RoundCallback):
    """Keeps the server's model after each round (what the server holds)."""

    def on_round_end(self, engine, record):
        _LAST["shared"] = [a.copy() for a in engine.parameters.arrays]


def _simulate(config, rounds=2, mods=(), strategy=None, **kw):
    initial = get_weights(_model(config.method == "fedbn"))
    split = _client(config, 0).split

    def client_fn(context):
        return _client(config, int(context.node_id), initial=initial)

    strategy = strategy or FedAvg(
        fraction_fit=0.5,
        min_fit_clients=3,
        min_evaluate_clients=NUM_CLIENTS,
        initial_parameters=ndarrays_to_parameters(split.shared(initial)),
        on_fit_config_fn=lambda rnd: dict(FIT),
    )
    history = start_simulation(
        client_fn=client_fn,
        num_clients=NUM_CLIENTS,
        strategy=strategy,
        config=ServerConfig(num_rounds=rounds),
        seed=3,
        mods=mods,
        callbacks=[PersonalizationReport(), _Capture()],
        **kw,
    )
    return history, split, initial


# --------------------------------------------------------------------------- selection


def test_selection_by_name_and_by_type():
    model = _model(batch_norm=True)
    by_name = select_personal(model, names=["head"])
    assert by_name.personal_names == ("head.weight", "head.bias")
    by_type = select_personal(model, types=["BatchNorm1d"])
    assert {n.split(".")[1] for n in by_type.personal_names} == {"1", "4", "7"}
    assert len(by_type.personal) == 15  # weight, bias, running mean/var, batch count
    assert {"features.1.running_mean", "features.1.num_batches_tracked"} <= set(
        by_type.personal_names
    )
    assert by_name.shared_indices == tuple(range(by_name.num_arrays - 2))


@pytest.mark.parametrize(
    ("names", "types", "message"),
    [
        (["bn"], [], "matches no parameter"),  # the classic trap: FedAvg in disguise
        ([], ["BatchNorm1d"], "matches no layer"),  # a model without batch norm
        (["*"], [], "matches every parameter"),
        (["head", "nonexistent"], [], "'nonexistent' matches no parameter"),
        ([], [], "no personal layers selected"),
    ],
)
def test_selection_of_nothing_or_everything_is_refused(names, types, message):
    with pytest.raises(ConfigError, match=message):
        select_personal(_model(), names=names, types=types)


def test_fedper_without_personal_layers_is_refused():
    with pytest.raises(ConfigError, match="needs personal layers"):
        PersonalizationConfig(method="fedper")
    with pytest.raises(ConfigError, match="needs personal layers"):
        PersonalizationConfig(method="fedrep")
    with pytest.raises(ConfigError, match="whole model"):
        PersonalizationConfig(method="ditto", personal_layers=("head",))
    with pytest.raises(ConfigError, match="not known"):
        PersonalizationConfig(method="pfedme")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lam"):
        PersonalizationConfig(method="ditto", lam=-1.0)


def test_keras_layers_selected_by_type_and_name(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, name="body"),
            keras.layers.BatchNormalization(name="norm"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    assert len(model.weights) == 8
    by_type = select_personal(model, types=["BatchNormalization"])
    assert by_type.personal == (2, 3, 4, 5)
    by_name = select_personal(model, names=["*/head/*"])
    assert by_name.personal == (6, 7)
    with pytest.raises(ConfigError, match="matches no parameter"):
        select_personal(model, names=["bn"])


def test_shared_split_round_trip():
    arrays = [np.full(2, i, np.float32) for i in range(5)]
    split = SharedSplit(tuple("abcde"), (1, 3))
    shared, personal = split.shared(arrays), split.personal_part(arrays)
    assert [a[0] for a in shared] == [0, 2, 4] and [a[0] for a in personal] == [1, 3]
    assert all(
        np.array_equal(a, b) for a, b in zip(split.merge(shared, personal), arrays, strict=True)
    )
    with pytest.raises(ConfigError, match="same personal layers"):
        split.merge(shared[:2], personal)


# --------------------------------------------------------------------------- never uploaded


@pytest.mark.parametrize(
    "config",
    [
        PersonalizationConfig(method="fedper", personal_layers=("head",)),
        PersonalizationConfig(method="fedrep", personal_layers=("head",), head_epochs=1),
        PersonalizationConfig(method="fedbn"),
    ],
    ids=["fedper", "fedrep", "fedbn"],
)
def test_personal_layers_are_never_uploaded(config, tmp_path):
    spy = Spy()
    history, split, initial = _simulate(
        config, rounds=2, mods=[spy], state_dir=tmp_path, state_memory_limit=0
    )
    assert spy.uploads, "no fit reply was seen"
    personal_shapes = [initial[i].shape for i in split.personal]
    shared_shapes = [initial[i].shape for i in split.shared_indices]
    for _node, res in spy.uploads:
        arrays = res.parameters.arrays
        assert [a.shape for a in arrays] == shared_shapes
        assert res.extras.is_empty()  # a standard model record, nothing beside it
    # what each client kept is exactly what it never sent
    states = {}
    for path in tmp_path.glob("state-*.fhv"):
        state = decode_record_dict(bytearray(path.read_bytes()))
        states[path.name] = state.array_records[STATE_RECORD]
    assert states
    for record in states.values():
        kept = list(record.values())
        assert [a.shape for a in kept] == personal_shapes
        for _, res in spy.uploads:
            for sent in res.parameters.arrays:
                for mine in kept:
                    assert sent.shape != mine.shape or not np.array_equal(sent, mine)
    # the server never held a personal array either
    assert len(history.rounds[-1]["personalized"]["clients"]) == NUM_CLIENTS


def test_fedbn_never_averages_batch_norm_parameters_or_statistics(tmp_path):
    config = PersonalizationConfig(method="fedbn")
    _, split, _ = _simulate(config, rounds=2, state_dir=tmp_path, state_memory_limit=0)
    assert any("running_mean" in n for n in split.personal_names)
    assert any(n.endswith("1.weight") for n in split.personal_names)  # affine BN weight
    kept = [
        decode_record_dict(bytearray(p.read_bytes())).array_records[STATE_RECORD]
        for p in sorted(tmp_path.glob("state-*.fhv"))
    ]
    assert len(kept) >= 3  # the clients that trained
    means = [rec[str(split.personal_names.index("features.1.running_mean"))] for rec in kept]
    # every client's statistics are its own: no two alike, none the initial ones
    for i, a in enumerate(means):
        assert not np.allclose(a, 0.0)
        for b in means[i + 1 :]:
            assert not np.allclose(a, b)
    # and the global (shared) model carries no batch-norm array at all
    assert all("features.1." not in split.names[i] for i in split.shared_indices)


# --------------------------------------------------------------------------- ditto


def test_ditto_with_infinite_lambda_equals_the_global_model():
    params = _client(PersonalizationConfig(), 0).get_parameters({})
    for lam in (math.inf, 1e9):
        client = _client(PersonalizationConfig(method="ditto", lam=lam), 0)
        client.fit(params, FIT)
        personal = client.personal_model(params)
        assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(personal, params, strict=True))
        _, _, m = client.evaluate(params, {})
        assert m["p_test_accuracy"] == m["g_test_accuracy"]
        assert m["p_test_loss"] == pytest.approx(m["g_test_loss"], rel=1e-5)
    # a small lambda lets the personal model move away
    client = _client(PersonalizationConfig(method="ditto", lam=0.0), 0)
    client.fit(params, FIT)
    assert not all(
        np.allclose(a, b) for a, b in zip(client.personal_model(params), params, strict=True)
    )


def test_apfl_learns_its_mixing_weight():
    client = _client(PersonalizationConfig(method="apfl", alpha=0.5, alpha_lr=0.5), 1)
    params = client.get_parameters({})
    client.fit(params, {**FIT, "local_epochs": 2})
    alpha = client._state().config_records["personalization.meta"]["alpha"]
    assert 0.0 <= alpha <= 1.0 and alpha != 0.5


# --------------------------------------------------------------------------- state


def test_state_survives_a_virtual_client_rebuild():
    config = PersonalizationConfig(method="fedper", personal_layers=("head",))
    context = Context(node_id="2", node_config={"partition-id": 2}, seed=11)
    first = _client(config, 2)
    first.context = context
    params = first.get_parameters({})
    first.fit(params, FIT)
    kept = [a.copy() for a in context.state.array_records[STATE_RECORD].values()]
    rebuilt = _client(config, 2)  # a new object, as every virtual client task builds
    rebuilt.context = context
    personal = rebuilt.personal_model(params)
    head = [personal[i] for i in rebuilt.split.personal]
    assert all(np.array_equal(a, b) for a, b in zip(head, kept, strict=True))
    fresh = _client(config, 2)
    fresh.context = Context(node_id="2")
    assert not np.array_equal(fresh.personal_model(params)[-1], kept[-1])


def test_state_survives_a_deployed_client_restart(tmp_path):
    config = PersonalizationConfig(method="ditto", lam=0.5)
    client = _client(config, 3, state_dir=tmp_path)
    client.context = Context(node_id="site-3", seed=5)
    params = client.get_parameters({})
    client.fit(params, FIT)
    (path,) = tmp_path.glob("personal-*.fhv")
    before = path.read_bytes()
    _, _, metrics = client.evaluate(params, {})
    # a new process: new client, empty context, same state directory
    restarted = _client(config, 3, state_dir=tmp_path)
    restarted.context = Context(node_id="site-3")
    _, _, again = restarted.evaluate(params, {})
    assert again == metrics
    assert path.read_bytes() == before  # evaluation rewrote nothing
    other = _client(config, 3, state_dir=tmp_path)
    other.context = Context(node_id="site-4")  # another node has no state there
    assert other.evaluate(params, {})[2]["p_test_accuracy"] == metrics["g_test_accuracy"]
    switched = _client(PersonalizationConfig(method="apfl"), 3, state_dir=tmp_path)
    switched.context = Context(node_id="site-3")
    with pytest.raises(StateError, match="made by method 'ditto'"):
        switched.evaluate(params, {})


def test_state_survives_checkpoint_and_resume(tmp_path):
    config = PersonalizationConfig(method="fedper", personal_layers=("head",))
    straight, _, _ = _simulate(config, rounds=3, checkpoint_dir=tmp_path / "a")
    _simulate(config, rounds=2, checkpoint_dir=tmp_path / "b")
    resumed, _, _ = _simulate(config, rounds=3, checkpoint_dir=tmp_path / "b", resume=True)
    a, b = straight.without_timings(), resumed.without_timings()
    assert a["rounds"] == b["rounds"]
    assert "personalized" in b["rounds"][-1] and "global" in b["rounds"][-1]


def test_state_store_bounds_memory_and_does_not_rewrite_unchanged_states(tmp_path):
    from fedhive.common.records import RecordDict

    store = StateStore(tmp_path, memory_limit_bytes=1 << 20, total_memory_bytes=3000)
    states = {str(i): RecordDict({"p": {"0": np.full(250, i, np.float32)}}) for i in range(5)}
    for node, state in states.items():
        store.put(node, state)
    assert store.memory_bytes <= 3000
    spilled = [n for n in states if store.is_on_disk(n)]
    assert len(spilled) == 2  # 1000 bytes each, 3000 in memory at most
    writes = store.disk_writes
    for node in spilled:
        store.put(node, store.get(node))  # read and stored back unchanged (an evaluation)
    assert store.disk_writes == writes
    changed = store.get(spilled[0])
    changed.array_records["p"]["0"] += 1
    store.put(spilled[0], changed)
    assert store.disk_writes == writes + 1
    assert np.array_equal(store.get(spilled[0]).array_records["p"]["0"], np.full(250, 4.0))


# --------------------------------------------------------------------------- evaluation


def test_client_splits_are_disjoint_and_cover_each_client():
    for part, idx in zip(SPLITS, PARTITION.indices, strict=True):
        together = np.concatenate([part.train, part.val, part.test])
        assert sorted(together.tolist()) == sorted(idx.tolist())
        assert len(set(part.test) & set(part.train)) == 0
        assert len(part.test) == round(len(idx) * 0.2)
    with pytest.raises(ConfigError, match="must be < 1"):
        client_splits(PARTITION, val_fraction=0.5, test_fraction=0.5, seed=0)


def test_per_client_metrics_are_computed_on_that_clients_own_test_split():
    config = PersonalizationConfig(method="fedper", personal_layers=("head",))
    history, split, initial = _simulate(config, rounds=1)
    record = history.rounds[-1]
    assert set(record["personalized"]) == set(SUMMARY_KEYS)
    assert set(record["global"]) == set(SUMMARY_KEYS)
    rows = {r["client_id"]: r for r in record["global"]["clients"]}
    assert sorted(rows, key=int) == [str(i) for i in range(NUM_CLIENTS)]  # also unsampled ones
    model = _model()
    # the global model (the server's shared layers, initial head) on each client's test split
    shared = _LAST["shared"]
    set_weights(model, split.merge(shared, split.personal_part(initial)))
    for cid, row in rows.items():
        part = SPLITS[int(cid)]
        loss, acc = evaluate_torch(model, X[part.test], Y[part.test])
        assert row["num_examples"] == len(part.test)
        assert row["accuracy"] == pytest.approx(acc)
        assert row["loss"] == pytest.approx(loss, rel=1e-5)
        _, vacc = evaluate_torch(model, X[part.val], Y[part.val])
        assert row["val_accuracy"] == pytest.approx(vacc)
        assert row["val_num_examples"] == len(part.val)


def test_summary_figures():
    rows = [
        {"client_id": str(i), "num_examples": n, "accuracy": a}
        for i, (n, a) in enumerate([(10, 0.5), (30, 1.0), (10, 0.0), (50, 0.75)])
    ]
    out = summarize(rows)
    assert list(out) == list(SUMMARY_KEYS)
    assert out["mean"] == pytest.approx(0.5625)
    assert out["weighted_mean"] == pytest.approx((5 + 30 + 0 + 37.5) / 100)
    assert out["median"] == pytest.approx(0.625)
    assert out["worst10"] == 0.0  # the worst client (10% of 4, at least one)
    assert out["std"] == pytest.approx(np.std([0.5, 1.0, 0.0, 0.75]))


def test_report_selects_on_validation_never_on_test():
    def record(rnd, test, val):
        rows = [{"client_id": "0", "num_examples": 1, "accuracy": test, "val_accuracy": val}]
        summary = summarize(rows)
        return {"round": rnd, "personalized": summary, "global": summary}

    history = {"rounds": [record(1, 0.9, 0.2), record(2, 0.5, 0.8), record(3, 0.7, 0.4)]}
    figures = report(history)
    assert figures["last"]["round"] == 3
    assert figures["selected"]["round"] == 2  # best on validation, not round 1 (best test)
    assert figures["selected"]["personalized"]["mean"] == 0.5


def test_reported_validation_mean_skips_clients_without_a_validation_split():
    rows = [
        {"client_id": "0", "num_examples": 4, "accuracy": 0.5, "val_accuracy": 0.6},
        {"client_id": "1", "num_examples": 4, "accuracy": 0.7, "val_accuracy": math.nan},
    ]
    summary = summarize(rows)
    figures = report({"rounds": [{"round": 1, "personalized": summary, "global": summary}]})
    assert figures["selected"]["personalized"]["val_mean"] == 0.6
    assert figures["last"]["global"]["val_mean"] == 0.6


def test_method_none_reports_the_global_model_as_personal():
    history, _, _ = _simulate(PersonalizationConfig(method="none"), rounds=1)
    record = history.rounds[-1]
    assert record["personalized"]["clients"] == record["global"]["clients"]


# --------------------------------------------------------------------------- the rest


def test_fedper_with_fedprox_fedadam_and_central_dp():
    from fedhive.privacy import DifferentialPrivacyServerSideFixedClipping
    from fedhive.server.strategy import FedAdam, FedProx

    config = PersonalizationConfig(method="fedper", personal_layers=("head",))
    split = _client(config, 0).split
    shared = ndarrays_to_parameters(split.shared(get_weights(_model())))
    common = dict(
        fraction_fit=0.5,
        min_fit_clients=3,
        min_evaluate_clients=NUM_CLIENTS,
        initial_parameters=shared,
        on_fit_config_fn=lambda rnd: dict(FIT),
    )
    for strategy in (
        FedProx(proximal_mu=0.1, **common),
        FedAdam(eta=0.01, **common),
        DifferentialPrivacyServerSideFixedClipping(
            FedAvg(**common), noise_multiplier=0.1, clipping_norm=5.0, num_sampled_clients=3
        ),
    ):
        history, _, _ = _simulate(config, rounds=2, strategy=strategy)
        record = history.rounds[-1]
        assert record["fit"]["num_results"] == 3, record
        assert record["personalized"]["mean"] > record["global"]["mean"]


def test_fedper_with_secure_aggregation():
    config = PersonalizationConfig(method="fedper", personal_layers=("head",))
    history, split, _ = _simulate(config, rounds=1, secure_aggregation={"bits": 16, "clip": 4.0})
    record = history.rounds[-1]
    assert record["fit"]["secagg"]["after_unmask"] == 3
    assert len(_LAST["shared"]) == len(split.shared_indices)
    assert record["personalized"]["clients"]


def test_fedper_with_compression():
    """Only the shared part is encoded and uploaded: the personal head stays home, and a
    codec cuts the upload of what is shared."""
    import fedhive as fl

    config = PersonalizationConfig(method="fedper", personal_layers=("head",))
    plain, split, _ = _simulate(config, rounds=2)
    for codec in (fl.compression.FP16(), fl.compression.TopK(ratio=0.25, error_feedback=True)):
        history, _, _ = _simulate(config, rounds=2, compression=codec)
        record = history.rounds[-1]
        assert record["fit"]["num_results"] == 3, record
        assert not record["failures"], record["failures"]
        assert len(_LAST["shared"]) == len(split.shared_indices)  # the model stays shared-only
        assert record["bytes_up"] < plain.rounds[-1]["bytes_up"], codec
        assert record["personalized"]["clients"]


# --------------------------------------------------------------------------- fedhive run


def _cfg(tmp_path, table: str) -> str:
    path = tmp_path / "exp.toml"
    path.write_text(
        f"""
rounds = 2
num_clients = 8
seed = 1
[data]
num_samples = 1000
partition = "shards"
[model]
name = "mlp"
hidden = 16
[train]
local_epochs = 1
[strategy]
fraction_fit = 0.5
{table}
"""
    )
    return str(path)


@pytest.mark.parametrize(
    "table",
    [
        '[personalization]\nmethod = "none"',
        '[personalization]\nmethod = "fedper"\npersonal_layers = ["net.2"]',
        '[personalization]\nmethod = "ditto"\nlam = inf\neval_clients = 4',
    ],
    ids=["none", "fedper", "ditto-sample"],
)
def test_fedhive_run_reports_personalized_and_global(tmp_path, table):
    from fedhive.cli.config import load_config, validate
    from fedhive.cli.experiment import build_experiment, run_experiment

    cfg = validate(load_config(_cfg(tmp_path, table)))
    history = run_experiment(build_experiment(cfg))
    evaluated = [r for r in history.rounds if r.get("distributed")]
    assert evaluated
    expect = cfg.personalization.eval_clients or cfg.num_clients
    for record in evaluated:
        for name in ("personalized", "global"):
            assert set(record[name]) == set(SUMMARY_KEYS)
            assert len(record[name]["clients"]) == expect
    json.dumps(history.to_dict(), allow_nan=False)
    if cfg.personalization.method == "ditto":
        rec = evaluated[-1]
        # lam = inf: the personal model is the global one the client last trained from
        assert all(0 <= r["accuracy"] <= 1 for r in rec["personalized"]["clients"])


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[personalization]\nmethod = "fedper"', "needs personal layers"),
        ('[personalization]\nmethod = "fedbn"', "matches a layer"),
        ('[personalization]\nmethod = "fedper"\npersonal_layers = ["bn"]', "matches no param"),
        ('[personalization]\nmethod = "magic"', "personalization.method"),
        ('[personalization]\nmethod = "none"\nfoo = 1', "unknown key 'personalization.foo'"),
    ],
)
def test_fedhive_run_refuses_bad_personalization(tmp_path, table, message):
    from fedhive.cli.config import load_config, validate
    from fedhive.cli.experiment import build_experiment

    with pytest.raises(ConfigError, match=message):
        build_experiment(validate(load_config(_cfg(tmp_path, table))))


# --------------------------------------------------------------------------- deployment


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_personal_state_survives_a_real_client_process_restart(tmp_path):
    """Run 1 over gRPC trains a FedPer client process; a second process (same node id
    and state directory) serves run 2, which only evaluates: it reports exactly the
    personal model the first process left behind, and no personal array was uploaded."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fedhive.server.checkpoint import load_npz
    from grpc_helpers import ServerThread, finish

    app = Path(__file__).resolve().parent / "apps" / "personal_client.py"
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), str(root / "tests")]))
    from apps.personal_client import CONFIG, model  # type: ignore[import-not-found]
    from fedhive.personalization.client import split_for

    net = model()
    split = split_for(net, CONFIG)
    shared = split.shared(get_weights(net))

    def serve(initial, rounds_fit):
        strategy = FedAvg(
            fraction_fit=1.0 if rounds_fit else 0.0,
            min_fit_clients=1 if rounds_fit else 0,
            min_evaluate_clients=1,
            min_available_clients=1,
            initial_parameters=ndarrays_to_parameters(initial),
            on_fit_config_fn=lambda rnd: dict(FIT),
        )
        server = ServerThread(
            config=ServerConfig(num_rounds=1), strategy=strategy, wait_timeout=60,
            checkpoint_dir=tmp_path / f"ckpt-{rounds_fit}",
        ).start()  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, str(app), "--address", server.address, "--node-id", "site-1",
             "--pid", "1", "--state-dir", str(tmp_path / "state")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        history = server.join(timeout=90)
        ((code, err),) = finish([proc])
        assert history is not None, err
        return history, code, err

    first, _, err = serve(shared, True)
    (row,) = first.rounds[-1]["distributed"]["clients"]
    trained = load_npz(tmp_path / "ckpt-True" / "final_model.npz")
    assert [a.shape for a in trained] == [a.shape for a in shared], err  # body only
    assert list((tmp_path / "state").glob("personal-*.fhv"))
    second, _, err = serve(trained, False)
    (again,) = second.rounds[-1]["distributed"]["clients"]
    assert second.rounds[-1]["fit"]["num_clients"] == 0
    assert again["metrics"]["p_test_accuracy"] == row["metrics"]["p_test_accuracy"], err
    assert again["metrics"]["p_test_loss"] == pytest.approx(row["metrics"]["p_test_loss"])
    assert again["metrics"]["p_test_loss"] != again["metrics"]["g_test_loss"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_benchmark_quick_run():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(root / "benchmarks" / "personalization.py"),
         "--quick", "--partition", "shards"],
        capture_output=True, text=True, timeout=380, check=False,
        env=dict(os.environ, PYTHONPATH=str(root / "src")),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "sel. w10%" in proc.stdout and "mean vs local" in proc.stdout
    assert "Reproduce:" in proc.stdout
    for label in ("FedAvg (global)", "local only", "FedPer", "FedRep", "FedBN", "Ditto", "APFL"):
        assert label in proc.stdout
