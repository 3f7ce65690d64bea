"""The report page: one HTML file with its styles and inline SVG plots, nothing fetched
(it opens from a disk or a mail attachment without a network), no script."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from fedhive.report.figures import AxisKind, Figure, figures
from fedhive.report.runs import Run, config_differences, failure_reasons, flatten, summary
from fedhive.report.svg import color, format_value, render

__all__ = ["report_html"]

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #1b1b1b; background: #fafafa; }
header { background: #20303f; color: #fff; padding: 14px 28px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 2px 0 0; color: #c9d4de; font-size: 13px; }
main { padding: 8px 28px 40px; max-width: 2100px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
figure { background: #fff; border: 1px solid #e2e2e2; border-radius: 6px; margin: 0;
         padding: 10px 12px; flex: 1 1 520px; max-width: 660px; box-sizing: border-box; }
figcaption { font-weight: 600; margin-bottom: 4px; }
.empty { color: #777; font-style: italic; min-height: 40px; }
.note { color: #555; font-size: 12px; margin-top: 4px; }
.legend { list-style: none; margin: 6px 0 0; padding: 0; font-size: 12px; display: flex;
          flex-wrap: wrap; gap: 4px 14px; }
.legend li { display: flex; align-items: center; gap: 5px; }
.swatch { display: inline-block; width: 22px; height: 0; border-top: 3px solid; }
.swatch.dashed { border-top-style: dashed; }
.swatch.hatched { height: 10px; border: 1px solid #888;
                  background: repeating-linear-gradient(45deg, #fff 0 3px, #888 3px 5px); }
svg.chart { display: block; max-width: 100%; height: auto; }
svg .gridline { stroke: #eee; }
svg .axis { stroke: #444; }
svg .tick { font-size: 11px; fill: #444; }
svg .label { font-size: 12px; fill: #222; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
th, td { border: 1px solid #e0e0e0; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12px; }
details { margin-top: 8px; }
"""


def _cell(value: Any, kind: AxisKind = "number") -> str:
    if value is None:
        return '<td class="num">&ndash;</td>'
    if isinstance(value, float | int) and not isinstance(value, bool):
        text = format_value(float(value), kind) if kind != "number" else f"{value:.4g}"
        return f'<td class="num">{escape(text)}</td>'
    return f"<td>{escape(str(value))}</td>"


def _run_name(run: Run, index: int) -> str:
    return (
        f'<span class="swatch" style="border-color:{color(index)}"></span> '
        f"<strong>{escape(run.name)}</strong>"
    )


def _summary_table(runs: Sequence[Run]) -> str:
    head = (
        "<tr><th>run</th><th>folder</th><th>rounds</th><th>evaluation</th>"
        "<th>final accuracy</th><th>best accuracy</th><th>final loss</th><th>bytes up</th>"
        "<th>bytes down</th><th>virtual time</th><th>epsilon</th><th>failures</th></tr>"
    )
    rows = []
    for index, run in enumerate(runs):
        s = summary(run)
        rows.append(
            f"<tr><td>{_run_name(run, index)}</td><td><code>{escape(str(run.path))}</code></td>"
            + _cell(s["rounds"], "round")
            + _cell(s["evaluation"])
            + _cell(s["final_accuracy"])
            + _cell(s["best_accuracy"])
            + _cell(s["final_loss"])
            + _cell(s["bytes_up"], "bytes")
            + _cell(s["bytes_down"], "bytes")
            + _cell(s["virtual_time_s"], "seconds")
            + _cell(s["epsilon"])
            + _cell(s["failures"], "round")
            + "</tr>"
        )
    return f'<table id="summary">{head}{"".join(rows)}</table>'


def _legend(figure: Figure) -> str:
    items = []
    if figure.kind == "box":
        seen = {b.run: b.label.split("\n")[0] for b in figure.boxes}
        for run, name in seen.items():
            items.append(
                f'<li><span class="swatch" style="border-color:{color(run)}"></span>'
                f"{escape(name)}</li>"
            )
        if any(b.hatched for b in figure.boxes):
            items.append('<li><span class="swatch hatched"></span>global model</li>')
    for series in figure.series:
        dashed = " dashed" if series.dashed else ""
        items.append(
            f'<li><span class="swatch{dashed}" style="border-color:{color(series.run)}">'
            f"</span>{escape(series.label)}</li>"
        )
    return f'<ul class="legend">{"".join(items)}</ul>'


