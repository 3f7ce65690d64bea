"""FedAsync: every result is mixed into the global model as it arrives.

Xie, Koyejo, Gupta. "Asynchronous Federated Optimization." arXiv:1903.03934, 2019.
"""

from __future__ import annotations

from typing import Literal, Unpack, final

import numpy as np

from fedhive.common.errors import ConfigError, InvalidUpdate
from fedhive.common.records import (
    FitRes,
    NDArrays,
    Parameters,
    RecordDict,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.server.client_manager import ClientProxy
from fedhive.server.strategy.asyncbase import AsynchronousStrategy
from fedhive.server.strategy.base import Aggregator
from fedhive.server.strategy.composed import FedAvgArgs, cast_like
from fedhive.server.strategy.fedavg import FedAvg
from fedhive.server.strategy.staleness import StalenessFunction

__all__ = ["FedAsync"]


@final
class FedAsync(AsynchronousStrategy):
    """FedAsync (Xie et al. 2019): ``x <- (1 - alpha_t) x + alpha_t y`` for each result.

    ``alpha_t = alpha * s(tau)``, with ``tau`` the result's staleness and ``s`` the
    staleness function (``staleness``: ``"constant"``, ``"poly"`` ``(1 + tau)^-a`` or
    ``"hinge"`` ``1`` up to ``staleness_hinge`` ``b``, then ``1 / (a (tau - b) + 1)``;
    ``a`` is ``staleness_exponent``). Every result publishes a model version
    (``buffer_size`` is 1), ``concurrency`` clients train at once; ``max_staleness``
    refuses older results. Under synchronous rounds the results of a round are mixed in
    one after the other, in the order they are folded.

    Memory: one float64 copy of the model, plus one model per older version a client is
    still training on (at most ``concurrency``).

    Example::

        strategy = FedAsync(alpha=0.6, staleness="hinge", staleness_exponent=10,
                            staleness_hinge=4, concurrency=20)
    """

    def __init__(
        self,
        *,
        alpha: float = 0.6,
        concurrency: int = 20,
        staleness: Literal["constant", "poly", "hinge"] = "poly",
        staleness_exponent: float = 0.5,
        staleness_hinge: int = 4,
        max_staleness: int | None = None,
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1:
            raise ConfigError(f"alpha must be a number in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        super().__init__(
            sampling=FedAvg(**fedavg),
            buffer_size=1,
            concurrency=concurrency,
            staleness=StalenessFunction(staleness, staleness_exponent, staleness_hinge),
            max_staleness=max_staleness,
        )

    def __repr__(self) -> str:
        return (
            f"FedAsync(alpha={self.alpha}, concurrency={self.concurrency}, "
            f"staleness={self.staleness!r})"
        )

    def fit_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        return _Mixer(self, server_round, parameters_to_ndarrays(parameters))

    def state_dict(self) -> RecordDict:
        return RecordDict(config_records={"fedasync": {"version": self.ledger.version}})

    def load_state_dict(self, state: RecordDict) -> None:
        self.ledger.restore(state.config_records.get("fedasync"), "FedAsync")
        self._published = None


class _Mixer:
    """Mixes each result into a float64 copy of the model."""

    def __init__(self, strategy: FedAsync, server_round: int, reference: NDArrays) -> None:
        self.strategy = strategy
        self.server_round = server_round
        self.reference = reference
        self.model = [np.array(r, dtype=np.float64) for r in reference]
        self.metrics: list[tuple[int, dict[str, Scalar]]] = []
        self.staleness: list[int] = []
        self.failures: list[BaseException] = []

    def add(self, client: ClientProxy, result: FitRes) -> None:
        if not isinstance(result, FitRes):
            raise InvalidUpdate(client.cid, self.server_round, "fit", "reply is not a FitRes")
        staleness, weight, _ = self.strategy.arrived(client, self.server_round)
        mix = self.strategy.alpha * weight
        for x, y in zip(self.model, parameters_to_ndarrays(result.parameters), strict=True):
            x *= 1.0 - mix
            x += np.multiply(y, mix, dtype=np.float64)
        self.staleness.append(staleness)
        self.metrics.append((result.num_examples, result.metrics))

    def add_failure(self, failure: BaseException) -> None:
        self.strategy.failed(failure)
        self.failures.append(failure)

    def finalize(self) -> tuple[Parameters | None, dict[str, Scalar]]:
        strategy = self.strategy
        if not self.staleness:
            return None, {}
        if self.failures and not strategy.sampling.accept_failures:
            return None, {}
        params = strategy.published(ndarrays_to_parameters(cast_like(self.model, self.reference)))
        metrics = strategy.fit_metrics(self.metrics)
        metrics["staleness_mean"] = float(np.mean(self.staleness))
        metrics["staleness_max"] = int(max(self.staleness))
        return params, metrics
