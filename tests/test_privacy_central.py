"""Central DP wrappers: clipping, noise, equivalence with the inner strategy, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedhive.privacy
from conftest import initial
from fedhive.client import Context, NumPyClient
from fedhive.common import (
    ConfigError,
    FitRes,
    Message,
    MessageType,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.common.records import FitIns
from fedhive.privacy import (
    Accounting,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    adaptiveclipping_mod,
    epsilon_for,
    fixedclipping_mod,
)
from fedhive.privacy.central import DP_INCOMPATIBLE
from fedhive.privacy.clipping import clip_update, l2_norm
from fedhive.server import ServerConfig
from fedhive.server.client_manager import ClientProxy
from fedhive.server.strategy import FedAvg
from fedhive.server.strategy.traits import StrategyTraits
from fedhive.simulation import start_simulation

SHAPES = [(4,), (2, 3)]


def zeros():
    return [np.zeros(s, np.float32) for s in SHAPES]


def fit_res(arrays, n=1, metrics=None):
    return FitRes(Status(), ndarrays_to_parameters(arrays), n, metrics or {})


def aggregate(strategy, reference, updates, server_round=1, metrics=None):
    """Run one round's aggregator directly on ``reference + update`` replies."""
    agg = strategy.fit_aggregator(server_round, ndarrays_to_parameters(reference))
    for i, upd in enumerate(updates):
        new = [r + u for r, u in zip(reference, upd, strict=True)]
        agg.add(ClientProxy(str(i)), fit_res(new, i + 1, (metrics or [{}] * len(updates))[i]))
    params, out = agg.finalize()
    return parameters_to_ndarrays(params), out


def fixed(noise=1.0, clip=1.0, m=4, **kw):
    return DifferentialPrivacyServerSideFixedClipping(FedAvg(), noise, clip, m, **kw)


