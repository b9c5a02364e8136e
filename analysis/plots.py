"""Plot conventions every analysis shares: vector (SVG) beside PNG, readable log axes, integer count
axes. Pure matplotlib (Agg); no harness import.

    fig, ax = figure()
    log_axis(ax, "x", label="parameters N")
    count_axis(ax, "y", label="subtasks learned (count)")
    save(fig, "out/x.png")     # writes out/x.png and out/x.svg
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402

DPI = 120


def figure(w: float = 5.5, h: float = 4.0, ncols: int = 1):
    fig, ax = plt.subplots(1, ncols, figsize=(w, h))
    return fig, ax


def compact(v: float, _pos=None) -> str:
    """1500 -> '1.5k', 2e6 -> '2M', 0.01 -> '0.01': short labels that do not collide."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else ""
    a = abs(v)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def log_axis(ax, which: str = "x", label: str | None = None, lo: float | None = None, hi: float | None = None) -> None:
    """Log scale whose labels never overlap: labels at decades (at 1-2-5 when the data span less than
    two decades, so a short axis still has several), compact numbers (20k), minor ticks unlabelled.
    Matplotlib's default labels minor ticks on short log axes, and they run into each other."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    if lo is None or hi is None:
        lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    span = math.log10(hi / lo) if lo and hi and lo > 0 and hi > lo else 3.0
    subs = (1.0, 2.0, 5.0) if span < 2 else (1.0,)
    axis.set_major_locator(mticker.LogLocator(base=10, subs=subs, numticks=12))
    axis.set_major_formatter(mticker.FuncFormatter(compact))
    axis.set_minor_locator(mticker.LogLocator(base=10, subs=tuple(range(2, 10)), numticks=12))
    axis.set_minor_formatter(mticker.NullFormatter())
    if label:
        (ax.set_xlabel if which == "x" else ax.set_ylabel)(label)


def count_axis(ax, which: str = "y", label: str | None = None) -> None:
    """Counts are integers: integer ticks only."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(mticker.MaxNLocator(integer=True))
    if label:
        (ax.set_xlabel if which == "x" else ax.set_ylabel)(label)


def save(fig, path: str, dpi: int = DPI) -> list[str]:
    """Write `path` (PNG) and the same figure as SVG beside it; close the figure. Returns both paths."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    svg = os.path.splitext(path)[0] + ".svg"
    fig.savefig(svg)
    plt.close(fig)
    return [path, svg]
