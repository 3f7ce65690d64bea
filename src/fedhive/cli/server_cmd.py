"""``fedhive server``: serve rounds of the configured strategy over gRPC and write the
run's files (see :mod:`fedhive.cli.deploy` for the config)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from fedhive.cli.deploy_common import console, err, experiment_config, set_log_level
from fedhive.cli.experiment import ModelSpec, load_data, model_strategy
from fedhive.cli.failures import (
    NO_SUCCESS_EXIT,
    failure_lines,
    no_success_message,
    run_had_no_success,
    zero_success_warning,
)
from fedhive.cli.initial_model import describe_model, initial_parameters
from fedhive.cli.overrides import merged_config
from fedhive.cli.server_config import (
    DeployConfig,
    check_client_auth,
    load_tokens,
    server_certificates,
    validate_server_config,
)
from fedhive.client.app import Mod
from fedhive.common.errors import ConfigError, FedhiveError
from fedhive.common.records import Config
from fedhive.data import Dataset
from fedhive.server.client_manager import SimpleClientManager
from fedhive.server.engine import Engine, RoundCallback
from fedhive.server.history import History
from fedhive.server.policy import RunPolicy
from fedhive.server.strategy import Strategy
from fedhive.server.strategy.composed import plain_mean

__all__ = ["describe_strategy", "server", "server_policy", "server_strategy"]


def server_strategy(cfg: DeployConfig) -> tuple[Strategy, tuple[Mod, ...], Dataset | None]:
    """The strategy ``[strategy]`` names, the client mods it needs, and the data set that
    gives the initial model and the centralized evaluation (``None`` when the model comes
    from a client: ``[model] name = "client"``, the default).

    Built by ``fedhive run``'s :func:`~fedhive.cli.experiment.build_strategy`, so both
    commands take the same names and parameters.
    """
    data: Dataset | None = None
    spec: ModelSpec | None = None
    if not cfg.model.from_client:
        reference = cfg.model.reference().model_dump()
        exp = experiment_config(cfg.seed, cfg.data.model_dump(), reference, 1, "server")
        data = load_data(exp)
        spec = ModelSpec.for_data(exp.model, data)
    initial = initial_parameters(cfg.model, spec, cfg.seed)
    fit_config: Config = dict(cfg.train.model_dump())
    st = cfg.strategy
    try:
        strategy, mods = model_strategy(
            st,
            spec,
            data,
            fit_config,
            cfg.seed,
            min_available_clients=st.min_available_clients,
            initial=initial,
        )
    except ConfigError as exc:
        if spec is None and initial is None and "initial_parameters" in str(exc):
            raise ConfigError(
                f'{exc}; the server holds no model ([model] name = "client"): give one '
                'with [model] initial_parameters = "MODEL.npz" (numpy.savez of its arrays)'
            ) from None
        raise
    if cfg.memory.accumulator != "float64":
        _set_accumulator(strategy, cfg.memory.accumulator, st.name)
    return strategy, mods, data


def server_policy(cfg: DeployConfig) -> RunPolicy | None:
    """The run policy ``[policy]`` names (synchronous rounds by default), new for this run;
    ``None`` for an asynchronous strategy, which brings its own
    (:func:`fedhive.cli.stragglers.run_policy`)."""
    from fedhive.cli.stragglers import run_policy

    return run_policy(cfg.strategy, cfg.policy)


def _set_accumulator(strategy: Strategy, accumulator: str, name: str) -> None:
    """Set the accumulator of ``strategy``'s weighted mean (see ``plain_mean``)."""
    mean = plain_mean(strategy)
    if mean is None:
        raise ConfigError(
            f"memory.accumulator = {accumulator!r} applies to strategies that take a weighted "
            "mean (FedAvg, FedProx, FedAvgM, FedAdam, ...); "
            f"strategy {name!r} keeps a float64 aggregate (remove memory.accumulator)"
        )
    mean.accumulator = accumulator


def describe_strategy(cfg: DeployConfig, mods: tuple[Mod, ...]) -> str:
    """``"fedprox (proximal_mu = 1.0)"``, and the client mods the strategy needs."""
    params = cfg.strategy.parameters()
    text: str = cfg.strategy.name
    if params:
        text += " (" + ", ".join(f"{k} = {v!r}" for k, v in params.items()) + ")"
    if mods:
        names = ", ".join(getattr(m, "__name__", repr(m)) for m in mods)
        text += f"; every client must run fedhive.client.mods.{names} (the demo client does)"
    return text


