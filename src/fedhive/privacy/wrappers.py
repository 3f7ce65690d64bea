"""The four public DP-FedAvg wrappers (Flower's names and arguments).

They share :class:`fedhive.privacy.central._DpStrategy` and differ only in where clipping
happens (server or clients) and whether the clip norm adapts.
"""

from __future__ import annotations

from typing import final

from fedhive.privacy.accounting import Accounting
from fedhive.privacy.central import _adaptive, _checked_common, _DpStrategy, _positive
from fedhive.server.strategy.base import Strategy

__all__ = [
    "DifferentialPrivacyClientSideAdaptiveClipping",
    "DifferentialPrivacyClientSideFixedClipping",
    "DifferentialPrivacyServerSideAdaptiveClipping",
    "DifferentialPrivacyServerSideFixedClipping",
]


@final
class DifferentialPrivacyServerSideFixedClipping(_DpStrategy):
    """DP-FedAvg with a fixed clip norm, clipping on the server (McMahan et al. 2018).

    Each update is clipped to ``clipping_norm``; the mean uses the fixed denominator
    ``num_sampled_clients`` and gets Gaussian noise with std
    ``noise_multiplier * clipping_norm / num_sampled_clients``. ``accounting`` says how
    cohorts are sampled and whether a budget stops training; ``noise_seed`` (tests only)
    makes the noise replayable and marks every round ``dp_not_private``.

    Example::

        strategy = DifferentialPrivacyServerSideFixedClipping(
            FedAvg(fraction_fit=0.1), noise_multiplier=1.0, clipping_norm=0.5,
            num_sampled_clients=10, accounting=Accounting(delta=1e-5, max_epsilon=8.0),
        )
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        *,
        accounting: Accounting | None = None,
        noise_seed: int | None = None,
        sampling_seed: int | None = None,
        weighting: str = "uniform",
    ) -> None:
        z, m = _checked_common(noise_multiplier, num_sampled_clients)
        super().__init__(
            strategy,
            z,
            m,
            _positive("clipping_norm", clipping_norm),
            None,
            accounting or Accounting(implicit=True),
            noise_seed,
            sampling_seed,
            weighting,
        )

    @property
    def clip_on_client(self) -> bool:
        return False


@final
class DifferentialPrivacyClientSideFixedClipping(_DpStrategy):
    """DP-FedAvg with a fixed clip norm applied by the clients (McMahan et al. 2018).

    The clip norm travels in the fit config; clients run :func:`fixedclipping_mod`. The
    server adds the noise, and refuses any update it can see whose norm exceeds the clip
    norm. Use this when secure aggregation hides individual updates from the server.

    Example::

        strategy = DifferentialPrivacyClientSideFixedClipping(
            FedAvg(), noise_multiplier=1.0, clipping_norm=0.5, num_sampled_clients=10
        )
        app = ClientApp(client_fn, mods=[fixedclipping_mod])
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        *,
        accounting: Accounting | None = None,
        noise_seed: int | None = None,
        sampling_seed: int | None = None,
        weighting: str = "uniform",
    ) -> None:
        z, m = _checked_common(noise_multiplier, num_sampled_clients)
        super().__init__(
            strategy,
            z,
            m,
            _positive("clipping_norm", clipping_norm),
            None,
            accounting or Accounting(implicit=True),
            noise_seed,
            sampling_seed,
            weighting,
        )

    @property
    def clip_on_client(self) -> bool:
        return True


@final
class DifferentialPrivacyServerSideAdaptiveClipping(_DpStrategy):
    """DP-FedAvg with adaptive clipping on the server (Andrew et al. 2021).

    The clip norm starts at ``initial_clipping_norm`` and follows the
    ``target_clipped_quantile`` of update norms with learning rate ``clip_norm_lr``,
    driven by a noisy count of unclipped updates (std ``clipped_count_stddev``, default
    ``num_sampled_clients / 20``). ``noise_multiplier`` covers update and count together.

    Example::

        strategy = DifferentialPrivacyServerSideAdaptiveClipping(
            FedAvg(), noise_multiplier=1.0, num_sampled_clients=100
        )
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        num_sampled_clients: int,
        initial_clipping_norm: float = 0.1,
        target_clipped_quantile: float = 0.5,
        clip_norm_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
        *,
        accounting: Accounting | None = None,
        noise_seed: int | None = None,
        sampling_seed: int | None = None,
        weighting: str = "uniform",
    ) -> None:
        z, m = _checked_common(noise_multiplier, num_sampled_clients)
        super().__init__(
            strategy,
            z,
            m,
            _positive("initial_clipping_norm", initial_clipping_norm),
            _adaptive(z, m, target_clipped_quantile, clip_norm_lr, clipped_count_stddev),
            accounting or Accounting(implicit=True),
            noise_seed,
            sampling_seed,
            weighting,
        )

    @property
    def clip_on_client(self) -> bool:
        return False


@final
class DifferentialPrivacyClientSideAdaptiveClipping(_DpStrategy):
    """Adaptive clipping (Andrew et al. 2021) with clipping on the clients.

    Clients run :func:`adaptiveclipping_mod`: they clip to the norm in the fit config and
    report whether their update was unclipped (metrics key ``"dp_norm_bit"``, removed
    before metrics are aggregated). The server adds noise to the mean and the count.

    Example::

        strategy = DifferentialPrivacyClientSideAdaptiveClipping(
            FedAvg(), noise_multiplier=1.0, num_sampled_clients=100
        )
        app = ClientApp(client_fn, mods=[adaptiveclipping_mod])
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        num_sampled_clients: int,
        initial_clipping_norm: float = 0.1,
        target_clipped_quantile: float = 0.5,
        clip_norm_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
        *,
        accounting: Accounting | None = None,
        noise_seed: int | None = None,
        sampling_seed: int | None = None,
        weighting: str = "uniform",
    ) -> None:
        z, m = _checked_common(noise_multiplier, num_sampled_clients)
        super().__init__(
            strategy,
            z,
            m,
            _positive("initial_clipping_norm", initial_clipping_norm),
            _adaptive(z, m, target_clipped_quantile, clip_norm_lr, clipped_count_stddev),
            accounting or Accounting(implicit=True),
            noise_seed,
            sampling_seed,
            weighting,
        )

    @property
    def clip_on_client(self) -> bool:
        return True