# -- clipping -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=30),
    st.floats(1e-6, 1e3),
)
def test_clip_update_bounds_the_norm_and_keeps_the_direction(values, clip):
    arrays = [np.array(values[: len(values) // 2 + 1]), np.array(values[len(values) // 2 + 1 :])]
    before = [a.copy() for a in arrays]
    norm = l2_norm(before)
    clipped, reported = clip_update(arrays, clip)
    assert reported == pytest.approx(norm)
    assert l2_norm(clipped) <= clip
    if norm <= clip:
        for a, b in zip(clipped, before, strict=True):
            np.testing.assert_array_equal(a, b)
    else:
        flat, orig = np.concatenate(clipped), np.concatenate(before)
        np.testing.assert_allclose(flat * (norm / clip), orig, rtol=1e-9, atol=1e-9 * norm)


def test_every_released_update_respects_the_clip_norm():
    rng = np.random.default_rng(0)
    updates = [[rng.normal(scale=10, size=s) for s in SHAPES] for _ in range(6)]
    for m in (6, 10):
        strategy = fixed(noise=0.0, clip=0.3, m=m)
        new, _ = aggregate(strategy, zeros(), updates)
        # the mean of 6 clipped updates over denominator m moves at most 6 * C / m
        assert l2_norm(new) <= 6 * 0.3 / m + 1e-6
        assert l2_norm(new) > 0


def test_client_mods_release_only_clipped_updates():
    rng = np.random.default_rng(1)
    reference = zeros()
    for mod, bit in ((fixedclipping_mod, False), (adaptiveclipping_mod, True)):
        for scale in (0.01, 10.0):
            update = [rng.normal(scale=scale, size=s).astype(np.float32) for s in SHAPES]
            task = Message.task(
                run_id=0, node_id="7", server_round=1, model_version=0,
                message_type=MessageType.FIT,
                content=FitIns(ndarrays_to_parameters(reference), {"dp_clipping_norm": 0.5}),
            )  # fmt: skip

            def client(msg, ctx, update=update):
                return msg.reply(fit_res([r + u for r, u in zip(reference, update, strict=True)]))

            reply = mod(task, Context("7"), client)
            sent = parameters_to_ndarrays(reply.content.parameters)
            assert l2_norm(sent) <= 0.5 * (1 + 1e-6)
            if bit:
                assert reply.content.metrics["dp_norm_bit"] == int(l2_norm(update) <= 0.5)
            else:
                assert "dp_norm_bit" not in reply.content.metrics


def test_clipping_mod_without_a_dp_server_fails_clearly():
    task = Message.task(
        run_id=0, node_id="1", server_round=1, model_version=0, message_type=MessageType.FIT,
        content=FitIns(ndarrays_to_parameters(zeros()), {}),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="dp_clipping_norm"):
        fixedclipping_mod(task, Context("1"), lambda m, c: m.reply(fit_res(zeros())))


# -- noise ----------------------------------------------------------------------------------------


def test_noise_standard_deviation_matches_z_c_over_m():
    reference = [np.zeros(250_000, np.float64)]
    updates = [[np.zeros(250_000)] for _ in range(5)]
    for z, clip, m in ((1.0, 0.5, 5), (3.0, 2.0, 8)):
        strategy = fixed(noise=z, clip=clip, m=m, noise_seed=11)
        new, metrics = aggregate(strategy, reference, updates)
        expected = z * clip / m
        assert metrics["dp_noise_stddev"] == pytest.approx(expected)
        # the standard error of a sample std over 250k draws is 0.14%
        assert np.std(new[0]) == pytest.approx(expected, rel=0.01)
        assert abs(np.mean(new[0])) < 5 * expected / math.sqrt(250_000)
        assert metrics["dp_not_private"] is True


def test_secure_noise_is_fresh_and_has_the_right_scale():
    reference = [np.zeros(100_000, np.float64)]
    updates = [[np.zeros(100_000)]]
    strategy = fixed(noise=2.0, clip=1.0, m=1)
    a, metrics = aggregate(strategy, reference, updates)
    b, _ = aggregate(strategy, reference, updates)
    assert "dp_not_private" not in metrics
    assert not np.array_equal(a[0], b[0])
    assert np.std(a[0]) == pytest.approx(2.0, rel=0.02)


def test_seeded_noise_replays_and_depends_on_the_round():
    reference, updates = zeros(), [zeros()]
    a, _ = aggregate(fixed(noise_seed=5, m=1), reference, updates, server_round=3)
    b, _ = aggregate(fixed(noise_seed=5, m=1), reference, updates, server_round=3)
    c, _ = aggregate(fixed(noise_seed=5, m=1), reference, updates, server_round=4)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_without_noise_and_active_clipping_the_wrapper_is_the_inner_strategy():
    rng = np.random.default_rng(2)
    reference = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    news = [[r + rng.normal(size=r.shape).astype(np.float32) for r in reference] for _ in range(4)]
    inner = FedAvg()
    agg = inner.fit_aggregator(1, ndarrays_to_parameters(reference))
    for i, new in enumerate(news):
        agg.add(ClientProxy(str(i)), fit_res(new, 1))  # equal weights
    expected, _ = agg.finalize()
    wrapper = fixed(noise=0.0, clip=1e9, m=4)
    updates = [[n - r for n, r in zip(new, reference, strict=True)] for new in news]
    got, metrics = aggregate(wrapper, reference, updates)  # unequal num_examples: ignored
    for g, e in zip(got, parameters_to_ndarrays(expected), strict=True):
        assert g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
    assert metrics["epsilon"] == 0.0  # nothing recorded: configure_fit never ran


class EqualClient(NumPyClient):
    def __init__(self, pid):
        self.pid = pid

    def fit(self, parameters, config):
        return [p + 0.1 * (self.pid + 1) for p in parameters], 5, {"pid": self.pid}

    def evaluate(self, parameters, config):
        return float(np.mean(parameters[0])), 1, {}


def equal_client_fn(context: Context):
    return EqualClient(int(context.node_config["partition-id"]))


def test_simulation_without_noise_equals_fedavg():
    def run(strategy):
        return start_simulation(
            client_fn=equal_client_fn, num_clients=6, config=ServerConfig(num_rounds=3),
            strategy=strategy, seed=4, num_workers=2,
        )  # fmt: skip

    def inner():
        return FedAvg(fraction_fit=0.5, fraction_evaluate=0.5, initial_parameters=initial((5,)))

    plain = run(inner())
    private = run(
        DifferentialPrivacyServerSideFixedClipping(
            inner(), 0.0, 100.0, 3, accounting=Accounting(delta=1e-3)
        )
    )
    assert [r for r, _ in private.losses_distributed] == [1, 2, 3]
    np.testing.assert_allclose(
        [loss for _, loss in private.losses_distributed],
        [loss for _, loss in plain.losses_distributed],
        rtol=1e-6,
    )
    assert private.metrics_distributed_fit["epsilon"] == [(r, math.inf) for r in (1, 2, 3)]


# -- adaptive clipping ----------------------------------------------------------------------------


def test_adaptive_noise_split_follows_andrew_et_al():
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=1.0, num_sampled_clients=100
    )
    z_update, stddev = strategy.noise_split()
    assert stddev == 5.0  # m / 20
    assert z_update == pytest.approx((1.0 - (2 * 5.0) ** -2) ** -0.5)
    assert z_update > 1.0
    with pytest.raises(ConfigError, match="clipped_count_stddev"):
        DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 1.0, 4)  # m/20 = 0.2 < z/2


def test_adaptive_clipping_norm_tracks_the_target_quantile():
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.0, num_sampled_clients=10, initial_clipping_norm=0.1,
        target_clipped_quantile=0.5, clip_norm_lr=0.2,
    )  # fmt: skip
    norms = np.arange(1, 11, dtype=float)
    updates = [[np.full(4, n / 2.0), np.zeros((2, 3))] for n in norms]  # norm of each = n
    for rnd in range(1, 80):
        _, metrics = aggregate(strategy, [np.zeros(4), np.zeros((2, 3))], updates, rnd)
    assert 4.5 <= strategy.clipping_norm <= 6.5
    assert metrics["dp_unclipped_fraction"] == pytest.approx(0.5, abs=0.11)
    assert metrics["dp_next_clipping_norm"] == strategy.clipping_norm


