"""q-FedAvg: fair federated averaging that gives clients with a high loss more weight."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Unpack, final

import numpy as np

from fedhive.common.errors import ConfigError, InvalidUpdate
from fedhive.common.records import FitRes, NDArrays
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

    def __init__(self, q_param: float, learning_rate: float, loss_key: str = "loss") -> None:
        if (
            isinstance(q_param, bool)
            or not isinstance(q_param, int | float)
            or not (0 <= q_param < math.inf)
        ):
            raise ConfigError(f"q_param must be a finite number >= 0, got {q_param!r}")
        self.q = float(q_param)
        self.lipschitz = 1.0 / check_positive("qffl_learning_rate", learning_rate)
        self.loss_key = loss_key

    def __repr__(self) -> str:
        return f"QFFLRule(q_param={self.q}, lipschitz={self.lipschitz})"

    def start(self, server_round: int, reference: NDArrays, weight: Callable[[int], float]) -> Fold:
        return _QFold(self, server_round, reference)


class _QFold:
    def __init__(self, rule: QFFLRule, server_round: int, reference: NDArrays) -> None:
        self.rule = rule
        self.server_round = server_round
        self.x = [np.asarray(r, dtype=np.float64) for r in reference]
        self.acc = [np.zeros_like(x) for x in self.x]
        self.h = 0.0

    def _loss(self, client_id: str, result: FitRes) -> float:
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
                f"q-FedAvg needs the client's loss at the global model as fit metric "
                f"{self.rule.loss_key!r} (a finite number >= 0), got {value!r}",
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
    Lipschitz constant ``L``. Each client reports its loss at the received global model
    as fit metric ``"loss"``; the reference training loops report their mean training loss
    over the local epoch, an approximation. fedhive uses each client's own loss, as the
    paper does; Flower uses the server's centralized loss for every client. Memory:
    O(model).

    Example::

        strategy = QFedAvg(q_param=1.0, qffl_learning_rate=0.05, min_fit_clients=10)
    """

    def __init__(
        self,
        *,
        q_param: float = 0.2,
        qffl_learning_rate: float = 0.1,
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        rule = QFFLRule(q_param, qffl_learning_rate)
        self.q_param, self.qffl_learning_rate = rule.q, float(qffl_learning_rate)
        super().__init__(sampling=FedAvg(**fedavg), rule=rule)
