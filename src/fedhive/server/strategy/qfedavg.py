"""q-FedAvg: fair federated averaging that gives clients with a high loss more weight."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, Unpack, final

import numpy as np

from fedhive.common.errors import ConfigError, InvalidUpdate
from fedhive.common.records import FitRes, NDArrays, ndarrays_to_parameters
from fedhive.server.strategy.composed import ComposedStrategy, FedAvgArgs, Fold
from fedhive.server.strategy.fedavg import FedAvg
from fedhive.server.strategy.optimizers import check_positive
from fedhive.server.strategy.traits import StrategyTraits

__all__ = ["QFedAvg", "QFFLRule"]

#: Keeps ``F^(q-1)`` finite for a client whose loss is exactly 0.
_EPS = 1e-10


class QFFLRule:
    """The q-FedAvg update (Li et al. 2020, Algorithm 2), streaming: O(model) memory.

    With ``L = 1 / learning_rate`` and client ``k``'s loss ``F_k`` at the global model::

        dw_k    = L (x - y_k)
        delta_k = F_k^q dw_k
        h_k     = q F_k^(q-1) ||dw_k||^2 + L F_k^q
        x_new   = x - sum_k delta_k / sum_k h_k

    Its traits: streaming, but not a weighted mean (the weights come from the clients'
    reported losses).
    """

    traits = StrategyTraits(
        individual_updates=False, reason="its aggregate reweights each update by the client's loss"
    )

    def __init__(
        self,
        q_param: float,
        learning_rate: float,
        loss_key: str = "loss",
        central_loss: Callable[[int, NDArrays], float | None] | None = None,
    ) -> None:
        if (
            isinstance(q_param, bool)
            or not isinstance(q_param, int | float)
            or not (0 <= q_param < math.inf)
        ):
            raise ConfigError(f"q_param must be a finite number >= 0, got {q_param!r}")
        self.q = float(q_param)
        self.lipschitz = 1.0 / check_positive("qffl_learning_rate", learning_rate)
        self.loss_key = loss_key
        #: ``(round, global model) -> loss or None``: when it gives a loss, every client of
        #: the round uses it (Flower's q-FedAvg); otherwise each client's own fit metric.
        self.central_loss = central_loss

    def __repr__(self) -> str:
        return f"QFFLRule(q_param={self.q}, lipschitz={self.lipschitz})"

    def start(self, server_round: int, reference: NDArrays, weight: Callable[[int], float]) -> Fold:
        return _QFold(self, server_round, reference)


class _QFold:
    def __init__(self, rule: QFFLRule, server_round: int, reference: NDArrays) -> None:
        self.rule = rule
        self.server_round = server_round
        self.reference = reference
        self.central: float | None = None
        self.central_asked = False
        self.x = [np.asarray(r, dtype=np.float64) for r in reference]
        self.acc = [np.zeros_like(x) for x in self.x]
        self.h = 0.0

    def _central_loss(self) -> float | None:
        if not self.central_asked and self.rule.central_loss is not None:
            self.central_asked = True  # once per round, on the first reply
            loss = self.rule.central_loss(self.server_round, self.reference)
            if loss is not None:
                if (
                    isinstance(loss, bool)
                    or not isinstance(loss, int | float)
                    or not (0 <= loss < math.inf)
                ):
                    raise ConfigError(
                        f"q-FedAvg needs a finite loss >= 0 from evaluate_fn, got {loss!r}"
                    )
                self.central = float(loss)
        return self.central

    def _loss(self, client_id: str, result: FitRes) -> float:
        central = self._central_loss()
        if central is not None:
            return central + _EPS
        value = result.metrics.get(self.rule.loss_key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (0 <= value < math.inf)
        ):
            raise InvalidUpdate(
                client_id,
                self.server_round,
                "fit",
                "q-FedAvg needs the loss at the global model: give the strategy an "
                "evaluate_fn (its loss is used for every client, as in Flower) or have the "
                f"client report fit metric {self.rule.loss_key!r} (a finite number >= 0); "
                f"got {value!r}",
            )
        return float(value) + _EPS

    def add(self, client_id: str, arrays: NDArrays, result: FitRes) -> None:
        loss = self._loss(client_id, result)
        q, lip = self.rule.q, self.rule.lipschitz
        grads = [
            lip * (x - np.asarray(y, dtype=np.float64)) for x, y in zip(self.x, arrays, strict=True)
        ]
        sq_norm = float(sum(np.vdot(g, g) for g in grads))
        f_q = loss**q
        for acc, g in zip(self.acc, grads, strict=True):
            acc += f_q * g
        self.h += q * loss ** (q - 1.0) * sq_norm + lip * f_q

    def result(self) -> NDArrays | None:
        if not self.h > 0:
            return None
        return [x - acc / self.h for x, acc in zip(self.x, self.acc, strict=True)]


@final
class QFedAvg(ComposedStrategy):
    """q-FedAvg: minimise ``sum_k p_k F_k^(q+1) / (q+1)``, so high-loss clients weigh more.

    Li, Sanjabi, Beirami, Smith. "Fair Resource Allocation in Federated Learning."
    ICLR 2020.

    ``q_param`` (``q >= 0``) sets the fairness: ``q = 0`` is the unweighted mean of the
    models (FedAvg with equal weights); larger ``q`` favours the worst-off clients.
    ``qffl_learning_rate`` is the clients' local learning rate, whose inverse estimates the
    Lipschitz constant ``L``. ``F_k`` is, as in Flower (``loss_source="evaluate"``, the
    default), the server's centralized loss at the global model (``evaluate_fn``), the
    same for every client; without an ``evaluate_fn`` each client's fit metric ``"loss"``
    is used. ``loss_source="client"`` always uses the client's own loss, as the paper
    does (the reference training loops report their mean training loss over the local
    epoch, an approximation). A reply with no loss to use is refused. Memory: O(model).

    Example::

        strategy = QFedAvg(q_param=1.0, qffl_learning_rate=0.05, min_fit_clients=10)
    """

    def __init__(
        self,
        *,
        q_param: float = 0.2,
        qffl_learning_rate: float = 0.1,
        loss_source: Literal["evaluate", "client"] = "evaluate",
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        if loss_source not in ("evaluate", "client"):
            raise ConfigError(f"loss_source must be 'evaluate' or 'client', got {loss_source!r}")
        central = self._evaluate_loss if loss_source == "evaluate" else None
        rule = QFFLRule(q_param, qffl_learning_rate, central_loss=central)
        self.q_param, self.qffl_learning_rate = rule.q, float(qffl_learning_rate)
        self.loss_source = loss_source
        super().__init__(sampling=FedAvg(**fedavg), rule=rule)

    def _evaluate_loss(self, server_round: int, model: NDArrays) -> float | None:
        result = self.evaluate(server_round, ndarrays_to_parameters(model))
        return None if result is None else result[0]