def test_client_side_adaptive_clipping_in_a_simulation():
    strategy = DifferentialPrivacyClientSideAdaptiveClipping(
        FedAvg(fraction_fit=0.5, initial_parameters=initial((5,)),
               fit_metrics_aggregation_fn=lambda pairs: {"seen": len(pairs)}),
        noise_multiplier=0.5, num_sampled_clients=3, initial_clipping_norm=0.05,
        clipped_count_stddev=1.0, accounting=Accounting(delta=1e-3),
    )  # fmt: skip
    history = start_simulation(
        client_fn=equal_client_fn, num_clients=6, config=ServerConfig(num_rounds=3),
        strategy=strategy, seed=1, num_workers=2, mods=[adaptiveclipping_mod],
    )  # fmt: skip
    fit = [r["fit"] for r in history.rounds if r["round"] > 0]
    assert all(f["num_results"] == 3 and f["num_failures"] == 0 for f in fit)
    assert all("dp_norm_bit" not in f["metrics"] and f["metrics"]["seen"] == 3 for f in fit)
    norms = [f["metrics"]["dp_clipping_norm"] for f in fit]
    assert norms[0] == 0.05 and norms[1] != norms[0]  # the norm adapts


def test_client_side_fixed_clipping_refuses_unclipped_updates():
    def run(mods):
        strategy = DifferentialPrivacyClientSideFixedClipping(
            FedAvg(fraction_fit=0.5, initial_parameters=initial((5,))),
            noise_multiplier=0.5, clipping_norm=0.01, num_sampled_clients=3,
            accounting=Accounting(delta=1e-3),
        )  # fmt: skip
        return start_simulation(
            client_fn=equal_client_fn, num_clients=6, config=ServerConfig(num_rounds=1),
            strategy=strategy, seed=1, num_workers=1, mods=mods,
        )  # fmt: skip

    good = run([fixedclipping_mod]).rounds[-1]
    assert good["fit"]["num_results"] == 3 and good["fit"]["updated"]
    bad = run([]).rounds[-1]
    assert bad["fit"]["num_results"] == 0
    assert all("did not clip" in f["reason"] for f in bad["failures"])


