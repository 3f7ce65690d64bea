"""``fedhive server`` and ``fedhive client``: a real federation over gRPC, from a shell.

``fedhive server [CONFIG.toml]`` serves FedAvg rounds of a reference model (``cnn1d``,
``mlp`` or ``logreg``) whose initial weights and centralized evaluation come from a
built-in data set, and writes history.json, metrics.csv, accuracy.png, config.toml and
final_model.npz to its output folder. ``fedhive client`` connects one site: your own
client (``--app module:attr``) or the built-in demo client (``--demo``), which trains on
its own partition of the same built-in data set. Both refuse to run without TLS unless
``--insecure`` is given. See docs/deployment.md.

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
    [strategy]  fraction_fit, fraction_evaluate, min_fit_clients, min_evaluate_clients,
                min_available_clients, centralized_eval
    [model]     name ("cnn1d" | "mlp" | "logreg"), hidden
    [data]      dataset ("mnist1d" | "digits" | "synthetic" | "folder"), num_samples, path
    [train]     local_epochs, batch_size, lr, momentum (sent to clients with every fit)

Relative paths are taken from the current directory. An unknown key or a bad value stops
the server with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.markup import escape

from fedhive.cli.config import (
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    parse_override,
    validate,
)
from fedhive.cli.experiment import (
    ModelSpec,
    SimClient,
    evaluate_params,
    load_data,
    make_partition,
    split_clients,
    weighted_average,
)
from fedhive.client.context import Context
from fedhive.common.errors import ConfigError, FedhiveError
from fedhive.common.records import Config, NDArray, NDArrays, Scalar, ndarrays_to_parameters
from fedhive.data import Dataset
from fedhive.server.engine import Engine, RoundCallback
from fedhive.server.history import History
from fedhive.server.strategy.fedavg import FedAvg

__all__ = [
    "DemoClient",
    "DemoClientFn",
    "DeployConfig",
    "client",
    "load_tokens",
    "server",
    "validate_server_config",
]

console = Console()
err = Console(stderr=True, soft_wrap=True)  # one line per message, for log files
log = logging.getLogger("fedhive")

# --------------------------------------------------------------------------- server config


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Section):
    ca: str = Field("", description="CA certificate (PEM); needed for require_client_auth")
    cert: str = Field("", description="the server's certificate (PEM)")
    key: str = Field("", description="the server's private key (PEM)")


class DeployStrategyConfig(_Section):
    fraction_fit: float = Field(1.0, ge=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_fit_clients: int = Field(2, ge=0)
    min_evaluate_clients: int = Field(2, ge=0)
    min_available_clients: int = Field(2, ge=1)
    centralized_eval: bool = True


class DeployDataConfig(_Section):
    dataset: Literal["mnist1d", "digits", "synthetic", "folder"] = "mnist1d"
    num_samples: int = Field(20_000, ge=100, description="MNIST-1D samples to generate")
    path: str = Field("", description="folder of train/test .npz or .csv (dataset = folder)")


class DeployConfig(_Section):
    """The config of ``fedhive server`` (see the module docstring)."""

    address: str = "0.0.0.0:8080"
    rounds: int = Field(10, ge=0)
    round_timeout: float | None = Field(None, gt=0)
    wait_timeout: float = Field(24 * 3600.0, gt=0)
    seed: int = 0
    out: str = "runs/server"
    checkpoint_dir: str = ""
    resume: bool = False
    require_client_auth: bool = False
    tokens: str = ""
    tls: TlsConfig = TlsConfig()
    strategy: DeployStrategyConfig = DeployStrategyConfig()
    model: ModelConfig = ModelConfig()
    data: DeployDataConfig = DeployDataConfig()
    train: TrainConfig = TrainConfig()


def _explain(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in error["loc"])
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        section: type[BaseModel] = DeployConfig
        for part in error["loc"][:-1]:
            section = section.model_fields[str(part)].annotation  # type: ignore[assignment]
        allowed = ", ".join(section.model_fields)
        return f"{source}: unknown key {key!r} (value {value!r}); allowed keys here: {allowed}"
    return f"{source}: {key} = {value!r}: {error['msg']}"


def validate_server_config(data: dict[str, Any], source: str = "config") -> DeployConfig:
    """Validate a plain dict into a :class:`DeployConfig` (ConfigError if bad)."""
    try:
        return DeployConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_explain(e, source) for e in exc.errors()]  # type: ignore[arg-type]
        raise ConfigError("invalid server configuration:\n  " + "\n  ".join(lines)) from None


def load_tokens(path: str | Path) -> dict[str, str]:
    """Enrolled clients from a TOML or JSON file (``.json``) of ``node_id = "token"``."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read tokens file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text.decode())
    except (ValueError, UnicodeDecodeError) as exc:  # JSON and TOML errors are ValueErrors
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise ConfigError(f"tokens file {path} is not valid {kind}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"tokens file {path} must map node ids to tokens, got {type(data)}")
    for node, token in data.items():
        if not isinstance(token, str) or not token:
            raise ConfigError(
                f"tokens file {path}: the token of {node!r} must be a non-empty string, "
                f"got {token!r}"
            )
    if not data:
        raise ConfigError(f"tokens file {path} enrolls no client; every client would be refused")
    return dict(data)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


_SERVER_NEEDS_TLS = (
    "fedhive server requires TLS: give --cert SERVER.pem --key SERVER_KEY.pem (and --ca "
    "CA.pem with --require-client-auth), or the same in the [tls] table of the config; "
    "pass --insecure to serve without encryption (for tests on one machine only)"
)


def _server_certificates(cfg: DeployConfig, insecure: bool) -> tuple[bytes, bytes, bytes] | None:
    tls = cfg.tls
    given = [f"tls.{k} = {v!r}" for k, v in tls.model_dump().items() if v]
    if insecure:
        if given:
            raise ConfigError(
                f"--insecure contradicts the TLS settings given ({', '.join(given)}); "
                "drop one or the other"
            )
        if cfg.require_client_auth:
            raise ConfigError("--require-client-auth needs TLS; it cannot be used with --insecure")
        return None
    if not (tls.cert and tls.key):
        raise ConfigError(_SERVER_NEEDS_TLS)
    if cfg.require_client_auth and not tls.ca:
        raise ConfigError(
            "--require-client-auth needs --ca CA.pem (tls.ca): the CA that signs client "
            "certificates"
        )
    ca = _read(tls.ca, "CA certificate") if tls.ca else b""
    return ca, _read(tls.cert, "server certificate"), _read(tls.key, "server key")


def _server_strategy(cfg: DeployConfig) -> tuple[FedAvg, Dataset]:
    """FedAvg as the config says, its initial model and centralized evaluation set."""
    exp = _experiment_config(cfg.seed, cfg.data.model_dump(), cfg.model.model_dump(), 1, "server")
    data = load_data(exp)
    in_dim = int(np.prod(data.x_train.shape[1:]))
    spec = ModelSpec(cfg.model.name, in_dim, data.num_classes, cfg.model.hidden)
    fit_config: Config = dict(cfg.train.model_dump())

    def evaluate_fn(
        server_round: int, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]]:
        loss, acc = evaluate_params(spec, parameters, data.x_test, data.y_test)
        return loss, {"accuracy": acc}

    st = cfg.strategy
    strategy = FedAvg(
        fraction_fit=st.fraction_fit,
        fraction_evaluate=st.fraction_evaluate,
        min_fit_clients=st.min_fit_clients,
        min_evaluate_clients=st.min_evaluate_clients,
        min_available_clients=st.min_available_clients,
        evaluate_fn=evaluate_fn if st.centralized_eval else None,
        on_fit_config_fn=lambda rnd: dict(fit_config),
        initial_parameters=ndarrays_to_parameters(spec.initial(cfg.seed)),
        fit_metrics_aggregation_fn=weighted_average,
        evaluate_metrics_aggregation_fn=weighted_average,
    )
    return strategy, data


