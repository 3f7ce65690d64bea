"""User-level privacy accounting with Google's ``dp-accounting``.

Each round of central DP releases a noisy mean of clipped client updates: a Gaussian
mechanism whose noise multiplier ``z`` is the noise standard deviation divided by the
sensitivity. How much one round costs depends on how the cohort was sampled, and the
accountant must describe the sampling actually done:

========== ================================ ========================= =====================
sampling   what happens                     neighbouring relation     accountants
========== ================================ ========================= =====================
poisson    every client joins with prob. q  add/remove one user       RDP, PLD (amplified)
fixed      m of N uniformly, no replacement replace one user (2C)     RDP only (amplified)
none       any cohort (deployment)          add/remove one user       RDP, PLD (q = 1)
========== ================================ ========================= =====================

Sources: RDP (Mironov 2017, "Renyi Differential Privacy"; Mironov, Talwar, Zhang 2019,
"Renyi Differential Privacy of the Sampled Gaussian Mechanism"), sampling without
replacement (Wang, Balle, Kasiviswanathan 2019, "Subsampled Renyi Differential Privacy
and Analytical Moments Accountant"), privacy loss distributions (Koskela, Jalko, Honkela
2020, "Computing Tight Differential Privacy Guarantees Using FFT"; Doroshenko, Ghazi,
Kamath, Kumar, Manurangsi 2022, "Connect the Dots: Tighter Discrete Approximations of
Privacy Loss Distributions"). Under replace-one adjacency a sum of updates clipped to C
changes by up to 2C, so the accountant sees ``z / 2``.

The ledger (:class:`PrivacyAccountant`) stores runs of identical releases, which is
enough to recompute epsilon at any delta, and round-trips through a ``RecordDict`` so
checkpoints keep it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedhive.common.errors import ConfigError, MissingDependency
from fedhive.common.records import RecordDict

__all__ = [
    "SAMPLINGS",
    "METHODS",
    "Accounting",
    "PrivacyAccountant",
    "Release",
    "epsilon_for",
    "noise_multiplier_for",
]

SAMPLINGS = ("poisson", "fixed", "none")
METHODS = ("rdp", "pld")
_RECORD = "dp.accountant"


class _DropOrderWarnings(logging.Filter):
    """dp-accounting logs when one fractional RDP order fails to converge and drops it;
    the remaining orders still give a valid bound, so the message is noise to users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


_ABSL_FILTER = _DropOrderWarnings()


def _dp() -> Any:
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise MissingDependency("dp_accounting", "privacy") from exc
    absl = logging.getLogger("absl")
    if _ABSL_FILTER not in absl.filters:
        absl.addFilter(_ABSL_FILTER)
    return dp_accounting


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}; a common choice is 1/N^1.1")


@dataclass(frozen=True)
class Accounting:
    """How a DP wrapper counts privacy, and when it stops.

    ``sampling`` names how cohorts are drawn (see the module table); ``"poisson"`` makes
    the wrapper sample each client independently with probability ``m / N`` itself.
    ``method`` is ``"rdp"`` or ``"pld"`` (``"fixed"`` sampling needs ``"rdp"``). With
    ``max_epsilon`` set, a round that would take epsilon above it is not run:
    ``on_exhausted="stop"`` selects no clients (the model stays; the engine notes it and a
    warning says why), ``"raise"`` raises :class:`~fedhive.common.PrivacyBudgetExceeded`.

    Example::

        Accounting(delta=1e-6, sampling="poisson", method="pld", max_epsilon=8.0)
    """

    delta: float = 1e-5
    sampling: str = "fixed"
    method: str = "rdp"
    max_epsilon: float | None = None
    on_exhausted: str = "stop"
    #: True when no Accounting was given: deployment then assumes no amplification.
    implicit: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_delta(self.delta)
        if self.sampling not in SAMPLINGS:
            raise ConfigError(
                f"sampling must be one of {', '.join(SAMPLINGS)}; got {self.sampling!r}"
            )
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.sampling == "fixed" and self.method != "rdp":
            raise ConfigError(
                "sampling='fixed' (fixed-size cohorts without replacement) can only be "
                "accounted with method='rdp' under replace-one adjacency; use method='rdp', "
                "or sampling='poisson' for the PLD accountant"
            )
        if self.max_epsilon is not None and not (
            isinstance(self.max_epsilon, int | float) and self.max_epsilon > 0
        ):
            raise ConfigError(f"max_epsilon must be a positive number, got {self.max_epsilon!r}")
        if self.on_exhausted not in ("stop", "raise"):
            raise ConfigError(f"on_exhausted must be 'stop' or 'raise', got {self.on_exhausted!r}")


