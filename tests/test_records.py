"""Named update records: ``extras`` beside the model arrays, checked per declared layout."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import fedhive as fl
from apps.records_client import EchoClient, model, quadratic_client_fn
from conftest import AddClient, initial
from fedhive.client.mods import SCAFFOLD_STATE, scaffold_mod
from fedhive.common import InvalidUpdate, ProtocolError, SerdeError
from fedhive.common.message import Message, MessageType, Metadata
from fedhive.common.records import (
    LAYERS_RECORD,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    RecordDict,
    Status,
    layers_record,
    ndarrays_to_parameters,
    present_layers,
)
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg, Scaffold
from fedhive.server.strategy.aggregate import check_fit_reply
from fedhive.server.strategy.traits import ExtraRecord, UpdateLayout
from fedhive.simulation import start_simulation
from fedhive.transport.codec import decode_message, encode_message
from grpc_helpers import ROOT, ServerThread, finish

APP = ROOT / "tests" / "apps" / "records_client.py"


META = Metadata(run_id=1, message_id="m", node_id="n", server_round=2, model_version=1,
                message_type="fit")  # fmt: skip


def side_data() -> RecordDict:
    return RecordDict(
        {"a": {"w": np.arange(6, dtype=np.float16).reshape(2, 3), "n": np.array([1, -2])}},
        {"c": {"s": "text", "b": b"\x00\xff", "f": False, "i": 2**64 - 1}},
        {"m": {"x": 0.25, "k": 3}},
    )


def same_records(a: RecordDict, b: RecordDict) -> bool:
    dtypes = lambda rd: {n: [v.dtype for v in r.values()] for n, r in rd.array_records.items()}  # noqa: E731
    return a == b and dtypes(a) == dtypes(b)


# -- the message classes -----------------------------------------------------------------


def test_flower_style_construction_is_unchanged_and_extras_default_empty():
    params = ndarrays_to_parameters([np.ones(2)])
    res = FitRes(Status(), params, 3, {"loss": 0.5})
    assert (res.num_examples, res.metrics) == (3, {"loss": 0.5}) and res.extras.is_empty()
    assert FitIns(params, {}).extras.is_empty() and EvaluateIns(params, {}).extras.is_empty()
    assert EvaluateRes(Status(), 0.1, 2, {}).extras.is_empty()
    # each message has its own (mutable) extras
    assert FitIns(params, {}).extras is not FitIns(params, {}).extras
    assert FitRes(Status(), params, 3, {}, extras=side_data()) != res


@pytest.mark.parametrize("kind", [FitIns, FitRes, EvaluateIns, EvaluateRes])
def test_extras_travel_through_the_wire_codec_with_their_types(kind):
    params = ndarrays_to_parameters([np.ones((2, 2), np.float32)])
    content = {
        FitIns: lambda: FitIns(params, {"lr": 0.1}, extras=side_data()),
        FitRes: lambda: FitRes(Status(), params, 4, {"acc": 1.0}, extras=side_data()),
        EvaluateIns: lambda: EvaluateIns(params, {}, extras=side_data()),
        EvaluateRes: lambda: EvaluateRes(Status(), 0.5, 4, {}, extras=side_data()),
    }[kind]()
    back = decode_message(encode_message(Message(META, content))).content
    assert type(back) is kind and same_records(back.extras, side_data())
    assert back == content  # config, metrics and the model untouched by the extras


def test_extras_arrays_are_read_back_as_views_and_a_tampered_header_is_refused():
    res = FitRes(Status(), ndarrays_to_parameters([np.ones(2)]), 1, {}, extras=side_data())
    wire = encode_message(Message(META, res))
    back = decode_message(bytearray(wire)).content
    assert not back.extras.array_records["a"]["w"].flags.owndata  # a view of the buffer
    assert wire.count(b'["x/a",2]') == 1
    with pytest.raises(SerdeError, match="does not belong to array record"):
        decode_message(wire.replace(b'["x/a",2]', b'["x/a",1]'))


def test_a_plain_reply_has_no_extras_on_the_wire_and_a_record_content_keeps_its_own():
    params = ndarrays_to_parameters([np.ones(2)])
    back = decode_message(encode_message(Message(META, FitRes(Status(), params, 1, {}))))
    assert back.content.extras.is_empty()
    records = decode_message(encode_message(Message(META, side_data()))).content
    assert same_records(records, side_data())


def test_the_codec_refuses_extras_that_cannot_travel():
    params = ndarrays_to_parameters([np.ones(2)])
    meta = META
    with pytest.raises(SerdeError, match=r"FitRes\.extras must be a RecordDict"):
        encode_message(Message(meta, FitRes(Status(), params, 1, {}, extras={"a": 1})))  # type: ignore[arg-type]
    bad_metric = RecordDict(metric_records={"m": {"x": "not a number"}})  # type: ignore[dict-item]
    with pytest.raises(SerdeError, match="must be int or float"):
        encode_message(Message(meta, FitRes(Status(), params, 1, {}, extras=bad_metric)))
    objects = RecordDict({"a": {"0": np.array([object()])}})
    with pytest.raises(SerdeError, match="unsupported dtype"):
        encode_message(Message(meta, FitIns(params, {}, extras=objects)))


def test_extras_survive_pickling_as_the_process_backend_sends_them():
    res = FitRes(Status(), ndarrays_to_parameters([np.ones(2)]), 1, {}, extras=side_data())
    back = pickle.loads(pickle.dumps(res))
    assert back == res and same_records(back.extras, side_data())


def test_messages_pickle_field_for_field_tasks_replies_and_errors():
    """Metadata and Message pickle as tuples of their fields (what Ray and the process
    backend send per task): every field comes back, and a reply keeps its link."""
    ins = FitIns(ndarrays_to_parameters([np.ones(2)]), {"lr": 0.1})
    task = Message.task(run_id=7, node_id="n-1", server_round=3, model_version=2,
                        message_type=MessageType.FIT, seed=2**63 - 1, content=ins)  # fmt: skip
    reply = task.reply(FitRes(Status(), ndarrays_to_parameters([np.zeros(2)]), 5, {"loss": 1.0}))
    for message in (task, reply, task.error_reply("boom")):
        back = pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        assert type(back.metadata) is Metadata and back.metadata == message.metadata
        assert dataclasses.astuple(back.metadata) == dataclasses.astuple(message.metadata)
        assert back.error == message.error and back.content == message.content
    assert pickle.loads(pickle.dumps(reply)).metadata.reply_to == task.metadata.message_id
    with pytest.raises(dataclasses.FrozenInstanceError):
        pickle.loads(pickle.dumps(task)).metadata.seed = 0  # still frozen


# -- SCAFFOLD's variates as a named record ----------------------------------------------------


def scaffold(**extra) -> Scaffold:
    return Scaffold(fraction_fit=1.0, min_fit_clients=2, min_available_clients=2,
                    fraction_evaluate=0.0, initial_parameters=ndarrays_to_parameters(model()),
                    **extra)  # fmt: skip


def spy(seen: list):
    """A mod outside scaffold_mod: sees what travels between the server and scaffold_mod."""

    def mod(message, context, call_next):
        reply = call_next(message, context)
        seen.append((message.content, reply.content))
        return reply

    return mod


def simulate(strategy, rounds=3, mods=(scaffold_mod,), **kwargs):
    return start_simulation(client_fn=quadratic_client_fn, num_clients=2, seed=1,
                            config=ServerConfig(num_rounds=rounds), strategy=strategy,
                            mods=mods, **kwargs)  # fmt: skip


def test_scaffold_variates_travel_as_the_named_record_scaffold():
    seen: list = []
    strategy = scaffold()
    hist = simulate(strategy, mods=[spy(seen), scaffold_mod], num_workers=1)
    assert all(r["fit"]["num_results"] == 2 and not r["failures"] for r in hist.rounds[1:])
    shapes = [a.shape for a in model()]
    assert len(seen) == 6
    for rnd, (ins, res) in enumerate(seen):
        # the model arrays are the model's, nothing appended; the config has no array count
        assert [a.shape for a in ins.parameters.arrays] == shapes
        assert ins.config["scaffold"] is True and "scaffold_num_arrays" not in ins.config
        c = ins.extras.array_records[SCAFFOLD_STATE]
        assert list(c) == ["0", "1"] and [v.shape for v in c.values()] == shapes
        assert [v.dtype for v in c.values()] == [np.float32, np.float32]
        if rnd < 2:
            assert all(not v.any() for v in c.values())  # c is zero before the first update
        assert [a.shape for a in res.parameters.arrays] == shapes
        delta = res.extras.array_records[SCAFFOLD_STATE]
        assert list(delta) == ["0", "1"] and [v.shape for v in delta.values()] == shapes
        assert [v.dtype for v in delta.values()] == [np.float32, np.float32]
        assert list(res.extras.array_records) == [SCAFFOLD_STATE]
    assert any(np.abs(c).max() > 0.01 for c in strategy.control_variate)


def test_the_client_does_not_see_the_server_variate():
    inner: list = []

    def below(message, context, call_next):  # runs inside scaffold_mod
        inner.append(message.content)
        return call_next(message, context)

    simulate(scaffold(), rounds=1, mods=[scaffold_mod, below], num_workers=1)
    assert inner and all(SCAFFOLD_STATE not in ins.extras.array_records for ins in inner)


def scaffold_task(variate: dict | None) -> Message:
    extras = RecordDict({} if variate is None else {SCAFFOLD_STATE: variate})
    ins = FitIns(ndarrays_to_parameters(model()), {"scaffold": True, "lr": 0.1}, extras=extras)
    return Message(META, ins)


def test_scaffold_mod_checks_the_server_variate_before_training():
    context = fl.client.Context(node_id="0", node_config={})
    trained: list = []

    def client(message, context):
        trained.append(message)
        return message.error_reply("not reached")

    cases = [
        (None, "has none"),
        ({"0": np.zeros(3), "1": np.zeros(3)}, "with the model's shapes"),
        ({"0": np.zeros(3), "1": np.full((2, 2), np.nan)}, "finite numbers"),
        ({"0": np.zeros(3), "1": np.array([[None, 1], [2, 3]])}, "finite numbers"),
    ]
    for variate, reason in cases:
        with pytest.raises(ProtocolError, match=reason):
            scaffold_mod(scaffold_task(variate), context, client)
    assert not trained and SCAFFOLD_STATE not in context.state.array_records


def test_scaffold_mod_refuses_a_reply_that_already_has_its_record():
    context = fl.client.Context(node_id="0", node_config={})

    def client(message, context):
        extras = RecordDict({SCAFFOLD_STATE: {"0": np.zeros(3), "1": np.zeros((2, 2))}})
        res = FitRes(Status(), message.content.parameters, 1, {"num_steps": 1}, extras=extras)
        return Message(message.metadata, res)

    zeros = {"0": np.zeros(3, np.float32), "1": np.zeros((2, 2), np.float32)}
    reply = scaffold_mod(scaffold_task(zeros), context, client)
    assert reply.error is not None and "reserved for scaffold_mod" in reply.error


def test_scaffold_on_the_process_backend_matches_the_thread_backend():
    runs = {}
    for backend in ("thread", "process"):
        strategy = scaffold()
        hist = simulate(strategy, backend=backend, num_workers=2)
        runs[backend] = (hist, strategy.control_variate)
    (thread, c_thread), (process, c_process) = runs["thread"], runs["process"]
    assert all(r["fit"]["num_results"] == 2 for r in process.rounds[1:]), process.rounds
    assert process.without_timings()["rounds"] == thread.without_timings()["rounds"]
    for a, b in zip(c_thread, c_process, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_flower_style_list_reply_still_works():
    seen: list = []

    class Lists(fl.client.NumPyClient):
        def fit(self, parameters, config):
            return [p + 1 for p in parameters], 3, {"ok": 1}

    start = ndarrays_to_parameters([np.zeros(2, np.float32)])
    strategy = FedAvg(min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0,
                      initial_parameters=start)  # fmt: skip
    hist = start_simulation(client_fn=lambda cid: Lists(), num_clients=2, strategy=strategy,
                            config=ServerConfig(num_rounds=2), mods=[spy(seen)])  # fmt: skip
    assert all(r["fit"]["updated"] and not r["failures"] for r in hist.rounds[1:])
    assert all(ins.extras.is_empty() and res.extras.is_empty() for ins, res in seen)


# -- refused replies: the reason says why and the round goes on ------------------------------

SIDE = UpdateLayout(extras=(ExtraRecord("side", like_model=True),))


class DeclaresSide(FedAvg):
    """FedAvg whose replies must carry the array record "side", laid out like the model."""

    @property
    def traits(self):
        return super().traits.but(layout=SIDE)


class Replies(fl.client.Client):
    def __init__(self, cid: str) -> None:
        self.cid = cid

    def fit(self, ins: FitIns) -> FitRes:
        model = [a + 1 for a in ins.parameters.arrays]
        side = {"side": {"0": np.ones(2), "1": np.ones(3)}}
        if self.cid == "1":
            side = {}
        elif self.cid == "2":
            side = {"side": {"0": np.ones(2), "1": np.ones(4)}}
        elif self.cid == "3":
            side = {"side": {"0": np.ones(2), "1": np.array([0.0, np.nan, 0.0])}}
        extras = RecordDict(side)
        if self.cid == "4":
            extras.config_records["other"] = {"x": 1}
        return FitRes(Status(), Parameters(arrays=model), 1, {}, extras=extras)


def test_bad_replies_are_refused_by_layout_with_a_clear_reason_and_the_round_goes_on():
    start = [np.zeros(2, np.float32), np.zeros(3, np.float32)]
    strategy = DeclaresSide(fraction_fit=1.0, min_fit_clients=5, min_available_clients=5,
                            fraction_evaluate=0.0,
                            initial_parameters=ndarrays_to_parameters(start))  # fmt: skip
    hist = start_simulation(client_fn=Replies, num_clients=5, strategy=strategy,
                            config=ServerConfig(num_rounds=1), num_workers=1)  # fmt: skip
    fit = hist.rounds[-1]
    assert fit["fit"]["num_results"] == 1 and fit["fit"]["updated"], fit
    reasons = {f["client_id"]: f["reason"] for f in fit["failures"]}
    assert sorted(reasons) == ["1", "2", "3", "4"], reasons
    assert "no extra record 'side'" in reasons["1"] and "requires" in reasons["1"]
    assert "extra record 'side': array 1 has shape (4,), expected (3,)" in reasons["2"]
    assert "extra record 'side': array 1 contains NaN or Inf" in reasons["3"]
    assert "did not declare: config_records['other']" in reasons["4"]


def test_scaffold_without_its_mod_names_the_mod():
    hist = simulate(scaffold(), rounds=1, mods=())
    failures = hist.rounds[-1]["failures"]
    assert len(failures) == 2
    assert all("scaffold_mod" in f["reason"] for f in failures)  # the mod to run, by path


# -- check_fit_reply: the layouts -------------------------------------------------------------

REFERENCE = [np.zeros(2, np.float32), np.zeros((3, 3), np.float32), np.zeros(4, np.float32)]


def reply(arrays, extras=None) -> FitRes:
    return FitRes(Status(), Parameters(arrays=arrays), 1, {}, extras=extras or RecordDict())


def check(res: FitRes, layout: UpdateLayout) -> None:
    check_fit_reply(res, REFERENCE, layout, client_id="7", server_round=3)


def partial(arrays, indices) -> FitRes:
    return reply(arrays, RecordDict(config_records={LAYERS_RECORD: layers_record(indices)}))


def test_a_partial_reply_carries_the_layers_it_names():
    layout = UpdateLayout(model="partial")
    check(partial([np.ones(2), np.ones(4)], [0, 2]), layout)
    check(partial([], []), layout)  # every layer stayed home
    assert present_layers(partial([np.ones(4)], [2]).extras, 1) == [2]
    assert layers_record([0, 2]) == {"0": 0, "1": 2}


@pytest.mark.parametrize(
    ("res", "reason"),
    [
        (reply([np.ones(2)]), "must name its model arrays in the config record 'layers'"),
        (partial([np.ones(2), np.ones(3)], [0, 2]), "array 1 (model array 2) has shape (3,)"),
        (partial([np.ones(4)], [3]), "names model array 3, but the model has 3 arrays"),
        (partial([np.ones(2), np.ones(4)], [0]), "one entry per model array"),
        (partial([np.full(2, np.inf)], [0]), "array 0 (model array 0) contains NaN or Inf"),
        (
            reply(
                [np.ones(2), np.ones(2)],
                RecordDict(config_records={LAYERS_RECORD: {"0": 0, "1": 0}}),
            ),
            "strictly increasing",
        ),
    ],
)
def test_bad_partial_replies_are_refused(res, reason):
    with pytest.raises(InvalidUpdate, match="client '7' failed in round 3") as info:
        check(res, UpdateLayout(model="partial"))
    assert reason in str(info.value)


def test_layers_record_refuses_what_it_cannot_describe():
    with pytest.raises(SerdeError, match="strictly increasing"):
        layers_record([2, 1])
    with pytest.raises(SerdeError, match="int >= 0"):
        layers_record([-1])


def test_the_full_and_none_layouts():
    full = [np.ones(2), np.ones((3, 3)), np.ones(4)]
    check(reply(full), UpdateLayout())
    with pytest.raises(InvalidUpdate, match="expected 3 arrays, got 2"):
        check(reply(full[:2]), UpdateLayout())
    with pytest.raises(InvalidUpdate, match="'layers' marks a partial model"):
        check(partial(full, [0, 1, 2]), UpdateLayout())
    codec = RecordDict({"codec": {"payload": np.zeros(8, np.uint8)}}, {"codec.id": {"id": 3}})
    none = UpdateLayout(
        model="none", extras=(ExtraRecord("codec"), ExtraRecord("codec.id", kind="config"))
    )
    check(reply([], codec), none)
    with pytest.raises(InvalidUpdate, match="expected no model arrays"):
        check(reply(full, codec), none)


def test_declared_extras_kinds_and_optional_records():
    layout = UpdateLayout(
        extras=(
            ExtraRecord("n", kind="metrics"),
            ExtraRecord("opt", kind="config", required=False),
        )
    )
    full = [np.ones(2), np.ones((3, 3)), np.ones(4)]
    check(reply(full, RecordDict(metric_records={"n": {"k": 1}})), layout)
    with_opt = RecordDict(config_records={"opt": {"a": "b"}}, metric_records={"n": {"k": 1}})
    check(reply(full, with_opt), layout)
    wrong_group = RecordDict(config_records={"n": {"k": 1}})  # a config, not a metric record
    with pytest.raises(InvalidUpdate, match=r"no extra record 'n' \(metric_records\)"):
        check(reply(full, wrong_group), layout)
    like = UpdateLayout(extras=(ExtraRecord("v", like_model=True),))
    renamed = RecordDict({"v": {"a": np.ones(2), "b": np.ones((3, 3)), "c": np.ones(4)}})
    with pytest.raises(InvalidUpdate, match=r"name its arrays 0, 1, \.\.\. in order"):
        check(reply(full, renamed), like)
    short = RecordDict({"v": {"0": np.ones(2)}})
    with pytest.raises(InvalidUpdate, match=r"one array per model array \(3\), got 1"):
        check(reply(full, short), like)


# -- over gRPC, between real processes ------------------------------------------------------


def client_process(address: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    return subprocess.Popen(
        [sys.executable, str(APP), "--address", address, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Echo(FedAvg):
    """Sends extras with every instruction, declares what comes back and records it."""

    LAYOUT = UpdateLayout(
        extras=(
            ExtraRecord("echo", like_model=True),
            ExtraRecord("echo.config", kind="config"),
            ExtraRecord("echo.metrics", kind="metrics"),
            ExtraRecord("echo.big", required=False),
        )
    )
    SENT = RecordDict(
        {"echo": {"0": np.arange(4, dtype=np.float16)}},
        {"echo.config": {"tag": "hello", "blob": b"\x01\x02\x03"}},
        {"echo.metrics": {"m": 1.5}},
    )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fit_extras: list[RecordDict] = []
        self.evaluate_extras: list[RecordDict] = []

    @property
    def traits(self):
        return super().traits.but(layout=self.LAYOUT)

    def configure_fit(self, server_round, parameters, client_manager):
        out = super().configure_fit(server_round, parameters, client_manager)
        return [(c, dataclasses.replace(ins, extras=self.SENT)) for c, ins in out]

    def configure_evaluate(self, server_round, parameters, client_manager):
        out = super().configure_evaluate(server_round, parameters, client_manager)
        ask = RecordDict(config_records={"ask": {"question": "why?"}})
        return [(c, dataclasses.replace(ins, extras=ask)) for c, ins in out]

    def fit_aggregator(self, server_round, parameters):
        return Recording(super().fit_aggregator(server_round, parameters), self.fit_extras)

    def evaluate_aggregator(self, server_round, parameters):
        inner = super().evaluate_aggregator(server_round, parameters)
        return Recording(inner, self.evaluate_extras)


class Recording:
    """An aggregator that notes each result's extras, then hands the result on."""

    def __init__(self, inner, extras: list) -> None:
        self.inner, self.extras = inner, extras

    def add(self, client, result) -> None:
        self.extras.append(result.extras)
        self.inner.add(client, result)

    def add_failure(self, failure) -> None:
        self.inner.add_failure(failure)

    def finalize(self):
        return self.inner.finalize()


