"""SecAgg+: the secure mean equals the plain mean, secrets never travel in the clear,
dropouts at every stage are survived, and a lying server is caught."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedhive as fl
from fedhive.common import MessageType
from fedhive.common.errors import ConfigError, ProtocolError
from fedhive.secagg import (
    SecAggConfig,
    SecAggPlusMod,
    SecAggPlusWorkflow,
    check_secagg_compatible,
    default_degree,
    secaggplus_mod,
)
from fedhive.secagg import primitives as p
from fedhive.secagg.client import STAGE_ADVERTISE, STAGE_CONSISTENCY, STAGE_SHARE, STAGE_UNMASK
from fedhive.secagg.client_checks import check_peer
from fedhive.secagg.config import neighbour_graph
from fedhive.secagg.server_round import SecureRound
from fedhive.server.strategy import FedAdam, FedAvg, FedMedian, Krum, Scaffold
from fedhive.simulation import start_simulation
from fedhive.transport.codec import encode_message

SHAPES = [(3,), (2, 4)]


class Linear(fl.client.NumPyClient):
    """fit adds a client-specific, layer-specific vector; weight 1 + pid."""

    def __init__(self, pid: int, scale: float = 0.01) -> None:
        self.pid, self.scale = pid, scale

    def get_parameters(self, config):
        return [np.zeros(s, np.float32) for s in SHAPES]

    def fit(self, parameters, config):
        rng = np.random.default_rng(self.pid)
        new = [p + self.scale * rng.uniform(-1, 1, p.shape).astype(p.dtype) for p in parameters]
        return new, 1 + self.pid, {"pid": self.pid}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


def updates(n: int, scale: float = 0.01) -> list[list[np.ndarray]]:
    out = []
    for pid in range(n):
        rng = np.random.default_rng(pid)
        out.append([scale * rng.uniform(-1, 1, s).astype(np.float32) for s in SHAPES])
    return out


def plain_mean(pids, n, weighted=True):
    ups = updates(n)
    w = np.array([1.0 + pid if weighted else 1.0 for pid in pids])
    return [
        sum(w[i] * ups[pid][k].astype(np.float64) for i, pid in enumerate(pids)) / w.sum()
        for k in range(len(SHAPES))
    ]


class Capture:
    """An evaluate_fn that keeps the model of every round."""

    def __init__(self):
        self.models = {}

    def __call__(self, rnd, params, config):
        self.models[rnd] = [a.copy() for a in params]
        return 0.0, {}


def dropout_mod(drops: dict[str, set[str]]):
    """Clients in drops[stage] fail at that stage (placed before the SecAgg+ mod)."""

    def mod(message, context, call_next):
        if context.node_id in drops.get(message.metadata.message_type, set()):
            raise RuntimeError("client dropped")
        return call_next(message, context)

    return mod


def run(n, workflow, *, mods=(), rounds=1, strategy=None, client=Linear,
        secagg_mod=secaggplus_mod, **kw):  # fmt: skip
    capture = Capture()
    strategy = strategy or FedAvg(
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters(
            [np.zeros(s, np.float32) for s in SHAPES]
        ),
        evaluate_fn=capture,
    )
    hist = start_simulation(
        client_fn=lambda cid: client(int(cid)),
        num_clients=n,
        strategy=strategy,
        config=fl.server.ServerConfig(num_rounds=rounds),
        mods=[*mods, secagg_mod],
        fit_workflow=workflow,
        seed=kw.pop("seed", 0),
        num_workers=kw.pop("num_workers", 2),
        **kw,
    )
    return hist, capture


# -- primitives ------------------------------------------------------------------------------


def test_shamir_any_threshold_subset_rebuilds_and_fewer_do_not():
    secret = bytes(range(32))
    xs = list(range(1, 8))
    shares = p.split_secret(secret, xs, 4)
    for subset in itertools.combinations(xs, 4):
        assert p.combine_shares({x: shares[x] for x in subset}, 4) == secret
    few = {x: shares[x] for x in xs[:3]}
    with pytest.raises(ProtocolError, match="3 shares, 4 needed"):
        p.combine_shares(few, 4)
    # interpolating fewer shares as if they were enough yields an unrelated value
    with pytest.raises(ProtocolError):
        assert p.combine_shares(few, 3) != secret


def test_fewer_than_t_shares_are_independent_of_the_secret():
    """t - 1 shares of two different secrets are identically (uniformly) distributed."""
    xs, t = [1, 2, 3], 3
    tops = {}
    for secret in (bytes(32), b"\xff" * 32):
        values = [
            int.from_bytes(p.split_secret(secret, xs, t)[1], "big") >> 515 for _ in range(400)
        ]
        tops[secret] = np.bincount(values, minlength=64)
    # the top 6 bits of one share: both histograms are close to uniform (chi-square)
    for hist in tops.values():
        expected = hist.sum() / 64
        chi2 = float(((hist - expected) ** 2 / expected).sum())
        assert chi2 < 120  # 63 degrees of freedom; p ~ 1e-5 at 120


def test_masks_are_deterministic_uniform_and_seed_dependent():
    a = p.expand_mask(b"\x01" * 32, 100_000, 32)
    assert np.array_equal(a, p.expand_mask(b"\x01" * 32, 100_000, 32))
    assert not np.array_equal(a, p.expand_mask(b"\x02" * 32, 100_000, 32))
    counts = np.bincount((a >> 24).astype(np.int64), minlength=256)
    expected = a.size / 256
    assert float(((counts - expected) ** 2 / expected).sum()) < 350  # 255 dof
    expander = p.MaskExpander(10, 64)
    assert expander.expand(b"\x03" * 32).dtype == np.dtype("<u8")


@given(
    bits=st.integers(2, 16),
    clip=st.floats(0.01, 10.0),
    values=st.lists(st.floats(-20, 20), min_size=1, max_size=50),
)
@settings(max_examples=60, deadline=None)
def test_quantization_error_is_below_one_step(bits, clip, values):
    x = np.array(values)
    q = p.quantize(x, clip, bits, np.random.default_rng(0))
    assert q.max(initial=0) <= (1 << bits) - 1
    back = p.dequantize(q, 1, clip, bits)
    step = 2 * clip / ((1 << bits) - 1)
    assert np.all(np.abs(back - np.clip(x, -clip, clip)) <= step * (1 + 1e-9))


def test_stochastic_rounding_is_unbiased():
    x = np.full(200_000, 0.123456)
    q = p.quantize(x, 1.0, 4, np.random.default_rng(1))
    assert abs(p.dequantize(q, 1, 1.0, 4).mean() - 0.123456) < 2e-3


def test_share_encryption_binds_sender_and_receiver():
    a, b = p.KeyPair(), p.KeyPair()
    key_ab = p.agree(a.secret, b.public, b"share|0|1")
    assert key_ab == p.agree(b.secret, a.public, b"share|0|1")
    assert key_ab != p.agree(b.secret, a.public, b"mask|0|1")
    blob = p.encrypt_share(key_ab, b"secret", b"1->2")
    assert p.decrypt_share(key_ab, blob, b"1->2") == b"secret"
    with pytest.raises(ProtocolError, match="authentication"):
        p.decrypt_share(key_ab, blob, b"1->3")


# -- configuration ----------------------------------------------------------------------------


def test_graph_is_regular_symmetric_and_complete_when_asked():
    ids = list(range(1, 41))
    graph = neighbour_graph(ids, 8, random.Random(0))
    assert all(len(v) == 8 and i not in v for i, v in graph.items())
    assert all(i in graph[j] for i, v in graph.items() for j in v)
    odd = neighbour_graph(list(range(1, 12)), 3, random.Random(0))  # odd k, odd n -> k + 1
    assert {len(v) for v in odd.values()} == {4}
    complete = neighbour_graph(ids, 39, random.Random(0))
    assert all(len(v) == 39 for v in complete.values())


def test_default_degree_is_logarithmic_and_complete_for_small_n():
    assert default_degree(4) == 3
    assert default_degree(10) <= 9
    assert default_degree(100) < 40
    assert default_degree(10_000) < 120  # t > (k + c) / 2 needs more neighbours
    degree, threshold = SecAggConfig().plan(100)
    assert degree // 2 < threshold <= degree
    assert SecAggConfig(degree="complete").plan(50) == (49, 33)


@pytest.mark.parametrize("n", [8, 32, 100, 1000])
def test_default_threshold_holds_against_a_view_split_plus_colluders(n):
    """No split of a client's honest neighbours into a group that reveals its seed share
    and one that reveals its key share, plus the colluding neighbours (at most the
    high-probability bound c) revealing both, reaches t shares of both kinds."""
    from fedhive.secagg.config import corrupt_bound

    config = SecAggConfig(max_clients=1000)
    k, t = config.plan(n)
    c = corrupt_bound(n, k, config.corrupt_fraction, config.failure_probability)
    assert c >= math.floor(0.1 * n) if k == n - 1 else 0 <= c <= k
    assert t >= (2 * k) // 3 + 1 and t <= k
    honest = k - c
    assert not any(a + c >= t and (honest - a) + c >= t for a in range(honest + 1))
    # the case: n = 32, two colluders, 2t <= k + c - 1 must not hold
    assert 2 * t > k + max(c, 2)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"degree": 9, "threshold": 5}, "safe bound"),
        ({"bits": 0}, "bits"),
        ({"clip": -1.0}, "clip"),
        ({"degree": "star"}, "degree"),
        ({"degree": 4, "threshold": 5}, "exceeds degree"),
        ({"bits": 30, "max_weight": 1 << 20, "max_clients": 1 << 20}, "ring is too small"),
        ({"ring_bits": 32, "bits": 16}, "ring is too small"),
        ({"ring_bits": 16}, "32 or 64"),
    ],
)
def test_invalid_configuration_is_refused_at_construction(options, match):
    with pytest.raises(ConfigError, match=match):
        SecAggPlusWorkflow(**options)


def test_ring_is_sized_for_clients_weights_and_bits():
    assert SecAggConfig().ring == 32  # 1000 x 1000 x 2^12 < 2^32
    assert SecAggConfig(bits=16).ring == 64
    with pytest.raises(ConfigError, match="unknown secure aggregation option"):
        SecAggPlusWorkflow(treshold=3)
    with pytest.raises(ConfigError, match="max_clients"):
        SecAggConfig(max_clients=10).plan(11)


def test_strategies_that_need_individual_updates_are_refused():
    assert check_secagg_compatible(FedAvg()) == "num_examples"
    assert (
        check_secagg_compatible(
            FedAdam(initial_parameters=fl.common.ndarrays_to_parameters([np.zeros(2)]))
        )
        == "num_examples"
    )
    for strategy in (FedMedian(), Krum(num_malicious_clients=1), Scaffold()):
        with pytest.raises(ConfigError, match="needs individual updates"):
            check_secagg_compatible(strategy)
    with pytest.raises(ConfigError, match="needs individual updates"):
        start_simulation(
            client_fn=lambda cid: Linear(int(cid)),
            num_clients=4,
            strategy=FedMedian(),
            secure_aggregation={"threshold": 2},
        )


# -- the secure mean --------------------------------------------------------------------------


STAGES = [STAGE_ADVERTISE, STAGE_SHARE, MessageType.FIT, STAGE_CONSISTENCY, STAGE_UNMASK]


class Sized(fl.client.NumPyClient):
    """A model of ``size`` float32 parameters in one layer; update uniform in +-0.04."""

    size = 1

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fit(self, parameters, config):
        rng = np.random.default_rng(self.pid)
        new = [p + rng.uniform(-0.04, 0.04, p.shape).astype(np.float32) for p in parameters]
        return new, 1 + self.pid % 5, {}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


@given(
    n=st.integers(3, 12),
    degree=st.one_of(st.none(), st.integers(2, 8)),
    slack=st.integers(0, 3),
    bits=st.integers(8, 16),
    size=st.integers(1, 300),
    stage=st.sampled_from(STAGES),
    drops=st.integers(0, 3),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_secure_mean_equals_plain_mean_within_the_bound(n, degree, slack, bits, size, stage, drops):
    """Over n, k, t, sizes and dropouts at any stage (no more than k - t, so every
    client keeps t live neighbours): the secure mean of whoever is in the sum equals
    their plain weighted mean within one quantization step."""
    k = n - 1 if degree is None else min(degree, n - 1)
    if k < n - 1 and k % 2 and n % 2:
        k += 1  # an odd k with odd n is raised by one
    threshold = max(SecAggConfig().safe_threshold(k, n), k - slack)
    drops = min(drops, k - threshold, n - max(2, threshold))
    dropped = {str(i) for i in range(drops)}
    workflow = SecAggPlusWorkflow(
        degree="complete" if degree is None else k,  # None: the complete graph
        threshold=threshold,
        bits=bits,
        clip=0.05,
        max_clients=64,
    )
    init = fl.common.ndarrays_to_parameters([np.zeros(size, np.float32)])
    capture = Capture()
    strategy = FedAvg(fraction_evaluate=0.0, initial_parameters=init, evaluate_fn=capture)
    client = type("S", (Sized,), {"size": size})
    hist, _ = run(
        n, workflow, mods=[dropout_mod({stage: dropped})], strategy=strategy, client=client
    )
    fit = hist.rounds[-1]["fit"]
    assert fit["updated"], fit.get("note")
    late = stage in (STAGE_CONSISTENCY, STAGE_UNMASK)
    in_sum = [i for i in range(n) if late or str(i) not in dropped]
    assert fit["num_results"] == len(in_sum)
    ups = [np.random.default_rng(i).uniform(-0.04, 0.04, size).astype(np.float32) for i in in_sum]
    weights = np.array([1 + i % 5 for i in in_sum], np.float64)
    want = sum(w * u.astype(np.float64) for w, u in zip(weights, ups, strict=True)) / weights.sum()
    error = np.max(np.abs(capture.models[1][0] - want))
    assert error <= workflow.config.quantization_error + 1e-6


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_at_every_stage_leave_the_mean_of_the_survivors(stage):
    n, dropped = 10, {"2", "7"}
    workflow = SecAggPlusWorkflow(degree=8, threshold=6, bits=16, clip=0.05)
    hist, capture = run(n, workflow, mods=[dropout_mod({stage: dropped})])
    fit = hist.rounds[-1]["fit"]
    assert fit["updated"], fit.get("note")
    # whoever sent masked input is in the sum, even if it dropped later
    in_sum = [
        i for i in range(n) if stage in (STAGE_CONSISTENCY, STAGE_UNMASK) or str(i) not in dropped
    ]
    for got, want in zip(capture.models[1], plain_mean(in_sum, n), strict=True):
        assert np.max(np.abs(got - want)) <= workflow.config.quantization_error + 1e-6
    failures = hist.rounds[-1]["failures"]
    assert {f["client_id"] for f in failures} == dropped
    assert {f["stage"] for f in failures} == {stage}
    if stage == MessageType.FIT:
        assert fit["secagg"]["dropped_after_sharing"] == 2


def test_too_many_dropouts_keep_the_model_and_say_why():
    drops = {MessageType.FIT: {str(i) for i in range(6)}}
    workflow = SecAggPlusWorkflow(degree="complete", threshold=6, bits=12, clip=0.05)
    hist, capture = run(9, workflow, mods=[dropout_mod(drops)])
    fit = hist.rounds[-1]["fit"]
    assert not fit["updated"]
    assert "fewer than the threshold 6" in fit["note"]
    assert all(np.all(a == 0) for a in capture.models[1])


def test_nan_update_fails_that_client_only():
    class Nan(Linear):
        def fit(self, parameters, config):
            new, n, m = super().fit(parameters, config)
            if self.pid == 1:
                new[0][0] = np.nan
            return new, n, m

    workflow = SecAggPlusWorkflow(degree="complete", threshold=4, bits=16, clip=0.05)
    hist, capture = run(6, workflow, client=Nan)
    (failure,) = hist.rounds[-1]["failures"]
    assert failure["client_id"] == "1" and "NaN" in failure["reason"]
    want = plain_mean([0, 2, 3, 4, 5], 6)
    assert (
        np.max(np.abs(capture.models[1][1] - want[1])) <= workflow.config.quantization_error + 1e-6
    )


def test_fedadam_and_weights_compose_over_rounds():
    init = fl.common.ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES])
    plain_cap, secure_cap = Capture(), Capture()
    results = {}
    for name, capture, workflow in (
        ("plain", plain_cap, None),
        ("secure", secure_cap, SecAggPlusWorkflow(bits=16, clip=0.05)),
    ):
        strategy = FedAdam(
            initial_parameters=init, fraction_evaluate=0.0, evaluate_fn=capture, eta=0.01
        )
        results[name] = start_simulation(
            client_fn=lambda cid: Linear(int(cid)),
            num_clients=8,
            strategy=strategy,
            config=fl.server.ServerConfig(num_rounds=3),
            fit_workflow=workflow,
            mods=[secaggplus_mod] if workflow else [],
            seed=0,
        )
    for a, b in zip(plain_cap.models[3], secure_cap.models[3], strict=True):
        np.testing.assert_allclose(a, b, atol=5e-4)


# -- what the server sees ---------------------------------------------------------------------


class Spy:
    """Placed before the SecAgg+ mod: records every message relayed to and from a client,
    encoded as on the wire, and the client's secrets once it has made them."""

    def __init__(self):
        self.wire: list[bytes] = []
        self.secrets: list[bytes] = []
        self.masked: list[np.ndarray] = []

    def __call__(self, message, context, call_next):
        self.wire.append(encode_message(message))
        reply = call_next(message, context)
        self.wire.append(encode_message(reply))
        state = context.state.config_records.get("secagg.round")
        if state:
            self.secrets += [state["c_sk"], state["s_sk"], state["seed"]]
        self.secrets.append(context.state.config_records["secagg.identity"]["secret"])
        if message.metadata.message_type == MessageType.FIT and reply.error is None:
            self.masked.append(fl.common.parameters_to_ndarrays(reply.content.parameters)[0])
        return reply


