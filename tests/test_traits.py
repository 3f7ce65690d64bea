"""Strategy traits: every strategy declares what it combines with, and differential
privacy, secure aggregation and the accumulator setting ask the traits, never names."""

from __future__ import annotations

import re

import numpy as np
import pytest

import fedhive as fl
from fedhive.client.mods import scaffold_mod
from fedhive.common.errors import ConfigError
from fedhive.privacy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    check_dp_compatible,
)
from fedhive.secagg import SecAggPlusWorkflow, check_secagg_compatible
from fedhive.server.strategy import (
    Bulyan,
    ComposedStrategy,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedNova,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Scaffold,
)
from fedhive.server.strategy.composed import MeanRule, plain_mean, rule_traits
from fedhive.server.strategy.optimizers import Adaptive
from fedhive.server.strategy.robust import MedianRule
from fedhive.server.strategy.traits import (
    MEAN_TRAITS,
    ExtraRecord,
    StrategyTraits,
    UpdateLayout,
    traits_of,
)
from test_secagg import SHAPES, Capture, Linear, run
from test_secagg import plain_mean as expected_mean

INITIAL = fl.common.ndarrays_to_parameters([np.zeros(2, np.float32)])
MEDIAN = StrategyTraits(reason="its aggregate is a coordinate-wise median")


def dp(strategy, wrapper=DifferentialPrivacyServerSideFixedClipping):
    adaptive = wrapper in (
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyClientSideAdaptiveClipping,
    )
    extra = {"initial_clipping_norm": 1.0, "clipped_count_stddev": 1.0}
    if not adaptive:
        extra = {"clipping_norm": 1.0}
    return wrapper(strategy, noise_multiplier=1.0, num_sampled_clients=4, **extra)


# -- what each built-in strategy declares ---------------------------------------------------------


MEANS = {
    "FedAvg": FedAvg,
    "FedProx": lambda: FedProx(proximal_mu=0.1),
    "FedAvgM": lambda: FedAvgM(server_momentum=0.9),
    "FedAdam": lambda: FedAdam(initial_parameters=INITIAL),
    "FedYogi": lambda: FedYogi(initial_parameters=INITIAL),
    "FedAdagrad": lambda: FedAdagrad(initial_parameters=INITIAL),
}
BUFFERING = {
    "FedMedian": (FedMedian, "median"),
    "FedTrimmedAvg": (FedTrimmedAvg, "trimmed mean"),
    "Krum": (lambda: Krum(num_malicious_clients=1), "Krum scores"),
    "MultiKrum": (MultiKrum, "Krum scores"),
    "Bulyan": (Bulyan, "Krum selection"),
}
STREAMING = {
    "FedNova": (FedNova, "local steps"),
    "QFedAvg": (QFedAvg, "loss"),
    "Scaffold": (Scaffold, "control variates"),
}


@pytest.mark.parametrize("name", sorted(MEANS))
def test_mean_strategies_declare_a_weighted_mean(name):
    traits = traits_of(MEANS[name]())
    assert traits == MEAN_TRAITS
    assert traits.weighted_mean and not traits.individual_updates
    assert traits.tolerates_staleness and traits.required_mods == ()
    assert traits.layout == UpdateLayout()


@pytest.mark.parametrize("name", sorted(BUFFERING))
def test_robust_strategies_need_individual_updates(name):
    build, reason = BUFFERING[name]
    traits = traits_of(build())
    assert traits.individual_updates and not traits.weighted_mean
    assert not traits.tolerates_staleness
    assert reason in traits.reason


@pytest.mark.parametrize("name", sorted(STREAMING))
def test_reweighting_strategies_stream_but_are_not_a_mean(name):
    build, reason = STREAMING[name]
    traits = traits_of(build())
    assert not traits.weighted_mean and not traits.individual_updates
    assert reason in traits.reason


def test_scaffold_requires_its_mod_and_declares_its_variate_record():
    traits = traits_of(Scaffold())
    assert traits.required_mods == (scaffold_mod,)
    assert traits.layout.model == "full"
    assert traits.layout.extra("scaffold") == ExtraRecord("scaffold", like_model=True)
    assert traits.layout.extra("other") is None


