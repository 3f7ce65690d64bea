"""The server side of SecAgg+: a fit workflow that learns only the sum of the updates.

``SecAggPlusWorkflow`` replaces the engine's fit round (``fit_workflow=``): it samples
clients through the strategy as usual, runs the six stages described in
:mod:`fedhive.secagg.client`, and hands the strategy the mean it unmasked, as if every
survivor had sent that mean. Protocol: Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead" (SecAgg+), with Bonawitz et al. 2017,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning" (SecAgg) as the
complete-graph case, including its consistency check for a server that lies.

Only strategies whose aggregate is a function of the (weighted) mean can use it: FedAvg,
FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad and the client-side clipping DP wrappers
around them. Rules that need each update (median, trimmed mean, Krum, Bulyan, q-FedAvg,
FedNova, SCAFFOLD) are refused at the first round with a clear message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedhive.common.errors import ConfigError
from fedhive.common.records import FitIns
from fedhive.secagg.config import SecAggConfig
from fedhive.secagg.server_round import SecureRound
from fedhive.server.client_manager import ClientProxy
from fedhive.server.engine import RoundDriver, run_pipeline
from fedhive.server.stages import MEAN, ExchangeStage, FitPipeline, FitSink
from fedhive.server.strategy.base import Strategy

__all__ = ["SecAggPlusWorkflow", "check_secagg_compatible"]


def check_secagg_compatible(strategy: Strategy) -> str:
    """How clients weigh their updates (``"num_examples"`` or ``"uniform"``), or raise.

    Asks the strategy's traits: secure aggregation reveals only the weighted mean, so
    it raises :class:`ConfigError` unless they declare the aggregate a weighted mean
    (a server optimizer after the mean is fine: FedAdam) that does not need each update
    on its own (a DP wrapper that clips on the server does). The weighting is the
    traits' (``"uniform"`` for the DP wrappers).
    """
    from fedhive.server.strategy.traits import traits_of

    traits = traits_of(strategy)
    if traits.weighted_mean and not traits.individual_updates:
        return traits.weighting
    if traits.weighted_mean:
        why, fix = traits.reason or "its traits declare individual_updates", ""
    else:
        why, fix = (
            traits.why_not_mean(),
            (
                ". Use a mean-based strategy (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, "
                "FedAdagrad) or turn secure aggregation off"
            ),
        )
    raise ConfigError(
        f"{type(strategy).__name__} needs individual updates, which secure aggregation "
        f"hides (only their sum is revealed): {why}{fix}"
    )


class SecAggPlusWorkflow(ExchangeStage):
    """The fit round with SecAgg+; keyword arguments are those of :class:`SecAggConfig`.

    An exchange stage (:mod:`fedhive.server.stages`) that reveals only the mean, so it
    composes with aggregate stages after it and is refused, when the engine is built, in
    front of a strategy or stage that needs individual updates. Called with a
    :class:`~fedhive.server.engine.RoundDriver` it is also a whole fit workflow.

    ``SecAggPlusWorkflow(threshold=..., degree=..., bits=..., clip=...)`` or
    ``SecAggPlusWorkflow(config=SecAggConfig(...))``. Clients need
    :data:`fedhive.secagg.secaggplus_mod` as their first mod.

    Memory on the server: one ring vector (4 or 8 bytes per parameter) for the running
    masked sum and one for a mask being removed; masked inputs are folded as they arrive.
    """

    def __init__(self, config: SecAggConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise ConfigError("pass either a SecAggConfig or keyword options, not both")
        if config is not None and not isinstance(config, SecAggConfig):
            raise ConfigError(f"config must be a SecAggConfig, got {type(config).__name__}")
        try:
            self.config = config or SecAggConfig(**options)
        except TypeError as exc:
            raise ConfigError(f"unknown secure aggregation option: {exc}") from exc
        self.codec: Any = None

    def attach_codec(self, codec: Any) -> None:
        """Encode each update with ``codec`` (shared-scale QSGD, shared-seed random-k) to
        ring integers before masking and decode the unmasked sum once
        (:mod:`fedhive.secagg.coded`); a codec the masked sum cannot add, or whose sums
        could overflow the ring at ``max_clients`` x ``max_weight``, is a
        :class:`ConfigError` now."""
        from fedhive.secagg.coded import check_codec

        check_codec(codec, self.config)
        self.codec = codec

    def __repr__(self) -> str:
        return f"SecAggPlusWorkflow({self.config!r})"

    name = "secagg+"
    produces = MEAN
    encodes_updates = True
    results = "secure results"

    def check(self, strategy: Strategy) -> None:
        check_secagg_compatible(strategy)

    def __call__(self, driver: RoundDriver) -> None:
        run_pipeline(driver, FitPipeline([self]))

    def run_exchange(
        self, driver: RoundDriver, instructions: list[tuple[ClientProxy, FitIns]], sink: FitSink
    ) -> None:
        weighting = check_secagg_compatible(driver.engine.strategy)
        round_ = SecureRound(self.config, driver, instructions, weighting, self.codec)
        try:
            mean = round_.run()
        finally:
            for failure in round_.failures:
                sink.add_failure(failure)
            driver.record["fit"]["secagg"] = round_.stats
        # The weights are secret, so each survivor counts once; a mean-based strategy
        # gets the mean back and its metrics aggregation sees each survivor's metrics.
        account = getattr(sink.aggregator, "account_rounding", None)
        if round_.dp_bound is not None and callable(account):
            account(round_.dp_rounding)  # the noise covers C + beta, what was released
        sink.add_mean(mean, [(peer.cid, 1, peer.metrics) for peer in round_.survivors])


def as_workflow(
    value: Any, strategy: Strategy | None = None, fit_workflow: object = None
) -> SecAggPlusWorkflow:
    """The workflow for ``secure_aggregation=``: a workflow, a config or a dict of options.

    With ``strategy`` given, its compatibility is checked now, before anything starts.
    ``fit_workflow`` is the caller's other workflow argument: both at once is an error.
    """
    if fit_workflow is not None:
        raise ConfigError("pass secure_aggregation or fit_workflow, not both")
    if isinstance(value, SecAggPlusWorkflow):
        workflow = value
    elif isinstance(value, SecAggConfig):
        workflow = SecAggPlusWorkflow(value)
    elif isinstance(value, Mapping):
        workflow = SecAggPlusWorkflow(**dict(value))
    else:
        raise ConfigError(
            "secure_aggregation must be a SecAggPlusWorkflow, a SecAggConfig or a dict of "
            f"options, got {type(value).__name__}"
        )
    if strategy is not None:
        check_secagg_compatible(strategy)
    return workflow