class Zero(Linear):
    """Sends back the model unchanged: the plain update is all zeros."""

    def fit(self, parameters, config):
        return [np.full_like(p, 0.25) for p in parameters], 1, {}


def test_relayed_messages_carry_no_secret_and_masked_inputs_look_uniform():
    spy = Spy()
    workflow = SecAggPlusWorkflow(degree="complete", threshold=3, bits=12, clip=1.0)
    run(5, workflow, mods=[spy], client=Zero, num_workers=1)
    secrets = set(spy.secrets)
    assert len(secrets) == 5 * 3 + 5
    wire = b"".join(spy.wire)
    for secret in secrets:
        assert secret not in wire
    # the plain model the clients trained (0.25 everywhere, float32) never leaves them
    replies = b"".join(spy.wire[1::2])
    assert np.full(3, 0.25, np.float32).tobytes() not in replies
    # every client's update is the same constant; the masked vectors still look uniform
    masked = np.concatenate([m[:-1] for m in spy.masked])
    assert masked.dtype == np.dtype("<u4")
    counts = np.bincount((masked >> 28).astype(np.int64), minlength=16)
    expected = masked.size / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 60  # 15 dof
    assert len({m.tobytes() for m in spy.masked}) == 5


# -- a server that lies -----------------------------------------------------------------------


