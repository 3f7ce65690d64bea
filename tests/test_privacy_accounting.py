"""Accounting: published values, RDP vs PLD, the ledger, calibration and `fedhive privacy`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedhive.cli import app
from fedhive.common import ConfigError
from fedhive.privacy import PrivacyAccountant, Release, epsilon_for, noise_multiplier_for

DELTA = 1e-5


def test_abadi_et_al_moments_accountant_value():
    """Abadi et al. 2016: q=0.01, sigma=4, T=10,000, delta=1e-5 gives epsilon ~ 1.26."""
    rdp = epsilon_for(4.0, DELTA, 10_000, sampling_rate=0.01)
    # the moments accountant's conversion, min over integer orders of RDP + log(1/d)/(a-1)
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    orders = np.arange(2, 257)
    acc = RdpAccountant(orders=list(orders))
    acc.compose(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(4.0)), 10_000)
    moments = float(np.min(acc._rdp + np.log(1 / DELTA) / (orders - 1)))
    assert moments == pytest.approx(1.26, abs=0.01)
    # dp-accounting's RDP conversion is tighter than the 2016 one, never looser
    assert 0.9 < rdp <= moments
    pld = epsilon_for(4.0, DELTA, 10_000, sampling_rate=0.01, method="pld")
    assert pld <= rdp
    assert pld == pytest.approx(rdp, rel=0.15)


@pytest.mark.parametrize(
    ("z", "q", "rounds"), [(1.1, 0.01, 1000), (0.8, 0.05, 100), (2.0, 1.0, 10)]
)
def test_rdp_and_pld_agree_where_both_apply(z, q, rounds):
    rdp = epsilon_for(z, DELTA, rounds, sampling_rate=q)
    pld = epsilon_for(z, DELTA, rounds, sampling_rate=q, method="pld")
    assert pld <= rdp * 1.001
    assert pld == pytest.approx(rdp, rel=0.25)
    none = epsilon_for(z, DELTA, rounds, sampling="none")
    assert none >= rdp * 0.999  # no amplification is never better


def test_gaussian_without_sampling_matches_the_closed_form():
    # one Gaussian release: PLD is exact up to discretisation; compare with Balle & Wang
    from dp_accounting.gaussian_mechanism import get_epsilon_gaussian

    exact = get_epsilon_gaussian(2.0, DELTA)
    assert epsilon_for(2.0, DELTA, 1, sampling="none", method="pld") == pytest.approx(
        exact, rel=1e-2
    )


def test_ledger_grows_merges_and_round_trips():
    acc = PrivacyAccountant("poisson", "rdp")
    assert acc.epsilon(DELTA) == 0.0
    release = Release(2.0, sampling_rate=0.1)
    values = []
    for _ in range(5):
        values.append(acc.epsilon(DELTA, extra=release))
        acc.record(release)
        assert acc.epsilon(DELTA) == values[-1]
    assert values == sorted(values) and len(set(values)) == 5
    assert len(acc.segments) == 1 and acc.rounds == 5
    acc.record(Release(3.0, sampling_rate=0.1), 3)
    restored = PrivacyAccountant("poisson", "rdp")
    restored.load_state_dict(acc.state_dict())
    assert restored.segments == acc.segments
    assert restored.epsilon(DELTA) == acc.epsilon(DELTA)
    other = PrivacyAccountant("none")
    with pytest.raises(ConfigError, match="sampling='poisson'"):
        other.load_state_dict(acc.state_dict())
    zero = PrivacyAccountant("none")
    zero.record(Release(0.0))
    assert zero.epsilon(DELTA) == float("inf")


def test_bad_releases_are_refused():
    with pytest.raises(ConfigError, match="sampling rate"):
        PrivacyAccountant("poisson").record(Release(1.0, sampling_rate=0.0))
    with pytest.raises(ConfigError, match="cohort"):
        PrivacyAccountant("fixed").record(Release(1.0, population=5, cohort=6))
    with pytest.raises(ConfigError, match="noise_multiplier"):
        PrivacyAccountant("none").record(Release(-1.0))
    with pytest.raises(ConfigError, match="method='rdp'"):
        PrivacyAccountant("fixed", "pld")


def test_calibration_meets_the_target_tightly():
    for sampling, kwargs, tol in (
        ("poisson", {"sampling_rate": 0.02}, 5e-4),
        ("none", {}, 5e-4),
        ("fixed", {"population": 1000, "cohort": 20}, 1e-2),  # slow accountant: coarser
    ):
        z = noise_multiplier_for(3.0, DELTA, 200, sampling=sampling, rel_tol=tol, **kwargs)
        assert epsilon_for(z, DELTA, 200, sampling=sampling, **kwargs) <= 3.0
        assert epsilon_for(z * (1 - 2 * tol), DELTA, 200, sampling=sampling, **kwargs) > 3.0


def invoke(*args):
    return CliRunner().invoke(app, ["privacy", *args], catch_exceptions=False)


def test_cli_round_trip_z_to_epsilon_to_z():
    common = ["--delta", "1e-5", "--sampling-rate", "0.01", "--rounds", "2000", "--json"]
    forward = invoke("--noise-multiplier", "1.3", *common)
    assert forward.exit_code == 0, forward.output
    eps = json.loads(forward.output)["epsilon"]
    assert eps == pytest.approx(epsilon_for(1.3, 1e-5, 2000, sampling_rate=0.01))
    back = invoke("--epsilon", repr(eps), *common)
    assert back.exit_code == 0, back.output
    answer = json.loads(back.output)
    assert answer["noise_multiplier"] == pytest.approx(1.3, rel=1e-3)
    assert answer["epsilon"] <= eps
    text = invoke("--noise-multiplier", "1.3", *common[:-1])
    assert "epsilon" in text.output and "Poisson sampling q=0.01" in text.output


def test_cli_refuses_unclear_questions():
    result = invoke("--rounds", "10")
    assert result.exit_code == 2 and "exactly one of" in result.output
    result = invoke(
        "--rounds", "10", "--epsilon", "1", "--sampling", "fixed", "--accountant", "pld"
    )
    assert result.exit_code == 2 and "method='rdp'" in result.output
    assert "privacy" in CliRunner().invoke(app, ["--help"]).output