# -- sampling and accounting in the wrapper -------------------------------------------------------


def test_poisson_sampling_is_seeded_and_accounted_with_q_m_over_n():
    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(initial_parameters=initial((3,)), fraction_evaluate=0.0), 1.0, 0.5, 5,
        accounting=Accounting(delta=1e-4, sampling="poisson"), sampling_seed=9,
    )  # fmt: skip
    history = start_simulation(
        client_fn=equal_client_fn, num_clients=20, config=ServerConfig(num_rounds=6),
        strategy=strategy, seed=3, num_workers=2,
    )  # fmt: skip
    sizes = [r["fit"]["num_clients"] for r in history.rounds if r["round"] > 0]
    assert len(set(sizes)) > 1  # Poisson cohorts vary in size
    eps = dict(history.metrics_distributed_fit["epsilon"])
    for rnd, value in eps.items():
        assert value == pytest.approx(epsilon_for(1.0, 1e-4, rnd, sampling_rate=0.25))
    from fedhive.privacy.sampling import poisson_cohort
    from fedhive.server import SimpleClientManager

    manager = SimpleClientManager([str(i) for i in range(1000)])
    a = poisson_cohort(manager, 0.1, 1, seed=9)
    assert a == poisson_cohort(manager, 0.1, 1, seed=9)
    assert 60 < len(a) < 140
    assert poisson_cohort(manager, 0.1, 1, seed=None) != a


def test_fixed_sampling_is_accounted_with_replace_one():
    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_fit=0.4, initial_parameters=initial((3,))), 1.0, 1.0, 4,
        accounting=Accounting(delta=1e-4),
    )  # fmt: skip
    history = start_simulation(
        client_fn=equal_client_fn, num_clients=10, config=ServerConfig(num_rounds=2),
        strategy=strategy, seed=1, num_workers=1,
    )  # fmt: skip
    expected = epsilon_for(1.0, 1e-4, 2, sampling="fixed", population=10, cohort=4)
    assert history.metrics_distributed_fit["epsilon"][-1] == (2, pytest.approx(expected))
    # replace-one doubles the sensitivity: worse than Poisson at the same rate
    assert expected > epsilon_for(1.0, 1e-4, 2, sampling_rate=0.4)


# -- validation -----------------------------------------------------------------------------------


class FedMedian(FedAvg):
    # refused for what its traits say, not for its name (see test_traits.py)
    traits = StrategyTraits(reason="its aggregate is a coordinate-wise median")


class MyKrumVariant(FedMedian):
    pass


class OptedOut(FedAvg):
    dp_compatible = False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clipping_norm": 0.0}, "clipping_norm must be > 0"),
        ({"clipping_norm": -1.0}, "clipping_norm must be > 0"),
        ({"noise_multiplier": -0.1}, "negative noise"),
        ({"num_sampled_clients": 0}, "num_sampled_clients"),
        ({"strategy": FedMedian()}, "FedMedian cannot be wrapped"),
        ({"strategy": MyKrumVariant()}, "MyKrumVariant cannot be wrapped"),
        ({"strategy": OptedOut()}, "OptedOut cannot be wrapped"),
        ({"strategy": fixed()}, "already a DP wrapper"),
        ({"weighting": "num_examples"}, "num_examples"),
        ({"accounting": {"delta": 1e-5}}, "Accounting"),
        ({"noise_seed": 1.5}, "noise_seed"),
    ],
)
def test_bad_configurations_fail_at_construction(kwargs, match):
    args = {"strategy": FedAvg(), "noise_multiplier": 1.0, "clipping_norm": 1.0,
            "num_sampled_clients": 4, **kwargs}  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        DifferentialPrivacyServerSideFixedClipping(**args)