class SplitViews(SecureRound):
    """Announces a different survivor set to half of the clients."""

    def _consistency(self, u3):
        original = self._exchange

        def exchange(stage, contents):
            for i, (_, content) in enumerate(sorted(contents.items())):
                if i % 2:
                    ids = content.array_records["secagg"]["survivors"]
                    content.array_records["secagg"]["survivors"] = ids[1:]
            return original(stage, contents)

        self._exchange = exchange
        try:
            return super()._consistency(u3)
        finally:
            self._exchange = original


class BothShares(SecureRound):
    """Claims every survivor also dropped, asking for both of its shares."""

    def _unmask(self, u2, u3, u4):
        original = self._exchange

        def exchange(stage, contents):
            for content in contents.values():
                arrays = content.array_records["secagg"]
                arrays["dropped"] = np.concatenate([arrays["dropped"], arrays["survivors"][:2]])
            return original(stage, contents)

        self._exchange = exchange
        try:
            return super()._unmask(u2, u3, u4)
        finally:
            self._exchange = original


@pytest.mark.parametrize(
    "liar, reason",
    [(SplitViews, "different set of survivors"), (BothShares, "both shares")],
)
def test_a_lying_server_is_caught_and_the_round_aborts(monkeypatch, liar, reason):
    import fedhive.secagg.server as server_module

    monkeypatch.setattr(server_module, "SecureRound", liar)
    workflow = SecAggPlusWorkflow(degree="complete", threshold=4, bits=12, clip=0.05)
    hist, capture = run(6, workflow)
    record = hist.rounds[-1]
    assert not record["fit"]["updated"]
    assert "aborted" in record["fit"]["note"]
    reasons = " ".join(f["reason"] for f in record["failures"])
    assert reason in reasons
    assert all(np.all(a == 0) for a in capture.models[1])


