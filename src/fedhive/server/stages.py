"""A fit round as a pipeline of stages.

::

    exchange stage  ->  reply stages (each update, in order)  ->  strategy's aggregator
    (sends the fit       (decode a compressed payload, ...)       wrapped by aggregate stages
     tasks: plain,                                                (noise on the mean, ...)
     or SecAgg+)

What flows between stages has a *kind*: ``"updates"`` (each client's update on its own,
a :class:`~fedhive.common.records.FitRes`), ``"encoded"`` (each client's update as an
encoded payload) or ``"mean"`` (only the weighted mean of the updates, what secure
aggregation reveals). Each stage declares the kinds it consumes and the kind it
produces; the strategy's traits say what its aggregator consumes (``"updates"`` only when
it needs individual updates; ``"updates"`` or ``"mean"`` when its aggregate is a weighted
mean). :class:`FitPipeline` checks the chain when the engine is built, so an impossible
combination (Krum behind secure aggregation, a decoder after a stage that revealed only
the mean) is a :class:`~fedhive.common.errors.ConfigError` before anything runs.

Example: a stage that records the norm of every update, after secure aggregation is
refused (it needs updates, SecAgg+ reveals only the mean)::

    from fedhive.server import Engine
    from fedhive.server.stages import ReplyStage

    class Norms(ReplyStage):
        name = "norms"
        consumes = frozenset({"updates"})

        def transform(self, driver, client_id, result):
            ...  # look at result.parameters
            return result
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from fedhive.common.errors import CheckpointError, ClientFailure, ConfigError, InvalidUpdate
from fedhive.common.message import Message, MessageType
from fedhive.common.records import (
    FitIns,
    FitRes,
    NDArrays,
    RecordDict,
    parameters_to_ndarrays,
)
from fedhive.server.client_manager import ClientProxy
from fedhive.server.strategy.aggregate import check_fit_reply
from fedhive.server.strategy.base import Aggregator, MeanClients, Strategy, fold_mean
from fedhive.server.strategy.traits import StrategyTraits, traits_of
from fedhive.transport.codec import MAX_NUM_EXAMPLES

if TYPE_CHECKING:
    from fedhive.server.engine import RoundDriver

__all__ = [
    "ENCODED",
    "MEAN",
    "UPDATES",
    "AggregateStage",
    "ExchangeStage",
    "FitPipeline",
    "FitSink",
    "PlainExchange",
    "ReplyStage",
    "RoundAborted",
    "RoundStage",
    "build_pipeline",
    "fold_fit_reply",
    "strategy_consumes",
]

UPDATES = "updates"
ENCODED = "encoded"
MEAN = "mean"


class RoundStage(ABC):  # noqa: B024 - the three kinds below are the abstract ones
    """One stage of a fit round: a ``name`` (for errors and records), the kinds it
    ``consumes`` and the kind it ``produces`` (``None``: the kind it was given)."""

    name: ClassVar[str] = "stage"
    consumes: ClassVar[frozenset[str]] = frozenset({UPDATES, MEAN})
    produces: ClassVar[str | None] = None

    def instruct(
        self, driver: RoundDriver, instructions: list[tuple[ClientProxy, FitIns]]
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The fit instructions as this stage wants them sent (default: unchanged); runs
        before the exchange, in stage order (a codec asks for encoded replies here)."""
        return instructions

    @property
    def asynchronous_reason(self) -> str:
        """Why this stage cannot run under the asynchronous policy ("" when it can)."""
        return ""

    def in_flight(self, client_ids: set[str]) -> None:  # noqa: B027 - optional hook
        """The asynchronous policy, before it dispatches: only ``client_ids`` still have
        a task out (what a stage noted for any other client at :meth:`instruct` can go)."""

    def state_dict(self) -> RecordDict:
        """What this stage carries from round to round, saved in checkpoints (default:
        nothing; a server-side error-feedback residual, say)."""
        return RecordDict()

    def load_state_dict(self, state: RecordDict) -> None:
        """Restore what :meth:`state_dict` returned (on resume)."""
        if state.array_records or state.config_records or state.metric_records:
            raise CheckpointError(f"the {self.name} stage keeps no state, the checkpoint has some")


