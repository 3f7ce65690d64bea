"""Calibrating one Gaussian release to (epsilon, delta).

:func:`analytic_gaussian_sigma` is the analytic Gaussian mechanism of Balle & Wang,
"Improving the Gaussian Mechanism for Differential Privacy: Analytical Calibration and
Optimal Denoising", ICML 2018: the smallest sigma for which the Gaussian mechanism with
L2 sensitivity ``s`` is (epsilon, delta)-DP, from the exact condition (their Theorem 8)

    Phi(s / (2 sigma) - epsilon sigma / s) - e^epsilon Phi(-s / (2 sigma) - epsilon sigma / s)
        <= delta.

It holds for every epsilon > 0 and is never larger than the classic bound
``s * sqrt(2 ln(1.25 / delta)) / epsilon`` (Dwork & Roth 2014, Theorem A.1), which is
only proven for epsilon < 1. The condition is evaluated in log space (scipy's
``log_ndtr``) and solved by bisection on log sigma; the returned sigma is the upper end of
the final bracket, so it always satisfies the condition.
"""

from __future__ import annotations

import math

from fedhive.common.errors import ConfigError, MissingDependency

__all__ = ["analytic_gaussian_delta", "analytic_gaussian_sigma", "classic_gaussian_sigma"]


def _check(epsilon: float, delta: float, sensitivity: float) -> None:
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"epsilon must be a positive finite number, got {epsilon!r}")
    if not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    if not (isinstance(sensitivity, int | float) and math.isfinite(sensitivity)):
        raise ConfigError(f"sensitivity must be a positive finite number, got {sensitivity!r}")
    if sensitivity <= 0:
        raise ConfigError(f"sensitivity must be a positive finite number, got {sensitivity!r}")


def analytic_gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """The smallest delta for which N(0, sigma^2) noise is (epsilon, delta)-DP."""
    try:
        from scipy.special import log_ndtr
    except ImportError as exc:  # pragma: no cover - scipy comes with the privacy extra
        raise MissingDependency("scipy", "privacy") from exc
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    log_first = float(log_ndtr(a - b))
    log_second = epsilon + float(log_ndtr(-a - b))
    if log_second >= log_first:
        return 0.0
    return math.exp(log_first) * -math.expm1(log_second - log_first)


def analytic_gaussian_sigma(
    epsilon: float, delta: float, sensitivity: float = 1.0, rel_tol: float = 1e-10
) -> float:
    """Smallest noise std making a Gaussian release with this L2 sensitivity (eps, delta)-DP.

    Example::

        analytic_gaussian_sigma(0.5, 1e-5, sensitivity=1.0)   # about 7.0 (classic: 9.7)
    """
    _check(epsilon, delta, sensitivity)
    lo = hi = sensitivity
    while analytic_gaussian_delta(lo, epsilon, sensitivity) <= delta:
        lo /= 2.0
    while analytic_gaussian_delta(hi, epsilon, sensitivity) > delta:
        hi *= 2.0
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if analytic_gaussian_delta(mid, epsilon, sensitivity) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Dwork & Roth's ``s * sqrt(2 ln(1.25 / delta)) / epsilon``; valid only for epsilon < 1."""
    _check(epsilon, delta, sensitivity)
    if epsilon >= 1:
        raise ConfigError(
            f"the classic Gaussian bound is only proven for epsilon < 1, got {epsilon!r}; "
            "use analytic_gaussian_sigma"
        )
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
