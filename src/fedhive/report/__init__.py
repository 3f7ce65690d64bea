"""Reports that compare runs: one self-contained HTML page and PNGs of its plots.

``fedhive report RUN_DIR [RUN_DIR ...] --out report.html`` reads the ``history.json`` (and
``config.toml``) that ``fedhive run`` and ``fedhive server`` write into each run folder
and draws, for all runs together: accuracy and loss against round, against cumulative
uplink bytes and against virtual time (runs on the simulated clock); privacy spent
(epsilon) per round; the per-client accuracy distribution (personal and global model of
a personalized run, the global model otherwise); client failures per round with their
reasons; and a table of the config keys in which the runs differ. The page embeds its
plots as SVG and its styles inline, so it opens without a network. From Python::

    from fedhive.report import load_runs, write_report

    runs = load_runs(["runs/fedavg", "runs/fedprox"])
    write_report(runs, "report.html", png_dir="report_png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedhive.common.atomic import atomic_write_bytes
from fedhive.report.figures import Box, Figure, Series, figures
from fedhive.report.page import report_html
from fedhive.report.png import write_pngs
from fedhive.report.runs import Run, load_run, load_runs

__all__ = [
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
]


def write_report(
    runs: Sequence[Run],
    out: str | Path,
    *,
    png_dir: str | Path | None = None,
    title: str = "fedhive report",
) -> list[Path]:
    """Write the page comparing ``runs`` to ``out`` and, with ``png_dir``, a PNG of each
    of its plots there (matplotlib, the ``plot`` extra); the paths written, page first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, report_html(runs, title).encode("utf-8"))
    written = [out]
    if png_dir is not None:
        written += write_pngs(figures(runs), png_dir)
    return written
