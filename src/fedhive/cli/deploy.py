"""``fedhive server`` and ``fedhive client``: a real federation over gRPC, from a shell.

``fedhive server [CONFIG.toml]`` serves rounds of a strategy chosen by name (FedAvg by
default; the same names and parameters as ``fedhive run``) on the clients' own model
(``[model] name = "client"``, the default: initial parameters from one connected
client, or from ``initial_parameters``) or on a reference model (``cnn1d``, ``mlp`` or
``logreg``) whose initial weights and centralized evaluation come from a built-in data
set, and writes history.json, metrics.csv, accuracy.png,
config.toml and final_model.npz to its output folder. ``fedhive client`` connects one
site: your own client (``--app module:attr``) or the built-in demo client (``--demo``),
which trains on its own partition of the same built-in data set. Both refuse to run
without TLS unless ``--insecure`` is given, and the server also refuses to run without
client authentication (tokens or mutual TLS). See docs/deployment.md.

The server config is a TOML file; every key is optional::

    address = "0.0.0.0:8080"
    rounds = 10
    round_timeout = 600          # seconds per stage; stragglers count as failures
    wait_timeout = 86400         # seconds to wait for strategy.min_available_clients
    seed = 0
    out = "runs/server"
    checkpoint_dir = ""          # "" = <out>/checkpoints
    resume = false
    require_client_auth = false  # mutual TLS: clients need certificates signed by tls.ca
    tokens = ""                  # TOML or JSON file of node_id -> token (enrolled clients)

    [tls]       ca, cert, key (PEM files)
    [strategy]  name (as in fedhive run: fedavg, fedprox, fedadam, krum, ...), the chosen
                strategy's parameters (proximal_mu, eta, ...), fraction_fit,
                fraction_evaluate, min_fit_clients, min_evaluate_clients,
                min_available_clients, centralized_eval
    [model]     name ("client" | "cnn1d" | "mlp" | "logreg"), hidden, initial_parameters
    [data]      dataset ("mnist1d" | "digits" | "synthetic" | "folder"), num_samples, path
    [train]     local_epochs, batch_size, lr, momentum, max_steps (sent with every fit)

Relative paths are taken from the current directory. An unknown key or a bad value stops
the server with a message naming the key, the value and what is allowed; so does an
unknown strategy name or a parameter the chosen strategy does not take.

The code lives in :mod:`fedhive.cli.server_config` (the config),
:mod:`fedhive.cli.server_cmd`, :mod:`fedhive.cli.client_cmd` and
:mod:`fedhive.cli.demo_client`; this module gathers their public names.
"""

from __future__ import annotations

from fedhive.cli.client_cmd import client
from fedhive.cli.demo_client import DemoClient, DemoClientFn, demo_client_fn
from fedhive.cli.server_cmd import server, server_strategy
from fedhive.cli.server_config import (
    DeployConfig,
    DeployDataConfig,
    DeployModelConfig,
    DeployStrategyConfig,
    DeployTrainConfig,
    TlsConfig,
    load_tokens,
    server_certificates,
    validate_server_config,
)

__all__ = [
    "DemoClient",
    "DemoClientFn",
    "DeployConfig",
    "DeployDataConfig",
    "DeployModelConfig",
    "DeployStrategyConfig",
    "DeployTrainConfig",
    "TlsConfig",
    "client",
    "demo_client_fn",
    "load_tokens",
    "server",
    "server_certificates",
    "server_strategy",
    "validate_server_config",
]