class RoundAborted(Exception):
    """Raised by an exchange stage that cannot finish its round; the model is kept and
    the reason goes into the round record."""


class ExchangeStage(RoundStage):
    """Sends the round's fit tasks and hands what comes back to a :class:`FitSink`.

    At most one per pipeline, and first. It consumes nothing (kinds are about replies).
    ``results`` names its results in the note of a round with too few of them.
    """

    consumes: ClassVar[frozenset[str]] = frozenset()
    produces: ClassVar[str | None] = UPDATES
    results: ClassVar[str] = "successful fit results"

    @abstractmethod
    def run_exchange(
        self, driver: RoundDriver, instructions: list[tuple[ClientProxy, FitIns]], sink: FitSink
    ) -> None:
        """Exchange messages with the clients; feed results and failures to ``sink``."""

    def check(self, strategy: Strategy) -> None:
        """Raise :class:`ConfigError` if this exchange cannot serve ``strategy``."""

    #: Whether this exchange encodes updates itself (:meth:`attach_codec`), so that no
    #: decoding stage follows it: SecAgg+ encodes before masking and decodes the sum.
    encodes_updates: ClassVar[bool] = False

    def attach_codec(self, codec: Any) -> None:
        """Encode each update with ``codec`` inside the exchange (only where
        :attr:`encodes_updates`); raise :class:`ConfigError` for a codec it cannot carry."""
        raise ConfigError(f"the {self.name} exchange does not encode updates")


class ReplyStage(RoundStage):
    """Transforms each successful fit result before it is validated and folded.

    ``transform`` may raise :class:`~fedhive.common.errors.InvalidUpdate`: that client's
    result is then refused (a failure with its reason) and the aggregate is untouched.
    It sees each update, so it consumes individual updates (or encoded ones, if it says
    so); after an exchange that reveals only the mean there is nothing for it to see.
    """

    consumes: ClassVar[frozenset[str]] = frozenset({UPDATES})

    @abstractmethod
    def transform(self, driver: RoundDriver, client_id: str, result: FitRes) -> FitRes: ...


class AggregateStage(RoundStage):
    """Wraps the strategy's aggregator (what it folds in, what ``finalize`` returns)."""

    @abstractmethod
    def wrap(self, driver: RoundDriver, aggregator: Aggregator) -> Aggregator: ...


def strategy_consumes(strategy: Strategy) -> frozenset[str]:
    """The kinds the strategy's aggregator can fold, from its traits."""
    traits = traits_of(strategy)
    if traits.weighted_mean and not traits.individual_updates:
        return frozenset({UPDATES, MEAN})
    return frozenset({UPDATES})


def fold_fit_reply(
    driver: RoundDriver,
    reply: Message,
    aggregator: Any,
    reference: list[Any],
    traits: StrategyTraits | None = None,
) -> ClientFailure | None:
    """Validate one fit reply against the update layout the strategy declared (its
    ``traits``, looked up when not given) and fold it into ``aggregator``; the failure if
    it was refused (the aggregate is then unchanged)."""
    rnd = driver.server_round
    cid = reply.metadata.node_id
    if reply.error is not None:
        return ClientFailure(cid, rnd, MessageType.FIT, reply.error)
    res = reply.content
    if not isinstance(res, FitRes):
        return InvalidUpdate(cid, rnd, MessageType.FIT, "fit reply is not a FitRes")
    if traits is None:
        traits = traits_of(driver.strategy)
    try:
        # The layout the strategy declared, not the model's: extras, partial models.
        check_fit_reply(
            res,
            reference,
            traits.layout,
            client_id=cid,
            server_round=rnd,
            required_mods=traits.required_mods,
        )
        _check_num_examples(res.num_examples, cid, rnd)
        aggregator.add(ClientProxy(cid), res)
    except InvalidUpdate as exc:
        return exc.with_traceback(None)  # its frames would keep the refused upload alive
    except Exception as exc:  # whatever one reply holds, it is that client's failure
        return unfoldable(cid, rnd, MessageType.FIT, exc)
    return None


