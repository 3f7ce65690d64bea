"""``fedhive report``: one HTML page (and PNGs) comparing the runs in some folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedhive.common.errors import FedhiveError, MissingDependency

__all__ = ["default_png_dir", "report"]

err = Console(stderr=True, soft_wrap=True)


def default_png_dir(out: Path) -> Path:
    """``report.html`` -> ``report_png/`` beside it."""
    return out.with_name(f"{out.stem}_png")


def report(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN_DIR...", help="output folders of fedhive run / server"),
    ],
    out: Annotated[Path, typer.Option(help="the HTML page to write")] = Path("report.html"),
    png_dir: Annotated[
        Path | None,
        typer.Option(help="folder for the PNGs of the plots (default: OUT's name + _png)"),
    ] = None,
    png: Annotated[bool, typer.Option(help="also write PNGs of the plots")] = True,
    title: Annotated[str, typer.Option(help="the page's title")] = "fedhive report",
) -> None:
    """Compare runs in one self-contained HTML page (it needs no network to open):
    accuracy and loss against round, uplink bytes and virtual time; privacy spent per
    round; the per-client accuracy distribution; failures per round with their reasons;
    and the config keys in which the runs differ. Also writes a PNG of each plot
    (matplotlib; --no-png to skip)."""
    from fedhive.report import figures, load_runs, write_pngs, write_report

    try:
        runs = load_runs(run_dirs)
        write_report(runs, out, title=title)
        err.print(f"fedhive report: {len(runs)} runs -> {out}", highlight=False, markup=False)
        if png:
            folder = png_dir or default_png_dir(out)
            try:
                written = write_pngs(figures(runs), folder)
            except MissingDependency as exc:
                err.print(f"[yellow]warning:[/] {escape(str(exc))}", highlight=False)
            else:
                err.print(
                    f"fedhive report: {len(written)} plots -> {folder}",
                    highlight=False,
                    markup=False,
                )
    except FedhiveError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
