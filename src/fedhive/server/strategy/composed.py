"""Strategies built from parts: sampling, an aggregation rule and a server optimizer.

:class:`ComposedStrategy` is the one concrete shape behind FedAvgM, FedProx, FedAdam,
FedYogi, FedAdagrad, QFedAvg, FedNova, the robust rules and SCAFFOLD. Each round:

1. **sampling** (a :class:`~fedhive.server.strategy.fedavg.FedAvg` instance, used for its
   client selection, configs, evaluation and metrics) picks clients and writes the
   :class:`~fedhive.common.records.FitIns`; ``fit_config`` entries are added to every
   client's config (FedProx's ``"proximal_mu"``);
2. the **rule** folds the replies into an aggregate model: a streaming weighted mean
   (O(model) memory) or a buffering robust rule (O(clients x model), see ``robust.py``);
3. the **server optimizer** (if any) moves the global model ``x`` along the
   pseudo-gradient ``aggregate - x`` (SGD with momentum, Adam, Yogi, Adagrad); without
   one the aggregate is the next model.

Example, Krum selection followed by server-side Adam::

    from fedhive.server.strategy import ComposedStrategy, FedAvg
    from fedhive.server.strategy.optimizers import Adaptive
    from fedhive.server.strategy.robust import KrumRule

    strategy = ComposedStrategy(
        sampling=FedAvg(min_fit_clients=10, min_available_clients=10),
        rule=KrumRule(num_malicious_clients=2),
        server_optimizer=Adaptive("adam", eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3),
    )
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

import numpy as np

from fedhive.common.errors import ConfigError, InvalidUpdate, SerdeError
from fedhive.common.records import (
    Config,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArray,
    NDArrays,
    Parameters,
    RecordDict,
    Scalar,
    Status,
    check_scalar_mapping,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.server.client_manager import ClientManager, ClientProxy
from fedhive.server.strategy.aggregate import WeightedMean, check_accumulator, check_update
from fedhive.server.strategy.base import (
    Aggregator,
    BufferingAggregator,
    EvaluateResults,
    FitResults,
    Strategy,
)
from fedhive.server.strategy.fedavg import EvaluateFn, FedAvg, MetricsAggregationFn
from fedhive.server.strategy.optimizers import ServerOptimizer
from fedhive.server.strategy.traits import (
    MEAN_TRAITS,
    StrategyTraits,
    legacy_traits,
    traits_of,
)

__all__ = [
    "FEDAVG_OPTIONS",
    "AggregationRule",
    "ComposedStrategy",
    "FedAvgArgs",
    "Fold",
    "MeanRule",
    "cast_like",
    "client_id",
    "overrides",
    "plain_mean",
    "rule_traits",
]


class FedAvgArgs(TypedDict, total=False):
    """FedAvg's keyword arguments, which every composed strategy accepts and passes on."""

    fraction_fit: float
    fraction_evaluate: float
    min_fit_clients: int
    min_evaluate_clients: int
    min_available_clients: int
    evaluate_fn: EvaluateFn | None
    on_fit_config_fn: Callable[[int], Config] | None
    on_evaluate_config_fn: Callable[[int], Config] | None
    accept_failures: bool
    initial_parameters: Parameters | None
    fit_metrics_aggregation_fn: MetricsAggregationFn | None
    evaluate_metrics_aggregation_fn: MetricsAggregationFn | None
    inplace: bool
    max_num_examples: int | None


class Fold(Protocol):
    """One round of an aggregation rule.

    ``add`` receives a reply already checked against the global model (count, shapes,
    finite values). It may raise :class:`InvalidUpdate` (a missing metric, say) and must
    then leave the fold unchanged. ``result`` returns the aggregate model (any float
    dtype; it is cast to the model's dtypes later) or ``None`` when there is none.
    """

    def add(self, client_id: str, arrays: NDArrays, result: FitRes) -> None: ...

    def result(self) -> NDArrays | None: ...