def _figure(figure: Figure) -> str:
    if figure.empty:
        body = f'<p class="empty">{escape(figure.empty)}</p>'
    else:
        body = render(figure) + _legend(figure)
    note = f'<p class="note">{escape(figure.note)}</p>' if figure.note else ""
    return (
        f'<figure id="fig-{escape(figure.key)}"><figcaption>{escape(figure.title)}'
        f"</figcaption>{body}{note}</figure>"
    )


_MISSING = object()


def _value(value: Any) -> str:
    if value is _MISSING:
        return "(not set)"
    return json.dumps(value) if not isinstance(value, str) else value


def _config_table(runs: Sequence[Run]) -> str:
    differ, same = config_differences(runs)
    flat = [flatten(run.config) for run in runs]
    head = "<tr><th>key</th>" + "".join(f"<th>{escape(r.name)}</th>" for r in runs) + "</tr>"
    if differ:
        rows = "".join(
            f"<tr><td><code>{escape(key)}</code></td>"
            + "".join(f"<td>{escape(_value(f.get(key, _MISSING)))}</td>" for f in flat)
            + "</tr>"
            for key in differ
        )
        table = f'<table id="config-diff">{head}{rows}</table>'
    elif len(runs) > 1:
        table = '<p class="empty" id="config-diff">the runs have the same config</p>'
    else:
        table = '<p class="empty" id="config-diff">one run: nothing to compare</p>'
    shared = "".join(
        f"<tr><td><code>{escape(k)}</code></td><td>{escape(_value(v))}</td></tr>"
        for k, v in same.items()
    )
    label = "shared by all runs" if len(runs) > 1 else "the run's config"
    return (
        f"{table}<details><summary>{len(same)} settings {label}</summary>"
        f"<table><tr><th>key</th><th>value</th></tr>{shared}</table></details>"
    )


def _failure_tables(runs: Sequence[Run]) -> str:
    parts = []
    for index, run in enumerate(runs):
        reasons = failure_reasons(run)
        if not reasons:
            continue
        rows = "".join(
            f"<tr><td>{escape(stage)}</td><td>{escape(reason)}</td>"
            f'<td class="num">{count}</td><td>{escape(_rounds(rounds))}</td></tr>'
            for stage, reason, count, rounds in reasons[:30]
        )
        parts.append(
            f"<details open><summary>{_run_name(run, index)}: failure reasons</summary>"
            "<table><tr><th>stage</th><th>reason</th><th>failures</th><th>rounds</th></tr>"
            f"{rows}</table></details>"
        )
    return "".join(parts)


def _rounds(rounds: list[int]) -> str:
    shown = ", ".join(str(r) for r in rounds[:12])
    return shown + (f" and {len(rounds) - 12} more" if len(rounds) > 12 else "")


def report_html(runs: Sequence[Run], title: str = "fedhive report") -> str:
    """The whole page comparing ``runs``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        made_by = f"fedhive {version('fedhive')}"
    except PackageNotFoundError:
        made_by = "fedhive"
    figs = {f.key: f for f in figures(runs)}
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")

    def section(heading: str, keys: Sequence[str], extra: str = "") -> str:
        body = "".join(_figure(figs[k]) for k in keys)
        return f'<h2>{escape(heading)}</h2><div class="plots">{body}</div>{extra}'

    names = ", ".join(run.name for run in runs)
    sections = [
        f'<h2>Runs</h2>{_summary_table(runs)}<p class="note">Solid lines: the server\'s '
        "test set (centralized evaluation); dashed: the clients' own validation data "
        "(federated evaluation). Hover a point for its values.</p>",
        section("Accuracy", ["accuracy-round", "accuracy-bytes-up", "accuracy-virtual-time-s"]),
        section("Loss", ["loss-round", "loss-bytes-up", "loss-virtual-time-s"]),
        section("Privacy", ["epsilon-round"]),
        section("Clients", ["client-accuracy"]),
        section("Failures", ["failures-round"], _failure_tables(runs)),
        f"<h2>Config differences</h2>{_config_table(runs)}",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{escape(title)}</h1><p>{len(runs)} run{'s' if len(runs) != 1 else ''}: "
        f"{escape(names)} &middot; made by {escape(made_by)} on {when}</p></header>"
        f"<main>{''.join(sections)}</main></body></html>\n"
    )