def test_a_composed_strategy_takes_its_rules_traits_and_a_server_optimizer_keeps_the_mean():
    adam = Adaptive("adam", eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    mean = ComposedStrategy(sampling=FedAvg(), rule=MeanRule(), server_optimizer=adam)
    median = ComposedStrategy(sampling=FedAvg(), rule=MedianRule(), server_optimizer=adam)
    assert traits_of(mean) == MEAN_TRAITS
    assert traits_of(median) == MedianRule.traits

    class Unknown:  # a user rule that declares nothing: not trusted to be a mean
        def start(self, server_round, reference, weight):
            raise NotImplementedError

    unknown = rule_traits(Unknown())
    assert unknown.individual_updates and not unknown.weighted_mean
    assert "Unknown declares no traits" in unknown.reason

    class Declared(Unknown):
        traits = MEAN_TRAITS

    assert traits_of(ComposedStrategy(sampling=FedAvg(), rule=Declared())) == MEAN_TRAITS


def test_a_composed_subclass_with_its_own_aggregator_is_not_known_to_be_a_mean():
    class Own(ComposedStrategy):
        def fit_aggregator(self, server_round, parameters):
            return super().fit_aggregator(server_round, parameters)

    traits = traits_of(Own(sampling=FedAvg(), rule=MeanRule()))
    assert not traits.weighted_mean and "builds its own fit aggregator" in traits.reason


def test_traits_refuse_an_unknown_weighting():
    with pytest.raises(ConfigError, match="weighting must be 'num_examples' or 'uniform'"):
        MEAN_TRAITS.but(weighting="by_loss")


def test_traits_of_refuses_what_is_not_a_strategy():
    with pytest.raises(ConfigError, match="declares no StrategyTraits"):
        traits_of(object())

    class Liar:
        traits = "weighted mean"

    with pytest.raises(ConfigError, match="Liar declares no StrategyTraits"):
        traits_of(Liar())


# -- a FedAvg subclass with its own aggregate_fit -------------------------------------------------


class SaveModel(FedAvg):
    """Flower's classic: a FedAvg subclass that overrides aggregate_fit."""

    def aggregate_fit(self, server_round, results, failures):
        return super().aggregate_fit(server_round, results, failures)


class DeclaredSaveModel(SaveModel):
    traits = MEAN_TRAITS


def test_overriding_aggregate_fit_gives_buffering_traits():
    traits = traits_of(SaveModel())
    assert traits.individual_updates and not traits.weighted_mean
    assert "SaveModel overrides aggregate_fit" in traits.reason
    assert plain_mean(SaveModel()) is None
    with pytest.raises(ConfigError, match=r"SaveModel cannot be wrapped.*overrides aggregate_fit"):
        dp(SaveModel())
    with pytest.raises(ConfigError, match="SaveModel needs individual updates"):
        check_secagg_compatible(SaveModel())


def test_overriding_fit_aggregator_is_not_known_to_be_a_mean_either():
    class OwnAggregator(FedAvg):
        def fit_aggregator(self, server_round, parameters):
            return super().fit_aggregator(server_round, parameters)

    traits = traits_of(OwnAggregator())
    assert not traits.weighted_mean and "overrides fit_aggregator" in traits.reason
    assert plain_mean(OwnAggregator()) is None


def test_a_subclass_that_declares_the_mean_is_believed():
    assert traits_of(DeclaredSaveModel()) == MEAN_TRAITS
    strategy = DeclaredSaveModel()
    assert plain_mean(strategy) is strategy
    assert check_secagg_compatible(strategy) == "num_examples"
    check_dp_compatible(strategy)


# -- differential privacy asks the traits ---------------------------------------------------------


def test_dp_over_the_real_krum_is_refused_by_its_traits():
    with pytest.raises(ConfigError, match=r"Krum cannot be wrapped.*best Krum scores"):
        dp(Krum(num_malicious_clients=1))


def test_dp_judges_traits_not_names():
    class Krum(FedAvg):  # named like a robust rule, declares (inherits) a weighted mean
        pass

    class Innocent(FedAvg):  # an innocent name whose traits say individual updates
        traits = MEDIAN

    wrapped = dp(Krum())
    assert wrapped.strategy.__class__.__name__ == "Krum"
    with pytest.raises(ConfigError, match=r"Innocent cannot be wrapped.*coordinate-wise median"):
        dp(Innocent())


@pytest.mark.parametrize("name", sorted({**BUFFERING, **STREAMING}))
def test_dp_refuses_every_builtin_that_is_not_a_mean(name):
    build = {**BUFFERING, **STREAMING}[name][0]
    strategy = build()
    reason = re.escape(traits_of(strategy).reason)
    with pytest.raises(ConfigError, match=rf"{name} cannot be wrapped.*{reason}"):
        dp(strategy)


@pytest.mark.parametrize(
    "wrapper",
    [
        DifferentialPrivacyServerSideFixedClipping,
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyClientSideAdaptiveClipping,
    ],
)
def test_dp_wrappers_pass_the_inner_traits_on(wrapper):
    def some_mod(message, context, call_next):
        return call_next(message, context)

    declared = MEAN_TRAITS.but(
        tolerates_staleness=False,
        required_mods=(some_mod,),
        layout=UpdateLayout(extras=(ExtraRecord("side", kind="metrics", required=False),)),
    )

    class Custom(FedAvg):
        traits = declared

    # still a weighted mean, of clipped updates with equal weights
    uniform = declared.but(weighting="uniform")
    wrapped = dp(Custom(), wrapper)
    if wrapped.clip_on_client:
        assert traits_of(wrapped) == uniform
        assert check_secagg_compatible(wrapped) == "uniform"
    else:  # clipping on the server needs each update, so a mean revealed whole won't do
        traits = traits_of(wrapped)
        assert traits == uniform.but(individual_updates=True, reason=traits.reason)
        assert "clips on the server" in traits.reason
        with pytest.raises(ConfigError, match=r"needs individual updates.*clips on the server"):
            check_secagg_compatible(wrapped)
    assert traits_of(dp(FedAdam(initial_parameters=INITIAL), wrapper)).weighted_mean


def test_legacy_flags_still_work():
    class OptedOut(FedAvg):
        dp_compatible = False

    class OptedIn(SaveModel):
        secure_aggregation_compatible = True

    assert not traits_of(OptedOut()).weighted_mean
    with pytest.raises(ConfigError, match="OptedOut sets dp_compatible = False"):
        dp(OptedOut())
    assert traits_of(OptedIn()).weighted_mean
    assert check_secagg_compatible(OptedIn()) == "num_examples"

    class OptedOutRule(MeanRule):
        dp_compatible = False

    with pytest.raises(ConfigError, match="OptedOutRule sets dp_compatible = False"):
        dp(ComposedStrategy(sampling=FedAvg(), rule=OptedOutRule()))


# -- secure aggregation asks the traits -----------------------------------------------------------


def test_secure_aggregation_over_a_median_is_refused_by_trait():
    with pytest.raises(ConfigError, match=r"FedMedian needs individual updates.*median"):
        check_secagg_compatible(FedMedian())

    class Averager(FedAvg):  # an innocent name whose traits say median
        traits = MEDIAN

    with pytest.raises(ConfigError, match=r"Averager needs individual updates.*median"):
        check_secagg_compatible(Averager())

    class FedMedian2(FedAvg):  # a robust-sounding name that declares a mean
        pass

    assert check_secagg_compatible(FedMedian2()) == "num_examples"
    for strategy in (FedAdam(initial_parameters=INITIAL), FedProx(proximal_mu=0.1)):
        assert check_secagg_compatible(strategy) == "num_examples"
    client_clipped = dp(FedAvg(), DifferentialPrivacyClientSideFixedClipping)
    assert check_secagg_compatible(client_clipped) == "uniform"


def test_plain_mean_finds_the_part_holding_the_accumulator():
    fedavg = FedAvg()
    assert plain_mean(fedavg) is fedavg
    fedadam = FedAdam(initial_parameters=INITIAL)
    assert plain_mean(fedadam) is fedadam.rule
    assert plain_mean(Scaffold()) is None
    assert plain_mean(FedMedian()) is None
    assert plain_mean(dp(FedAvg())) is None  # a wrapper holds no accumulator


def test_a_declared_mean_runs_under_secure_aggregation():
    """A FedAvg subclass with its own aggregate_fit that declares MEAN_TRAITS gets the
    revealed mean (once per client) and computes the same model as plain FedAvg would."""
    n = 5
    capture = Capture()
    strategy = DeclaredSaveModel(
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters(
            [np.zeros(s, np.float32) for s in SHAPES]
        ),
        evaluate_fn=capture,
    )
    workflow = SecAggPlusWorkflow(threshold=3, bits=16, clip=0.05)
    hist, _ = run(n, workflow, strategy=strategy, client=Linear)
    fit = hist.rounds[-1]["fit"]
    assert fit["updated"], fit.get("note")
    for got, want in zip(capture.models[1], expected_mean(range(n), n), strict=True):
        assert np.max(np.abs(got - want)) <= workflow.config.quantization_error + 1e-6