def test_a_client_reveals_shares_once_per_round():
    mod = SecAggPlusMod()
    context = fl.client.Context(node_id="x")
    message = fl.common.Message.task(
        run_id=1,
        node_id="x",
        server_round=1,
        model_version=0,
        message_type=STAGE_UNMASK,
        content=fl.common.RecordDict(),
    )
    with pytest.raises(ProtocolError, match="before this client advertised"):
        mod(message, context, lambda m, c: m)


# -- differential privacy on top ---------------------------------------------------------------


def _dp_run(secure: bool, adaptive: bool):
    from fedhive.privacy import (
        DifferentialPrivacyClientSideAdaptiveClipping,
        DifferentialPrivacyClientSideFixedClipping,
        adaptiveclipping_mod,
        fixedclipping_mod,
    )

    capture = Capture()
    inner = FedAvg(
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters(
            [np.zeros(s, np.float32) for s in SHAPES]
        ),
        evaluate_fn=capture,
    )
    if adaptive:
        strategy = DifferentialPrivacyClientSideAdaptiveClipping(
            inner, noise_multiplier=0.5, num_sampled_clients=6, noise_seed=5
        )
        clip_mod = adaptiveclipping_mod
    else:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            inner, noise_multiplier=0.5, clipping_norm=0.02, num_sampled_clients=6, noise_seed=5
        )
        clip_mod = fixedclipping_mod
    hist = start_simulation(
        client_fn=lambda cid: Linear(int(cid)),
        num_clients=6,
        strategy=strategy,
        config=fl.server.ServerConfig(num_rounds=2),
        mods=[clip_mod],
        secure_aggregation={"bits": 16, "clip": 0.05} if secure else None,
        seed=0,
    )
    return hist, capture


