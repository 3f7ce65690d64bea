"""Flower compatibility, names: what Flower 1.x code imports exists under ``fedhive``
(``import fedhive as fl``) and behaves as Flower documents it."""

from __future__ import annotations

import importlib
import logging
from unittest.mock import MagicMock

import numpy as np
import pytest

import fedhive as fl
from fedhive.common import FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

FLOWER_IMPORTS = [
    ("fedhive.common", "Context"),
    ("fedhive.common", "Properties"),
    ("fedhive.common", "DisconnectRes"),
    ("fedhive.common", "ReconnectIns"),
    ("fedhive.common", "MetricsAggregationFn"),
    ("fedhive.common", "ConfigsRecord"),
    ("fedhive.common", "MetricsRecord"),
    ("fedhive.common", "RecordSet"),
    ("fedhive.common", "GRPC_MAX_MESSAGE_LENGTH"),
    ("fedhive.common.typing", "NDArrays"),
    ("fedhive.common.typing", "Scalar"),
    ("fedhive.common.typing", "Config"),
    ("fedhive.common.typing", "Metrics"),
    ("fedhive.common.typing", "MetricsAggregationFn"),
    ("fedhive.common.typing", "Properties"),
    ("fedhive.common.logger", "log"),
    ("fedhive.server", "Server"),
    ("fedhive.server", "Criterion"),
    ("fedhive.server.client_proxy", "ClientProxy"),
    ("fedhive.server.criterion", "Criterion"),
    ("fedhive.server.strategy", "FaultTolerantFedAvg"),
    ("fedhive.server.strategy", "FedOpt"),
    ("fedhive.server.strategy.aggregate", "aggregate"),
    ("fedhive.server.strategy.aggregate", "weighted_loss_avg"),
    ("fedhive.server.strategy", "DifferentialPrivacyServerSideFixedClipping"),
    ("fedhive.server.strategy", "DifferentialPrivacyClientSideFixedClipping"),
    ("fedhive.server.strategy", "DifferentialPrivacyServerSideAdaptiveClipping"),
    ("fedhive.server.strategy", "DifferentialPrivacyClientSideAdaptiveClipping"),
]


@pytest.mark.parametrize(("module", "name"), FLOWER_IMPORTS)
def test_flower_import_exists(module, name):
    assert getattr(importlib.import_module(module), name) is not None


def test_the_dp_wrappers_are_the_privacy_packages_own():
    assert fl.server.strategy.DifferentialPrivacyServerSideFixedClipping is (
        fl.privacy.DifferentialPrivacyServerSideFixedClipping
    )
    with pytest.raises(AttributeError):
        fl.server.strategy.NoSuchStrategy  # noqa: B018


def test_context_is_the_clients_context():
    assert fl.common.Context is fl.client.Context
    context = fl.common.Context(node_id="1", node_config={"partition-id": 0})
    assert context.node_config["partition-id"] == 0


def test_records_take_flowers_spellings_and_check_values():
    rs = fl.common.RecordSet(configs_records={"c": fl.common.ConfigsRecord({"lr": 0.1})})
    assert rs.configs_records["c"] == {"lr": 0.1} and rs.config_records is rs.configs_records
    assert fl.common.MetricsRecord({"acc": 0.5}) == {"acc": 0.5}
    with pytest.raises(fl.SerdeError):
        fl.common.ConfigsRecord({"bad": [1, 2]})
    with pytest.raises(fl.SerdeError):
        fl.common.MetricsRecord({"bad": "text"})
    assert fl.common.ReconnectIns(seconds=3).seconds == 3
    assert fl.common.DisconnectRes(reason="UNKNOWN").reason == "UNKNOWN"
    assert fl.common.GRPC_MAX_MESSAGE_LENGTH == 536_870_912


def test_logger_log_goes_to_the_fedhive_logger(caplog):
    from fedhive.common.logger import log

    with caplog.at_level(logging.INFO, logger="fedhive"):
        log(logging.INFO, "round %s done", 3)
    assert "round 3 done" in caplog.text