def _experiment_config(
    seed: int, data: dict[str, Any], model: dict[str, Any], num_clients: int, source: str
) -> ExperimentConfig:
    """The simulation's config for the data and model pieces shared with ``fedhive run``."""
    raw = {"seed": seed, "num_clients": num_clients, "data": data, "model": model}
    return validate(raw, source)


def _set_log_level(level: str) -> None:
    name = level.upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level {level!r}: choose debug, info, warning or error")
    log.setLevel(name)


# --------------------------------------------------------------------------- fedhive server


def server(
    config_file: Annotated[
        Path | None, typer.Argument(metavar="[CONFIG.toml]", help="server config (TOML)")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="HOST:PORT to serve on (default: 0.0.0.0:8080)")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="number of rounds")] = None,
    out: Annotated[str | None, typer.Option(help="output folder")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="serve WITHOUT TLS (tests on one machine only)")
    ] = False,
    ca: Annotated[
        str | None, typer.Option(help="CA certificate (PEM), for --require-client-auth")
    ] = None,
    cert: Annotated[str | None, typer.Option(help="server certificate (PEM)")] = None,
    key: Annotated[str | None, typer.Option(help="server private key (PEM)")] = None,
    require_client_auth: Annotated[
        bool | None,
        typer.Option(
            "--require-client-auth", help="mutual TLS: clients present certificates signed by CA"
        ),
    ] = None,
    tokens: Annotated[
        str | None, typer.Option(help="TOML/JSON file of enrolled clients: node_id -> token")
    ] = None,
    checkpoint_dir: Annotated[
        str | None, typer.Option(help="checkpoint folder (default: OUT/checkpoints)")
    ] = None,
    resume: Annotated[
        bool | None, typer.Option("--resume", help="continue from the newest checkpoint")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override any config key, e.g. --set strategy.fraction_fit=0.5"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug|info|warning|error")] = "info",
) -> None:
    """Serve a federation over gRPC: FedAvg rounds of a reference model (cnn1d, mlp or
    logreg) on a built-in data set, with centralized evaluation on its test split.

    Requires TLS (--cert/--key, or the tls table of the config) unless --insecure is
    given.
    Writes history.json, metrics.csv, accuracy.png, config.toml and final_model.npz to
    the output folder, and a checkpoint after every round (continue with --resume).
    """
    flags = {
        "address": address,
        "rounds": rounds,
        "out": out,
        "tls.ca": ca,
        "tls.cert": cert,
        "tls.key": key,
        "require_client_auth": require_client_auth,
        "tokens": tokens,
        "checkpoint_dir": checkpoint_dir,
        "resume": resume,
    }
    try:
        code = _serve(config_file, flags, set_ or [], insecure, log_level)
    except FedhiveError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