@dataclass(frozen=True)
class Release:
    """One round's Gaussian release as the accountant sees it.

    ``noise_multiplier`` is the noise standard deviation over the add/remove sensitivity
    (``sigma / C`` for a sum clipped to ``C``). ``sampling_rate`` is used by Poisson
    sampling; ``population`` and ``cohort`` by fixed-size sampling.
    """

    noise_multiplier: float
    sampling_rate: float = 1.0
    population: int = 0
    cohort: int = 0


def _check_release(release: Release, sampling: str) -> None:
    z = release.noise_multiplier
    if not (isinstance(z, int | float) and math.isfinite(z) and z >= 0):
        raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {z!r}")
    if sampling == "poisson" and not 0.0 < release.sampling_rate <= 1.0:
        raise ConfigError(f"the sampling rate must be in (0, 1], got {release.sampling_rate!r}")
    if sampling == "fixed" and not 1 <= release.cohort <= release.population:
        raise ConfigError(
            f"fixed-size sampling needs 1 <= cohort <= population, got cohort "
            f"{release.cohort} of population {release.population}"
        )


def _event(dp: Any, release: Release, sampling: str) -> Any:
    ev = dp.dp_event
    if sampling == "fixed":
        gaussian = ev.GaussianDpEvent(release.noise_multiplier / 2.0)
        if release.cohort == release.population:
            return gaussian
        return ev.SampledWithoutReplacementDpEvent(release.population, release.cohort, gaussian)
    gaussian = ev.GaussianDpEvent(release.noise_multiplier)
    if sampling == "poisson" and release.sampling_rate < 1.0:
        return ev.PoissonSampledDpEvent(release.sampling_rate, gaussian)
    return gaussian


def _rdp_accountant(dp: Any, sampling: str) -> Any:
    relation = dp.NeighboringRelation
    if sampling == "fixed":
        return dp.rdp.RdpAccountant(neighboring_relation=relation.REPLACE_ONE)
    return dp.rdp.RdpAccountant()


_PLD_INTERVAL = 1e-4  # dp-accounting's default discretisation of privacy losses
_pld_powers: dict[tuple[float, float, int], Any] = {}


@functools.lru_cache(maxsize=64)
def _pld_base(noise_multiplier: float, sampling_rate: float) -> Any:
    pld = _dp().pld.privacy_loss_distribution
    return pld.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        sampling_prob=sampling_rate,
        value_discretization_interval=_PLD_INTERVAL,
    )


def _pld_power(noise_multiplier: float, sampling_rate: float, count: int) -> Any:
    """The PLD of ``count`` Poisson-subsampled Gaussian rounds.

    Building one round's PLD dominates the cost, so it is cached, and a ledger that grew by
    one round since the last call composes one more round onto the cached previous power.
    """
    key = (noise_multiplier, sampling_rate, count)
    power = _pld_powers.get(key)
    if power is None:
        base = _pld_base(noise_multiplier, sampling_rate)
        previous = _pld_powers.get((noise_multiplier, sampling_rate, count - 1))
        power = previous.compose(base) if previous is not None else base.self_compose(count)
        if len(_pld_powers) > 64:
            _pld_powers.clear()
        _pld_powers[key] = power
    return power


def _pld_epsilon(segments: tuple[tuple[Release, int], ...], delta: float) -> float:
    """The same PLDs as dp-accounting's ``PLDAccountant`` builds, with caching."""
    pld = _dp().pld.privacy_loss_distribution
    total: Any = None
    for release, count in segments:
        z, q = release.noise_multiplier, release.sampling_rate
        if q < 1.0:
            part = _pld_power(z, q, count)
        else:  # count Gaussian releases are one Gaussian with std z / sqrt(count)
            part = pld.from_gaussian_mechanism(
                standard_deviation=z / math.sqrt(count),
                value_discretization_interval=_PLD_INTERVAL,
            )
        total = part if total is None else total.compose(part)
    return float(total.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=512)