@pytest.mark.parametrize("adaptive", [False, True])
def test_client_side_dp_composes_with_secure_aggregation(adaptive):
    plain_hist, plain = _dp_run(False, adaptive)
    secure_hist, secure = _dp_run(True, adaptive)
    metrics = secure_hist.rounds[-1]["fit"]["metrics"]
    assert metrics["epsilon"] == plain_hist.rounds[-1]["fit"]["metrics"]["epsilon"]
    assert metrics["dp_noise_stddev"] > 0
    bound = 2 * 2 * 0.05 / (2**16 - 1)  # two rounds of quantization error
    for a, b in zip(plain.models[2], secure.models[2], strict=True):
        assert np.max(np.abs(a - b)) <= bound + 1e-6


def test_server_side_clipping_cannot_use_secure_aggregation():
    from fedhive.privacy import DifferentialPrivacyServerSideFixedClipping

    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=4
    )
    with pytest.raises(ConfigError, match="clips on the server"):
        check_secagg_compatible(strategy)


def test_enrolled_identities_are_checked_against_the_relayed_keys():
    from types import SimpleNamespace

    from fedhive.secagg.client import advert_bytes

    identity = p.new_identity()
    c, s = p.KeyPair(), p.KeyPair()
    meta = SimpleNamespace(run_id=7, server_round=2)
    advert = {
        "c_pk": c.public,
        "s_pk": s.public,
        "id_pk": p.identity_public(identity),
        "sig": p.sign(identity, advert_bytes(7, 2, 3, "alice", c.public, s.public)),
    }
    trusted = {"alice": p.identity_public(identity)}
    assert check_peer(trusted, meta, 3, "alice", advert)[0] == c.public
    with pytest.raises(ProtocolError, match="not enrolled"):
        check_peer(trusted, meta, 3, "mallory", advert)
    with pytest.raises(ProtocolError, match="no valid signature"):
        check_peer(trusted, meta, 4, "alice", advert)  # signed for another id
    other = p.new_identity()
    swapped = {**advert, "id_pk": p.identity_public(other)}
    with pytest.raises(ProtocolError, match="not enrolled"):
        check_peer(trusted, meta, 3, "alice", swapped)


