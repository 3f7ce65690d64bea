"""Federated Averaging.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data." AISTATS 2017.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedhive.common.errors import ConfigError, InvalidUpdate
from fedhive.common.records import (
    Config,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.common.typing import MetricsAggregationFn
from fedhive.server.client_manager import ClientManager, ClientProxy
from fedhive.server.strategy.aggregate import WeightedMean, check_accumulator
from fedhive.server.strategy.base import (
    Aggregator,
    EvaluateResults,
    FitResults,
    MeanClients,
    Strategy,
    weighted_loss_avg,
)
from fedhive.server.strategy.traits import MEAN_TRAITS, StrategyTraits

__all__ = ["FedAvg", "MetricsAggregationFn", "EvaluateFn"]

EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


class FedAvg(Strategy):
    """Federated Averaging (McMahan et al. 2017) with Flower's constructor and semantics.

    Each round samples ``max(int(fraction_fit * available), min_fit_clients)`` clients
    (none if fewer than ``min_available_clients`` are connected) and averages their
    parameters weighted by ``num_examples`` (capped at ``max_num_examples`` if given).
    With ``accept_failures=False`` a round with any failure keeps the previous model.

    Aggregation streams: memory is O(model), whatever the number of clients. A subclass
    that overrides :meth:`aggregate_fit` receives the full results list instead, which
    costs O(clients x model) memory, and its :attr:`traits` are a buffering strategy's.

    The mean is accumulated in float64 (8 bytes per parameter) and is as exact as float64
    allows. Setting :attr:`accumulator` to ``"model"`` keeps float32 layers' accumulator
    in float32 instead (half the memory, for servers where the model is large), at the
    cost of an error bounded in :mod:`~fedhive.server.strategy.aggregate` (small when
    updates are small next to the model; identical updates still average exactly).

    Example::

        strategy = FedAvg(fraction_fit=0.1, min_fit_clients=10, min_available_clients=100)
    """

    #: ``"float64"`` (exact) or ``"model"`` (float32 layers accumulate in float32).
    accumulator: str = "float64"

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int = 2,
        min_evaluate_clients: int = 2,
        min_available_clients: int = 2,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: Callable[[int], Config] | None = None,
        on_evaluate_config_fn: Callable[[int], Config] | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        inplace: bool = True,
        max_num_examples: int | None = None,
    ) -> None:
        _check_fraction("fraction_fit", fraction_fit)
        _check_fraction("fraction_evaluate", fraction_evaluate)
        _check_count("min_fit_clients", min_fit_clients, 0)
        _check_count("min_evaluate_clients", min_evaluate_clients, 0)
        _check_count("min_available_clients", min_available_clients, 0)
        if max_num_examples is not None:
            _check_count("max_num_examples", max_num_examples, 1)

        self.fraction_fit = fraction_fit
        self.fraction_evaluate = fraction_evaluate
        self.min_fit_clients = min_fit_clients
        self.min_evaluate_clients = min_evaluate_clients
        self.min_available_clients = min_available_clients
        self.evaluate_fn = evaluate_fn
        self.on_fit_config_fn = on_fit_config_fn
        self.on_evaluate_config_fn = on_evaluate_config_fn
        self.accept_failures = accept_failures
        self.initial_parameters = initial_parameters
        self.fit_metrics_aggregation_fn = fit_metrics_aggregation_fn
        self.evaluate_metrics_aggregation_fn = evaluate_metrics_aggregation_fn
        self.inplace = inplace
        self.max_num_examples = max_num_examples

    def __repr__(self) -> str:
        return f"{type(self).__name__}(accept_failures={self.accept_failures})"

    # -- sampling -------------------------------------------------------------------------

    def num_fit_clients(self, num_available_clients: int) -> tuple[int, int]:
        """(clients to sample, clients that must be available) for a fit round."""
        num_clients = int(num_available_clients * self.fraction_fit)
        return max(num_clients, self.min_fit_clients), self.min_available_clients

    def num_evaluation_clients(self, num_available_clients: int) -> tuple[int, int]:
        """(clients to sample, clients that must be available) for an evaluate round."""
        num_clients = int(num_available_clients * self.fraction_evaluate)
        return max(num_clients, self.min_evaluate_clients), self.min_available_clients

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        initial = self.initial_parameters
        self.initial_parameters = None  # the engine owns the model from now on
        return initial

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        config = dict(self.on_fit_config_fn(server_round)) if self.on_fit_config_fn else {}
        size, min_num = self.num_fit_clients(client_manager.num_available())
        clients = client_manager.sample(num_clients=size, min_num_clients=min_num)
        fit_ins = FitIns(parameters, config)
        return [(client, fit_ins) for client in clients]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if self.fraction_evaluate == 0.0:
            return []
        config = {}
        if self.on_evaluate_config_fn:
            config = dict(self.on_evaluate_config_fn(server_round))
        size, min_num = self.num_evaluation_clients(client_manager.num_available())
        clients = client_manager.sample(num_clients=size, min_num_clients=min_num)
        evaluate_ins = EvaluateIns(parameters, config)
        return [(client, evaluate_ins) for client in clients]

    # -- aggregation ----------------------------------------------------------------------

    @property
    def traits(self) -> StrategyTraits:
        """:data:`~fedhive.server.strategy.traits.MEAN_TRAITS`, unless a subclass aggregates
        its own way.

        A subclass that overrides :meth:`aggregate_fit` (Flower's list API) or
        :meth:`fit_aggregator` may compute anything from the results: its traits are
        those of a buffering strategy that needs individual updates and whose aggregate
        is not known to be a weighted mean, so differential privacy and secure
        aggregation refuse it. A subclass whose aggregate is still the weighted mean
        (one that only logs or saves the model, say) says so in its class body:
        ``traits = MEAN_TRAITS``.
        """
        own = _own_aggregation(self)
        if own is None:
            return MEAN_TRAITS
        return StrategyTraits(
            reason=f"{type(self).__name__} overrides {own}, so its aggregate is not known to "
            "be a weighted mean (if it is, declare traits = MEAN_TRAITS in its class)"
        )

    def accept_round(self, num_results: int, num_failures: int, stage: str = "fit") -> bool:
        """Whether a round with these counts is aggregated (``stage``: ``"fit"`` or
        ``"evaluate"``): at least one result, and no failure unless ``accept_failures``.
        :class:`~fedhive.server.strategy.fault_tolerant_fedavg.FaultTolerantFedAvg` asks
        for a completion rate instead."""
        return num_results > 0 and (self.accept_failures or num_failures == 0)

    def weight(self, num_examples: int) -> int:
        """A client's weight: its example count, capped at ``max_num_examples``."""
        if self.max_num_examples is None:
            return num_examples
        return min(num_examples, self.max_num_examples)

    def fit_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        check_accumulator(self.accumulator)  # before the round, not at its end
        if _own_aggregation(self) == "aggregate_fit":
            # The list-based path also casts to the global model's dtypes: remember them.
            self._reference: NDArrays | None = parameters_to_ndarrays(parameters)
            return super().fit_aggregator(server_round, parameters)
        self._reference = None  # an older model would otherwise outlive its round
        return _StreamingFedAvg(self, server_round, parameters_to_ndarrays(parameters))

    def aggregate_fit(
        self,
        server_round: int,
        results: FitResults,
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Flower's list-based aggregation (O(clients x model) memory); see fit_aggregator."""
        if not self.accept_round(len(results), len(failures), "fit"):
            return None, {}
        reference = getattr(self, "_reference", None)
        if reference is None:
            reference = parameters_to_ndarrays(results[0][1].parameters)
        mean = WeightedMean(reference, accumulator=self.accumulator)
        for client, res in results:
            mean.add(
                parameters_to_ndarrays(res.parameters),
                self.weight(res.num_examples),
                client_id=client.cid,
                server_round=server_round,
            )
        arrays = mean.result()
        return (None if arrays is None else ndarrays_to_parameters(arrays)), self._fit_metrics(
            [(res.num_examples, res.metrics) for _, res in results]
        )

    def aggregate_evaluate(
        self,
        server_round: int,
        results: EvaluateResults,
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        if not self.accept_round(len(results), len(failures), "evaluate"):
            return None, {}
        loss = weighted_loss_avg([(res.num_examples, res.loss) for _, res in results])
        metrics: dict[str, Scalar] = {}
        if self.evaluate_metrics_aggregation_fn:
            metrics = self.evaluate_metrics_aggregation_fn(
                [(res.num_examples, res.metrics) for _, res in results]
            )
        return loss, metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        if self.evaluate_fn is None:
            return None
        result = self.evaluate_fn(server_round, parameters_to_ndarrays(parameters), {})
        if result is None:
            return None
        loss, metrics = result
        return loss, metrics

    def _fit_metrics(self, pairs: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
        if self.fit_metrics_aggregation_fn is None:
            return {}
        return self.fit_metrics_aggregation_fn(pairs)


def _own_aggregation(strategy: FedAvg) -> str | None:
    """The fit aggregation method a subclass of FedAvg replaced (``"aggregate_fit"``
    first: the engine then hands it the full list), or ``None``."""
    for name in ("aggregate_fit", "fit_aggregator"):
        if getattr(type(strategy), name) is not getattr(FedAvg, name):
            return name
    return None


class _StreamingFedAvg:
    """FedAvg's aggregator: one running weighted mean, O(model) memory."""

    def __init__(self, strategy: FedAvg, server_round: int, reference: NDArrays) -> None:
        self.strategy = strategy
        self.server_round = server_round
        self.mean = WeightedMean(reference, accumulator=strategy.accumulator)
        self.metrics: list[tuple[int, dict[str, Scalar]]] = []
        self.failures: list[Any] = []

    def add(self, client: ClientProxy, result: FitRes) -> None:
        if not isinstance(result, FitRes):
            raise InvalidUpdate(client.cid, self.server_round, "fit", "reply is not a FitRes")
        self.mean.add(
            parameters_to_ndarrays(result.parameters),
            self.strategy.weight(result.num_examples),
            client_id=client.cid,
            server_round=self.server_round,
            check=False,  # the engine validated the reply against the global model
        )
        self.metrics.append((result.num_examples, result.metrics))

    def add_mean(self, mean: NDArrays, clients: MeanClients) -> None:
        """Fold ``mean`` once, as the model of all of ``clients`` (id, num_examples,
        metrics); see :func:`~fedhive.server.strategy.base.fold_mean`."""
        self.mean.add(mean, 1.0, client_id="mean", server_round=self.server_round, check=False)
        self.metrics += [(num_examples, metrics) for _, num_examples, metrics in clients]

    def add_failure(self, failure: BaseException) -> None:
        self.failures.append(failure)

    def finalize(self) -> tuple[Parameters | None, dict[str, Scalar]]:
        if self.mean.count == 0 or not self.strategy.accept_round(
            len(self.metrics), len(self.failures), "fit"
        ):
            return None, {}
        arrays = self.mean.result()
        params = None if arrays is None else ndarrays_to_parameters(arrays)
        return params, self.strategy._fit_metrics(self.metrics)
