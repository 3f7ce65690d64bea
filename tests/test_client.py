"""The client API: NumPyClient/Client conversions, mods, records."""

from __future__ import annotations

import numpy as np
import pytest

import fedhive as fl
from fedhive.client import ClientApp, Context
from fedhive.common import (
    Code,
    EvaluateIns,
    FitIns,
    GetParametersIns,
    GetPropertiesIns,
    Message,
    MessageType,
    Parameters,
    RecordDict,
    SerdeError,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)


class Model(fl.client.NumPyClient):
    def get_properties(self, config):
        return {"os": "linux", "cores": 2}

    def get_parameters(self, config):
        return [np.arange(3, dtype=np.float32)]

    def fit(self, parameters, config):
        return [parameters[0] * 2], 7, {"lr": config.get("lr", 0.0)}

    def evaluate(self, parameters, config):
        return 0.25, 9, {"acc": 0.9}


def task(mtype, content, node="0"):
    return Message.task(
        run_id=1,
        node_id=node,
        server_round=1,
        model_version=0,
        message_type=mtype,
        content=content,
    )


def test_numpy_client_adapter_speaks_low_level_types():
    client = Model().to_client()
    params = ndarrays_to_parameters([np.ones(3, np.float32)])
    fit = client.fit(FitIns(params, {"lr": 0.5}))
    assert fit.status.code == Code.OK and fit.num_examples == 7
    np.testing.assert_array_equal(parameters_to_ndarrays(fit.parameters)[0], [2, 2, 2])
    assert fit.metrics == {"lr": 0.5}
    ev = client.evaluate(EvaluateIns(params, {}))
    assert (ev.loss, ev.num_examples, ev.metrics) == (0.25, 9, {"acc": 0.9})
    assert client.get_properties(GetPropertiesIns({})).properties == {"os": "linux", "cores": 2}
    got = client.get_parameters(GetParametersIns({})).parameters
    np.testing.assert_array_equal(parameters_to_ndarrays(got)[0], [0, 1, 2])


def test_client_app_dispatches_and_turns_exceptions_into_error_replies():
    app = ClientApp(lambda cid: Model())
    ctx = Context(node_id="0")
    reply = app.handle(task(MessageType.FIT, FitIns(ndarrays_to_parameters([np.ones(3)]), {})), ctx)
    assert reply.error is None and reply.metadata.reply_to
    bad = app.handle(task("unknown.stage", RecordDict()), ctx)
    assert "no handler" in bad.error

    class Broken(fl.client.NumPyClient):
        def fit(self, parameters, config):
            return "not a tuple"

    reply = ClientApp(lambda cid: Broken()).handle(
        task(MessageType.FIT, FitIns(ndarrays_to_parameters([np.ones(3)]), {})), ctx
    )
    assert "3-tuple" in reply.error


def test_unimplemented_methods_become_failures_with_status():
    reply = ClientApp(lambda cid: fl.client.Client()).handle(
        task(MessageType.FIT, FitIns(ndarrays_to_parameters([np.ones(1)]), {})),
        Context(node_id="0"),
    )
    assert "FIT_NOT_IMPLEMENTED" in reply.error


def test_mods_wrap_in_order_and_can_answer_custom_stages():
    calls = []

    def outer(msg, ctx, nxt):
        calls.append("outer-in")
        reply = nxt(msg, ctx)
        calls.append("outer-out")
        return reply

    def inner(msg, ctx, nxt):
        calls.append("inner-in")
        if msg.metadata.message_type == "custom.ping":
            return msg.reply(RecordDict(config_records={"pong": {"v": 1}}))
        reply = nxt(msg, ctx)
        calls.append("inner-out")
        return reply

    built = []
    app = ClientApp(lambda cid: built.append(cid) or Model(), mods=[outer, inner])
    ctx = Context(node_id="3")
    app.handle(task(MessageType.FIT, FitIns(ndarrays_to_parameters([np.ones(3)]), {})), ctx)
    assert calls == ["outer-in", "inner-in", "inner-out", "outer-out"]
    pong = app.handle(task("custom.ping", RecordDict()), ctx)
    assert pong.content.config_records == {"pong": {"v": 1}}
    assert built == ["3"]  # the custom stage did not need the client


def test_parameters_flower_bytes_form_round_trips():
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64)]
    params = ndarrays_to_parameters(arrays)
    again = Parameters(tensors=params.tensors, tensor_type="numpy.ndarray")
    for a, b in zip(arrays, parameters_to_ndarrays(again), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert again == params
    with pytest.raises(SerdeError):
        parameters_to_ndarrays(Parameters(tensors=[b"not npy"]))


def test_metrics_must_be_scalars():
    class Bad(fl.client.NumPyClient):
        def evaluate(self, parameters, config):
            return 0.1, 1, {"hist": [1, 2]}

    reply = ClientApp(lambda cid: Bad()).handle(
        task(MessageType.EVALUATE, EvaluateIns(ndarrays_to_parameters([np.ones(1)]), {})),
        Context(node_id="0"),
    )
    assert "evaluate metrics" in reply.error


def test_context_rng_is_seeded_by_the_task():
    a = Context(node_id="1", seed=5).rng.integers(0, 1 << 30, size=4)
    b = Context(node_id="1", seed=5).rng.integers(0, 1 << 30, size=4)
    np.testing.assert_array_equal(a, b)
