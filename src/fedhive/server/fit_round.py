"""A synchronous fit round as Flower runs it, in pieces that run policies reuse: the
strategy's instructions (:func:`begin_fit_round`), the end of the round
(:func:`end_fit_round`), the whole round through a stage pipeline (:func:`run_pipeline`,
:func:`default_fit_workflow`) and how a client failure is recorded
(:func:`failure_record`). :mod:`fedhive.server.engine` re-exports them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedhive.common.errors import ClientFailure
from fedhive.common.records import FitIns, Parameters, Scalar
from fedhive.server.client_manager import ClientProxy
from fedhive.server.stages import FitPipeline, RoundAborted

if TYPE_CHECKING:
    from fedhive.server.engine import RoundDriver

__all__ = [
    "begin_fit_round",
    "default_fit_workflow",
    "end_fit_round",
    "failure_record",
    "run_pipeline",
]

log = logging.getLogger("fedhive")


def failure_record(failure: ClientFailure) -> dict[str, Any]:
    """A failure as it appears in the history (client id, round, stage, reason)."""
    return {
        "client_id": failure.client_id,
        "round": failure.server_round,
        "stage": failure.stage,
        "reason": failure.reason,
    }


def begin_fit_round(
    driver: RoundDriver,
) -> tuple[list[tuple[ClientProxy, FitIns]], dict[str, Any]] | None:
    """Flower's start of a fit round: the strategy's instructions and the round's ``fit``
    record, or ``None`` (noted in the record) when ``configure_fit`` selected no client."""
    engine, rnd = driver.engine, driver.server_round
    engine.reseed_sampling(rnd, "fit")
    instructions = engine.strategy.configure_fit(rnd, engine.parameters, engine.client_manager)
    fit: dict[str, Any] = {"num_clients": len(instructions), "num_results": 0, "metrics": {}}
    driver.record["fit"] = fit
    if not instructions:
        fit["updated"] = False
        fit["note"] = "configure_fit selected no clients; the model is unchanged"
        return None
    return list(instructions), fit


def end_fit_round(
    driver: RoundDriver,
    fit: dict[str, Any],
    finalize: Callable[[], tuple[Parameters | None, dict[str, Scalar]]],
    results: str = "successful fit results",
) -> None:
    """Flower's end of a fit round with ``fit["num_results"]`` results: too few keep the
    model; otherwise ``finalize()`` (the strategy's aggregate) gives the next one."""
    minimum = driver.engine.config.min_fit_results
    if fit["num_results"] < max(1, minimum):
        fit["updated"] = False
        fit["note"] = (
            f"{fit['num_results']} {results}, fewer than the minimum {minimum}; "
            "the model is unchanged"
        )
        return
    params, metrics = finalize()
    fit["metrics"] = dict(metrics)
    fit["updated"] = params is not None
    if params is None:
        fit["note"] = "the strategy returned no parameters; the model is unchanged"
        return
    driver.update_parameters(params)


def run_pipeline(driver: RoundDriver, pipeline: FitPipeline) -> None:
    """A fit round through ``pipeline``: the strategy's instructions, the exchange stage
    into the (wrapped) aggregator, then Flower's end of round. An exchange that raises
    :class:`~fedhive.server.stages.RoundAborted` keeps the model (the reason is noted)."""
    begun = begin_fit_round(driver)
    if begun is None:
        return
    instructions, fit = begun
    for stage in pipeline.stages[1:]:
        instructions = stage.instruct(driver, instructions)
    aggregator, sink = pipeline.prepare(driver, fit)
    try:
        pipeline.exchange.run_exchange(driver, instructions, sink)
    except RoundAborted as exc:
        fit["updated"] = False
        fit["note"] = f"{pipeline.exchange.name} aborted: {exc}; the model is unchanged"
        log.warning("round %d: %s", driver.server_round, fit["note"])
        return
    finally:
        driver.record["failures"] = [failure_record(f) for f in sink.failures]
        fit["num_failures"] = len(sink.failures)
    end_fit_round(driver, fit, aggregator.finalize, pipeline.exchange.results)


def default_fit_workflow(driver: RoundDriver) -> None:
    """Flower's fit round: one exchange, results streamed into the strategy's aggregator."""
    run_pipeline(driver, FitPipeline())
