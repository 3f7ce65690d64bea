"""Differential privacy for fedhive: central DP wrappers, client mods, DP-SGD, accounting.

Central DP (the server is trusted to add noise)::

    from fedhive.privacy import Accounting, DifferentialPrivacyServerSideFixedClipping

    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_fit=0.1), noise_multiplier=1.0, clipping_norm=0.5,
        num_sampled_clients=10, accounting=Accounting(delta=1e-5, max_epsilon=8.0),
    )

Every round's fit metrics then carry ``"epsilon"`` (user-level, at ``delta``). The
client-side variants clip on the clients (:func:`fixedclipping_mod`,
:func:`adaptiveclipping_mod`); :class:`LocalDpMod` noises updates on the clients (local
DP); :func:`train_dpsgd` (``fedhive.privacy.dpsgd``, needs torch and opacus) gives
example-level DP-SGD whose ledger lives in the client's state. :func:`epsilon_for` and
:func:`noise_multiplier_for` answer planning questions (also ``fedhive privacy``).
See ``docs/privacy.md`` for which setting gives which guarantee.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedhive.privacy.accounting import (
    Accounting,
    PrivacyAccountant,
    Release,
    epsilon_for,
    noise_multiplier_for,
)
from fedhive.privacy.central import check_dp_compatible
from fedhive.privacy.gaussian import analytic_gaussian_sigma, classic_gaussian_sigma
from fedhive.privacy.mods import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from fedhive.privacy.noise import SecureGaussian, SeededGaussian
from fedhive.privacy.wrappers import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

if TYPE_CHECKING:
    from fedhive.privacy.dpsgd import DpSgdResult, max_client_epsilon, train_dpsgd

__all__ = [
    "Accounting",
    "DifferentialPrivacyClientSideAdaptiveClipping",
    "DifferentialPrivacyClientSideFixedClipping",
    "DifferentialPrivacyServerSideAdaptiveClipping",
    "DifferentialPrivacyServerSideFixedClipping",
    "DpSgdResult",
    "LocalDpMod",
    "PrivacyAccountant",
    "Release",
    "SecureGaussian",
    "SeededGaussian",
    "adaptiveclipping_mod",
    "analytic_gaussian_sigma",
    "check_dp_compatible",
    "classic_gaussian_sigma",
    "epsilon_for",
    "fixedclipping_mod",
    "max_client_epsilon",
    "noise_multiplier_for",
    "train_dpsgd",
]

_TORCH_NAMES = frozenset({"DpSgdResult", "max_client_epsilon", "train_dpsgd"})


def __getattr__(name: str) -> Any:
    # DP-SGD pulls in torch and opacus; import it only when asked for.
    if name in _TORCH_NAMES:
        from fedhive.privacy import dpsgd

        return getattr(dpsgd, name)
    raise AttributeError(f"module 'fedhive.privacy' has no attribute {name!r}")
