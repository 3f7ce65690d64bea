"""Strategies that differ from FedAvg only in their server optimizer.

Each is a :class:`~fedhive.server.strategy.composed.ComposedStrategy` of FedAvg's sampling,
the streaming weighted mean (O(model) memory) and a server optimizer from
:mod:`fedhive.server.strategy.optimizers` applied to the pseudo-gradient
``delta = mean - x``. The optimizer state (momentum, moments, step count) is part of
:meth:`state_dict`, so a run resumed from a checkpoint continues identically.
"""

from __future__ import annotations

from typing import Literal, Unpack, final

from fedhive.common.errors import ConfigError
from fedhive.server.strategy.composed import ComposedStrategy, FedAvgArgs, MeanRule
from fedhive.server.strategy.fedavg import FedAvg
from fedhive.server.strategy.optimizers import Adaptive, ServerSGD, check_positive

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "Variant"]

#: ``"flower"``: Flower's numbers (``v`` starts at 0; FedAdam's bias-corrected step);
#: ``"paper"``: Reddi et al.'s Algorithm 2 as written (``v`` starts at ``tau^2``).
Variant = Literal["flower", "paper"]


def _initial_v(variant: str) -> str:
    if variant not in ("flower", "paper"):
        raise ConfigError(f"variant must be 'flower' or 'paper', got {variant!r}")
    return "zero" if variant == "flower" else "tau2"


