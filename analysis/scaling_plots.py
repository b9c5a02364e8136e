"""Figures of the parameter-scaling study (analysis.scaling), all in bits.

Conventions (issue 19): seeds aggregated (mean and standard error per width, the seed count in the
legend; single runs as small grey dots); fits drawn only over the range they were fitted on; the
asymptotic theory and the design prediction drawn as slopes through the plain fit's own anchor (its
value at the geometric centre of the fitted parameter counts), so a reader compares slopes at a glance;
legends in their own panel under the plot, where they cover no data.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

from analysis import plots as P

LN2 = math.log(2)


def per_width(points: list[dict], key: str, scale: float = 1.0) -> pd.DataFrame:
    """params, mean, se (0 for one seed), n per parameter count of `key` (values times `scale`)."""
    df = pd.DataFrame(
        {
            "params": [p["params"] for p in points],
            "v": [np.nan if p.get(key) is None else float(p[key]) * scale for p in points],
        }
    ).dropna()
    g = df.groupby("params")["v"]
    out = pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1), "n": g.count()}).reset_index()
    out["se"] = (out["sd"] / np.sqrt(out["n"])).fillna(0.0)
    return out


def _seeds_label(agg: pd.DataFrame) -> str:
    lo, hi = int(agg["n"].min()), int(agg["n"].max())
    return f"n = {lo} seeds per width" if lo == hi else f"n = {lo}-{hi} seeds per width"


def _legend_below(fig, ax_leg, handles_from) -> None:
    h, lab = handles_from.get_legend_handles_labels()
    ax_leg.axis("off")
    ax_leg.legend(h, lab, loc="upper center", fontsize=7, frameon=False)


def _figure(width: float = 6.0, height: float = 4.0, legend_rows: int = 6):
    import matplotlib.pyplot as plt

    leg_h = 0.17 * legend_rows
    fig, (ax, ax_leg) = plt.subplots(
        2, 1, figsize=(width, height + leg_h), gridspec_kw={"height_ratios": [height, leg_h]}
    )
    return fig, ax, ax_leg


def _anchor(result: dict, xs: np.ndarray) -> float:
    """The plain fit's value (bits) at the geometric centre of the fitted parameter counts."""
    xc = math.exp(np.mean(np.log([p["params"] for p in result["points"]])))
    return xc, math.exp(result["plain_intercept_bits"]) * xc ** -result["alpha_N_plain"]


def draw_loss(ax, result: dict, design_points: bool = True) -> None:
    """Measured loss per width (mean +- SE, bits), single runs, the fits and the slopes to compare."""
    pts = result["points"]
    x_all = np.array([p["params"] for p in pts], float)
    ax.plot(x_all, [p["loss"] / LN2 for p in pts], ".", color="0.6", ms=3, label="single runs", zorder=1)
    agg = per_width(pts, "loss", 1 / LN2)
    ax.errorbar(
        agg["params"],
        agg["mean"],
        yerr=agg["se"],
        fmt="o",
        color="C0",
        ms=4,
        capsize=2,
        zorder=3,
        label=f"final test loss, mean +- SE ({_seeds_label(agg)})",
    )
    xs = np.logspace(np.log10(x_all.min()), np.log10(x_all.max()), 100)  # the fitted range only
    a, ci = result["alpha_N_plain"], result.get("alpha_N_plain_ci") or [math.nan] * 2
    ax.plot(
        xs,
        math.exp(result["plain_intercept_bits"]) * xs**-a,
        "-",
        color="C0",
        label=f"measured: plain log-log fit, alpha_N = {a:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]",
    )
    E, A, ao = result["E"], result["A"], result["alpha_N_offset"]
    bound = " (E on its bound 0: mis-specified)" if result.get("alpha_N_primary") == "plain" else ""
    ax.plot(
        xs,
        (E + A * xs**-ao) / LN2,
        "-.",
        color="C2",
        lw=1,
        label=f"offset fit E + A N^-alpha: alpha_N = {ao:.3f}, E = {E / LN2:.2g} bits{bound}",
    )
    xc, yc = _anchor(result, xs)
    theory = result.get("theory_alpha")
    if isinstance(theory, float):
        ax.plot(
            xs,
            yc * (xs / xc) ** -theory,
            "--",
            color="0.4",
            lw=1,
            label=f"asymptotic theory (infinitely many subtasks): slope alpha_N = alpha = {theory:g}",
        )
    d = result.get("alpha_N_design")
    if d is not None:
        dci = result.get("alpha_N_design_ci") or [math.nan] * 2
        ax.plot(
            xs,
            yc * (xs / xc) ** -d,
            ":",
            color="C3",
            lw=1.5,
            label=f"design prediction (this design's subtasks, learned counts): slope {d:.3f} "
            f"[{dci[0]:.3f}, {dci[1]:.3f}]",
        )
        if design_points:
            pred = per_width(pts, "predicted_loss", 1 / LN2)
            ax.plot(
                pred["params"],
                pred["mean"],
                "s",
                mfc="none",
                color="C3",
                ms=4,
                label="design prediction's loss sum_{k>n} p_k per width (mean over seeds)",
            )
    P.log_axis(ax, "x", "parameters N")
    P.log_axis(ax, "y", "final test loss (bits)")


