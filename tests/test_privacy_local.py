"""Local DP (analytic Gaussian calibration, LocalDpMod) and the secure noise source."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedhive.client import Context
from fedhive.common import (
    ConfigError,
    FitIns,
    FitRes,
    Message,
    MessageType,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.privacy import (
    LocalDpMod,
    SecureGaussian,
    SeededGaussian,
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
)
from fedhive.privacy.clipping import l2_norm
from fedhive.privacy.gaussian import analytic_gaussian_delta


@pytest.mark.parametrize("epsilon", [0.05, 0.3, 0.7, 0.99])
def test_analytic_sigma_beats_the_classic_bound_below_one(epsilon):
    for delta in (1e-3, 1e-5, 1e-9):
        analytic = analytic_gaussian_sigma(epsilon, delta, sensitivity=2.0)
        assert analytic < classic_gaussian_sigma(epsilon, delta, sensitivity=2.0)
        assert analytic_gaussian_delta(analytic, epsilon, 2.0) <= delta


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 8.0, 50.0])
def test_analytic_sigma_is_valid_and_tight_for_large_epsilon(epsilon):
    from dp_accounting.gaussian_mechanism import get_sigma_gaussian

    for delta in (1e-5, 1e-10):
        sigma = analytic_gaussian_sigma(epsilon, delta)
        assert analytic_gaussian_delta(sigma, epsilon) <= delta
        assert analytic_gaussian_delta(sigma * (1 - 1e-6), epsilon) > delta
        assert sigma == pytest.approx(get_sigma_gaussian(epsilon, delta), rel=1e-6)
    with pytest.raises(ConfigError, match="only proven for epsilon < 1"):
        classic_gaussian_sigma(epsilon, 1e-5)


def test_calibration_refuses_bad_parameters():
    for args, match in (((0.0, 1e-5), "epsilon"), ((1.0, 0.0), "delta"), ((1.0, 1.5), "delta")):
        with pytest.raises(ConfigError, match=match):
            analytic_gaussian_sigma(*args)
    with pytest.raises(ConfigError, match="sensitivity"):
        analytic_gaussian_sigma(1.0, 1e-5, sensitivity=0.0)


def fit_task(reference, rnd=1, node="3"):
    return Message.task(
        run_id=0, node_id=node, server_round=rnd, model_version=0, message_type=MessageType.FIT,
        content=FitIns(ndarrays_to_parameters(reference), {}),
    )  # fmt: skip


def test_local_dp_mod_clips_and_adds_calibrated_noise():
    reference = [np.ones(200_000, np.float32), np.arange(3, dtype=np.int64)]
    update = [np.full(200_000, 0.1, np.float32), np.array([5, 0, 0])]

    def client(msg, ctx):
        new = [r + u for r, u in zip(reference, update, strict=True)]
        return msg.reply(FitRes(Status(), ndarrays_to_parameters(new), 10, {"loss": 1.0}))

    mod = LocalDpMod(clipping_norm=1.0, epsilon=2.0, delta=1e-5, noise_seed=1)
    assert mod.stddev == pytest.approx(analytic_gaussian_sigma(2.0, 1e-5, sensitivity=2.0))
    context = Context("3")
    reply = mod(fit_task(reference), context, client)
    sent = parameters_to_ndarrays(reply.content.parameters)
    assert sent[0].dtype == np.float32 and sent[1].dtype == np.float64
    noise = np.asarray(sent[0], np.float64) - 1.0 - 0.1 / l2_norm(update)
    assert np.std(noise) == pytest.approx(mod.stddev, rel=0.01)
    assert reply.content.num_examples == 10
    metrics = reply.content.metrics
    assert metrics["loss"] == 1.0 and metrics["dp_local_epsilon"] == 2.0
    assert metrics["dp_not_private"] is True and metrics["dp_local_releases"] == 1
    mod(fit_task(reference, rnd=2), context, client)
    assert context.state.metric_records["dp.local"]["releases"] == 2
    # the reference arrays the client received are untouched
    np.testing.assert_array_equal(reference[0], 1.0)


def test_local_dp_mod_is_private_by_default_and_passes_other_messages():
    mod = LocalDpMod(clipping_norm=0.5, epsilon=1.0, delta=1e-6)
    reference = [np.zeros(10, np.float32)]

    def client(msg, ctx):
        return msg.reply(FitRes(Status(), ndarrays_to_parameters(reference), 1, {}))

    a = mod(fit_task(reference), Context("1"), client).content
    b = mod(fit_task(reference), Context("1"), client).content
    assert "dp_not_private" not in a.metrics
    assert not np.array_equal(a.parameters.arrays[0], b.parameters.arrays[0])
    evaluate = Message.task(
        run_id=0, node_id="1", server_round=1, model_version=0,
        message_type=MessageType.EVALUATE, content=None,
    )  # fmt: skip
    assert mod(evaluate, Context("1"), lambda m, c: m.reply("untouched")).content == "untouched"
    with pytest.raises(ConfigError, match="clipping_norm"):
        LocalDpMod(clipping_norm=0.0, epsilon=1.0, delta=1e-5)
    with pytest.raises(ConfigError, match="epsilon"):
        LocalDpMod(clipping_norm=1.0, epsilon=-1.0, delta=1e-5)


def test_secure_gaussian_is_standard_normal():
    draws = SecureGaussian().standard_normal((400_000,))
    se = 1 / math.sqrt(len(draws))
    assert abs(draws.mean()) < 6 * se
    assert draws.std() == pytest.approx(1.0, abs=6 * se)
    kurtosis = np.mean(draws**4) / np.mean(draws**2) ** 2
    assert kurtosis == pytest.approx(3.0, abs=0.05)
    from scipy.stats import norm

    # tails: the fraction beyond 3 sigma matches the normal law
    assert np.mean(np.abs(draws) > 3) == pytest.approx(2 * norm.sf(3), rel=0.15)
    plain = SecureGaussian(hardened=False).standard_normal((3, 5))
    assert plain.shape == (3, 5) and SecureGaussian().standard_normal((7,)).shape == (7,)


def test_seeded_gaussian_replays_and_is_marked_not_private():
    assert SeededGaussian(3).private is False and SecureGaussian().private is True
    np.testing.assert_array_equal(
        SeededGaussian(3).standard_normal((5,)), SeededGaussian(3).standard_normal((5,))
    )
