"""Compression in runs: simulation, checkpoint/resume, byte accounting, DP, SecAgg checks."""

from __future__ import annotations

import numpy as np
import pytest

import fedhive as fl
from fedhive.client import NumPyClient
from fedhive.common.errors import ConfigError
from fedhive.common.message import Message, MessageType
from fedhive.common.records import FitRes, RecordDict, ndarrays_to_parameters
from fedhive.compression import (
    BF16,
    EDEN,
    FP16,
    QSGD,
    RESIDUAL_RECORD,
    Compression,
    RandomK,
    Sign,
    TopK,
    _frame,
    compression_mod,
)
from fedhive.compression.payload import PAYLOAD_RECORD
from fedhive.models import numpy_lr
from fedhive.server import ServerConfig
from fedhive.server.stages import ReplyStage
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation
from fedhive.transport.codec import encode_message

DIM, CLASSES = 512, 4


def data(pid: int, n: int = 80):
    rng = np.random.default_rng(pid)
    centers = np.random.default_rng(99).normal(size=(CLASSES, DIM))
    y = rng.integers(0, CLASSES, n)
    x = centers[y] + rng.normal(scale=1.5, size=(n, DIM))
    return x.astype(np.float32), y


class LRClient(NumPyClient):
    def __init__(self, pid: int) -> None:
        self.x, self.y = data(pid)

    def fit(self, parameters, config):
        new, _ = numpy_lr.train(
            parameters,
            self.x,
            self.y,
            epochs=1,
            batch_size=16,
            lr=0.1,
            seed=int(config.get("s", 0)),
        )
        return [a.astype(np.float32) for a in new], len(self.y), {}

    def evaluate(self, parameters, config):
        loss, acc = numpy_lr.evaluate(parameters, self.x, self.y)
        return loss, len(self.y), {"accuracy": acc}


def client_fn(context):
    return LRClient(int(context.node_config["partition-id"])).to_client()


TEST = data(1000, n=400)


def central(server_round, parameters, config):
    loss, acc = numpy_lr.evaluate(parameters, *TEST)
    return loss, {"accuracy": acc}


def strategy(**kw):
    init = ndarrays_to_parameters(numpy_lr.init_params(DIM, CLASSES, seed=0))
    options = dict(
        initial_parameters=init,
        fraction_fit=0.5,
        min_fit_clients=2,
        min_available_clients=4,
        fraction_evaluate=0.0,
        evaluate_fn=central,
    )
    return FedAvg(**{**options, **kw})


def run(rounds=3, **kw):
    return start_simulation(
        client_fn=kw.pop("client_fn", client_fn),
        num_clients=kw.pop("num_clients", 4),
        config=ServerConfig(num_rounds=rounds),
        strategy=kw.pop("strategy", None) or strategy(),
        seed=kw.pop("seed", 3),
        **kw,
    )


def fit_bytes(history):
    return [r["bytes_up"] for r in history.rounds if r["round"] > 0]


@pytest.mark.parametrize(
    "codec",
    [
        FP16(),
        BF16(),
        QSGD(bits=4, min_size=0),
        TopK(ratio=0.05, error_feedback=True),
        RandomK(ratio=0.25, shared_seed=True),
        Sign(error_feedback=True),
        EDEN(bits=2, block=256),
    ],
    ids=repr,
)
def test_every_codec_runs_and_sends_fewer_bytes(codec):
    plain = run()
    packed = run(compression=codec)
    assert all(r["fit"]["num_results"] == 2 for r in packed.rounds if r["round"] > 0)
    ratio = sum(fit_bytes(plain)) / sum(fit_bytes(packed))
    assert ratio > (1.6 if codec.id in ("fp16", "bf16") else 3.0)
    assert packed.rounds[-1]["bytes_down"] > 0


def test_top_k_with_error_feedback_learns_and_saves_bytes():
    plain = run(rounds=6)
    packed = run(rounds=6, compression=TopK(ratio=0.05, error_feedback=True, min_size=0))
    assert sum(fit_bytes(plain)) / sum(fit_bytes(packed)) > 5
    start = packed.rounds[0]["centralized"]["accuracy"]
    assert packed.rounds[-1]["centralized"]["accuracy"] > start + 0.3


def test_bytes_per_round_equal_the_encoded_messages():
    sizes = {"up": 0, "down": 0}

    def measure(message, context, call_next):
        if message.metadata.message_type == MessageType.FIT:
            sizes["down"] += len(encode_message(message))
        reply = call_next(message, context)
        if message.metadata.message_type == MessageType.FIT:
            sizes["up"] += len(encode_message(reply))
        return reply

    history = run(rounds=2, compression=TopK(ratio=0.1), mods=[measure])
    # the measuring mod sits inside compression_mod for the reply and outside for the task
    assert sum(fit_bytes(history)) < sizes["up"]  # it saw the plain replies
    rounds = [r for r in history.rounds if r["round"] > 0]
    per_client = sum(c["up"] for r in rounds for c in r["bytes_clients"].values())
    assert per_client == sum(fit_bytes(history))