def plot_loss(result: dict, path: str) -> str:
    fig, ax, ax_leg = _figure(legend_rows=7)
    draw_loss(ax, result)
    ax.set_title("Multitask sparse parity: loss vs parameters (lines over the fitted range)", fontsize=9)
    _legend_below(fig, ax_leg, ax)
    P.save(fig, path)
    return path


def plot_learned(result: dict, path: str) -> str:
    pts = result["points"]
    key = "n_below_end" if any(p.get("n_below_end") is not None for p in pts) else "n_learned"
    fig, ax, ax_leg = _figure(5.5, 3.5, legend_rows=2)
    ax.plot([p["params"] for p in pts], [p[key] for p in pts], ".", color="0.6", ms=3, label="single runs")
    agg = per_width(pts, key)
    ax.errorbar(
        agg["params"],
        agg["mean"],
        yerr=agg["se"],
        fmt="o-",
        color="C0",
        ms=4,
        capsize=2,
        label=f"subtasks below 0.1 bits at the end, mean +- SE ({_seeds_label(agg)})",
    )
    P.log_axis(ax, "x", "parameters N")
    P.count_axis(ax, "y", "subtasks learned (count)")
    ax.set_title("Quanta learned vs parameters", fontsize=9)
    _legend_below(fig, ax_leg, ax)
    P.save(fig, path)
    return path


def plot_quanta(result: dict, path: str, extra: int = 3) -> str:
    """Left: every subtask's final loss (mean over seeds, bits) against parameters, coloured by
    frequency rank: each drops sharply at the size that learns it. Right: the mean loss and its fit."""
    import matplotlib.pyplot as plt

    pts = result["points"]
    per = pd.DataFrame([p["final_loss"] for p in pts]) / LN2  # [runs, subtasks], bits
    per["params"] = [p["params"] for p in pts]
    mean = per.groupby("params").mean()  # [widths, subtasks]
    ever = sorted({i for p in pts for i in p["learned"]})
    shown = list(range(min(mean.shape[1], max(10, (ever[-1] + 1 + extra) if ever else 0))))
    fig, axes = plt.subplots(2, 2, figsize=(11, 5.6), gridspec_kw={"height_ratios": [4.2, 1.4]})
    a0, a1 = axes[0]
    cmap = plt.get_cmap("viridis")
    for i in shown:
        a0.plot(mean.index, mean[i], "-", color=cmap(i / max(len(shown) - 1, 1)), lw=1.2, alpha=0.9)
    a0.axhline(result.get("threshold_bits", 0.1), color="k", ls=":", lw=1, label="learned below this (0.1 bits)")
    a0.plot(
        [],
        [],
        "-",
        color="0.5",
        label=f"one line per subtask, mean over seeds ({_seeds_label(per_width(pts, 'loss'))})",
    )
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(1, len(shown)))
    fig.colorbar(sm, ax=a0, label="subtask frequency rank (1 = most frequent)")
    P.log_axis(a0, "x", "parameters N")
    a0.set_ylabel("final test loss of each subtask (bits)")
    a0.set_title(f"Per-subtask loss: the {len(shown)} most frequent subtasks", fontsize=9)
    draw_loss(a1, result, design_points=False)
    a1.set_title("Mean loss: a power law made of those drops", fontsize=9)
    _legend_below(fig, axes[1][0], a0)
    _legend_below(fig, axes[1][1], a1)
    P.save(fig, path)
    return path


def plot(result: dict, out_dir: str) -> list[str]:
    paths = [plot_loss(result, os.path.join(out_dir, "loss_vs_params.png"))]
    pts = result["points"]
    if any(p.get("n_below_end") is not None or p.get("n_learned") is not None for p in pts):
        paths.append(plot_learned(result, os.path.join(out_dir, "learned_vs_params.png")))
    if pts and all("final_loss" in p for p in pts):
        paths.insert(0, plot_quanta(result, os.path.join(out_dir, "quanta_vs_params.png")))
    return paths