def test_metrics_aggregation_sees_every_survivor():
    seen = []

    def agg(pairs):
        seen.append(sorted(m["pid"] for _, m in pairs))
        return {"clients": len(pairs)}

    init = fl.common.ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES])
    strategy = FedAvg(
        fraction_evaluate=0.0, initial_parameters=init, fit_metrics_aggregation_fn=agg
    )
    workflow = SecAggPlusWorkflow(degree="complete", threshold=3, bits=12, clip=0.05)
    hist, _ = run(5, workflow, strategy=strategy, mods=[dropout_mod({MessageType.FIT: {"4"}})])
    assert seen == [[0, 1, 2, 3]]
    assert hist.rounds[-1]["fit"]["metrics"] == {"clients": 4}


def test_a_round_too_small_for_the_threshold_keeps_the_model_and_says_why():
    workflow = SecAggPlusWorkflow(threshold=5, bits=12, clip=0.05)
    hist, capture = run(4, workflow, rounds=2)
    for record in hist.rounds[1:]:
        assert not record["fit"]["updated"]
        assert "threshold=5 exceeds the 3 neighbours" in record["fit"]["note"]
    assert all(np.all(a == 0) for a in capture.models[2])
    one = SecAggPlusWorkflow(bits=12, clip=0.05)
    init = fl.common.ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES])
    alone = FedAvg(min_fit_clients=1, min_available_clients=1, initial_parameters=init)
    hist, _ = run(1, one, strategy=alone)
    assert "at least 2 clients" in hist.rounds[-1]["fit"]["note"]


