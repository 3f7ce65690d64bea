"""Central differential privacy: strategy wrappers that clip, noise and account.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent
Language Models." ICLR 2018): every client's update (its new model minus the global one)
is clipped to L2 norm ``C``; the updates are summed with equal weights and divided by a
fixed denominator ``m`` (the expected cohort size, ``num_sampled_clients``), so one user
moves the mean by at most ``C / m``; Gaussian noise with standard deviation
``sigma = z * C / m`` is added to that mean. The inner strategy then receives every
client's result (its ``num_examples`` and metrics) with the noisy mean in place of its
parameters, so a mean-based inner strategy computes the noisy mean again, and whatever it
does with it (FedAvg takes it as is; a server optimizer steps on it) is post-processing
and keeps the guarantee. Client-reported metrics are not covered by the guarantee.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private Learning
with Adaptive Clipping." NeurIPS 2021) also releases a noisy count of unclipped updates,
``sum(b_i - 1/2) + N(0, sigma_b^2)`` (sensitivity 1/2), and moves ``C`` geometrically
towards the target quantile. The noise is split as in the paper,
``z_update = (z^-2 - (2 sigma_b)^-2)^-1/2``, so that the update and the count together
are one Gaussian mechanism with multiplier ``z``: the epsilon reported for ``z`` holds for
the whole release.

Server-side wrappers clip on the server. Client-side wrappers send ``C`` to the clients in
the fit config (key ``"dp_clipping_norm"``) and expect :func:`fixedclipping_mod` or
:func:`adaptiveclipping_mod` to clip there, which is what secure aggregation needs; when
the server can see individual updates it still refuses one that exceeds ``C``.

Every round's fit metrics carry ``"epsilon"`` (user-level, at ``accounting.delta``),
``"delta"`` and the noise settings; see :mod:`fedhive.privacy.accounting` for which
sampling gives which guarantee.

Memory: one float64 sum the size of the model plus one float64 update being folded:
O(model), whatever the number of clients.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

from fedhive.common.errors import (
    ConfigError,
    InvalidUpdate,
    PrivacyBudgetExceeded,
    ProtocolError,
)
from fedhive.common.message import derive_seed
from fedhive.common.records import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    RecordDict,
    Scalar,
)
from fedhive.privacy.accounting import Accounting, PrivacyAccountant, Release
from fedhive.privacy.clipping import next_clipping_norm
from fedhive.privacy.noise import NoiseSource, SecureGaussian, SeededGaussian
from fedhive.privacy.sampling import CohortManager, poisson_cohort
from fedhive.server.client_manager import ClientManager, ClientProxy
from fedhive.server.strategy.base import Aggregator, EvaluateResults, FitResults, Strategy
from fedhive.server.strategy.traits import StrategyTraits, traits_of

__all__ = [
    "CLIPPING_NORM_KEY",
    "NORM_BIT_KEY",
    "DP_INCOMPATIBLE",
    "check_dp_compatible",
]

log = logging.getLogger("fedhive.privacy")

CLIPPING_NORM_KEY = "dp_clipping_norm"
NORM_BIT_KEY = "dp_norm_bit"
_INNER = "inner/"
_WRAPPER_RECORD = "dp.wrapper"

#: The built-in strategies and aggregation rules whose output can move by more than ``C / m``
#: when one client changes (medians, trimming, selection, reweighting by local steps or
#: losses, control variates). Kept for compatibility only: it is no longer consulted;
#: :func:`check_dp_compatible` asks the strategy's traits, and these all declare that
#: their aggregate is not a weighted mean.
DP_INCOMPATIBLE = frozenset(
    {"FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan", "QFedAvg", "FedNova", "Scaffold"}
    | {"MedianRule", "TrimmedMeanRule", "KrumRule", "BulyanRule", "NovaRule", "QFFLRule"}
)


def check_dp_compatible(strategy: object) -> None:
    """Raise :class:`ConfigError` unless ``strategy`` can sit inside a DP wrapper.

    Asks the strategy's traits (:func:`~fedhive.server.strategy.traits.traits_of`): it
    is refused unless they declare its aggregate a weighted mean, the only aggregate
    that one client moves by at most ``C / m``, whatever the strategy is called. The
    robust and reweighting strategies, SCAFFOLD, a FedAvg subclass with its own
    ``aggregate_fit`` and a strategy with the legacy flag ``dp_compatible = False`` are
    refused that way.
    """
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"strategy must be a fedhive Strategy, got {type(strategy).__name__}")
    if isinstance(strategy, _DpStrategy):
        raise ConfigError(
            f"{type(strategy).__name__} is already a DP wrapper; wrap the plain strategy once"
        )
    traits = traits_of(strategy)
    if not traits.weighted_mean:
        raise ConfigError(
            f"{type(strategy).__name__} cannot be wrapped for differential privacy: "
            f"{traits.why_not_mean()}, and only a weighted mean of the updates moves by at "
            "most C/m when one client changes, so the noise would not cover it. Use FedAvg "
            "or another mean-based strategy (FedAvgM, FedAdam, FedYogi, FedProx)"
        )


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positive(name: str, value: Any) -> float:
    number = _number(name, value)
    if number <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    return number


def _non_negative(name: str, value: Any, hint: str = "") -> float:
    number = _number(name, value)
    if number < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}{hint}")
    return number


def _seed(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name} must be an int or None, got {value!r}")
    return value


@dataclass(frozen=True)
class _Adaptive:
    target_quantile: float
    lr: float
    count_stddev: float


def _adaptive(
    noise_multiplier: float,
    num_sampled_clients: int,
    target_clipped_quantile: float,
    clip_norm_lr: float,
    clipped_count_stddev: float | None,
) -> _Adaptive:
    target = _number("target_clipped_quantile", target_clipped_quantile)
    if not 0.0 <= target <= 1.0:
        raise ConfigError(f"target_clipped_quantile must be in [0, 1], got {target!r}")
    lr = _non_negative("clip_norm_lr", clip_norm_lr)
    if clipped_count_stddev is None:
        # Andrew et al. suggest m / 20; without update noise there is nothing to match.
        stddev = num_sampled_clients / 20.0 if noise_multiplier > 0 else 0.0
    else:
        stddev = _non_negative("clipped_count_stddev", clipped_count_stddev)
    if noise_multiplier > 0 and not 2.0 * stddev > noise_multiplier:
        raise ConfigError(
            f"clipped_count_stddev = {stddev:g} is too small for noise_multiplier = "
            f"{noise_multiplier:g}: the count takes a share z_b = 2 * stddev of the noise, "
            f"which must exceed z for the update noise (z^-2 - (2 stddev)^-2)^-1/2 to exist; "
            f"pass clipped_count_stddev > {noise_multiplier / 2:g} (Andrew et al. use m/20)"
        )
    return _Adaptive(target, lr, stddev)


class _DpStrategy(Strategy, ABC):
    """What the four DP wrappers share; they differ in where clipping happens."""

    accounting: Accounting
    accountant: PrivacyAccountant

    @property
    @abstractmethod
    def clip_on_client(self) -> bool:
        """True when clients clip (client mods) and the server only adds noise."""

    def assume_no_amplification(self) -> None:
        """In deployment the server does not control who shows up: unless an Accounting
        was given explicitly, account every round with sampling rate 1 (no amplification).
        Called by ``start_server`` before the first round."""
        if self.accounting.implicit and self.accounting.sampling != "none":
            self.accounting = replace(self.accounting, sampling="none", implicit=False)
            self.accountant = PrivacyAccountant("none", self.accounting.method)

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        num_sampled_clients: int,
        clipping_norm: float,
        adaptive: _Adaptive | None,
        accounting: Accounting,
        noise_seed: int | None,
        sampling_seed: int | None,
        weighting: str,
    ) -> None:
        check_dp_compatible(strategy)
        if not isinstance(accounting, Accounting):
            raise ConfigError(
                f"accounting must be a fedhive.privacy.Accounting, got {type(accounting).__name__}"
            )
        if weighting != "uniform":
            raise ConfigError(
                f"weighting={weighting!r} is not allowed with differential privacy: weights "
                "by num_examples let one client (who reports its own count) move the mean by "
                "more than C/m. DP wrappers give every clipped update the same weight and "
                "divide by the fixed num_sampled_clients; use weighting='uniform'"
            )
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.num_sampled_clients = num_sampled_clients
        self.clipping_norm = clipping_norm
        self.adaptive = adaptive
        self.accounting = accounting
        self.noise_seed = _seed("noise_seed", noise_seed)
        self.sampling_seed = _seed("sampling_seed", sampling_seed)
        self.accountant = PrivacyAccountant(accounting.sampling, accounting.method)
        self.exhausted_reason: str | None = None
        self._parameters: Parameters | None = None
        self._warned_delta = False
        if self.noise_seed is not None:
            log.warning(
                "%s: noise_seed=%d makes the DP noise replayable; this run is NOT private "
                "(fit metrics carry dp_not_private=True). Use it for tests only.",
                type(self).__name__,
                self.noise_seed,
            )
        if noise_multiplier == 0:
            log.warning("%s: noise_multiplier=0 adds no noise; epsilon is infinite", self)

    @property
    def traits(self) -> StrategyTraits:
        """The wrapped strategy's traits, passed on: the noisy mean is still a weighted
        mean, of clipped updates with equal weights (``weighting="uniform"``). A wrapper
        that clips on the server also needs every update on its own, so a mean revealed
        whole (secure aggregation) is refused, with the reason."""
        traits = traits_of(self.strategy).but(weighting="uniform")
        if self.clip_on_client:
            return traits
        return traits.but(
            individual_updates=True,
            reason="it clips on the server, which must see every update; use the "
            "client-side clipping wrapper (DifferentialPrivacyClientSideFixedClipping or "
            "...AdaptiveClipping)",
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.strategy!r}, noise_multiplier={self.noise_multiplier}, "
            f"clipping_norm={self.clipping_norm}, num_sampled_clients={self.num_sampled_clients})"
        )

    # -- noise -------------------------------------------------------------------------

    @property
    def private(self) -> bool:
        """False when noise is seeded (test mode): the noise can then be replayed."""
        return self.noise_seed is None

    def noise_split(self) -> tuple[float, float]:
        """(noise multiplier of the update, standard deviation of the clipped count)."""
        z = self.noise_multiplier
        if self.adaptive is None:
            return z, 0.0
        stddev = self.adaptive.count_stddev
        if z == 0:
            return 0.0, stddev
        return (z**-2 - (2.0 * stddev) ** -2) ** -0.5, stddev

    def noise_source(self, server_round: int) -> NoiseSource:
        if self.noise_seed is None:
            return SecureGaussian()
        return SeededGaussian(derive_seed(self.noise_seed, server_round, "", "dp-noise"))

    # -- sampling and budget ----------------------------------------------------------------

    def _release(self, num_available: int, cohort: int) -> Release:
        z, sampling = self.noise_multiplier, self.accounting.sampling
        if sampling == "poisson":
            return Release(z, sampling_rate=min(1.0, self.num_sampled_clients / num_available))
        if sampling == "fixed":
            return Release(z, population=num_available, cohort=cohort)
        return Release(z)

    def _check_budget(self, server_round: int, release: Release) -> bool:
        limit = self.accounting.max_epsilon
        if limit is None:
            return True
        delta = self.accounting.delta
        after = self.accountant.epsilon(delta, extra=release)
        if after <= limit:
            return True
        now = self.accountant.epsilon(delta)
        reason = (
            f"privacy budget exhausted: round {server_round} would raise epsilon from "
            f"{now:.4g} to {after:.4g} (delta={delta:g}), above max_epsilon={limit:g}; "
            f"training stopped after {self.accountant.rounds} private rounds"
        )
        if self.accounting.on_exhausted == "raise":
            raise PrivacyBudgetExceeded(reason)
        if self.exhausted_reason is None:  # keep (and log) the round that stopped training
            log.warning("%s", reason)
            self.exhausted_reason = reason
        return False

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._parameters = parameters
        if self.accounting.sampling == "poisson":
            available = client_manager.num_available()
            if available < 1:
                return []
            self._warn_delta(available)
            release = self._release(available, 0)
            if not self._check_budget(server_round, release):
                return []
            cohort = poisson_cohort(
                client_manager, release.sampling_rate, server_round, self.sampling_seed
            )
            manager: ClientManager = CohortManager(client_manager, cohort)
            instructions = self.strategy.configure_fit(server_round, parameters, manager)
            # The sampling happened, so the round is charged even if the cohort is empty.
            self.accountant.record(release)
        else:
            # the inner strategy samples (and, in a deployment, waits for its clients)
            instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
            if not instructions:
                return []
            available = max(client_manager.num_available(), len(instructions))
            self._warn_delta(available)
            release = self._release(available, len(instructions))
            if not self._check_budget(server_round, release):
                return []
            self.accountant.record(release)
            if len(instructions) != self.num_sampled_clients:
                log.info(
                    "round %d: the inner strategy sampled %d clients; the noise is calibrated "
                    "to num_sampled_clients=%d and the accountant uses the actual cohort",
                    server_round,
                    len(instructions),
                    self.num_sampled_clients,
                )
        if self.clip_on_client:
            instructions = self._send_clipping_norm(instructions)
        return instructions

    def _warn_delta(self, available: int) -> None:
        if not self._warned_delta and self.accounting.delta >= 1.0 / available:
            self._warned_delta = True
            log.warning(
                "delta=%g is not below 1/N = %g for N=%d clients: a mechanism that publishes "
                "one user's data at random would meet it; choose delta << 1/N",
                self.accounting.delta,
                1.0 / available,
                available,
            )

    def _send_clipping_norm(
        self, instructions: list[tuple[ClientProxy, FitIns]]
    ) -> list[tuple[ClientProxy, FitIns]]:
        out = []
        for client, ins in instructions:
            config = {**ins.config, CLIPPING_NORM_KEY: self.clipping_norm}
            out.append((client, FitIns(ins.parameters, config, ins.extras)))
        return out

    # -- aggregation ------------------------------------------------------------------------

    def fit_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        from fedhive.privacy.aggregator import DpAggregator

        return DpAggregator(self, server_round, parameters)

    def aggregate_fit(
        self,
        server_round: int,
        results: FitResults,
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Flower's list API: needs the model sent by the last ``configure_fit``."""
        if self._parameters is None:
            raise ProtocolError(
                "aggregate_fit needs the global model of this round; call configure_fit "
                "first (or use fit_aggregator(round, parameters))"
            )
        aggregator = self.fit_aggregator(server_round, self._parameters)
        for failure in failures:
            aggregator.add_failure(failure)  # type: ignore[arg-type]
        for client, res in results:
            try:
                aggregator.add(client, res)
            except InvalidUpdate as exc:
                aggregator.add_failure(exc)
        return aggregator.finalize()

    def _adapt(self, unclipped_fraction: float) -> None:
        if self.adaptive is not None:
            self.clipping_norm = next_clipping_norm(
                self.clipping_norm,
                unclipped_fraction,
                self.adaptive.target_quantile,
                self.adaptive.lr,
            )

    def privacy_metrics(self) -> dict[str, Scalar]:
        """What every round reports: epsilon so far, delta and the noise settings."""
        metrics: dict[str, Scalar] = {
            "epsilon": self.accountant.epsilon(self.accounting.delta),
            "delta": self.accounting.delta,
            "dp_rounds": self.accountant.rounds,
            "dp_noise_multiplier": self.noise_multiplier,
        }
        if not self.private:
            metrics["dp_not_private"] = True
        return metrics

    # -- delegated ----------------------------------------------------------------------------

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def evaluate_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        return self.strategy.evaluate_aggregator(server_round, parameters)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: EvaluateResults,
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return self.strategy.evaluate(server_round, parameters)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> RecordDict:
        """The privacy ledger, the current clip norm and the inner strategy's state."""
        state = self.accountant.state_dict()
        state.config_records[_WRAPPER_RECORD] = {"clipping_norm": self.clipping_norm}
        inner = self.strategy.state_dict()
        state.array_records.update({_INNER + k: v for k, v in inner.array_records.items()})
        state.config_records.update({_INNER + k: v for k, v in inner.config_records.items()})
        state.metric_records.update({_INNER + k: v for k, v in inner.metric_records.items()})
        return state

    def load_state_dict(self, state: RecordDict) -> None:
        def inner_name(name: str) -> str | None:
            return name[len(_INNER) :] if name.startswith(_INNER) else None

        inner = RecordDict(
            {n: v for k, v in state.array_records.items() if (n := inner_name(k)) is not None},
            {n: v for k, v in state.config_records.items() if (n := inner_name(k)) is not None},
            {n: v for k, v in state.metric_records.items() if (n := inner_name(k)) is not None},
        )
        self.accountant.load_state_dict(state)
        wrapper = state.config_records.get(_WRAPPER_RECORD)
        if wrapper is not None:
            norm = wrapper["clipping_norm"]
            if isinstance(norm, bool) or not isinstance(norm, int | float) or not norm > 0:
                raise ConfigError(f"the saved clip norm must be a positive number, got {norm!r}")
            self.clipping_norm = float(norm)
        self.strategy.load_state_dict(inner)


def _checked_common(noise_multiplier: float, num_sampled_clients: int) -> tuple[float, int]:
    z = _non_negative(
        "noise_multiplier", noise_multiplier, " (negative noise is meaningless; 0 = no privacy)"
    )
    if (
        isinstance(num_sampled_clients, bool)
        or not isinstance(num_sampled_clients, int)
        or num_sampled_clients < 1
    ):
        raise ConfigError(
            f"num_sampled_clients must be an int >= 1 (the expected cohort size m), "
            f"got {num_sampled_clients!r}"
        )
    return z, num_sampled_clients