class _Outputs(RoundCallback):
    """Files after every round, a line per round on stderr, and the engine for the end."""

    def __init__(self, out_dir: Path, resolved: dict[str, Any], rounds: int) -> None:
        self.out_dir = out_dir
        self.resolved = resolved
        self.rounds = rounds
        self.engine: Engine | None = None

    def write(self, history: History) -> None:
        from fedhive.cli.output import write_history, write_metrics_csv

        write_history(self.out_dir / "history.json", history, self.resolved)
        write_metrics_csv(self.out_dir / "metrics.csv", history)

    def on_run_start(self, engine: Engine) -> None:
        self.engine = engine

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        self.write(engine.history)
        central = record.get("centralized") or {}
        dist = record.get("distributed") or {}
        fit = record.get("fit") or {}
        acc = central.get("accuracy", (dist.get("metrics") or {}).get("accuracy"))
        loss = central.get("loss", dist.get("loss"))
        parts = [f"round {record['round']}/{self.rounds}:"]
        if acc is not None:
            parts.append(f"accuracy {acc:.4f}")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        failures = len(record.get("failures", []))
        parts.append(f"({fit.get('num_results', 0)} fit results, {failures} failures)")
        err.print(" ".join(parts), highlight=False, markup=False)


def _serve(
    config_file: Path | None,
    flags: dict[str, Any],
    sets: list[str],
    insecure: bool,
    log_level: str,
) -> int:
    from fedhive.cli.output import write_config, write_plot
    from fedhive.cli.progress import summary_table
    from fedhive.server.checkpoint import save_npz
    from fedhive.server.config import ServerConfig
    from fedhive.server.start import start_server

    raw = load_config(config_file)
    overrides = dict(parse_override(s) for s in sets)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    source = str(config_file) if config_file else "defaults"
    cfg = validate_server_config(apply_overrides(raw, overrides), source)
    certificates = _server_certificates(cfg, insecure)
    auth_tokens = load_tokens(cfg.tokens) if cfg.tokens else None
    _set_log_level(log_level)
    if auth_tokens is not None and certificates is None:
        err.print(
            "[yellow]warning:[/] client tokens travel in the clear without TLS", highlight=False
        )
    strategy, data = _server_strategy(cfg)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_dump()
    write_config(out_dir / "config.toml", resolved)
    outputs = _Outputs(out_dir, resolved, cfg.rounds)
    host = cfg.address.rsplit(":", 1)[0]
    mode = "mutual TLS" if cfg.require_client_auth else "TLS" if certificates else "INSECURE"

    def started(grpc_server: Any) -> None:
        err.print(
            f"fedhive server: listening on {host}:{grpc_server.port} ({mode}); "
            f"{cfg.model.name} on {data.name}, {cfg.rounds} rounds, waiting for "
            f"{cfg.strategy.min_available_clients} clients -> {out_dir}",
            highlight=False,
            markup=False,
        )

    try:
        history = start_server(
            server_address=cfg.address,
            config=ServerConfig(num_rounds=cfg.rounds, round_timeout=cfg.round_timeout),
            strategy=strategy,
            certificates=certificates,
            require_client_auth=cfg.require_client_auth,
            auth_tokens=auth_tokens,
            wait_timeout=cfg.wait_timeout,
            seed=cfg.seed,
            checkpoint_dir=cfg.checkpoint_dir or out_dir / "checkpoints",
            resume=cfg.resume,
            callbacks=[outputs],
            on_started=started,
        )
    except KeyboardInterrupt:
        err.print(
            f"\ninterrupted; the finished rounds are saved in {out_dir}. Continue with the "
            "same command and --resume",
            highlight=False,
            markup=False,
        )
        return 130
    outputs.write(history)
    if outputs.engine is not None:
        save_npz(out_dir / "final_model.npz", list(outputs.engine.parameters.arrays))
    write_plot(out_dir / "accuracy.png", history)
    table = summary_table(history, str(out_dir))
    table.title = "fedhive server: summary"
    console.print(table)
    return 0