def test_conditional_rounding_keeps_the_released_norm_within_c_plus_beta():
    """Stochastic rounding after clipping to C inflates the norm (here to ~2.5 C); the
    conditional rounding releases at most C + beta, what the accountant is told."""
    d, c, clip, bits = 200_000, 0.1, 0.1, 12
    rng = np.random.default_rng(0)
    x = rng.normal(size=d)
    x *= c / np.linalg.norm(x)
    step = 2 * clip / (2**bits - 1)
    beta = p.rounding_bound(d, clip, bits)
    plain = p.quantize(x, clip, bits, rng) * step - clip
    assert np.linalg.norm(plain) > c  # the inflation is real
    for _ in range(5):
        q = p.conditional_quantize(x, clip, bits, rng, c + beta)
        assert np.linalg.norm(q * step - clip) <= c + beta
    with pytest.raises(ProtocolError, match="conditional rounding"):
        p.conditional_quantize(10 * x, clip, bits, rng, c + beta)  # not clipped to C
    # the numbers: d = 1e6, 12 bits, clip = 1 against C = 0.1 -> beta ~ 2.45 C
    assert p.rounding_bound(1_000_000, 1.0, 12) > 2.4 * 0.1


def test_dp_with_secure_aggregation_accounts_what_is_released(monkeypatch):
    import fedhive.secagg.primitives as prim

    released = []
    original = prim.conditional_quantize

    def spy(values, clip, bits, rng, norm_bound, tries=64):
        q = original(values, clip, bits, rng, norm_bound, tries)
        released.append((float(np.linalg.norm(q * (2 * clip / (2**bits - 1)) - clip)), norm_bound))
        return q

    monkeypatch.setattr(prim, "conditional_quantize", spy)
    hist, _ = _dp_run(True, False)
    metrics = hist.rounds[-1]["fit"]["metrics"]
    assert released and all(norm <= bound for norm, bound in released)
    assert {bound for _, bound in released} == {metrics["dp_sensitivity"]}
    assert metrics["dp_sensitivity"] > 0.02  # C + beta, not C
    assert metrics["dp_noise_stddev"] == pytest.approx(0.5 * metrics["dp_sensitivity"] / 6)


def test_dp_rounding_error_large_against_c_is_refused():
    from fedhive.privacy import DifferentialPrivacyClientSideFixedClipping, fixedclipping_mod

    init = fl.common.ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES])
    strategy = DifferentialPrivacyClientSideFixedClipping(
        FedAvg(fraction_evaluate=0.0, initial_parameters=init),
        noise_multiplier=0.5, clipping_norm=1e-4, num_sampled_clients=6, noise_seed=5,
    )  # fmt: skip
    hist = start_simulation(
        client_fn=lambda cid: Linear(int(cid)),
        num_clients=6,
        strategy=strategy,
        config=fl.server.ServerConfig(num_rounds=1),
        mods=[fixedclipping_mod],
        secure_aggregation={"bits": 8, "clip": 1.0},
        seed=0,
    )
    fit = hist.rounds[-1]["fit"]
    assert not fit["updated"]
    assert "not small against the DP clipping norm" in fit["note"]