def server(
    config_file: Annotated[
        Path | None, typer.Argument(metavar="CONFIG.toml", help="server config (TOML)")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="HOST:PORT to serve on (default: 0.0.0.0:8080)")
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(help="number of rounds (model versions under an asynchronous policy)"),
    ] = None,
    data_port: Annotated[
        int | None,
        typer.Option(
            help="port of the data plane for large messages, beside the gRPC port "
            "(default: any free one; -1: none, everything on the gRPC stream)"
        ),
    ] = None,
    out: Annotated[str | None, typer.Option(help="output folder")] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="serve WITHOUT TLS and let any client join (tests only); with --cert/--key: "
            "TLS, but without client authentication",
        ),
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
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="replace the run already in the output folder (and its checkpoints)"
        ),
    ] = False,
    dashboard: Annotated[
        str | None,
        typer.Option(
            help="serve a live read-only page on HOST:PORT (loopback; another address needs "
            "--tokens, which viewers log in with)"
        ),
    ] = None,
) -> None:
    """Serve a federation over gRPC: rounds of the config's strategy (FedAvg by
    default; [strategy] name picks another, as in fedhive run).

    The model is the clients' own by default: the initial parameters come from one
    connected client's get_parameters (or from [model] initial_parameters, a .npz file),
    and updates of another layout are refused. [model] name = "cnn1d", "mlp" or "logreg"
    serves a reference model of a built-in data set instead, with centralized evaluation
    on its test split. Synchronous rounds by default; [policy] name = "buffered-async"
    publishes a model every buffer_size results while concurrency sites train.

    Requires TLS (--cert/--key, or the [tls] table of the config) and client
    authentication (--tokens, or --require-client-auth with --ca) unless --insecure is
    given. Writes history.json, metrics.csv, accuracy.png, config.toml and
    final_model.npz to the output folder, and a checkpoint after every round (continue
    with --resume). --dashboard 127.0.0.1:8081 serves a live page of the run (clients,
    rounds, failures, bytes, privacy). Exits 1 if no client's fit ever succeeded.
    """
    flags = {
        "address": ("--address", address),
        "rounds": ("--rounds", rounds),
        "data_port": ("--data-port", data_port),
        "out": ("--out", out),
        "tls.ca": ("--ca", ca),
        "tls.cert": ("--cert", cert),
        "tls.key": ("--key", key),
        "require_client_auth": ("--require-client-auth", require_client_auth),
        "tokens": ("--tokens", tokens),
        "checkpoint_dir": ("--checkpoint-dir", checkpoint_dir),
        "resume": ("--resume", resume),
    }
    try:
        code = _serve(config_file, flags, set_ or [], insecure, log_level, overwrite, dashboard)
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
        evaluate = len(dist.get("failures") or [])
        counts = f"{fit.get('num_results', 0)} fit results, {failures} failures"
        if evaluate:
            counts += f", {evaluate} evaluate failures"
        parts.append(f"({counts})")
        err.print(" ".join(parts), highlight=False, markup=False)
        report_failures(record)


def report_failures(record: dict[str, Any]) -> None:
    """The round's failure reasons (one line each) and a zero-success warning, on stderr."""
    for line in failure_lines(record):
        err.print(f"  {line}", highlight=False, markup=False)
    warning = zero_success_warning(record)
    if warning is not None:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


def _resolve(
    config_file: Path | None, flags: dict[str, tuple[str, Any]], sets: list[str]
) -> DeployConfig:
    """The config file with ``--set`` and the flags applied, validated."""
    merged = merged_config(config_file, sets, flags)
    return validate_server_config(merged.data, merged.source, merged.sources)