# --------------------------------------------------------------------------- fedhive client

_CLIENT_NEEDS_TLS = (
    "fedhive client requires TLS: give --root-certificates CA.pem (the CA that signed the "
    "server's certificate); pass --insecure to connect without encryption (for tests on one "
    "machine only)"
)


def _demo_client_fn(
    *,
    partition_id: int,
    num_partitions: int,
    dataset: str,
    num_samples: int,
    partition: str,
    alpha: float,
    val_fraction: float,
    model: str,
    hidden: int,
    seed: int,
) -> tuple[DemoClientFn, str]:
    """The demo client's ``client_fn`` and a line describing what it holds."""
    if num_partitions < 1:
        raise ConfigError(f"--num-partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"--partition-id must be in [0, {num_partitions}) for --num-partitions "
            f"{num_partitions}, got {partition_id}"
        )
    data_cfg = {
        "dataset": dataset,
        "num_samples": num_samples,
        "partition": partition,
        "alpha": alpha,
        "val_fraction": val_fraction,
    }
    model_cfg = {"name": model, "hidden": hidden}
    try:
        cfg = _experiment_config(seed, data_cfg, model_cfg, num_partitions, "demo")
    except ConfigError as exc:  # name the flags, not the config keys behind them
        text = str(exc).replace("invalid configuration", "invalid demo client options")
        flags = {f"data.{k}": k for k in data_cfg} | {
            "model.name": "model",
            "model.hidden": "hidden",
        }
        for dotted, name in flags.items():
            text = text.replace(f"demo: {dotted} =", "--" + name.replace("_", "-") + " =")
        raise ConfigError(text) from None
    data = load_data(cfg)
    parts = make_partition(cfg, data)
    train_idx, val_idx = split_clients(parts, cfg.data.val_fraction, cfg.seed)[partition_id]
    in_dim = int(np.prod(data.x_train.shape[1:]))
    spec = ModelSpec(cfg.model.name, in_dim, data.num_classes, cfg.model.hidden)
    fn = DemoClientFn(
        spec,
        (data.x_train[train_idx], data.y_train[train_idx]),
        (data.x_train[val_idx], data.y_train[val_idx]),
        partition_id,
        num_partitions,
    )
    line = (
        f"demo client: partition {partition_id} of {num_partitions} ({partition}) of "
        f"{data.name}: {len(train_idx)} train / {len(val_idx)} held-out samples, "
        f"model {model}"
    )
    return fn, line


