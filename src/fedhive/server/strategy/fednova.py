"""FedNova: normalized averaging of clients that ran different numbers of local steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Unpack, final

import numpy as np

from fedhive.common.errors import InvalidUpdate
from fedhive.common.records import FitRes, NDArrays, Scalar
from fedhive.server.strategy.composed import ComposedStrategy, FedAvgArgs, Fold
from fedhive.server.strategy.fedavg import FedAvg
from fedhive.server.strategy.optimizers import ServerSGD, check_unit_interval
from fedhive.server.strategy.traits import StrategyTraits

__all__ = ["FedNova", "NovaRule", "local_norm"]

STEPS_KEY = "num_steps"


def local_norm(steps: float, momentum: float = 0.0) -> float:
    """``||a||_1`` of a client that took ``steps`` SGD steps with heavy-ball ``momentum``.

    Plain SGD: ``steps``. With momentum ``rho`` (Wang et al. 2020, Section 4):
    ``(steps - rho (1 - rho^steps) / (1 - rho)) / (1 - rho)``.
    """
    if momentum == 0.0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


def _steps(metrics: Mapping[str, Scalar], client_id: str, server_round: int) -> float:
    value = metrics.get(STEPS_KEY)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise InvalidUpdate(
            client_id,
            server_round,
            "fit",
            f"FedNova needs the number of local steps as fit metric {STEPS_KEY!r} "
            f"(a number >= 0), got {value!r}",
        )
    return float(value)


class NovaRule:
    """FedNova's normalized average (Wang et al. 2020), streaming: O(model) memory.

    With ``p_i`` the example weights and ``||a_i||`` from :func:`local_norm`, the aggregate
    is ``x + tau_eff * sum_i p_i (y_i - x) / ||a_i||`` with ``tau_eff = sum_i p_i ||a_i||``.
    A client with zero steps has not moved and adds only its weight.

    Its traits: streaming, but not a weighted mean (each update is divided by the
    client's own step count, which one client can choose).
    """

    traits = StrategyTraits(
        individual_updates=False,
        reason="its aggregate reweights each update by the client's local steps",
    )

    def __init__(self, local_momentum: float = 0.0) -> None:
        self.local_momentum = check_unit_interval("local_momentum", local_momentum)

    def __repr__(self) -> str:
        return f"NovaRule(local_momentum={self.local_momentum})"

    def start(self, server_round: int, reference: NDArrays, weight: Callable[[int], float]) -> Fold:
        return _NovaFold(self, server_round, reference, weight)


class _NovaFold:
    def __init__(
        self, rule: NovaRule, server_round: int, reference: NDArrays, weight: Callable[[int], float]
    ) -> None:
        self.rule = rule
        self.server_round = server_round
        self.x = [np.asarray(r, dtype=np.float64) for r in reference]
        self.acc = [np.zeros_like(x) for x in self.x]
        self.weight = weight
        self.total_weight = 0.0
        self.tau_eff = 0.0

    def add(self, client_id: str, arrays: NDArrays, result: FitRes) -> None:
        steps = _steps(result.metrics, client_id, self.server_round)
        w = float(self.weight(result.num_examples))
        norm = local_norm(steps, self.rule.local_momentum)
        if norm > 0:
            for acc, y, x in zip(self.acc, arrays, self.x, strict=True):
                acc += (w / norm) * (np.asarray(y, dtype=np.float64) - x)
        self.total_weight += w
        self.tau_eff += w * norm

    def result(self) -> NDArrays | None:
        if self.total_weight <= 0:
            return None
        scale = self.tau_eff / self.total_weight / self.total_weight
        return [x + scale * acc for x, acc in zip(self.x, self.acc, strict=True)]


@final
class FedNova(ComposedStrategy):
    """FedNova: average normalized updates, so clients with more local steps don't dominate.

    Wang, Liu, Liang, Joshi, Poor. "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization." NeurIPS 2020.

    Each client reports its number of local SGD steps as fit metric ``"num_steps"`` (the
    reference training loops and the CLI's simulated client do); a reply without it is
    refused. The update ``y_i - x`` is divided by ``||a_i||`` (the step count, or its
    momentum form when clients use heavy-ball ``local_momentum``), averaged with example
    weights ``p_i``, and rescaled by ``tau_eff = sum_i p_i ||a_i||``. The result moves the
    model with ``server_learning_rate`` (1 = the paper's vanilla FedNova). When all
    clients run the same number of steps this is FedAvg. Memory: O(model).

    Example::

        strategy = FedNova(min_fit_clients=10, local_momentum=0.0)
    """

    def __init__(
        self,
        *,
        server_learning_rate: float = 1.0,
        local_momentum: float = 0.0,
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        rule = NovaRule(local_momentum)
        optimizer = ServerSGD(server_learning_rate)
        self.server_learning_rate, self.local_momentum = optimizer.lr, rule.local_momentum
        super().__init__(sampling=FedAvg(**fedavg), rule=rule, server_optimizer=optimizer)
