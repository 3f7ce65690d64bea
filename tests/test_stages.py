"""Round stages: the fit round as a checked pipeline (exchange, reply and aggregate stages)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import AddClient, initial
from fedhive.common import parameters_to_ndarrays
from fedhive.common.errors import ConfigError, InvalidUpdate
from fedhive.common.records import FitRes, ndarrays_to_parameters
from fedhive.secagg import SecAggPlusWorkflow
from fedhive.server import ServerConfig
from fedhive.server.stages import (
    AggregateStage,
    ExchangeStage,
    FitPipeline,
    PlainExchange,
    ReplyStage,
    strategy_consumes,
)
from fedhive.server.strategy import FedAvg, FedMedian, Krum
from fedhive.simulation import start_simulation


class Scale(ReplyStage):
    """Halves every update (a stand-in for a decoder)."""

    name = "halve"

    def transform(self, driver, client_id, result):
        arrays = [a / 2 for a in parameters_to_ndarrays(result.parameters)]
        return FitRes(result.status, ndarrays_to_parameters(arrays), result.num_examples)


class RefuseOdd(ReplyStage):
    name = "refuse-odd"

    def transform(self, driver, client_id, result):
        if int(client_id) % 2:
            raise InvalidUpdate(client_id, driver.server_round, "fit", "odd clients refused")
        return result


class Decode(ReplyStage):
    name = "decode"
    consumes = frozenset({"encoded"})
    produces = "updates"

    def transform(self, driver, client_id, result):
        return result


class OnlyMean(ExchangeStage):
    """An exchange that reveals only the mean (as secure aggregation does)."""

    name = "only-mean"
    produces = "mean"

    def run_exchange(self, driver, instructions, sink):
        raise AssertionError("not run in these tests")


class CountMeans(AggregateStage):
    """Counts what reaches the aggregator: whole means and single updates."""

    name = "count"
    consumes = frozenset({"mean", "updates"})

    def __init__(self):
        self.means = 0
        self.updates = 0

    def wrap(self, driver, aggregator):
        stage = self

        class Counting:
            def add(self, client, result):
                stage.updates += 1
                aggregator.add(client, result)

            def add_mean(self, mean, clients):
                stage.means += 1
                from fedhive.server.strategy.base import fold_mean

                fold_mean(aggregator, mean, clients)

            def add_failure(self, failure):
                aggregator.add_failure(failure)

            def finalize(self):
                return aggregator.finalize()

        return Counting()


def _simulate(stages=(), secure_aggregation=None, num_rounds=1):
    return start_simulation(
        client_fn=lambda cid: AddClient(int(cid)),
        num_clients=4,
        config=ServerConfig(num_rounds=num_rounds),
        strategy=FedAvg(
            fraction_evaluate=0.0,
            initial_parameters=initial((3,)),
            evaluate_fn=lambda rnd, params, cfg: (float(np.mean(params[0])), {}),
        ),
        stages=list(stages),
        secure_aggregation=secure_aggregation,
        seed=0,
    )


def test_strategies_declare_what_their_aggregator_folds():
    assert strategy_consumes(FedAvg()) == {"updates", "mean"}
    assert strategy_consumes(Krum()) == {"updates"}


def test_impossible_pipelines_fail_when_built():
    with pytest.raises(ConfigError, match=r"Krum.*needs individual updates"):
        FitPipeline([SecAggPlusWorkflow()]).check(Krum())
    with pytest.raises(ConfigError, match=r"FedMedian folds individual updates.*'only-mean'"):
        FitPipeline([OnlyMean()]).check(FedMedian())
    with pytest.raises(ConfigError, match=r"'decode' consumes encoded updates.*'fit'"):
        FitPipeline([Decode()]).check(FedAvg())
    with pytest.raises(ConfigError, match=r"'halve' consumes individual updates.*'secagg\+'"):
        FitPipeline([SecAggPlusWorkflow(), Scale()]).check(FedAvg())
    with pytest.raises(ConfigError, match="one exchange stage"):
        FitPipeline([PlainExchange(), SecAggPlusWorkflow()])
    with pytest.raises(ConfigError, match="must come first"):
        FitPipeline([Scale(), SecAggPlusWorkflow()])
    with pytest.raises(ConfigError, match="'halve' comes after aggregate stage 'count'"):
        FitPipeline([CountMeans(), Scale()])
    with pytest.raises(ConfigError, match="must be an ExchangeStage, ReplyStage or"):
        FitPipeline([object()])  # type: ignore[list-item]


def test_a_start_simulation_with_an_impossible_pipeline_fails_before_running():
    with pytest.raises(ConfigError, match="Krum needs individual updates"):
        start_simulation(
            client_fn=lambda cid: AddClient(int(cid)),
            num_clients=4,
            strategy=Krum(initial_parameters=initial((3,))),
            secure_aggregation={"bits": 16, "clip": 8.0},
            seed=0,
        )


def test_reply_stages_transform_each_update_before_it_is_folded():
    plain = _simulate().rounds[-1]
    halved = _simulate([Scale()]).rounds[-1]
    assert plain["fit"]["num_results"] == halved["fit"]["num_results"] == 4
    # client pid sends 0 + (1 + pid) with weight 1 + pid: the mean is 30 / 10 = 3
    assert np.isclose(plain["centralized"]["loss"], 3.0)
    assert np.isclose(halved["centralized"]["loss"], 1.5)


def test_a_reply_stage_refusing_an_update_is_that_clients_failure():
    history = _simulate([RefuseOdd()])
    record = history.rounds[-1]
    assert record["fit"]["num_results"] == 2
    refused = sorted(f["client_id"] for f in record["failures"])
    assert refused == ["1", "3"]
    assert all("refuse-odd: odd clients refused" in f["reason"] for f in record["failures"])


def test_secure_aggregation_composes_with_an_aggregate_stage():
    count = CountMeans()
    history = _simulate([count], secure_aggregation={"bits": 16, "clip": 8.0}, num_rounds=2)
    assert count.means == 2 and count.updates == 0  # SecAgg+ hands over only the mean
    assert all(r["fit"]["updated"] for r in history.rounds[1:])
    assert history.rounds[-1]["fit"]["secagg"]["after_unmask"] == 4
    plain = CountMeans()
    _simulate([plain])
    assert plain.updates == 4 and plain.means == 0
