"""The figures of analysis.subtasks: Kaplan-Meier share learned over training, when each subtask is
learned, sharpness histograms, example curves with their sigmoid fits, final loss against size."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import emergence as em
from analysis import plots


def _colours(n):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def plot_fraction_learned(table: pd.DataFrame, path: str) -> list[str]:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    fig, ax = plots.figure(6, 4)
    sizes = sorted(table["params"].dropna().unique())
    cols = _colours(len(sizes))
    pos = table.loc[table["t_learned"] > 0, "t_learned"]
    start = pos.min() if len(pos) else 1.0  # a log axis: an event at step 0 is drawn at the first evaluation after it
    for c, n in zip(cols, sizes):
        g = table[table["params"] == n]
        t, f = em.fraction_emerged(g["t_learned"].clip(lower=start), g["learned"])
        end = max(g["t_learned"].max(), start)  # the curve runs to the last evaluation, flat at 0 if none learned
        ax.step(
            np.r_[start, t, end],
            np.r_[0, f, f[-1] if len(f) else 0],
            where="post",
            color=c,
            lw=1.3,
            label=f"N={plots.compact(n)} (width {int(g['width'].iloc[0]) if g['width'].notna().any() else '?'})",
        )
    plots.log_axis(ax, "x", "training step (log)")
    ax.set_ylabel("share of subtasks learned (Kaplan-Meier)")
    ax.set_ylim(0, 1.02)
    if len(sizes) <= 8:
        ax.legend(fontsize=7, title="one line per model size N (parameters)", title_fontsize=7)
    elif sizes:
        fig.colorbar(
            ScalarMappable(LogNorm(min(sizes), max(sizes)), "viridis"), ax=ax, label="parameters N (line colour)"
        )
    ax.set_title("Subtasks learned over training (loss < threshold)")
    return plots.save(fig, path)


def plot_emergence_steps(table: pd.DataFrame, path: str) -> list[str]:
    g = table[table["params"] == table["params"].max()]
    g = g[g["run_id"] == g["run_id"].iloc[0]]  # one run of the largest size (one seed)
    fig, ax = plots.figure(6, 4)
    rank = g["item"].to_numpy() + 1
    ok = g["learned"].to_numpy(bool)
    ax.plot(rank[ok], g["t_learned"][ok].clip(lower=1), "o", ms=4, color="C0", label="first evaluation below threshold")
    ax.plot(
        rank[~ok],
        g["t_learned"][~ok].clip(lower=1),
        "^",
        ms=5,
        color="C3",
        label="never learned (censored at the last step)",
    )
    lo, hi = max(g["t_learned"].min(), 1) / 2, g["t_learned"].max() * 2  # the evaluated steps
    if "midpoint" in g:
        d = g[g["detected"] & g["in_range"]]
        # intervals clipped to the evaluated range (an undetermined one would stretch the axis over decades)
        ax.errorbar(
            d["item"] + 1,
            d["midpoint"],
            yerr=[d["midpoint"] - d["mid_lo"].clip(lower=lo), d["mid_hi"].clip(upper=hi) - d["midpoint"]],
            fmt="s",
            ms=3,
            color="C2",
            alpha=0.7,
            lw=0.8,
            label="loss sigmoid midpoint, 95% interval",
        )
    ax.set_ylim(lo, hi)
    plots.log_axis(ax, "x", "subtask frequency rank (1 = most frequent)")
    plots.log_axis(ax, "y", "training step", lo, hi)
    ax.set_title(
        f"When each subtask is learned (run {g['run_id'].iloc[0]}, N={plots.compact(g['params'].iloc[0])})", fontsize=9
    )
    ax.legend(fontsize=7)
    return plots.save(fig, path)


def plot_sharpness(table: pd.DataFrame, path: str) -> list[str]:
    fig, ax = plots.figure(6, 4)
    bins = np.linspace(0, 1, 21)
    moving = table[table["verdict"] != "flat"]  # a flat curve's range is noise: any jump fraction is meaningless
    ax.hist(moving["jump_loss"], bins=bins, alpha=0.6, color="C0", label="loss (continuous)")
    ax.hist(
        moving["jump_thresholded"],
        bins=bins,
        alpha=0.6,
        color="C1",
        label=f"{table['thresholded'].iloc[0]} (thresholded)",
    )
    ax.axvline(em.SUDDEN, color="k", ls="--", lw=1, label=f"sudden at >= {em.SUDDEN}")
    ax.set_xlabel("jump fraction: largest share of the change within 0.1 decade of steps")
    plots.count_axis(ax, "y", "subtask curves (count)")
    ax.set_title(
        f"Sharpness of the {len(moving)} curves whose thresholded metric moves "
        f"({len(table) - len(moving)} flat left out)",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper left")
    return plots.save(fig, path)


def plot_examples(curves: pd.DataFrame, table: pd.DataFrame, path: str, n: int = 6) -> list[str]:
    g = table[table["params"] == table["params"].max()]
    rid = g["run_id"].iloc[0]
    g = g[(g["run_id"] == rid)].sort_values("item").head(n)
    c = curves[(curves["run_id"] == rid) & (curves["step"] > 0)]
    fig, ax = plots.figure(7.5, 6)
    for i, r in enumerate(g.itertuples()):
        h = c[c["item"] == r.item].sort_values("step")
        ax.plot(h["step"], h["loss"], "o", ms=3, color=f"C{i}", label=f"subtask {r.item}: loss")
        if "midpoint" in g and r.detected:
            xs = np.geomspace(h["step"].min(), h["step"].max(), 200)
            fitted = em.sigmoid(xs, r.midpoint, r.width_dec, r.fit_start, r.fit_end)
            mid = em.midpoint_text(r.midpoint, h["step"].min(), h["step"].max(), "{:.0f}", short=True)
            ax.plot(xs, fitted, "-", lw=1, color=f"C{i}", label=f"fit: midpoint {mid}, width {r.width_dec:.2f} dec")
    plots.log_axis(ax, "x", "training step")
    ax.set_ylabel("subtask test loss (nats)")
    ax.set_title(f"Subtask loss curves and sigmoid fits (run {rid})", fontsize=9)
    ax.legend(fontsize=6.5, ncol=2, loc="upper center", bbox_to_anchor=(0.45, -0.16), frameon=False)  # off the curves
    return plots.save(fig, path)


def plot_size(size: pd.DataFrame, path: str, max_items: int = 16) -> list[str]:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sizes, Y = size.attrs["sizes"], size.attrs["Y"]
    fig, ax = plots.figure(6.5, 4)
    items = size["item"].to_numpy()
    pick = np.unique(np.linspace(0, len(items) - 1, min(max_items, len(items))).round().astype(int))
    cols = _colours(len(items))
    for i in pick:
        ax.plot(sizes, Y[i], "-o", ms=3, lw=1, color=cols[i])
    plots.log_axis(ax, "x", "parameters N")
    ax.set_ylabel("final subtask test loss (nats; mean over seeds)")
    fig.colorbar(
        ScalarMappable(Normalize(items.min(), items.max()), "viridis"),
        ax=ax,
        label="subtask index (line colour; 0 = most frequent)",
    )
    ax.set_title(f"Per-subtask loss against model size ({len(pick)} of {len(items)} subtasks)", fontsize=9)
    return plots.save(fig, path)