ECHOED = RecordDict(
    {"echo": {"0": np.arange(4, dtype=np.float16) * 2}},
    {"echo.config": {"tag": "hello!", "blob": b"\x03\x02\x01"}},
    {"echo.metrics": {"m": 2.5}},
)
ANSWER = RecordDict(config_records={"answer": {"text": "why? 42"}})


def echo_strategy(**extra) -> Echo:
    return Echo(min_fit_clients=2, min_available_clients=2, min_evaluate_clients=2,
                initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
                **extra)  # fmt: skip


def test_extras_travel_both_ways_over_grpc_between_processes():
    strategy = echo_strategy()
    server = ServerThread(config=ServerConfig(num_rounds=1), strategy=strategy).start()
    procs = [client_process(server.address, "--mode", "echo") for _ in range(2)]
    history = server.join()
    assert [code for code, _ in finish(procs)] == [0, 0]
    assert not history.rounds[-1]["failures"], history.rounds[-1]
    assert len(strategy.fit_extras) == 2
    assert all(same_records(extras, ECHOED) for extras in strategy.fit_extras)
    assert strategy.evaluate_extras == [ANSWER, ANSWER]


def test_the_message_size_limit_covers_the_extras():
    strategy = echo_strategy(fraction_evaluate=0.0)
    server = ServerThread(config=ServerConfig(num_rounds=1, round_timeout=30), strategy=strategy,
                          grpc_max_message_length=1 << 20).start()  # fmt: skip
    procs = [
        client_process(server.address, "--mode", "echo"),
        client_process(server.address, "--mode", "echo", "--big", str(2 << 20)),
    ]
    history = server.join()
    finish(procs)
    fit = history.rounds[-1]
    assert fit["fit"]["num_results"] == 1 and fit["fit"]["updated"], fit
    [failure] = fit["failures"]
    assert "over the limit of 1048576" in failure["reason"], failure


