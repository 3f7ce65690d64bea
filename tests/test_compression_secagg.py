"""Compression inside SecAgg+ rounds: shared-scale QSGD and shared-seed random-k are
encoded to ring integers before masking and the unmasked sum is decoded once."""

from __future__ import annotations

import numpy as np
import pytest

from fedhive.client import NumPyClient
from fedhive.common.errors import ConfigError, ProtocolError
from fedhive.common.records import ndarrays_to_parameters
from fedhive.compression import QSGD, Compression, RandomK, TopK
from fedhive.compression.secure import codec_round_params
from fedhive.secagg.coded import client_codec
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation
from grpc_helpers import secure_mean_round

SHAPE = (40, 30)  # 1200 elements: random-k at ratio 0.25 keeps exactly 300
STEP = 2.0**-6  # one grid step: 15 levels over a scale of 15/64
SCALE = 15 * STEP


class GridClient(NumPyClient):
    """Updates on the codec's grid (multiples of 2^-6 within the scale), so stochastic
    rounding is exact and every sum and mean is exact in floating point."""

    def __init__(self, pid: int, drop: bool = False, noise: float = 0.0) -> None:
        self.pid, self.drop, self.noise = pid, drop, noise

    def fit(self, parameters, config):
        if self.drop:
            raise RuntimeError("this client dies after sharing its keys")
        rng = np.random.default_rng(self.pid)
        if self.noise:
            delta = rng.normal(0.0, self.noise, SHAPE)
        else:
            delta = rng.integers(-15, 16, SHAPE) * STEP
        return [(parameters[0] + delta).astype(np.float32)], 4, {}


def run(num_clients=4, drop=(), noise=0.0, **kw):
    models = []

    def keep(rnd, params, config):
        models.append(params[0].copy())
        return 0.0, {}

    history = start_simulation(
        client_fn=lambda cid: GridClient(int(cid), int(cid) in drop, noise),
        num_clients=num_clients,
        config=ServerConfig(num_rounds=1),
        strategy=FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_available_clients=num_clients,
            initial_parameters=ndarrays_to_parameters([np.zeros(SHAPE, np.float32)]),
            evaluate_fn=keep,
        ),
        seed=5,
        **kw,
    )
    return history, models[-1]


SECURE = {"bits": 4, "clip": SCALE, "ring_bits": 32}
CODECS = [
    QSGD(bits=4, scale=SCALE, min_size=0),
    RandomK(ratio=0.25, shared_seed=True, min_size=0),
]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.id)
def test_secure_compressed_round_equals_the_plaintext_compressed_round_bit_exactly(codec):
    _, plain = run(compression=codec)
    secure_hist, secure = run(compression=codec, secure_aggregation=SECURE)
    stats = secure_hist.rounds[-1]["fit"]["secagg"]
    assert stats["codec"] == codec.id and stats["after_unmask"] == 4
    assert stats["total_weight"] == 16
    np.testing.assert_array_equal(secure, plain)
    if isinstance(codec, QSGD):  # on the grid: the codec is lossless, so also the plain mean
        deltas = [np.random.default_rng(i).integers(-15, 16, SHAPE) * STEP for i in range(4)]
        np.testing.assert_array_equal(secure, np.mean(deltas, axis=0).astype(np.float32))
    else:
        assert np.count_nonzero(secure) <= 300  # one shared support


def test_secure_qsgd_mean_is_within_one_step_of_the_plain_mean():
    _, plain = run(noise=0.05)
    _, secure = run(noise=0.05, compression=CODECS[0], secure_aggregation=SECURE)
    clipped = [
        np.clip(np.random.default_rng(i).normal(0.0, 0.05, SHAPE), -SCALE, SCALE) for i in range(4)
    ]
    step = SCALE / 15
    assert np.abs(secure - np.mean(clipped, axis=0)).max() <= step + 1e-7
    assert np.abs(secure - plain).max() > 0  # it did quantize


def test_a_client_dropping_after_sharing_leaves_the_survivors_exact_sum():
    history, secure = run(
        num_clients=5, drop=(4,), compression=CODECS[0], secure_aggregation=SECURE
    )
    stats = history.rounds[-1]["fit"]["secagg"]
    assert stats["dropped_after_sharing"] == 1 and stats["total_weight"] == 16
    deltas = [np.random.default_rng(i).integers(-15, 16, SHAPE) * STEP for i in range(4)]
    np.testing.assert_array_equal(secure, np.mean(deltas, axis=0).astype(np.float32))
    (failure,) = history.rounds[-1]["failures"]
    assert failure["stage"] == "fit"


