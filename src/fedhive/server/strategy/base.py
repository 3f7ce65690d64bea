"""The strategy interface and the streaming aggregation protocol.

A strategy decides who trains and on what (``configure_fit``), and how results become
the next model. Results stream in: each round the engine asks the strategy for an
:class:`Aggregator`, calls ``add`` for every result as it arrives and ``finalize`` once.
A strategy that overrides Flower's ``aggregate_fit`` gets a :class:`BufferingAggregator`,
which keeps every result (O(clients x model) memory) and hands the full list over.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias

from fedhive.common.records import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    RecordDict,
    Scalar,
    Status,
    ndarrays_to_parameters,
)
from fedhive.server.client_manager import ClientManager, ClientProxy
from fedhive.server.strategy.aggregate import weighted_loss_avg
from fedhive.server.strategy.traits import StrategyTraits

__all__ = [
    "Aggregator",
    "BufferingAggregator",
    "FitResults",
    "MeanClients",
    "EvaluateResults",
    "Strategy",
    "fold_mean",
    "weighted_loss_avg",
]

FitResults: TypeAlias = list[tuple[ClientProxy, FitRes]]
EvaluateResults: TypeAlias = list[tuple[ClientProxy, EvaluateRes]]
#: Clients whose model is one shared mean: (id, num_examples, metrics) each.
MeanClients: TypeAlias = Sequence[tuple[str, int, dict[str, Scalar]]]


class Aggregator(Protocol):
    """Folds one round's results as they arrive.

    Failures arrive as :class:`~fedhive.common.errors.ClientFailure` exceptions, which
    carry the client id, round, stage and reason.
    ``add`` may raise :class:`~fedhive.common.errors.InvalidUpdate` to refuse a result;
    it must then leave the aggregate unchanged. ``finalize`` returns what Flower's
    ``aggregate_fit``/``aggregate_evaluate`` return.
    """

    def add(self, client: ClientProxy, result: Any) -> None: ...

    def add_failure(self, failure: BaseException) -> None: ...

    def finalize(self) -> tuple[Any, dict[str, Scalar]]: ...


def fold_mean(aggregator: Aggregator, mean: NDArrays, clients: MeanClients) -> None:
    """Fold ``mean`` as the model of every one of ``clients`` (id, num_examples, metrics).

    An aggregator that takes a mean whole (``add_mean``: FedAvg, the mean rule, the DP
    aggregator) folds it once; any other gets it once per client, as that client's
    result (one shared array list, no copies). Secure aggregation, which reveals only
    the mean, and the DP wrappers, which hand their noisy mean on, use this.
    """
    add_mean = getattr(aggregator, "add_mean", None)
    if callable(add_mean):
        add_mean(mean, clients)
        return
    shared = ndarrays_to_parameters(mean)
    for cid, num_examples, metrics in clients:
        aggregator.add(ClientProxy(cid), FitRes(Status(), shared, num_examples, metrics))


class BufferingAggregator:
    """Keeps every result and calls ``aggregate(server_round, results, failures)`` at the end.

    Memory: O(clients x model) for fit results. Used for strategies that override
    ``aggregate_fit`` and for rules that need every update at once (median, Krum).
    """

    def __init__(
        self,
        server_round: int,
        aggregate: Callable[[int, list[Any], list[Any]], tuple[Any, dict[str, Scalar]]],
    ) -> None:
        self.server_round = server_round
        self._aggregate = aggregate
        self.results: list[tuple[ClientProxy, Any]] = []
        self.failures: list[Any] = []

    def add(self, client: ClientProxy, result: Any) -> None:
        self.results.append((client, result))

    def add_failure(self, failure: BaseException) -> None:
        self.failures.append(failure)

    def finalize(self) -> tuple[Any, dict[str, Scalar]]:
        return self._aggregate(self.server_round, self.results, self.failures)


class Strategy(ABC):
    """Flower's strategy interface, plus streaming aggregators and explicit state.

    Subclasses implement the six Flower methods. ``fit_aggregator`` and
    ``evaluate_aggregator`` default to buffering every result and calling the Flower
    methods; streaming strategies return an O(model) aggregator instead.
    ``state_dict``/``load_state_dict`` carry whatever the strategy keeps across rounds
    (server optimizer moments, control variates) into checkpoints.
    """

    @abstractmethod
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None: ...

    @abstractmethod
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]: ...

    @abstractmethod
    def aggregate_fit(
        self,
        server_round: int,
        results: FitResults,
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]: ...

    @abstractmethod
    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]: ...

    @abstractmethod
    def aggregate_evaluate(
        self,
        server_round: int,
        results: EvaluateResults,
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]: ...

    @abstractmethod
    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None: ...

    @property
    def traits(self) -> StrategyTraits:
        """What this strategy can be combined with (default: a buffering strategy whose
        aggregate is not known to be a weighted mean; see
        :mod:`fedhive.server.strategy.traits`)."""
        return StrategyTraits()

    def fit_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        """An aggregator for this round's fit results (default: buffer them all)."""
        return BufferingAggregator(server_round, self.aggregate_fit)

    def evaluate_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        """An aggregator for this round's evaluate results (default: buffer them all)."""
        return BufferingAggregator(server_round, self.aggregate_evaluate)

    def state_dict(self) -> RecordDict:
        """What this strategy keeps across rounds (empty for stateless strategies)."""
        return RecordDict()

    def load_state_dict(self, state: RecordDict) -> None:  # noqa: B027 - stateless default
        """Restore what :meth:`state_dict` returned."""
