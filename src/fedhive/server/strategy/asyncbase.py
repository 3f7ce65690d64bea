"""The shape FedBuff and FedAsync share: FedAvg's sampling, a staleness function, a ledger
of the versions clients train on, and the run policy that fits them.

An asynchronous strategy runs under buffered asynchronous aggregation
(``fedhive.server.asynchronous.BufferedAsync``: ``buffer_size`` results per model version,
``concurrency`` clients training, ``max_staleness``); the engine, ``start_simulation`` and
``start_server`` pick that policy for it when none is given
(``fedhive.server.policy.default_policy``).
Under synchronous rounds it still works: every result is then fresh (staleness 0).

Each result is folded against the model it was trained on (the ledger keeps that model
while a task on it is in flight), and its staleness is counted in versions this strategy
published since the task was sent.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedhive.common.errors import ClientFailure, ConfigError, InvalidUpdate
from fedhive.common.records import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from fedhive.server.client_manager import ClientManager, ClientProxy
from fedhive.server.strategy.base import EvaluateResults, FitResults, Strategy
from fedhive.server.strategy.fedavg import FedAvg
from fedhive.server.strategy.staleness import StalenessFunction, VersionLedger
from fedhive.server.strategy.traits import StrategyTraits

__all__ = ["AsynchronousStrategy", "check_count"]


def check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


#: What secure aggregation and central DP are told about an asynchronous strategy.
ASYNC_REASON = (
    "it weighs each update by its own staleness against the model that client trained "
    "on, so it needs every update on its own (secure aggregation reveals only their sum)"
)


class AsynchronousStrategy(Strategy):
    """FedAvg's sampling and evaluation, a staleness function and a version ledger.

    Subclasses build the fit aggregator. ``max_staleness`` (optional) refuses results
    more than that many versions old.
    """

    #: Whether :meth:`state_dict` keeps a buffer that is not yet published, so that the
    #: policy may checkpoint mid-version (``BufferedAsync(checkpoint_every=...)``).
    checkpoints_open_buffer: ClassVar[bool] = False

    def __init__(
        self,
        *,
        sampling: FedAvg,
        buffer_size: int,
        concurrency: int,
        staleness: StalenessFunction,
        max_staleness: int | None,
    ) -> None:
        if not isinstance(sampling, FedAvg):
            raise ConfigError(f"sampling must be a FedAvg, got {type(sampling).__name__}")
        self.sampling = sampling
        self.buffer_size = check_count("buffer_size", buffer_size, 1)
        self.concurrency = check_count("concurrency", concurrency, 1)
        if not isinstance(staleness, StalenessFunction):
            raise ConfigError(
                f"staleness must be a StalenessFunction, got {type(staleness).__name__}"
            )
        self.staleness_fn = staleness
        #: The staleness function's name and parameters (as in the constructor).
        self.staleness = staleness.kind
        self.staleness_exponent = staleness.exponent
        self.staleness_hinge = staleness.hinge_at
        if max_staleness is not None:
            check_count("max_staleness", max_staleness, 0)
        self.max_staleness = max_staleness
        self.ledger = VersionLedger()
        self._published: Parameters | None = None
        #: The last dispatch's task content: reused while the model and config are the
        #: same, so a version's tasks share one content (and its sizing), as a round's do.
        self._content: FitIns | None = None

    @property
    def traits(self) -> StrategyTraits:
        """Individual updates, no weighted mean (each update has its own staleness
        weight and base model), and results trained on older versions may be folded."""
        return StrategyTraits(
            weighted_mean=False,
            individual_updates=True,
            tolerates_staleness=True,
            reason=ASYNC_REASON,
        )

    # -- sampling and evaluation are FedAvg's ------------------------------------------------

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.sampling.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        if parameters is not self._published:
            # A model this strategy did not publish (the initial one, or one restored
            # from a checkpoint): it is the current version.
            self.ledger.current = parameters_to_ndarrays(parameters)
            self._published = parameters
        instructions = self.sampling.configure_fit(server_round, parameters, client_manager)
        instructions = [(client, self._shared(ins)) for client, ins in instructions]
        current = self.ledger.current
        if current is None:  # pragma: no cover - set just above
            raise ConfigError("no current model")
        for client, _ in instructions:
            self.ledger.dispatched(client.cid, current)
        return instructions

    def _shared(self, ins: FitIns) -> FitIns:
        """``ins``, or the previous dispatch's content when that is equal to it (the
        same parameters object, an equal config, no extras): dispatches of one version then
        send one content object, sized and encoded once."""
        last = self._content
        if (
            last is not None
            and type(ins) is FitIns
            and ins.parameters is last.parameters
            and ins.config == last.config
            and ins.extras.is_empty()
            and last.extras.is_empty()
        ):
            return last
        self._content = ins
        return ins

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.sampling.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: EvaluateResults,
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return self.sampling.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return self.sampling.evaluate(server_round, parameters)

    def aggregate_fit(
        self,
        server_round: int,
        results: FitResults,
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Flower's list API: fold ``results`` in order into this version's aggregator."""
        if self._published is None:
            raise ConfigError(
                f"{type(self).__name__}.aggregate_fit needs the current model: call "
                "configure_fit first (the engine uses fit_aggregator instead)"
            )
        aggregator = self.fit_aggregator(server_round, self._published)
        for failure in failures:
            aggregator.add_failure(failure)  # type: ignore[arg-type]
        for client, res in results:
            aggregator.add(client, res)
        result: tuple[Parameters | None, dict[str, Scalar]] = aggregator.finalize()
        return result

    # -- what the aggregators share ------------------------------------------------------------

    def arrived(self, client: ClientProxy, server_round: int) -> tuple[int, float, Any]:
        """(staleness, staleness weight, base model arrays) of ``client``'s result, or
        :class:`InvalidUpdate` when no task is on record or it is too stale."""
        found = self.ledger.arrived(client.cid)
        if found is None:
            raise InvalidUpdate(
                client.cid,
                server_round,
                "fit",
                "no fit task of this strategy is on record for this client (a result from "
                "before a restart, or a duplicate); refused",
            )
        _, staleness, base = found
        limit = self.max_staleness
        if limit is not None and staleness > limit:
            raise InvalidUpdate(
                client.cid,
                server_round,
                "fit",
                f"staleness {staleness} exceeds max_staleness {limit}",
            )
        return staleness, self.staleness_fn(staleness), base

    def failed(self, failure: BaseException) -> None:
        """A task failed: its client's note in the ledger goes."""
        if isinstance(failure, ClientFailure):
            self.ledger.forget(failure.client_id)

    def published(self, parameters: Parameters) -> Parameters:
        """Note a new model version (the aggregator's result)."""
        self.ledger.install(parameters_to_ndarrays(parameters))
        self._published = parameters
        return parameters

    def fit_metrics(self, pairs: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
        fn = self.sampling.fit_metrics_aggregation_fn
        return {} if fn is None else dict(fn(pairs))