def test_extras_travel_both_ways_in_simulation_and_the_client_gets_its_own_copy():
    class Mutating(EchoClient):
        def fit(self, ins):
            res = super().fit(ins)
            ins.extras.array_records["echo"]["0"][:] = -1  # must not reach the server's copy
            return res

    strategy = echo_strategy()
    hist = start_simulation(client_fn=lambda cid: Mutating(), num_clients=2, strategy=strategy,
                            config=ServerConfig(num_rounds=2), num_workers=1)  # fmt: skip
    assert all(not r["failures"] for r in hist.rounds[1:]), hist.rounds
    assert len(strategy.fit_extras) == 4
    assert all(same_records(extras, ECHOED) for extras in strategy.fit_extras)
    assert strategy.evaluate_extras == [ANSWER] * 4
    np.testing.assert_array_equal(Echo.SENT.array_records["echo"]["0"], np.arange(4))


def test_deployed_scaffold_over_grpc_matches_the_simulation():
    strategy = scaffold()
    server = ServerThread(config=ServerConfig(num_rounds=3), strategy=strategy, seed=1).start()
    procs = [client_process(server.address, "--mode", "scaffold", "--pid", str(i)) for i in (0, 1)]
    history = server.join()
    assert [code for code, _ in finish(procs)] == [0, 0]
    assert all(r["fit"]["num_results"] == 2 and not r["failures"] for r in history.rounds[1:])
    simulated = scaffold()
    simulate(simulated, num_workers=1)
    assert any(np.abs(c).max() > 0.01 for c in strategy.control_variate)
    for a, b in zip(strategy.control_variate, simulated.control_variate, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


# -- wrappers and secure aggregation carry a strategy's instruction extras -------------------


class SendsExtras(FedAvg):
    """FedAvg whose fit instructions carry an extra record (a codec's parameters, say)."""

    def configure_fit(self, server_round, parameters, client_manager):
        return [
            (
                client,
                FitIns(
                    ins.parameters, ins.config, RecordDict(config_records={"codec": {"bits": 4}})
                ),
            )
            for client, ins in super().configure_fit(server_round, parameters, client_manager)
        ]


def _seen_extras(strategy, **kw):
    seen: list[dict] = []

    def spy(message, context, call_next):
        if message.metadata.message_type == MessageType.FIT:
            seen.append(dict(message.content.extras.config_records.get("codec", {})))
        return call_next(message, context)

    start_simulation(
        client_fn=lambda cid: AddClient(int(cid)),
        num_clients=4,
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        mods=[spy],
        seed=0,
        **kw,
    )
    return seen


@pytest.mark.parametrize("wrapped", ["dp", "secagg", "composed"])
def test_instruction_extras_survive_wrappers_and_secure_aggregation(wrapped):
    from fedhive.privacy import DifferentialPrivacyClientSideFixedClipping
    from fedhive.server.strategy import FedProx

    base = SendsExtras(fraction_fit=1.0, fraction_evaluate=0.0, initial_parameters=initial((3,)))
    strategy, options = base, {}
    if wrapped == "dp":
        strategy = DifferentialPrivacyClientSideFixedClipping(
            base, noise_multiplier=1.0, clipping_norm=100.0, num_sampled_clients=4
        )
    elif wrapped == "secagg":
        options = {"secure_aggregation": {"bits": 16, "clip": 8.0}}
    else:
        strategy = FedProx(proximal_mu=0.1)
        strategy.sampling = base  # FedProx adds its config to the sampling's instructions
    assert _seen_extras(strategy, **options) == [{"bits": 4}] * 4