def test_bytes_count_the_compressed_masked_upload():
    plain, _ = run(secure_aggregation=SECURE)
    coded, _ = run(compression=CODECS[1], secure_aggregation=SECURE)
    # one 32-bit ring integer per element: random-k sends 300 of 1200 per client; the
    # rest of the messages differ by a few bytes (message ids, the shape's digits)
    saved = plain.rounds[-1]["bytes_up"] - coded.rounds[-1]["bytes_up"]
    assert abs(saved - 4 * (1200 - 300) * 4) <= 4 * 8, saved
    assert coded.rounds[-1]["bytes_up"] < plain.rounds[-1]["bytes_up"] * 0.65
    per_client = coded.rounds[-1]["bytes_clients"]
    assert len(per_client) == 4 and all(v["up"] > 300 * 4 for v in per_client.values())


def test_a_ring_that_could_overflow_is_refused_at_construction():
    with pytest.raises(ConfigError, match="can overflow"):
        run(
            compression=QSGD(bits=15, scale=1.0),
            secure_aggregation={"bits": 8, "max_clients": 1000, "max_weight": 1000},
        )
    with pytest.raises(ConfigError, match="at most 15"):
        run(compression=CODECS[1], secure_aggregation={"bits": 16})


def test_what_a_secure_round_cannot_carry_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="top-k"):
        run(compression=TopK(ratio=0.1), secure_aggregation=SECURE)
    with pytest.raises(ConfigError, match="shared scale"):
        run(compression=QSGD(bits=4), secure_aggregation=SECURE)
    with pytest.raises(ConfigError, match="error_feedback"):
        run(compression=QSGD(bits=4, scale=1.0, error_feedback=True), secure_aggregation=SECURE)
    with pytest.raises(ConfigError, match="downlink"):
        run(
            compression=Compression(uplink=CODECS[0], downlink=QSGD(bits=8)),
            secure_aggregation=SECURE,
        )


def _params(codec, n=4, max_weight=1, ring_bits=32):
    return {
        "n": n,
        "bits": 4,
        "clip": 1.0,
        "ring_bits": ring_bits,
        "max_weight": max_weight,
        "weighted": True,
        **codec_round_params(codec, 7),
    }


def test_the_client_checks_the_codec_the_server_asks_for():
    codec = client_codec(_params(CODECS[0]), 10)
    assert codec.seed == 7 and codec.encoding.ring_bits == 32 and codec.length == 11
    assert client_codec({"n": 4}) is None  # plain SecAgg+
    with pytest.raises(ProtocolError, match=r"codec check.*overflow"):
        client_codec(_params(QSGD(bits=15, scale=1.0), n=10**6, max_weight=1000))
    with pytest.raises(ProtocolError, match=r"codec check.*top-k"):
        client_codec(_params(TopK(ratio=0.1)))
    bad = {**_params(CODECS[0]), "codec.p.scale": float("nan")}
    with pytest.raises(ProtocolError, match="codec check"):
        client_codec(bad)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_grpc_secure_compressed_round_with_a_client_dying():
    """Five client processes, one dies while training; deltas 1..4 weighted 1..4."""
    history = secure_mean_round(
        5, {"threshold": 3, "bits": 8, "clip": 8.0}, compression=QSGD(bits=4, scale=8.0)
    )
    first = history.rounds[1]
    assert first["fit"]["updated"], first["fit"]
    assert first["fit"]["secagg"]["codec"] == "qsgd"
    assert first["fit"]["secagg"]["dropped_after_sharing"] == 1
    assert first["bytes_up"] > 0
    # 30 / 10 = 3, within one step of the codec's grid (8 / 15)
    assert abs(history.losses_centralized[1][1] - 3.0) <= 8.0 / 15


def test_a_secure_compressed_round_with_dp_clipping_is_refused_and_keeps_the_model():
    from fedhive.privacy import Accounting
    from fedhive.server.strategy import DifferentialPrivacyClientSideFixedClipping

    strategy = DifferentialPrivacyClientSideFixedClipping(
        FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            initial_parameters=ndarrays_to_parameters([np.zeros(SHAPE, np.float32)]),
        ),
        noise_multiplier=0.5,
        clipping_norm=1.0,
        num_sampled_clients=4,
        accounting=Accounting(delta=1e-3),
    )
    history = start_simulation(
        client_fn=lambda cid: GridClient(int(cid)),
        num_clients=4,
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        compression=CODECS[0],
        secure_aggregation=SECURE,
        seed=5,
    )
    fit = history.rounds[-1]["fit"]
    assert not fit["updated"] and "DP clipping" in fit["note"]
