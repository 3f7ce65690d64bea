"""The report's figures as PNG files (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedhive.common.atomic import atomic_write_bytes
from fedhive.common.errors import MissingDependency
from fedhive.report.figures import Figure
from fedhive.report.svg import color, format_value

__all__ = ["write_pngs"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency("matplotlib", "plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax: Any, figure: Figure) -> None:
    from matplotlib.ticker import MaxNLocator

    if figure.kind == "line":
        for s in figure.series:
            ax.plot(
                s.x,
                s.y,
                color=color(s.run),
                linestyle="--" if s.dashed else "-",
                marker="o" if len(s.x) <= 60 else None,
                markersize=3,
                label=s.label,
            )
    elif figure.kind == "bar":
        rounds = sorted({x for s in figure.series for x in s.x})
        width = 0.8 / max(len(figure.series), 1)
        for i, s in enumerate(figure.series):
            offsets = [x - 0.4 + width * (i + 0.5) for x in s.x]
            ax.bar(offsets, s.y, width=width, color=color(s.run), label=s.label)
        if len(rounds) <= 20:
            ax.set_xticks(rounds)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        data = [b.values for b in figure.boxes]
        parts = ax.boxplot(data, patch_artist=True, widths=0.5)
        for patch, box in zip(parts["boxes"], figure.boxes, strict=True):
            patch.set_facecolor("white" if box.hatched else color(box.run))
            patch.set_alpha(0.9 if box.hatched else 0.4)
            patch.set_edgecolor(color(box.run))
            if box.hatched:
                patch.set_hatch("//")
        for i, box in enumerate(figure.boxes, start=1):
            jitter = [i + ((k * 0.618034) % 1 - 0.5) * 0.3 for k in range(len(box.values))]
            ax.scatter(jitter, box.values, s=6, color=color(box.run), alpha=0.6)
        ax.set_xticks(range(1, len(figure.boxes) + 1))
        ax.set_xticklabels([b.label for b in figure.boxes], fontsize=8)


def write_pngs(figures: Sequence[Figure], folder: str | Path) -> list[Path]:
    """One ``KEY.png`` per figure that has something to draw, in ``folder``; the paths."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for figure in figures:
        if figure.empty:
            continue
        fig, ax = plt.subplots(figsize=(10, 4.5))
        _draw(ax, figure)
        ax.set_title(figure.title)
        ax.set_xlabel(figure.x_label)
        ax.set_ylabel(figure.y_label)
        ax.grid(alpha=0.3)
        if figure.kind != "box":
            kind = figure.x_kind
            if kind == "round":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _, k=kind: format_value(v, k)))
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if figure.note:
            fig.text(0.01, 0.01, figure.note, fontsize=7, color="#555")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        path = folder / f"{figure.key}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written