def unfoldable(client_id: str, server_round: int, stage: str, exc: Exception) -> InvalidUpdate:
    """The failure of a reply whose validation or fold raised ``exc`` (the aggregators
    validate before they change anything, so the aggregate holds none of it)."""
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > 300:
        text = text[:300] + "..."
    return InvalidUpdate(client_id, server_round, stage, f"its reply could not be folded ({text})")


def _check_num_examples(value: object, client_id: str, server_round: int) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0 <= value <= MAX_NUM_EXAMPLES:  # type: ignore[operator]
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise InvalidUpdate(
            client_id, server_round, MessageType.FIT,
            f"num_examples must be a number in [0, 2**53], got {shown}",
        )  # fmt: skip


class FitSink:
    """Where an exchange stage puts what it got: each reply passes the reply stages, is
    validated against the strategy's update layout and folded; or a revealed mean is
    folded whole (:func:`~fedhive.server.strategy.base.fold_mean`). Counts results and
    keeps failures for the round record."""

    def __init__(
        self,
        driver: RoundDriver,
        aggregator: Aggregator,
        reply_stages: Sequence[ReplyStage],
        fit: dict[str, Any],
    ) -> None:
        self.driver = driver
        self.aggregator = aggregator
        self.reply_stages = tuple(reply_stages)
        self.fit = fit
        self.failures: list[ClientFailure] = []
        self.reference = parameters_to_ndarrays(driver.engine.parameters)
        self.traits = traits_of(driver.engine.strategy)  # once per round, not per reply

    def add_reply(self, reply: Message) -> bool:
        """Validate and fold one fit reply; ``False`` (and a failure kept) if refused."""
        if reply.error is None and self.reply_stages and isinstance(reply.content, FitRes):
            reply = self._through_stages(reply)
        failure = fold_fit_reply(self.driver, reply, self.aggregator, self.reference, self.traits)
        del reply  # folded: free the upload before the next one is awaited
        if failure is None:
            self.fit["num_results"] += 1
            return True
        self.add_failure(failure)
        return False

    def _through_stages(self, reply: Message) -> Message:
        result: FitRes = reply.content
        cid = reply.metadata.node_id
        for stage in self.reply_stages:
            try:
                result = stage.transform(self.driver, cid, result)
            except InvalidUpdate as exc:
                return reply.error_reply(f"{stage.name}: {exc.reason}")
        return Message(reply.metadata, result, None)

    def add_mean(self, mean: NDArrays, clients: MeanClients) -> None:
        """Fold ``mean`` as the model of every one of ``clients`` (id, num_examples, metrics)."""
        fold_mean(self.aggregator, mean, clients)
        self.fit["num_results"] += len(clients)

    def add_failure(self, failure: ClientFailure) -> None:
        self.failures.append(failure)
        self.aggregator.add_failure(failure)


class PlainExchange(ExchangeStage):
    """Flower's fit exchange: one task per client, results streamed into the sink."""

    name = "fit"

    def run_exchange(
        self, driver: RoundDriver, instructions: list[tuple[ClientProxy, FitIns]], sink: FitSink
    ) -> None:
        for reply in driver.exchange(MessageType.FIT, instructions):
            sink.add_reply(reply)
            del reply

    def __repr__(self) -> str:
        return "PlainExchange()"