class DemoClient(SimClient):
    """The simulation's client; training settings the server does not send get defaults."""

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return super().fit(parameters, {**TrainConfig().model_dump(), **config})


@dataclass
class DemoClientFn:
    """``client_fn`` of the built-in demo client: one fixed partition of a data set."""

    spec: ModelSpec
    train: tuple[NDArray, NDArray]
    val: tuple[NDArray, NDArray]
    partition_id: int
    num_partitions: int

    def __call__(self, context: Context) -> DemoClient:
        context.node_config.setdefault("partition-id", self.partition_id)
        context.node_config.setdefault("num-partitions", self.num_partitions)
        return DemoClient(self.spec, self.train, self.val)


def _load_app(spec: str, app_dir: str) -> Any:
    """``module:attr`` (attr may be dotted) imported with ``app_dir`` on ``sys.path``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"--app expects MODULE:ATTRIBUTE (e.g. my_client:client_fn), got {spec!r}"
        )
    folder = str(Path(app_dir).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"--app {spec}: cannot import module {module_name!r} (searched {folder} and "
            f"sys.path): {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"--app {spec}: {module_name!r} has no attribute {attr!r}") from None
    return obj


def _client_target(obj: Any, spec: str) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """``start_client`` arguments for an ``--app`` object, and the app's own mods."""
    from fedhive.client.app import ClientApp
    from fedhive.client.client import Client
    from fedhive.client.numpy_client import NumPyClient

    if isinstance(obj, ClientApp):
        return {"client_fn": obj.client_fn}, obj.mods
    if isinstance(obj, NumPyClient):
        return {"client": obj.to_client()}, ()
    if isinstance(obj, Client):
        return {"client": obj}, ()
    if callable(obj):
        return {"client_fn": obj}, ()
    raise ConfigError(
        f"--app {spec}: expected a client_fn (taking a Context or a cid), a NumPyClient or "
        f"Client instance, or a ClientApp; got {type(obj).__name__}"
    )


def _token(token: str | None, token_file: Path | None) -> str:
    if token and token_file is not None:
        raise ConfigError("give --token or --token-file, not both")
    if token_file is not None:
        try:
            value = token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {token_file}: {exc.strerror}") from exc
        if not value:
            raise ConfigError(f"--token-file {token_file} is empty")
        return value
    return token or ""


