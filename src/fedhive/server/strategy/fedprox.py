"""FedProx: FedAvg whose clients add a proximal term to their local objective."""

from __future__ import annotations

import math
from typing import Unpack, final

from fedhive.common.errors import ConfigError
from fedhive.server.strategy.composed import ComposedStrategy, FedAvgArgs, MeanRule
from fedhive.server.strategy.fedavg import FedAvg

__all__ = ["FedProx"]


@final
class FedProx(ComposedStrategy):
    """FedAvg that asks clients to minimise ``F_k(w) + mu/2 ||w - w_global||^2``.

    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in
    Heterogeneous Networks." MLSys 2020.

    The server side is FedAvg's weighted mean (O(model) memory); ``proximal_mu`` is sent to
    every client in its fit config as ``"proximal_mu"`` (overriding ``on_fit_config_fn``).
    The reference training loops (``fedhive.models.numpy_lr.train``,
    ``fedhive.models.torch_models.train_torch`` and the CLI's simulated client) apply the
    term; a custom client must read ``config["proximal_mu"]`` itself. FedProx also
    tolerates partial local work: clients may stop early and still be averaged.

    Example::

        strategy = FedProx(proximal_mu=0.01, min_fit_clients=10)
    """

    def __init__(self, *, proximal_mu: float, **fedavg: Unpack[FedAvgArgs]) -> None:
        if (
            isinstance(proximal_mu, bool)
            or not isinstance(proximal_mu, int | float)
            or not 0 <= proximal_mu < math.inf
        ):
            raise ConfigError(f"proximal_mu must be a finite number >= 0, got {proximal_mu!r}")
        self.proximal_mu = float(proximal_mu)
        super().__init__(
            sampling=FedAvg(**fedavg),
            rule=MeanRule(),
            fit_config={"proximal_mu": self.proximal_mu},
        )