def _serve(
    config_file: Path | None,
    flags: dict[str, tuple[str, Any]],
    sets: list[str],
    insecure: bool,
    log_level: str,
    overwrite: bool = False,
    dashboard: str | None = None,
) -> int:
    from fedhive.cli.outdir import prepare_out_dir, resume_line
    from fedhive.cli.output import plot_title, write_config, write_plot
    from fedhive.cli.progress import summary_table
    from fedhive.cli.tracking import tracking_callbacks
    from fedhive.server.checkpoint import save_npz
    from fedhive.server.config import ServerConfig
    from fedhive.server.start import start_server

    cfg = _resolve(config_file, flags, sets)
    certificates = server_certificates(cfg, insecure)
    check_client_auth(cfg, insecure)
    auth_tokens = load_tokens(cfg.tokens) if cfg.tokens else None
    set_log_level(log_level)
    if auth_tokens is not None and certificates is None:
        err.print(
            "[yellow]warning:[/] client tokens travel in the clear without TLS", highlight=False
        )
    manager = SimpleClientManager(seed=cfg.seed, wait_timeout=cfg.wait_timeout)
    board = None
    extra: list[RoundCallback] = []
    if dashboard is not None:  # checked before anything is written or listens
        from fedhive.cli.dashboard_cmd import prepare_dashboard

        board, live = prepare_dashboard(
            dashboard, cfg, auth_tokens, certificates is not None, manager
        )
        extra.append(live)
    out_dir = Path(cfg.out)
    checkpoints = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out_dir / "checkpoints"
    if not cfg.resume:
        hint = "the same command and --resume"
        prepare_out_dir(out_dir, checkpoints, overwrite=overwrite, resume_hint=hint)
    strategy, mods, data = server_strategy(cfg)
    policy = server_policy(cfg)
    title = plot_title(data.name if data else None, cfg.strategy.name, cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_dump()
    write_config(out_dir / "config.toml", resolved)
    outputs = _Outputs(out_dir, resolved, cfg.rounds)
    tracking = tracking_callbacks(cfg.tracking, out_dir, resolved)
    host = cfg.address.rsplit(":", 1)[0]
    mode = "mutual TLS" if cfg.require_client_auth else "TLS" if certificates else "INSECURE"
    if not (cfg.require_client_auth or auth_tokens):
        mode += ", NO CLIENT AUTHENTICATION"

    def started(grpc_server: Any) -> None:
        err.print(
            f"fedhive server: listening on {host}:{grpc_server.port} ({mode}); "
            f"{describe_model(cfg.model, data.name if data else None)}, {cfg.rounds} "
            "rounds, waiting for "
            f"{cfg.strategy.min_available_clients} clients -> {out_dir}",
            highlight=False,
            markup=False,
        )
        if grpc_server.data_port:
            err.print(
                f"fedhive server: data plane on port {grpc_server.data_port} (large messages; "
                "clients that cannot reach it use the gRPC port)",
                highlight=False,
                markup=False,
            )
        err.print(
            f"fedhive server: strategy {describe_strategy(cfg, mods)}",
            highlight=False,
            markup=False,
        )
        if policy is not None and policy.name != "sync":  # the default is not named
            err.print(
                f"fedhive server: policy {cfg.policy.describe()}; a round is a model version",
                highlight=False,
                markup=False,
            )
        if cfg.resume:
            line = resume_line(checkpoints, cfg.rounds)
            err.print(f"fedhive server: {line}", highlight=False, markup=False)

    if board is not None:
        board.start()
        err.print(f"fedhive server: dashboard on {board.url}", highlight=False, markup=False)
    try:
        history = start_server(
            server_address=cfg.address,
            client_manager=manager,
            config=ServerConfig(num_rounds=cfg.rounds, round_timeout=cfg.round_timeout),
            strategy=strategy,
            certificates=certificates,
            require_client_auth=cfg.require_client_auth,
            auth_tokens=auth_tokens,
            wait_timeout=cfg.wait_timeout,
            seed=cfg.seed,
            checkpoint_dir=checkpoints,
            resume=cfg.resume,
            callbacks=[outputs, *extra, *tracking],
            on_started=started,
            policy=policy,
            secure_aggregation=(
                None if cfg.secure_aggregation is None else cfg.secure_aggregation.options()
            ),
            compression=None if cfg.compression is None else cfg.compression.build(),
            **cfg.memory.server_options(),
            data_plane=cfg.data_port >= 0,
            data_port=max(cfg.data_port, 0),
        )
    except KeyboardInterrupt:
        if outputs.engine is not None:
            write_plot(out_dir / "accuracy.png", outputs.engine.history, title)
        err.print(
            f"\ninterrupted; the finished rounds are saved in {out_dir}. Continue with the "
            "same command and --resume",
            highlight=False,
            markup=False,
        )
        return 130
    finally:
        if board is not None:
            board.stop()
    outputs.write(history)
    if outputs.engine is not None:
        save_npz(out_dir / "final_model.npz", list(outputs.engine.parameters.arrays))
    write_plot(out_dir / "accuracy.png", history, title)
    table = summary_table(history, str(out_dir))
    table.title = "fedhive server: summary"
    console.print(table)
    if run_had_no_success(history):
        err.print(f"[bold red]error:[/] {escape(no_success_message(history))}", highlight=False)
        return NO_SUCCESS_EXIT
    return 0
