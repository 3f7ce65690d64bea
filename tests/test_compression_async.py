"""Compression under the asynchronous policy (FedBuff, FedAsync, BufferedAsync): each
update is decoded against the model its client trained on before it enters the buffer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedhive.client import NumPyClient
from fedhive.common.clock import VirtualClock
from fedhive.common.errors import ConfigError
from fedhive.common.records import FitRes, ndarrays_to_parameters
from fedhive.compression import (
    FP16,
    QSGD,
    RESIDUAL_RECORD,
    Compression,
    RandomK,
    TopK,
    compression_mod,
)
from fedhive.server import ServerConfig
from fedhive.server.asynchronous import BufferedAsync
from fedhive.server.stages import ReplyStage
from fedhive.server.strategy import FedAsync, FedAvg, FedBuff
from fedhive.simulation import start_simulation

SHAPE = (300,)


class StepClient(NumPyClient):
    """A step of its own per client and task (from the task's seed)."""

    def __init__(self, context) -> None:
        self.context = context

    def fit(self, parameters, config):
        rng = self.context.rng
        step = rng.normal(0.0, 0.3, SHAPE) + 0.2 * (int(self.context.node_id) % 3 - 1)
        return [(parameters[0] + step).astype(np.float32)], int(rng.integers(1, 9)), {}


def latency(task):  # fixed per task: varied arrival order, so stale results are folded
    return float(task.metadata.seed % 53) + 1.0


def fedbuff(keep):
    return FedBuff(
        buffer_size=3,
        concurrency=5,
        fraction_evaluate=0.0,
        initial_parameters=ndarrays_to_parameters([np.zeros(SHAPE, np.float32)]),
        evaluate_fn=keep,
    )


def run(make=fedbuff, workers=1, **kw):
    models = []

    def keep(rnd, params, config):
        models.append(params[0].copy())
        return float(np.abs(params[0]).mean()), {}

    history = start_simulation(
        client_fn=StepClient,
        num_clients=8,
        config=ServerConfig(num_rounds=kw.pop("rounds", 5)),
        strategy=make(keep),
        seed=11,
        num_workers=workers,
        clock=VirtualClock(),
        latency=latency,
        **kw,
    )
    return history, models


def stale(history):
    return [s["staleness"] for r in history.rounds[1:] for s in r["staleness"]]


def test_a_lossless_codec_leaves_the_staleness_weighted_run_unchanged():
    # random-k keeping every element is exact: what FedBuff folds must be the same
    # update against the same base model, whatever its staleness
    plain_hist, plain = run()
    coded_hist, coded = run(compression=RandomK(ratio=1.0, shared_seed=True, min_size=0))
    assert max(stale(plain_hist)) >= 1  # stale results were folded
    assert stale(coded_hist) == stale(plain_hist)
    for a, b in zip(plain, coded, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    # decoding against the current model instead would be off by the drift between
    # versions, far above that tolerance
    assert min(np.abs(b - a).max() for a, b in itertools.pairwise(plain)) > 0.05


@pytest.mark.parametrize(
    ("make", "policy"),
    [
        (
            lambda keep: FedAsync(
                concurrency=4,
                fraction_evaluate=0.0,
                initial_parameters=ndarrays_to_parameters([np.zeros(SHAPE, np.float32)]),
                evaluate_fn=keep,
            ),
            None,
        ),
        (
            lambda keep: FedAvg(
                fraction_evaluate=0.0,
                initial_parameters=ndarrays_to_parameters([np.zeros(SHAPE, np.float32)]),
                evaluate_fn=keep,
            ),
            lambda: BufferedAsync(buffer_size=3, concurrency=5),
        ),
    ],
    ids=["fedasync", "buffered-fedavg"],
)
def test_fp16_runs_within_half_precision_of_the_plain_run(make, policy):
    def kw():  # a policy keeps its dispatch count: a fresh one per run
        return {} if policy is None else {"policy": policy()}

    plain, plain_models = run(make, **kw())
    coded, coded_models = run(make, compression=FP16(min_size=0), **kw())
    assert stale(coded) == stale(plain) and max(stale(plain)) >= 1
    for a, b in zip(plain_models, coded_models, strict=True):
        np.testing.assert_allclose(b, a, atol=5e-3)
    # 300 float32 -> 300 float16 per upload (plus the message's own bytes)
    assert sum(r["bytes_up"] for r in coded.rounds[1:]) < 0.8 * sum(
        r["bytes_up"] for r in plain.rounds[1:]
    )


def test_seeded_async_compressed_runs_are_deterministic_on_any_worker_count():
    codec = QSGD(bits=2, min_size=0)
    one_hist, one = run(compression=codec)
    two_hist, two = run(compression=codec, workers=2)
    _, again = run(compression=codec)
    for a, b, c in zip(one, two, again, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert one_hist.without_timings()["rounds"] == two_hist.without_timings()["rounds"]
    _, plain = run()
    assert np.abs(one[-1] - plain[-1]).max() > 0  # it did quantize


class BaseRecorder(ReplyStage):
    """The decoded update of each reply, against the model its client was sent."""

    name = "recorder"

    def __init__(self) -> None:
        self.updates: dict[str, list[np.ndarray]] = {}

    def transform(self, driver, client_id, result):
        ledger = driver.engine.strategy.ledger
        base = ledger.models[ledger.bases[client_id]]
        self.updates.setdefault(client_id, []).append(result.parameters.arrays[0] - base[0])
        return result


def test_error_feedback_per_client_sent_plus_residual_equals_inputs():
    inputs: dict[str, list[np.ndarray]] = {}
    residuals: dict[str, np.ndarray] = {}

    def inner(message, context, call_next):  # the update before it is encoded
        reply = call_next(message, context)
        if isinstance(reply.content, FitRes):
            new, old = reply.content.parameters.arrays[0], message.content.parameters.arrays[0]
            inputs.setdefault(context.node_id, []).append(new - old)
        return reply

    def outer(message, context, call_next):  # the residual once it is encoded
        reply = call_next(message, context)
        record = context.state.array_records.get(RESIDUAL_RECORD)
        if record is not None:
            residuals[context.node_id] = np.concatenate([np.ravel(a) for a in record.values()])
        return reply

    recorder = BaseRecorder()
    history, _ = run(
        compression=TopK(ratio=0.05, error_feedback=True, min_size=0),
        mods=[outer, compression_mod, inner],
        stages=[recorder],
    )
    assert max(stale(history)) >= 1
    folded = {s["client_id"] for r in history.rounds[1:] for s in r["staleness"]}
    checked = 0
    for cid, sent in recorder.updates.items():
        if len(sent) != len(inputs[cid]):  # a task still in flight at the end
            continue
        np.testing.assert_allclose(
            np.sum(sent, axis=0) + residuals[cid], np.sum(inputs[cid], axis=0), atol=1e-4
        )
        checked += 1
    assert checked >= len(folded) - 5 and checked >= 2


def test_server_error_feedback_is_refused_under_the_asynchronous_policy():
    with pytest.raises(ConfigError, match="server_error_feedback"):
        run(
            compression=Compression(
                uplink=FP16(), downlink=QSGD(bits=8), server_error_feedback=True
            )
        )


def test_a_downlink_codec_runs_under_the_asynchronous_policy():
    plain, models = run()
    coded, coded_models = run(compression=Compression(uplink=None, downlink=FP16()))
    assert all(r["bytes_down"] > 0 for r in plain.rounds[1:])  # tasks are counted
    # 1200 bytes of float32 weights -> 600 per task, less the codec's task record
    assert sum(r["bytes_down"] for r in coded.rounds[1:]) < 0.9 * sum(
        r["bytes_down"] for r in plain.rounds[1:]
    )
    np.testing.assert_allclose(coded_models[-1], models[-1], atol=0.05)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fedbuff_over_grpc_with_compression_and_real_client_processes():
    """start_server with FedBuff and fp16 uploads: three client processes and a slow one;
    each upload (1 + pid added to every weight, exact in half precision) is decoded
    against the model that client was sent."""
    from grpc_helpers import ServerThread, client_process, finish

    server = ServerThread(
        config=ServerConfig(num_rounds=4, round_timeout=60),
        strategy=FedBuff(
            buffer_size=2,
            concurrency=3,
            staleness="constant",
            min_available_clients=4,  # all four in before the run starts (it is short)
            fraction_evaluate=0.0,
            initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
            evaluate_fn=lambda rnd, params, cfg: (float(params[0].mean()), {}),
        ),
        compression=FP16(min_size=0),
        seed=0,
        wait_timeout=30,
    ).start()
    procs = [client_process(server.address, "--pid", str(i)) for i in range(3)]
    procs.append(client_process(server.address, "--pid", "3", "--mode", "slow"))
    history = server.join(timeout=120)
    # every client, the slow one too, is told the run ended and exits by itself (a client
    # that comes after the server is gone retries, as Flower's does without max_retries)
    ends = finish(procs, timeout=20)
    assert [code for code, _ in ends] == [0, 0, 0, 0], [err[-2000:] for _, err in ends]
    versions = history.rounds[1:]
    assert [r["model_version"] for r in versions] == [1, 2, 3, 4]
    for r in versions:  # each version's buffer filled with decoded updates
        assert r["fit"]["num_results"] == 2 and r["bytes_up"] > 0 and r["bytes_down"] > 0, r
    # every folded update is 1 + pid (pids 0..3, weights 1 + pid), whatever its base:
    # each version moves the model by a weighted mean of those, between 1 and 4
    losses = [0.0] + [loss for _, loss in history.losses_centralized[1:]]
    steps = np.diff(losses)
    assert np.all(steps >= 1.0 - 1e-5) and np.all(steps <= 4.0 + 1e-5), losses  # float32