def test_bytes_match_the_wire_encoding_exactly():
    seen = {"up": 0, "down": 0}

    def outer(message, context, call_next):
        reply = call_next(message, context)
        if message.metadata.message_type == MessageType.FIT:
            seen["down"] += len(encode_message(message))
            seen["up"] += len(encode_message(reply))
        return reply

    history = run(rounds=2, compression=QSGD(bits=2), mods=[outer, compression_mod])
    rounds = [r for r in history.rounds if r["round"] > 0]
    assert sum(r["bytes_up"] for r in rounds) == seen["up"]
    assert sum(r["bytes_down"] for r in rounds) == seen["down"]
    totals = history.bytes_totals()
    assert totals["bytes_up"] == seen["up"]
    assert '"bytes_up"' in history.to_json()


def test_residual_lives_in_the_state_store_across_rebuilds_and_resume(tmp_path):
    codec = TopK(ratio=0.05, error_feedback=True, min_size=0)
    residuals = []

    def spy(message, context, call_next):
        reply = call_next(message, context)
        record = context.state.array_records.get(RESIDUAL_RECORD)
        if record is not None:
            residuals.append((context.node_id, float(np.abs(record["0"]).sum())))
        return reply

    full = run(rounds=4, compression=codec, mods=[spy])
    seen = {}
    for node, total in residuals:
        seen.setdefault(node, []).append(total)
    assert any(len(v) > 1 for v in seen.values())  # a rebuilt client found its residual
    assert all(t > 0 for v in seen.values() for t in v)

    ckpt = tmp_path / "ckpt"
    run(rounds=2, compression=codec, checkpoint_dir=ckpt)
    resumed = run(rounds=4, compression=codec, checkpoint_dir=ckpt, resume=True)
    assert resumed.without_timings()["rounds"] == full.without_timings()["rounds"]
    cut = run(rounds=4, compression=codec, checkpoint_dir=tmp_path / "other", state_memory_limit=0)
    assert cut.without_timings()["rounds"] == full.without_timings()["rounds"]


def test_resume_without_the_residual_differs(tmp_path):
    """The checkpoint holds the residuals: dropping them changes the resumed run."""
    codec = TopK(ratio=0.05, error_feedback=True, min_size=0)
    full = run(rounds=4, compression=codec)
    ckpt = tmp_path / "ckpt"
    run(rounds=2, compression=codec, checkpoint_dir=ckpt)
    for path in (ckpt).rglob("index.tsv"):
        path.write_text("")  # forget every client's state
    resumed = run(rounds=4, compression=codec, checkpoint_dir=ckpt, resume=True)
    assert resumed.without_timings()["rounds"] != full.without_timings()["rounds"]


def test_a_garbled_payload_is_refused_with_its_reason():
    def garble(message, context, call_next):
        reply = call_next(message, context)
        res = reply.content
        if isinstance(res, FitRes) and context.node_id == "1":
            codec_id, arrays, info = _frame.unpack(
                res.extras.array_records[PAYLOAD_RECORD]["frame"]
            )
            arrays["index"] = np.full(arrays["index"].size, 255, arrays["index"].dtype)
            frame = _frame.pack(codec_id, arrays, info)
            extras = RecordDict({PAYLOAD_RECORD: {"frame": frame}}, res.extras.config_records)
            res = FitRes(res.status, res.parameters, res.num_examples, res.metrics, extras)
            return Message(reply.metadata, res)
        return reply

    history = run(
        rounds=2,
        num_clients=2,
        compression=TopK(ratio=0.1),
        mods=[garble, compression_mod],
        strategy=strategy(min_available_clients=2, fraction_fit=1.0, min_fit_clients=1),
    )
    failures = [f for r in history.rounds for f in r.get("failures", [])]
    assert failures and all(f["client_id"] == "1" for f in failures)
    assert all("compression" in f["reason"] and "out of range" in f["reason"] for f in failures)


def test_downlink_and_server_error_feedback():
    both = Compression(uplink=QSGD(bits=4), downlink=FP16(), server_error_feedback=True)
    plain = run()
    history = run(compression=both)
    down = [r["bytes_down"] for r in history.rounds if r["round"] > 0]
    plain_down = [r["bytes_down"] for r in plain.rounds if r["round"] > 0]
    assert sum(down) < 0.7 * sum(plain_down)
    assert all(r["fit"]["num_results"] == 2 for r in history.rounds if r["round"] > 0)