def client(
    server: Annotated[str, typer.Option("--server", help="the server's HOST:PORT")],
    app: Annotated[
        str | None,
        typer.Option(help="your client: MODULE:ATTR, a client_fn, NumPyClient or ClientApp"),
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="run the built-in demo client instead of --app")
    ] = False,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="connect WITHOUT TLS (tests on one machine only)")
    ] = False,
    root_certificates: Annotated[
        Path | None, typer.Option(help="CA certificate (PEM) that signed the server's")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option(help="this client's certificate (PEM), for mutual TLS")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(help="this client's private key (PEM), for mutual TLS")
    ] = None,
    node_id: Annotated[
        str | None, typer.Option(help="this site's node id (default: random)")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="FEDHIVE_TOKEN", help="the token enrolled for this node id"),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="read the token from this file instead")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="site policy (TOML): allowed config keys, epochs, metrics")
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option(help="append a JSON line per message that leaves this site")
    ] = None,
    persistent: Annotated[
        bool, typer.Option("--persistent", help="stay up after a run and join the next one")
    ] = False,
    max_retries: Annotated[
        int | None, typer.Option(help="reconnection attempts (default: unlimited)")
    ] = None,
    max_wait_time: Annotated[
        float | None, typer.Option(help="seconds to keep reconnecting (default: unlimited)")
    ] = None,
    app_dir: Annotated[str, typer.Option(help="folder to import --app from")] = ".",
    partition_id: Annotated[int, typer.Option(help="demo: this client's partition")] = 0,
    num_partitions: Annotated[int, typer.Option(help="demo: number of partitions")] = 2,
    dataset: Annotated[str, typer.Option(help="demo: mnist1d|digits|synthetic")] = "mnist1d",
    num_samples: Annotated[int, typer.Option(help="demo: MNIST-1D samples")] = 20_000,
    partition: Annotated[
        str, typer.Option(help="demo: iid|dirichlet|shards|quantity_skew")
    ] = "dirichlet",
    alpha: Annotated[float, typer.Option(help="demo: Dirichlet concentration")] = 0.5,
    val_fraction: Annotated[
        float, typer.Option(help="demo: share of the partition kept for evaluation")
    ] = 0.1,
    model: Annotated[str, typer.Option(help="demo: cnn1d|mlp|logreg")] = "cnn1d",
    hidden: Annotated[int, typer.Option(help="demo: hidden width of the MLP")] = 128,
    seed: Annotated[
        int, typer.Option(help="demo: seed of the data and partition (same on every site)")
    ] = 0,
    log_level: Annotated[str, typer.Option(help="debug|info|warning|error")] = "info",
) -> None:
    """Connect this site to a fedhive server and answer its tasks until the run ends.

    Runs your client (--app MODULE:ATTR) or the built-in demo client (--demo), which
    trains a reference model on its own partition of a built-in data set. Requires TLS
    (--root-certificates CA.pem) unless --insecure is given.
    """
    try:
        if demo == (app is not None):
            raise ConfigError("give exactly one of --app MODULE:ATTR or --demo")
        if insecure and (root_certificates is not None or cert is not None):
            raise ConfigError("--insecure contradicts --root-certificates/--cert; drop one")
        if not insecure and root_certificates is None:
            raise ConfigError(_CLIENT_NEEDS_TLS)
        if (cert is None) != (key is None):
            raise ConfigError("mutual TLS needs both --cert and --key")
        secret = _token(token, token_file)
        mods: list[Any] = []
        if policy is not None:
            from fedhive.client.policy import SitePolicy, policy_mod

            mods.append(policy_mod(SitePolicy.from_file(policy)))
        if app is not None:
            target, app_mods = _client_target(_load_app(app, app_dir), app)
            mods.extend(app_mods)
            what = f"--app {app}"
        else:
            fn, what = _demo_client_fn(
                partition_id=partition_id,
                num_partitions=num_partitions,
                dataset=dataset,
                num_samples=num_samples,
                partition=partition,
                alpha=alpha,
                val_fraction=val_fraction,
                model=model,
                hidden=hidden,
                seed=seed,
            )
            target = {"client_fn": fn}
        tls: dict[str, Any] = {}
        if cert is not None and key is not None:
            tls = {
                "certificate_chain": _read(str(cert), "--cert"),
                "private_key": _read(str(key), "--key"),
            }
        roots = _read(str(root_certificates), "--root-certificates") if root_certificates else None
        _set_log_level(log_level)
        err.print(
            f"fedhive client: {what} -> {server} ({'INSECURE' if insecure else 'TLS'})",
            highlight=False,
            markup=False,
        )
        from fedhive.client.start import start_client

        start_client(
            server_address=server,
            root_certificates=roots,
            insecure=insecure,
            max_retries=max_retries,
            max_wait_time=max_wait_time,
            node_id=node_id,
            auth_token=secret,
            mods=mods,
            persistent=persistent,
            audit_log=audit_log,
            **tls,
            **target,
        )
    except FedhiveError as exc:
        err.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("\ninterrupted", highlight=False, markup=False)
        raise typer.Exit(130) from None
    raise typer.Exit(0)
