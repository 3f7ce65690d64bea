"""The ``fedhive`` command line (typer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fedhive.cli import deploy
from fedhive.cli.certs_cmd import certs
from fedhive.cli.new_cmd import new_command
from fedhive.cli.privacy import privacy_command
from fedhive.cli.report_cmd import report
from fedhive.cli.secagg_cmd import secagg_app
from fedhive.common.errors import FedhiveError

app = typer.Typer(
    name="fedhive",
    help="fedhive: federated learning simulations and deployments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help: TOML table names such as [strategy] are text, not rich markup
    rich_markup_mode=None,
)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # one line per message, for log files


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("fedhive")
        except PackageNotFoundError:  # run from a source tree that is not installed
            installed = "(not installed)"
        console.print(f"fedhive {installed}", highlight=False, markup=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """fedhive: federated learning simulations and deployments."""


def _resolve(
    config_file: Path | None,
    resume: Path | None,
    flags: dict[str, tuple[str, Any]],
    sets: list[str],
) -> tuple[Any, Path]:
    from fedhive.cli.config import validate
    from fedhive.cli.overrides import merged_config
    from fedhive.cli.user_app import with_app_dir

    if resume is not None:
        if not resume.is_dir():
            raise FedhiveError(f"--resume {resume}: no such folder")
        saved = resume / "config.toml"
        if not saved.exists():
            raise FedhiveError(f"--resume {resume}: no config.toml there (not a fedhive run?)")
        if config_file is not None:
            raise FedhiveError("give either a CONFIG file or --resume DIR, not both")
        config_file = saved
        flags = {**flags, "out": ("--resume", str(resume))}
    merged = merged_config(config_file, sets, flags)
    cfg = with_app_dir(validate(merged.data, merged.source, merged.sources), config_file)
    return cfg, Path(cfg.out)


@app.command()
def run(
    config_file: Annotated[
        Path | None, typer.Argument(metavar="CONFIG.toml", help="experiment config (TOML)")
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(help="number of rounds (model versions under an asynchronous policy)"),
    ] = None,
    num_clients: Annotated[int | None, typer.Option(help="number of simulated clients")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the whole run")] = None,
    out: Annotated[str | None, typer.Option(help="output folder")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="continue the run saved in this output folder")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="simulation workers (0 = one per core)")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="simulation backend: thread|process, or another registered one"),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override any config key, e.g. --set data.alpha=0.1"),
    ] = None,
    show_partition: Annotated[
        bool, typer.Option("--show-partition", help="print per-client label histograms and exit")
    ] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="replace the run already in the output folder (and its checkpoints)"
        ),
    ] = False,
) -> None:
    """Simulate a federation: by default 100 clients train a 1-D CNN on MNIST-1D with a
    Dirichlet(0.5) label skew and FedAvg (10% of clients per round), in synchronous
    rounds ([policy] name = "buffered-async" publishes a model every buffer_size
    results instead).

    Writes history.json, metrics.csv, accuracy.png, config.toml and the final model
    (final_model.npz, best_model.npz) to the output folder. Ctrl-C stops after saving
    what is done; --resume DIR continues.
    """
    flags = {
        "rounds": ("--rounds", rounds),
        "num_clients": ("--num-clients", num_clients),
        "seed": ("--seed", seed),
        "out": ("--out", out),
        "simulation.num_workers": ("--workers", workers),
        "simulation.backend": ("--backend", backend),
    }
    try:
        code = _run(config_file, resume, flags, set_ or [], show_partition, progress, overwrite)
    except FedhiveError as exc:
        # escaped: messages name TOML tables ("[policy]"), which rich reads as markup
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def _run(
    config_file: Path | None,
    resume: Path | None,
    flags: dict[str, tuple[str, Any]],
    sets: list[str],
    show_partition: bool,
    progress: bool,
    overwrite: bool = False,
) -> int:
    from fedhive.cli.experiment import build_experiment, run_experiment
    from fedhive.cli.failures import (
        NO_SUCCESS_EXIT,
        FailureLog,
        no_success_message,
        run_had_no_success,
    )
    from fedhive.cli.outdir import prepare_out_dir, resume_line
    from fedhive.cli.output import (
        plot_title,
        write_config,
        write_history,
        write_metrics_csv,
        write_plot,
    )
    from fedhive.cli.progress import EveryRound, ProgressBar, summary_table
    from fedhive.cli.tracking import tracking_callbacks
    from fedhive.data import format_partition_table
    from fedhive.server.history import History

    cfg, out_dir = _resolve(config_file, resume, flags, sets)
    checkpoints = out_dir / "checkpoints"
    if resume is None and not show_partition:
        hint = f"fedhive run --resume {out_dir}"
        prepare_out_dir(out_dir, checkpoints, overwrite=overwrite, resume_hint=hint)
    exp = build_experiment(cfg)
    if show_partition:
        if exp.partition is None or exp.dataset is None:
            raise FedhiveError("--show-partition shows the built-in data; with app, there is none")
        table = format_partition_table(exp.partition, exp.dataset.y_train, exp.dataset.num_classes)
        console.print(table, highlight=False, markup=False)
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_dump()
    write_config(out_dir / "config.toml", resolved)
    title = plot_title(exp.dataset.name if exp.dataset else None, cfg.strategy.name, cfg.seed)
    latest: list[History] = []

    def write_all(history: History) -> None:
        write_history(out_dir / "history.json", history, resolved)
        write_metrics_csv(out_dir / "metrics.csv", history)
        latest[:] = [history]

    def emit(line: str, warning: bool) -> None:
        prefix = "[yellow]warning:[/] " if warning else "  "
        err.print(prefix + escape(line), highlight=False)

    callbacks: list[Any] = [EveryRound(write_all), FailureLog(emit)]
    callbacks += tracking_callbacks(cfg.tracking, out_dir, resolved)
    if progress:
        callbacks.append(ProgressBar(cfg.rounds, console=err))
    # the default policy is not named, so the line reads as it always has
    policy = "" if cfg.policy.name == "sync" else f", policy {cfg.policy.describe()}"
    err.print(
        f"fedhive run: {cfg.num_clients} clients, {exp.describe()}, {cfg.rounds} rounds"
        f"{policy} -> {out_dir}",
        highlight=False,
    )
    if resume is not None:
        err.print(f"fedhive run: {resume_line(checkpoints, cfg.rounds)}", highlight=False)
    history: History | None = None
    try:
        history = run_experiment(
            exp,
            callbacks=callbacks,
            checkpoint_dir=checkpoints,
            model_dir=out_dir,
            resume=resume is not None,
        )
    except KeyboardInterrupt:
        if latest:
            write_plot(out_dir / "accuracy.png", latest[0], title)
        err.print(
            f"\ninterrupted; the finished rounds are saved in {out_dir}. "
            f"Continue with: fedhive run --resume {out_dir}",
            highlight=False,
        )
        return 130
    write_all(history)
    write_plot(out_dir / "accuracy.png", history, title)
    console.print(summary_table(history, str(out_dir)))
    if cfg.personalization is not None:
        from fedhive.cli.personalization import format_report, write_report

        figures = write_report(out_dir / "personalization.json", history)
        console.print(format_report(figures), highlight=False, markup=False)
    if run_had_no_success(history):
        err.print(f"[bold red]error:[/] {escape(no_success_message(history))}", highlight=False)
        return NO_SUCCESS_EXIT
    return 0


app.command("privacy")(privacy_command)
app.command("certs")(certs)
app.command("report")(report)
app.command("new")(new_command)
app.command("server")(deploy.server)
app.command("client")(deploy.client)
app.add_typer(secagg_app)


def main() -> None:
    """Entry point of the ``fedhive`` script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app(prog_name="fedhive")


if __name__ == "__main__":  # pragma: no cover
    main()