def test_aggregate_and_weighted_loss_avg():
    from fedhive.server.strategy.aggregate import aggregate, weighted_loss_avg

    a = [np.array([1.0, 2.0], np.float32), np.array([[1]], np.int64)]
    b = [np.array([3.0, 6.0], np.float32), np.array([[3]], np.int64)]
    mean = aggregate([(a, 1), (b, 3)])
    np.testing.assert_allclose(mean[0], [2.5, 5.0])
    assert mean[0].dtype == np.float32 and mean[1].dtype == np.float64  # ints: a real mean
    assert weighted_loss_avg([(1, 1.0), (3, 5.0)]) == 4.0
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])


def test_fedopt_keeps_flowers_attributes_and_aggregates_like_fedavg():
    init = ndarrays_to_parameters([np.zeros(2)])
    s = fl.server.strategy.FedOpt(initial_parameters=init, eta=0.5, tau=1e-3)
    assert isinstance(s, fl.server.strategy.FedAvg)
    assert (s.eta, s.eta_l, s.beta_1, s.beta_2, s.tau) == (0.5, 0.1, 0.0, 0.0, 1e-3)
    assert s.m_t is None and s.v_t is None
    assert s.current_weights[0].tolist() == [0.0, 0.0]
    results = [(MagicMock(), FitRes(Status(), ndarrays_to_parameters([np.ones(2)]), 1, {}))]
    assert parameters_to_ndarrays(s.aggregate_fit(1, results, [])[0])[0].tolist() == [1.0, 1.0]
    with pytest.raises(fl.ConfigError, match="initial_parameters"):
        fl.server.strategy.FedOpt()


def test_fault_tolerant_fedavg_defaults_and_traits():
    s = fl.server.strategy.FaultTolerantFedAvg()
    assert (s.min_fit_clients, s.min_available_clients, s.accept_failures) == (1, 1, True)
    assert s.traits.weighted_mean  # it streams FedAvg's mean
    with pytest.raises(fl.ConfigError, match="min_completion_rate_fit"):
        fl.server.strategy.FaultTolerantFedAvg(min_completion_rate_fit=1.5)


def _client_fn(context):
    class C(fl.client.NumPyClient):
        def get_parameters(self, config):
            return [np.zeros(2)]

        def fit(self, parameters, config):
            return [parameters[0] + 1.0], 1, {}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    return C().to_client()


def test_start_simulation_takes_a_server_object():
    strategy = fl.server.strategy.FedAvg(
        min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0
    )
    server = fl.server.Server(client_manager=fl.server.SimpleClientManager(), strategy=strategy)
    server.set_max_workers(4)
    assert server.max_workers == 4 and server.client_manager() is not None
    history = fl.simulation.start_simulation(
        client_fn=_client_fn, num_clients=2, server=server, config=fl.server.ServerConfig(2)
    )
    assert len(history.rounds) == 2


def test_a_server_that_overrides_the_round_loop_is_refused():
    class Custom(fl.server.Server):
        def fit_round(self, server_round, timeout):
            return None

    server = Custom(client_manager=fl.server.SimpleClientManager())
    with pytest.raises(fl.ConfigError, match="fit_round"):
        fl.simulation.start_simulation(
            client_fn=_client_fn, num_clients=2, server=server, config=fl.server.ServerConfig(1)
        )
    with pytest.raises(fl.ConfigError, match="start_simulation"):
        fl.server.Server(client_manager=fl.server.SimpleClientManager()).fit(1, None)


def test_start_server_refuses_a_server_object_of_the_wrong_type():
    with pytest.raises(fl.ConfigError, match="Server"):
        fl.server.start_server(server_address="127.0.0.1:0", server=object())


def test_start_client_accepts_grpc_max_message_length():
    import inspect

    params = inspect.signature(fl.client.start_client).parameters
    assert "grpc_max_message_length" in params