class AggregationRule(Protocol):
    """Starts a :class:`Fold` for a round; ``weight`` maps ``num_examples`` to a weight.

    A rule also declares its ``traits`` (a
    :class:`~fedhive.server.strategy.traits.StrategyTraits`), which the composed strategy
    takes as its own (see :func:`rule_traits`); a rule that declares none is treated as
    one that needs individual updates and is not a weighted mean.
    """

    def start(
        self, server_round: int, reference: NDArrays, weight: Callable[[int], float]
    ) -> Fold: ...


def cast_like(arrays: Sequence[NDArray], reference: Sequence[NDArray]) -> NDArrays:
    """Float layers back to the model's dtype; integer and bool layers stay float64.

    The same rule as :class:`~fedhive.server.strategy.aggregate.WeightedMean`.
    """
    out = []
    for arr, ref in zip(arrays, reference, strict=True):
        dtype = ref.dtype if ref.dtype.kind == "f" else np.float64
        out.append(np.asarray(arr).astype(dtype, copy=False))
    return out


def rule_traits(rule: object) -> StrategyTraits:
    """The traits ``rule`` declares (its ``traits`` attribute, with the flags that predate
    traits applied); a rule that declares none gets a buffering strategy's traits."""
    traits = getattr(rule, "traits", None)
    if not isinstance(traits, StrategyTraits):
        traits = StrategyTraits(
            reason=f"its aggregation rule {type(rule).__name__} declares no traits (give it "
            "a `traits` attribute, a fedhive.server.strategy.traits.StrategyTraits)"
        )
    return legacy_traits(rule, traits)


class MeanRule:
    """Weighted mean of the models, weights ``num_examples`` (FedAvg's rule).

    Its traits are :data:`~fedhive.server.strategy.traits.MEAN_TRAITS` (a subclass that
    changes :meth:`start` declares its own).

    Memory: O(model): the accumulator of :class:`WeightedMean` plus a small scratch buffer.
    ``accumulator`` is :class:`WeightedMean`'s (``"float64"``, or ``"model"`` to keep
    float32 layers' accumulator in float32, as ``FedAvg.accumulator``); it may be changed
    between rounds.
    """

    traits: StrategyTraits = MEAN_TRAITS

    def __init__(self, accumulator: str = "float64") -> None:
        self.accumulator = check_accumulator(accumulator)

    def __repr__(self) -> str:
        return "MeanRule()" if self.accumulator == "float64" else f"MeanRule({self.accumulator!r})"

    def start(self, server_round: int, reference: NDArrays, weight: Callable[[int], float]) -> Fold:
        return _MeanFold(server_round, reference, weight, self.accumulator)


class _MeanFold:
    def __init__(
        self,
        server_round: int,
        reference: NDArrays,
        weight: Callable[[int], float],
        accumulator: str = "float64",
    ) -> None:
        self.server_round = server_round
        self.mean = WeightedMean(reference, accumulator=accumulator)
        self.weight = weight

    def add(self, client_id: str, arrays: NDArrays, result: FitRes) -> None:
        self.mean.add(
            arrays,
            self.weight(result.num_examples),
            client_id=client_id,
            server_round=self.server_round,
            check=False,
        )

    def result(self) -> NDArrays | None:
        return self.mean.result()


def plain_mean(strategy: Strategy) -> FedAvg | MeanRule | None:
    """The part of ``strategy`` whose fit aggregate is the plain weighted mean of the
    models (its ``accumulator`` chooses the mean's precision), or ``None``.

    Asks the traits: ``None`` unless ``strategy`` declares a weighted mean. Then the part
    is FedAvg itself, or the :class:`MeanRule` of a composed strategy (FedProx, FedAvgM,
    FedAdam, ...). SCAFFOLD (whose aggregate also carries control variates), a FedAvg
    subclass with its own ``aggregate_fit`` and the robust and reweighting rules declare
    no weighted mean. A user strategy that declares one but keeps no accumulator gives
    ``None`` too.
    """
    if not isinstance(strategy, Strategy) or not traits_of(strategy).weighted_mean:
        return None
    if isinstance(strategy, ComposedStrategy):
        return strategy.rule if isinstance(strategy.rule, MeanRule) else None
    return strategy if isinstance(strategy, FedAvg) else None