def test_resume_keeps_the_server_side_downlink_residual(tmp_path):
    """The broadcast's error-feedback residual is in the checkpoint: a resumed run is the
    uninterrupted one, bit for bit."""
    coarse = Compression(downlink=QSGD(bits=2, min_size=0), server_error_feedback=True)
    full = run(rounds=4, compression=coarse)
    ckpt = tmp_path / "ckpt"
    run(rounds=2, compression=coarse, checkpoint_dir=ckpt)
    resumed = run(rounds=4, compression=coarse, checkpoint_dir=ckpt, resume=True)
    assert resumed.without_timings()["rounds"] == full.without_timings()["rounds"]
    cold = run(rounds=4, compression=coarse, checkpoint_dir=tmp_path / "none")
    assert cold.without_timings()["rounds"] == full.without_timings()["rounds"]


class Recorder(ReplyStage):
    """Records each decoded update (the stage after the compression stage sees them)."""

    name = "recorder"

    def __init__(self):
        self.updates = {}

    def transform(self, driver, client_id, result):
        ref = driver.engine.parameters.arrays
        delta = np.concatenate(
            [np.ravel(a - r) for a, r in zip(result.parameters.arrays, ref, strict=True)]
        )
        self.updates[(driver.server_round, client_id)] = delta
        return result


def client_updates(store):
    def spy(message, context, call_next):
        reply = call_next(message, context)
        if isinstance(reply.content, FitRes):
            old = message.content.parameters.arrays
            new = reply.content.parameters.arrays
            delta = np.concatenate([np.ravel(a - b) for a, b in zip(new, old, strict=True)])
            store[(message.metadata.server_round, context.node_id)] = delta
        return reply

    return spy


def test_local_dp_clips_and_noises_before_the_encode():
    from fedhive.privacy import LocalDpMod

    local = LocalDpMod(clipping_norm=0.5, epsilon=50.0, delta=1e-5, noise_seed=1)
    sent, recorder = {}, Recorder()
    run(rounds=2, compression=FP16(), mods=[client_updates(sent), local], stages=[recorder])
    assert sent.keys() == recorder.updates.keys() and sent
    for key, delta in sent.items():
        # what the server decoded is the clipped and noised update, in half precision
        np.testing.assert_allclose(recorder.updates[key], delta, atol=2e-3)
        assert np.linalg.norm(delta) > 0.5  # noised beyond the clipping ball


def test_central_dp_noise_is_added_after_decode():
    from fedhive.privacy import DifferentialPrivacyServerSideFixedClipping

    models = []

    def keep(server_round, parameters, config):
        models.append(np.concatenate([np.ravel(a) for a in parameters]))
        return central(server_round, parameters, config)

    dp = DifferentialPrivacyServerSideFixedClipping(
        strategy(evaluate_fn=keep, fraction_fit=1.0, min_fit_clients=4),
        noise_multiplier=1.0,
        clipping_norm=0.1,
        num_sampled_clients=4,
    )
    sent, recorder = {}, Recorder()
    run(rounds=1, strategy=dp, compression=FP16(), mods=[client_updates(sent)], stages=[recorder])
    decoded = [recorder.updates[(1, c)] for c in "0123"]
    for c, d in zip("0123", decoded, strict=True):
        np.testing.assert_allclose(d, sent[(1, c)], atol=2e-3)  # noise-free decodes
    clipped = [d * min(1.0, 0.1 / np.linalg.norm(d)) for d in decoded]
    noise = (models[1] - models[0]) - np.mean(clipped, axis=0)
    assert np.std(noise) == pytest.approx(1.0 * 0.1 / 4, rel=0.2)  # sigma C / m on the mean


def test_secure_aggregation_refuses_per_client_codecs_by_name():
    with pytest.raises(ConfigError, match="top-k"):
        run(compression=TopK(ratio=0.1), secure_aggregation={"clip": 1.0})
    with pytest.raises(ConfigError, match="shared scale"):
        run(compression=QSGD(bits=4), secure_aggregation={"clip": 1.0})


def test_compression_table_and_bad_values():
    from fedhive.compression import Compression as C

    got = C.from_table(
        {"uplink": "topk", "ratio": 0.01, "error_feedback": True, "downlink": "none"}
    )
    assert got.uplink == TopK(ratio=0.01, error_feedback=True) and got.downlink is None
    assert C.from_table({"uplink": "qsgd", "bits": 2, "downlink": "bf16"}).uplink == QSGD(bits=2)
    with pytest.raises(ConfigError, match="unknown keys"):
        C.from_table({"uplink": "topk", "level": 3})
    with pytest.raises(ConfigError, match="uplink = 'gzip'"):
        C.from_table({"uplink": "gzip"})
    with pytest.raises(ConfigError, match="downlink"):
        C.from_table({"downlink": "topk"})
    with pytest.raises(ConfigError, match="ratio"):
        C.from_table({"uplink": "topk", "ratio": 2.0})
    # the asynchronous policy takes compression (tests/test_compression_async.py)
    policy = fl.server.BufferedAsync(buffer_size=2, concurrency=2)
    history = run(rounds=2, compression=TopK(), policy=policy)
    assert [r["model_version"] for r in history.rounds[1:]] == [1, 2]
