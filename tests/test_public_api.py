"""The public surface is pinned: changing it must be a deliberate edit here."""

from __future__ import annotations

import subprocess
import sys

import fedhive
import fedhive.callbacks
import fedhive.client
import fedhive.common
import fedhive.report
import fedhive.secagg
import fedhive.server
import fedhive.server.strategy
import fedhive.simulation
import fedhive.testing

EXPECTED = {
    fedhive.report: [
        "Box",
        "Figure",
        "Run",
        "Series",
        "figures",
        "load_run",
        "load_runs",
        "report_html",
        "write_pngs",
        "write_report",
    ],
    fedhive.callbacks: ["MLflow", "TensorBoard", "client_values", "flat_params", "round_scalars"],
    fedhive.testing: ["DROP", "FakeReply", "FakeTransport", "ManualClock", "VirtualClock"],
    fedhive.client: [
        "Client",
        "ClientApp",
        "ClientFn",
        "Context",
        "Mod",
        "NumPyClient",
        "SitePolicy",
        "StateStore",
        "build_client",
        "policy_mod",
        "start_client",
        "start_clients",
        "start_numpy_client",
    ],
    fedhive.server.strategy: [
        "Aggregator",
        "Bulyan",
        "BufferingAggregator",
        "ComposedStrategy",
        "FaultTolerantFedAvg",
        "FedAdagrad",
        "FedAdam",
        "FedAsync",
        "FedAvg",
        "FedAvgM",
        "FedBuff",
        "FedMedian",
        "FedNova",
        "FedOpt",
        "FedProx",
        "FedTrimmedAvg",
        "FedYogi",
        "Krum",
        "MultiKrum",
        "QFedAvg",
        "Scaffold",
        "Strategy",
        "WeightedMean",
        "check_update",
    ],
    fedhive.simulation: [
        "Backend",
        "ClientSetup",
        "RayOptions",
        "SystemModel",
        "backend_names",
        "register_backend",
        "start_simulation",
    ],
    fedhive.secagg: [
        "SecAggConfig",
        "SecAggPlusMod",
        "SecAggPlusWorkflow",
        "check_secagg_compatible",
        "default_degree",
        "default_threshold",
        "secaggplus_mod",
    ],
}


def test_export_lists_are_pinned():
    for module, names in EXPECTED.items():
        assert sorted(module.__all__) == sorted(names), module.__name__
        for name in names:
            assert hasattr(module, name)


def test_flower_layout_is_reachable_from_the_top():
    import fedhive as fl

    assert fl.client.NumPyClient is fedhive.client.NumPyClient
    assert fl.server.strategy.FedAvg is fedhive.server.strategy.FedAvg
    assert fl.server.ServerConfig(num_rounds=3).num_rounds == 3
    assert callable(fl.simulation.start_simulation)
    assert callable(fl.common.ndarrays_to_parameters)
    assert callable(fl.common.parameters_to_ndarrays)
    for name in fedhive.common.__all__:
        assert hasattr(fedhive.common, name)


def test_errors_share_one_root():
    for name in fedhive.common.errors.__all__:
        assert issubclass(getattr(fedhive, name), fedhive.FedhiveError)


def test_import_is_light_and_fast():
    code = (
        # CPU time, not wall time: other jobs on the machine do not lengthen it
        "import sys, time; t = time.process_time(); import fedhive; "
        "import fedhive.client, fedhive.server, fedhive.simulation; "
        "print(time.process_time() - t); "
        "print(sorted(m for m in ('torch', 'matplotlib', 'sklearn', 'mnist1d', 'grpc') "
        "if m in sys.modules))"
    )
    times = []
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split("\n")
        times.append(float(out[0]))
        assert out[1] == "[]"
    assert min(times) < 0.5