def _epsilon(
    segments: tuple[tuple[Release, int], ...], delta: float, sampling: str, method: str
) -> float:
    """Epsilon of a ledger (cached: budgets, metrics and resumed runs ask again)."""
    if not segments:
        return 0.0
    if any(release.noise_multiplier == 0 for release, _ in segments):
        return math.inf
    if method == "pld":
        return _pld_epsilon(segments, delta)
    dp = _dp()
    accountant = _rdp_accountant(dp, sampling)
    for release, count in segments:
        accountant.compose(_event(dp, release, sampling), count)
    return float(accountant.get_epsilon(delta))


class PrivacyAccountant:
    """A ledger of releases that answers "what is epsilon at this delta?".

    ``record`` appends a round; ``epsilon(delta, extra=...)`` gives epsilon with an
    optional not-yet-recorded round included (to check a budget before spending it).
    Results are cached per ledger and delta (process-wide), so asking twice costs nothing.

    Example::

        acc = PrivacyAccountant("poisson")
        acc.record(Release(noise_multiplier=1.1, sampling_rate=0.01), count=1000)
        acc.epsilon(1e-5)
    """

    def __init__(self, sampling: str = "poisson", method: str = "rdp") -> None:
        Accounting(sampling=sampling, method=method)  # validates the combination
        self.sampling = sampling
        self.method = method
        self.segments: list[tuple[Release, int]] = []

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(sampling={self.sampling!r}, method={self.method!r}, "
            f"rounds={self.rounds})"
        )

    @property
    def rounds(self) -> int:
        return sum(count for _, count in self.segments)

    def _with(self, release: Release, count: int) -> list[tuple[Release, int]]:
        _check_release(release, self.sampling)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"count must be an int >= 1, got {count!r}")
        segments = list(self.segments)
        if segments and segments[-1][0] == release:
            segments[-1] = (release, segments[-1][1] + count)
        else:
            segments.append((release, count))
        return segments

    def record(self, release: Release, count: int = 1) -> None:
        """Add ``count`` rounds of ``release`` to the ledger."""
        self.segments = self._with(release, count)

    def epsilon(self, delta: float, extra: Release | None = None) -> float:
        """Epsilon at ``delta`` for the recorded rounds (plus ``extra`` if given)."""
        _check_delta(delta)
        segments = self.segments if extra is None else self._with(extra, 1)
        return _epsilon(tuple(segments), float(delta), self.sampling, self.method)

    def state_dict(self, name: str = _RECORD) -> RecordDict:
        """The ledger as arrays (one entry per run of identical releases) under ``name``."""
        releases = [release for release, _ in self.segments]
        arrays = {
            "noise_multiplier": np.array([r.noise_multiplier for r in releases], np.float64),
            "sampling_rate": np.array([r.sampling_rate for r in releases], np.float64),
            "population": np.array([r.population for r in releases], np.int64),
            "cohort": np.array([r.cohort for r in releases], np.int64),
            "count": np.array([count for _, count in self.segments], np.int64),
        }
        config = {"sampling": self.sampling, "method": self.method}
        return RecordDict({name: arrays}, {name: config})

    def load_state_dict(self, state: RecordDict, name: str = _RECORD) -> None:
        """Restore a ledger saved by :meth:`state_dict` (refuses another sampling scheme)."""
        arrays = state.array_records.get(name)
        config = state.config_records.get(name, {})
        if arrays is None:
            self.segments = []
            return
        if config.get("sampling") != self.sampling:
            raise ConfigError(
                f"the saved privacy ledger was kept for sampling={config.get('sampling')!r}, "
                f"this accountant describes sampling={self.sampling!r}; their epsilons "
                "cannot be combined"
            )
        self.segments = [
            (Release(float(z), float(q), int(n), int(k)), int(c))
            for z, q, n, k, c in zip(
                arrays["noise_multiplier"],
                arrays["sampling_rate"],
                arrays["population"],
                arrays["cohort"],
                arrays["count"],
                strict=True,
            )
        ]