#: FedAvg's options; on a composed strategy they are its sampling part's (read and written).
FEDAVG_OPTIONS = frozenset(FedAvgArgs.__annotations__)


def client_id(client: ClientProxy) -> str:
    """``client.cid`` as a string (test doubles such as ``MagicMock()`` carry other ids)."""
    cid = getattr(client, "cid", None)
    return cid if isinstance(cid, str) else str(cid)


def overrides(strategy: object, base: type, name: str) -> bool:
    """Whether ``type(strategy)`` replaces ``base``'s method ``name`` (a user's subclass)."""
    return getattr(type(strategy), name, None) is not getattr(base, name)


class ComposedStrategy(FedAvg):
    """A strategy made of sampling, an aggregation rule and an optional server optimizer.

    ``sampling`` is a :class:`FedAvg` used for everything but fit aggregation: client
    selection, fit/evaluate configs, ``accept_failures``, example weights
    (``max_num_examples``), centralized evaluation and metrics aggregation. A composed
    strategy is a :class:`FedAvg` itself (Flower code checks ``isinstance(s, FedAvg)`` and
    calls ``super().configure_fit``): FedAvg's options (``fraction_fit``,
    ``initial_parameters``, ...) read and write the sampling's, so
    ``strategy.fraction_fit`` and ``strategy.sampling.fraction_fit`` are one value, and
    FedAvg's methods (``num_fit_clients``, ``configure_fit``, ``evaluate``, ...) run on the
    composed strategy, so a subclass that overrides one of them is obeyed. A ``sampling``
    whose class overrides one of FedAvg's methods keeps its own.

    ``fit_config`` entries are added to every fit config after ``on_fit_config_fn`` has
    run (so they win); the caller's dicts are never modified.

    A subclass that overrides Flower's ``aggregate_fit`` receives the full list of results
    (O(clients x model) memory) and its traits are a buffering strategy's, as with FedAvg;
    ``super().aggregate_fit(...)`` then runs the composition on that list.
    ``aggregate_fit`` may also be called directly, as Flower's tests do: it starts from
    the model last given to ``configure_fit``, else from ``initial_parameters``, else
    (for rules that need no global model) from nothing; each call moves that model on.

    State (:meth:`state_dict`) is the server optimizer's; stateless without one.

    Its :attr:`traits` are the rule's: a server optimizer stepping on the mean is
    post-processing, so FedAdam is still a weighted mean for secure aggregation and
    differential privacy.
    """

    #: Kept for compatibility. The engine checks every reply against the layout in
    #: ``traits`` (:func:`~fedhive.server.strategy.aggregate.check_fit_reply`) before the
    #: rule sees it, whatever this says; False only makes each round check them again.
    validate_fit_results = True

    def __init__(
        self,
        *,
        sampling: FedAvg,
        rule: AggregationRule,
        server_optimizer: ServerOptimizer | None = None,
        fit_config: Mapping[str, Scalar] | None = None,
    ) -> None:
        if not isinstance(sampling, FedAvg):
            raise ConfigError(f"sampling must be a FedAvg, got {type(sampling).__name__}")
        self.sampling = sampling
        self.rule = rule
        self.server_optimizer = server_optimizer
        try:
            self.fit_config = check_scalar_mapping(fit_config or {}, "fit_config")
        except SerdeError as exc:
            raise ConfigError(str(exc)) from exc
        self._current: Parameters | None = None

    if not TYPE_CHECKING:  # FedAvg's annotations type these attributes for mypy

        def __getattr__(self, name: str) -> Any:
            sampling = self.__dict__.get("sampling")
            if name in FEDAVG_OPTIONS and sampling is not None:
                return getattr(sampling, name)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in FEDAVG_OPTIONS and "sampling" in self.__dict__:
            setattr(self.sampling, name, value)
        else:
            super().__setattr__(name, value)

    def __repr__(self) -> str:
        parts = [f"rule={self.rule!r}"]
        if self.server_optimizer is not None:
            parts.append(f"server_optimizer={self.server_optimizer!r}")
        if self.fit_config:
            parts.append(f"fit_config={self.fit_config!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    @property
    def traits(self) -> StrategyTraits:
        """The rule's traits (:func:`rule_traits`); those of a buffering strategy whose
        aggregate is not known when a subclass aggregates its own way (overrides
        ``aggregate_fit`` or ``fit_aggregator``; one that does and still averages declares
        ``traits = MEAN_TRAITS``, one that builds its own aggregator declares its own
        traits, as SCAFFOLD does)."""
        own = self._own_aggregation()
        if own is not None:
            what = (
                "builds its own fit aggregator" if own == "fit_aggregator" else f"overrides {own}"
            )
            return StrategyTraits(
                reason=f"{type(self).__name__} {what}, so its aggregate is not known to be "
                "a weighted mean (if it is, declare traits = MEAN_TRAITS in its class)"
            )
        return rule_traits(self.rule)

    def _own_aggregation(self) -> str | None:
        for name in ("aggregate_fit", "fit_aggregator"):
            if overrides(self, ComposedStrategy, name):
                return name
        return None

    # -- FedAvg's part: the sampling's own methods if its class replaced FedAvg's ---------

    def _sampling_method(self, name: str) -> Callable[..., Any]:
        if overrides(self.sampling, FedAvg, name):
            return cast(Callable[..., Any], getattr(self.sampling, name))
        return functools.partial(getattr(FedAvg, name), self)

    def num_fit_clients(self, num_available_clients: int) -> tuple[int, int]:
        return cast(
            tuple[int, int], self._sampling_method("num_fit_clients")(num_available_clients)
        )

    def num_evaluation_clients(self, num_available_clients: int) -> tuple[int, int]:
        method = self._sampling_method("num_evaluation_clients")
        return cast(tuple[int, int], method(num_available_clients))

    def weight(self, num_examples: int) -> int:
        return cast(int, self._sampling_method("weight")(num_examples))

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        initial = self._sampling_method("initialize_parameters")(client_manager)
        if self._current is None:
            self._current = initial
        return cast("Parameters | None", initial)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._current = parameters
        method = self._sampling_method("configure_fit")
        instructions: list[tuple[ClientProxy, FitIns]] = method(
            server_round, parameters, client_manager
        )
        if not self.fit_config:
            return instructions
        return [
            (client, FitIns(ins.parameters, {**ins.config, **self.fit_config}, ins.extras))
            for client, ins in instructions
        ]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        method = self._sampling_method("configure_evaluate")
        return cast(
            list[tuple[ClientProxy, EvaluateIns]], method(server_round, parameters, client_manager)
        )

    def aggregate_evaluate(
        self,
        server_round: int,
        results: EvaluateResults,
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        method = self._sampling_method("aggregate_evaluate")
        return cast(tuple[float | None, dict[str, Scalar]], method(server_round, results, failures))

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        method = self._sampling_method("evaluate")
        return cast("tuple[float, dict[str, Scalar]] | None", method(server_round, parameters))

    # -- fit aggregation ------------------------------------------------------------------

    def fit_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        if overrides(self, ComposedStrategy, "aggregate_fit"):
            # Flower's list API: the override gets every result; super().aggregate_fit
            # starts from this round's model.
            self._current = parameters
            return BufferingAggregator(server_round, self.aggregate_fit)
        return self.round_aggregator(server_round, parameters, check=not self.validate_fit_results)

    def round_aggregator(
        self, server_round: int, parameters: Parameters, *, check: bool
    ) -> Aggregator:
        """This round's aggregator; ``check``: validate each reply here, because nobody
        did before (Flower's list-based :meth:`aggregate_fit`; the engine checks replies
        against the traits' layout itself)."""
        reference = parameters_to_ndarrays(parameters)
        return ComposedRound(self, server_round, reference, check=check)

    def aggregate_fit(
        self,
        server_round: int,
        results: FitResults,
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Flower's list-based call (O(clients x model) memory).

        The global model is the one last given to :meth:`configure_fit` (or returned by
        the previous call), else ``initial_parameters``; without either, a rule with no
        server optimizer starts from the first result's layout (the robust rules need no
        global model), and one with a server optimizer is refused.
        """
        if not results:
            return None, {}
        current = self._current if self._current is not None else self.initial_parameters
        if current is None:
            if self.server_optimizer is not None:
                raise ConfigError(
                    f"{type(self).__name__} needs the global model to step its server "
                    "optimizer: pass initial_parameters (or call configure_fit first)"
                )
            current = results[0][1].parameters
        aggregator = self.round_aggregator(server_round, current, check=True)
        for client, res in results:
            aggregator.add(client, res)
        for failure in failures:
            aggregator.add_failure(failure)  # type: ignore[arg-type]
        params, metrics = aggregator.finalize()
        if params is not None:
            self._current = params  # as Flower's current_weights: the next call starts here
        return params, metrics

    def apply(self, reference: NDArrays, aggregate: NDArrays) -> NDArrays:
        """The next global model from the current one and this round's aggregate."""
        if self.server_optimizer is None:
            return cast_like(aggregate, reference)
        delta = [
            np.asarray(a, dtype=np.float64) - np.asarray(x, dtype=np.float64)
            for a, x in zip(aggregate, reference, strict=True)
        ]
        return cast_like(self.server_optimizer.step(reference, delta), reference)

    def state_dict(self) -> RecordDict:
        if self.server_optimizer is None:
            return RecordDict()
        return self.server_optimizer.state_dict()

    def load_state_dict(self, state: RecordDict) -> None:
        if self.server_optimizer is not None:
            self.server_optimizer.load_state_dict(state)


class ComposedRound:
    """The aggregator of one round of a :class:`ComposedStrategy`.

    With ``check=True`` every reply is validated here (the engine did not).
    """

    def __init__(
        self, strategy: ComposedStrategy, server_round: int, reference: NDArrays, *, check: bool
    ) -> None:
        self.strategy = strategy
        self.server_round = server_round
        self.reference = reference
        self.check = check
        self.fold = strategy.rule.start(server_round, reference, strategy.weight)
        self.metrics: list[tuple[int, dict[str, Scalar]]] = []
        self.failures: list[Any] = []

    def add(self, client: ClientProxy, result: FitRes) -> None:
        if not isinstance(result, FitRes):
            raise InvalidUpdate(
                client_id(client), self.server_round, "fit", "reply is not a FitRes"
            )
        self.add_arrays(client_id(client), parameters_to_ndarrays(result.parameters), result)

    def add_arrays(self, client_id: str, arrays: NDArrays, result: FitRes) -> None:
        """Fold a model (already split from any extra arrays the reply carried)."""
        if self.check:
            check_update(
                arrays, self.reference, client_id=client_id, server_round=self.server_round
            )
        self.fold.add(client_id, arrays, result)
        self.metrics.append((result.num_examples, result.metrics))

    def add_mean(
        self, mean: NDArrays, clients: Sequence[tuple[str, int, dict[str, Scalar]]]
    ) -> None:
        """Fold ``mean`` as the model of all of ``clients`` (id, num_examples, metrics):
        once for a rule whose traits declare a weighted mean (the mean of one mean is
        itself), once per client for any other rule; see
        :func:`~fedhive.server.strategy.base.fold_mean`."""
        if rule_traits(self.strategy.rule).weighted_mean:
            self.fold.add("mean", mean, FitRes(Status(), Parameters(arrays=[]), 1, {}))
            self.metrics += [(num_examples, metrics) for _, num_examples, metrics in clients]
            return
        for cid, num_examples, metrics in clients:
            self.add_arrays(
                cid, mean, FitRes(Status(), Parameters(arrays=[]), num_examples, metrics)
            )

    def add_failure(self, failure: BaseException) -> None:
        self.failures.append(failure)

    def finalize(self) -> tuple[Parameters | None, dict[str, Scalar]]:
        strategy = self.strategy
        if not strategy.accept_round(len(self.metrics), len(self.failures), "fit"):
            return None, {}
        aggregate = self.fold.result()
        if aggregate is None:
            return None, {}
        new = self.strategy.apply(self.reference, aggregate)
        metrics: dict[str, Scalar] = {}
        if strategy.fit_metrics_aggregation_fn is not None:
            metrics = strategy.fit_metrics_aggregation_fn(self.metrics)
        return ndarrays_to_parameters(new), metrics