@pytest.mark.parametrize("name", sorted(n for n in DP_INCOMPATIBLE if not n.endswith("Rule")))
def test_the_real_robust_and_reweighting_strategies_are_refused(name):
    import fedhive.server.strategy as strategies

    cls = getattr(strategies, name, None)
    if cls is None:
        pytest.skip(f"{name} is not in fedhive.server.strategy")
    try:
        instance = cls()
    except TypeError:
        pytest.skip(f"{name} needs constructor arguments")
    with pytest.raises(ConfigError, match="cannot be wrapped"):
        DifferentialPrivacyServerSideFixedClipping(instance, 1.0, 1.0, 4)


def test_a_composed_strategy_with_a_median_rule_is_refused():
    from fedhive.privacy import check_dp_compatible
    from fedhive.server.strategy import ComposedStrategy

    class MedianRule:  # a user's rule that declares no traits: not known to be a mean
        def start(self, server_round, reference, weight):
            raise NotImplementedError

    with pytest.raises(ConfigError, match=r"cannot be wrapped.*MedianRule declares no traits"):
        check_dp_compatible(ComposedStrategy(sampling=FedAvg(), rule=MedianRule()))


def test_server_optimizers_step_on_the_noisy_mean():
    import fedhive.server.strategy as strategies

    fedadam = getattr(strategies, "FedAdam", None)
    if fedadam is None:
        pytest.skip("FedAdam is not in fedhive.server.strategy")
    strategy = DifferentialPrivacyServerSideFixedClipping(
        fedadam(initial_parameters=initial((5,)), fraction_fit=0.5), 0.5, 1.0, 3,
        accounting=Accounting(delta=1e-3),
    )  # fmt: skip
    history = start_simulation(
        client_fn=equal_client_fn, num_clients=6, config=ServerConfig(num_rounds=2),
        strategy=strategy, seed=1, num_workers=1,
    )  # fmt: skip
    assert [r["fit"]["updated"] for r in history.rounds if r["round"] > 0] == [True, True]
    assert len(history.metrics_distributed_fit["epsilon"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delta": 0.0}, "delta must be in"),
        ({"delta": 1.0}, "delta must be in"),
        ({"sampling": "stratified"}, "sampling must be one of"),
        ({"sampling": "fixed", "method": "pld"}, "only be accounted with method='rdp'"),
        ({"method": "moments"}, "method must be one of"),
        ({"max_epsilon": 0}, "max_epsilon"),
        ({"on_exhausted": "ignore"}, "on_exhausted"),
    ],
)
def test_accounting_the_sampling_cannot_describe_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Accounting(**kwargs)


def test_adaptive_validation():
    for kwargs, match in (
        ({"initial_clipping_norm": 0.0}, "initial_clipping_norm"),
        ({"target_clipped_quantile": 1.5}, "target_clipped_quantile"),
        ({"clip_norm_lr": -1.0}, "clip_norm_lr"),
        ({"clipped_count_stddev": -1.0}, "clipped_count_stddev"),
    ):
        with pytest.raises(ConfigError, match=match):
            DifferentialPrivacyClientSideAdaptiveClipping(FedAvg(), 0.5, 100, **kwargs)


def test_public_api_is_pinned():
    assert sorted(fedhive.privacy.__all__) == sorted([
        "Accounting", "DifferentialPrivacyClientSideAdaptiveClipping",
        "DifferentialPrivacyClientSideFixedClipping",
        "DifferentialPrivacyServerSideAdaptiveClipping",
        "DifferentialPrivacyServerSideFixedClipping", "DpSgdResult", "LocalDpMod",
        "PrivacyAccountant", "Release", "SecureGaussian", "SeededGaussian",
        "adaptiveclipping_mod", "analytic_gaussian_sigma", "check_dp_compatible",
        "classic_gaussian_sigma", "epsilon_for", "fixedclipping_mod", "max_client_epsilon",
        "noise_multiplier_for", "train_dpsgd",
    ])  # fmt: skip
    for name in fedhive.privacy.__all__:
        assert hasattr(fedhive.privacy, name)
    for cls in (
        DifferentialPrivacyServerSideFixedClipping,
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyClientSideAdaptiveClipping,
    ):
        assert getattr(cls, "__final__", False)
        assert len(cls.__mro__) <= 5  # cls, _DpStrategy, Strategy, ABC, object