class FitPipeline:
    """An ordered, checked chain of fit-round stages (see the module docstring).

    ``stages`` holds at most one :class:`ExchangeStage` (first; default
    :class:`PlainExchange`), then :class:`ReplyStage` and :class:`AggregateStage`
    instances in the order they apply (reply stages before aggregate stages, since
    replies are folded before the aggregate exists).
    """

    def __init__(self, stages: Sequence[RoundStage] = ()) -> None:
        stages = list(stages)
        for stage in stages:
            if not isinstance(stage, ExchangeStage | ReplyStage | AggregateStage):
                raise ConfigError(
                    f"a round stage must be an ExchangeStage, ReplyStage or AggregateStage "
                    f"(fedhive.server.stages); got {type(stage).__name__}"
                )
        exchanges = [s for s in stages if isinstance(s, ExchangeStage)]
        if len(exchanges) > 1:
            names = ", ".join(s.name for s in exchanges)
            raise ConfigError(f"a round has one exchange stage; got {len(exchanges)}: {names}")
        if exchanges and stages[0] is not exchanges[0]:
            raise ConfigError(
                f"the exchange stage {exchanges[0].name!r} must come first: it sends the tasks"
            )
        self.exchange: ExchangeStage = exchanges[0] if exchanges else PlainExchange()
        rest = stages[1:] if exchanges else stages
        first = next((i for i, s in enumerate(rest) if isinstance(s, AggregateStage)), len(rest))
        late = [s for s in rest[first:] if isinstance(s, ReplyStage)]
        if late:
            raise ConfigError(
                f"reply stage {late[0].name!r} comes after aggregate stage "
                f"{rest[first].name!r}: replies are transformed before they are folded; "
                "put reply stages first"
            )
        self.reply_stages = [s for s in rest if isinstance(s, ReplyStage)]
        self.aggregate_stages = [s for s in rest if isinstance(s, AggregateStage)]
        self.stages: list[RoundStage] = [self.exchange, *rest]

    def __repr__(self) -> str:
        return f"FitPipeline({self.stages!r})"

    def check(self, strategy: Strategy) -> None:
        """Raise :class:`ConfigError` unless each stage gets a kind it consumes."""
        self.exchange.check(strategy)
        kind = self.exchange.produces or UPDATES
        source = self.exchange.name
        for stage in self.reply_stages:
            kind, source = self._feed(stage.name, stage.consumes, kind, source, stage.produces)
        traits = traits_of(strategy)
        needed = strategy_consumes(strategy)
        if kind not in needed:
            why = f" ({traits.reason})" if traits.reason else ""
            raise ConfigError(
                f"{type(strategy).__name__} folds {_kinds(needed)}{why}, but stage "
                f"{source!r} gives it {_kinds({kind})}; use a strategy whose aggregate is a "
                "weighted mean (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad) or "
                f"remove {source!r}"
            )
        for later in self.aggregate_stages:
            kind, source = self._feed(later.name, later.consumes, kind, source, later.produces)

    @staticmethod
    def _feed(
        name: str, consumes: frozenset[str], kind: str, source: str, produces: str | None
    ) -> tuple[str, str]:
        if kind not in consumes:
            raise ConfigError(
                f"stage {name!r} consumes {_kinds(consumes)}, but {source!r} before it "
                f"gives {_kinds({kind})}; reorder the stages or drop one of them"
            )
        return (produces or kind), name

    def prepare(self, driver: RoundDriver, fit: dict[str, Any]) -> tuple[Aggregator, FitSink]:
        """This round's aggregator (wrapped by the aggregate stages, the first stage
        outermost) and the sink the exchange feeds; the caller finalizes the aggregator."""
        engine, rnd = driver.engine, driver.server_round
        aggregator = engine.strategy.fit_aggregator(rnd, engine.parameters)
        for stage in reversed(self.aggregate_stages):
            aggregator = stage.wrap(driver, aggregator)
        return aggregator, FitSink(driver, aggregator, self.reply_stages, fit)


def build_pipeline(
    strategy: Strategy, stages: Sequence[RoundStage], fit_workflow: object = None
) -> FitPipeline:
    """The checked pipeline of ``stages`` for ``strategy``; :class:`ConfigError` for a
    combination that cannot work, or for ``stages`` beside a whole custom ``fit_workflow``.
    The engine builds it; ``start_simulation``/``start_server`` call it before anything
    starts."""
    if fit_workflow is not None and stages:
        raise ConfigError(
            "pass fit_workflow (a whole custom fit round) or stages, not both; a custom "
            "exchange can be an ExchangeStage among the stages"
        )
    pipeline = FitPipeline(stages)
    pipeline.check(strategy)
    return pipeline


def _kinds(kinds: frozenset[str] | set[str]) -> str:
    words = {UPDATES: "individual updates", ENCODED: "encoded updates", MEAN: "only the mean"}
    return " or ".join(words.get(k, repr(k)) for k in sorted(kinds))
