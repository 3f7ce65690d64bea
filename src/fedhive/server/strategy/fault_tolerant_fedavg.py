"""FedAvg that aggregates a round once enough of its clients answered."""

from __future__ import annotations

from collections.abc import Callable
from typing import final

from fedhive.common.errors import ConfigError
from fedhive.common.records import Config, Parameters
from fedhive.common.typing import MetricsAggregationFn
from fedhive.server.strategy.fedavg import EvaluateFn, FedAvg

__all__ = ["FaultTolerantFedAvg"]


def _check_rate(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


@final
class FaultTolerantFedAvg(FedAvg):
    """FedAvg (McMahan et al. 2017) that accepts failures up to a completion rate.

    McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of
    Deep Networks from Decentralized Data." AISTATS 2017.

    A fit (evaluate) round is aggregated when at least one result arrived and
    ``results / (results + failures)`` is at least ``min_completion_rate_fit``
    (``min_completion_rate_evaluate``); otherwise the model is kept. Flower's defaults:
    one client suffices (``min_*_clients=1``), rates 0.5. Aggregation streams like
    FedAvg's: O(model) memory, and the traits of a weighted mean.

    Example::

        strategy = FaultTolerantFedAvg(min_completion_rate_fit=0.8)
    """

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int = 1,
        min_evaluate_clients: int = 1,
        min_available_clients: int = 1,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: Callable[[int], Config] | None = None,
        on_evaluate_config_fn: Callable[[int], Config] | None = None,
        min_completion_rate_fit: float = 0.5,
        min_completion_rate_evaluate: float = 0.5,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=fraction_fit,
            fraction_evaluate=fraction_evaluate,
            min_fit_clients=min_fit_clients,
            min_evaluate_clients=min_evaluate_clients,
            min_available_clients=min_available_clients,
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=on_fit_config_fn,
            on_evaluate_config_fn=on_evaluate_config_fn,
            accept_failures=True,
            initial_parameters=initial_parameters,
            fit_metrics_aggregation_fn=fit_metrics_aggregation_fn,
            evaluate_metrics_aggregation_fn=evaluate_metrics_aggregation_fn,
        )
        self.completion_rate_fit = _check_rate("min_completion_rate_fit", min_completion_rate_fit)
        self.completion_rate_evaluate = _check_rate(
            "min_completion_rate_evaluate", min_completion_rate_evaluate
        )

    def __repr__(self) -> str:
        return "FaultTolerantFedAvg()"

    def accept_round(self, num_results: int, num_failures: int, stage: str = "fit") -> bool:
        if num_results == 0:
            return False
        rate = self.completion_rate_fit if stage == "fit" else self.completion_rate_evaluate
        return num_results / (num_results + num_failures) >= rate