def epsilon_for(
    noise_multiplier: float,
    delta: float,
    rounds: int,
    *,
    sampling: str = "poisson",
    sampling_rate: float = 1.0,
    population: int = 0,
    cohort: int = 0,
    method: str = "rdp",
) -> float:
    """Epsilon after ``rounds`` identical rounds (see the module table for ``sampling``).

    Example (Abadi et al. 2016's setting, RDP)::

        epsilon_for(4.0, 1e-5, 10_000, sampling_rate=0.01)   # about 1.04
    """
    accountant = PrivacyAccountant(sampling, method)
    accountant.record(Release(noise_multiplier, sampling_rate, population, cohort), rounds)
    return accountant.epsilon(delta)


def _solve_down(
    eps: Callable[[float], float],
    target: float,
    bracket: tuple[float, float, float, float],
    rel_tol: float,
) -> float:
    """Smallest ``z`` (within ``rel_tol``) with ``eps(z) <= target``, given
    ``bracket = (lo, eps(lo), hi, eps(hi))`` with ``eps(lo) > target >= eps(hi)``.

    Epsilon is close to a power law of ``z``, so each step interpolates log epsilon
    linearly in log z and then probes just across the guess, which usually closes the
    bracket in two or three steps; the interpolation is clamped so the bracket always
    shrinks. The upper end is returned, so the answer always meets the target.
    """
    lo, eps_lo, hi, eps_hi = bracket

    def place(z: float) -> bool:
        """Evaluate ``z``, make it the new lower or upper end; True if it was too small."""
        nonlocal lo, eps_lo, hi, eps_hi
        value = eps(z)
        if value > target:
            lo, eps_lo = z, value
            return True
        hi, eps_hi = z, value
        return False

    step = 1.0 + rel_tol / 2.0
    while hi / lo > 1.0 + rel_tol:
        t = 0.5
        if eps_hi > 0 and math.isfinite(eps_lo):
            t = math.log(eps_lo / target) / math.log(eps_lo / eps_hi)
        guess = lo * (hi / lo) ** min(max(t, 0.05), 0.95)
        probe = guess * step if place(guess) else guess / step
        if lo < probe < hi:
            place(probe)
    return hi


def noise_multiplier_for(
    epsilon: float,
    delta: float,
    rounds: int,
    *,
    sampling: str = "poisson",
    sampling_rate: float = 1.0,
    population: int = 0,
    cohort: int = 0,
    method: str = "rdp",
    rel_tol: float = 1e-4,
) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` is at most ``epsilon``.

    The answer is the upper end of a bisection bracket, so it always meets the target
    (epsilon_for(answer) <= epsilon); it is within ``rel_tol`` of the exact threshold.
    Noise multipliers below 0.002 are not searched (the answer is then 0.002 or less
    noise would do).

    Example::

        noise_multiplier_for(2.0, 1e-5, 100, sampling_rate=0.01)
    """
    if not (isinstance(epsilon, int | float) and epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"epsilon must be a positive finite number, got {epsilon!r}")

    def eps(z: float) -> float:
        return epsilon_for(
            z,
            delta,
            rounds,
            sampling=sampling,
            sampling_rate=sampling_rate,
            population=population,
            cohort=cohort,
            method=method,
        )

    # Bracket from z = 1 by doubling or halving (tiny z are slow to account and useless).
    z, value = 1.0, eps(1.0)
    if value > epsilon:
        while value > epsilon:
            if z > 1e6:
                raise ConfigError(f"no noise multiplier below 1e6 reaches epsilon={epsilon}")
            lo, eps_lo = z, value
            z *= 2.0
            value = eps(z)
        bracket = (lo, eps_lo, z, value)
    else:
        while value <= epsilon:
            if z < 2e-3:
                return z
            hi, eps_hi = z, value
            z /= 2.0
            value = eps(z)
        bracket = (z, value, hi, eps_hi)
    return _solve_down(eps, epsilon, bracket, rel_tol)