@final
class FedAvgM(ComposedStrategy):
    """FedAvg with server momentum.

    Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification." arXiv:1909.06335, 2019.

    ``v <- server_momentum * v + delta``, ``x <- x + server_learning_rate * v`` with
    ``delta`` the weighted mean minus the global model. With ``server_momentum=0`` and
    ``server_learning_rate=1`` this is FedAvg (and, as in Flower, needs no
    ``initial_parameters``). ``server_momentum`` must be in [0, 1) and
    ``server_learning_rate > 0``. Memory: O(model) for the mean and one float64 copy of
    the model for the momentum.

    Example::

        strategy = FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
    """

    def __init__(
        self,
        *,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        optimizer = ServerSGD(server_learning_rate, server_momentum)
        self.server_learning_rate = optimizer.lr
        self.server_momentum = optimizer.momentum
        #: Flower's ``server_opt``: lr 1 without momentum is plain FedAvg (no model needed)
        self.server_opt = optimizer.lr != 1.0 or optimizer.momentum != 0.0
        super().__init__(
            sampling=FedAvg(**fedavg),
            rule=MeanRule(),
            server_optimizer=optimizer if self.server_opt else None,
        )


def _adaptive_sampling(name: str, fedavg: FedAvgArgs, eta_l: float) -> FedAvg:
    check_positive("eta_l", eta_l)
    if fedavg.get("initial_parameters") is None:
        raise ConfigError(
            f"{name} needs initial_parameters (as in Flower): the server optimizer works on "
            "the global model from the first round on"
        )
    return FedAvg(**fedavg)


@final
class FedAdam(ComposedStrategy):
    """FedAvg with server-side Adam on the pseudo-gradient.

    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
    Optimization." ICLR 2021 (FedAdam, Algorithm 2)::

        m <- beta_1 m + (1 - beta_1) delta
        v <- beta_2 v + (1 - beta_2) delta^2
        x <- x + eta * m / (sqrt(v) + tau)

    By default (``variant="flower"``) the numbers are Flower's: ``m`` and ``v`` start at
    0 and the step size is bias-corrected as Flower does,
    ``eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`` with ``tau`` outside the square
    root (``bias_correction=False`` turns that off). ``variant="paper"`` follows
    Algorithm 2 as written: ``v`` starts at ``tau^2`` and there is no bias correction
    unless ``bias_correction=True`` (Kingma & Ba's, on ``m`` and ``v``).
    ``eta_l`` (the clients' learning rate) is recorded as in Flower but not sent: set the
    clients' learning rate with ``on_fit_config_fn``. ``initial_parameters`` is required.
    Memory: O(model) for the mean plus two float64 copies of the model (m and v).

    Example::

        strategy = FedAdam(initial_parameters=params, eta=0.01, tau=1e-3)
    """

    def __init__(
        self,
        *,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-9,
        bias_correction: bool | None = None,
        variant: Variant = "flower",
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        initial_v = _initial_v(variant)
        sampling = _adaptive_sampling("FedAdam", fedavg, eta_l)
        correction: bool | str = "adam" if bias_correction else False  # the paper's option
        if variant == "flower":
            correction = False if bias_correction is False else "flower"
        optimizer = Adaptive(
            "adam",
            eta=eta,
            beta_1=beta_1,
            beta_2=beta_2,
            tau=tau,
            bias_correction=correction,
            initial_v=initial_v,
        )
        self.variant = variant
        self.eta, self.eta_l, self.tau = optimizer.eta, float(eta_l), optimizer.tau
        self.beta_1, self.beta_2 = optimizer.beta_1, optimizer.beta_2
        super().__init__(sampling=sampling, rule=MeanRule(), server_optimizer=optimizer)


@final
class FedYogi(ComposedStrategy):
    """FedAvg with server-side Yogi on the pseudo-gradient.

    Reddi et al. "Adaptive Federated Optimization." ICLR 2021 (FedYogi, Algorithm 2):
    as FedAdam but ``v <- v - (1 - beta_2) delta^2 sign(v - delta^2)``, so the
    effective learning rate changes more gently. ``m`` starts at 0; no bias correction.
    ``v`` starts at 0 as in Flower (``variant="flower"``, the default) or at ``tau^2`` as
    in the paper (``variant="paper"``). ``eta_l`` is recorded, not sent.
    ``initial_parameters`` is required. Memory: O(model) plus two float64 copies of the
    model.

    Example::

        strategy = FedYogi(initial_parameters=params, eta=0.01, tau=1e-3)
    """

    def __init__(
        self,
        *,
        eta: float = 1e-2,
        eta_l: float = 0.0316,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        variant: Variant = "flower",
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        initial_v = _initial_v(variant)
        sampling = _adaptive_sampling("FedYogi", fedavg, eta_l)
        optimizer = Adaptive(
            "yogi", eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, initial_v=initial_v
        )
        self.variant = variant
        self.eta, self.eta_l, self.tau = optimizer.eta, float(eta_l), optimizer.tau
        self.beta_1, self.beta_2 = optimizer.beta_1, optimizer.beta_2
        super().__init__(sampling=sampling, rule=MeanRule(), server_optimizer=optimizer)


@final
class FedAdagrad(ComposedStrategy):
    """FedAvg with server-side Adagrad on the pseudo-gradient.

    Reddi et al. "Adaptive Federated Optimization." ICLR 2021 (FedAdagrad, Algorithm 2):
    ``v <- v + delta^2``, ``x <- x + eta * m / (sqrt(v) + tau)`` with
    ``m <- beta_1 m + (1 - beta_1) delta``. ``beta_1`` defaults to 0 (``m = delta``, the
    form Flower implements); the paper allows momentum, so fedhive accepts ``beta_1``.
    ``v`` starts at 0 as in Flower (``variant="flower"``, the default) or at ``tau^2`` as
    in the paper (``variant="paper"``). ``eta_l`` is recorded, not sent.
    ``initial_parameters`` is required. Memory: O(model) plus two float64 copies of the
    model.

    Example::

        strategy = FedAdagrad(initial_parameters=params, eta=0.1, tau=1e-3)
    """

    def __init__(
        self,
        *,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        tau: float = 1e-9,
        beta_1: float = 0.0,
        variant: Variant = "flower",
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        initial_v = _initial_v(variant)
        sampling = _adaptive_sampling("FedAdagrad", fedavg, eta_l)
        optimizer = Adaptive(
            "adagrad", eta=eta, beta_1=beta_1, beta_2=0.0, tau=tau, initial_v=initial_v
        )
        self.variant = variant
        self.eta, self.eta_l, self.tau = optimizer.eta, float(eta_l), optimizer.tau
        self.beta_1 = optimizer.beta_1
        super().__init__(sampling=sampling, rule=MeanRule(), server_optimizer=optimizer)
