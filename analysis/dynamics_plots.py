"""The figures of analysis.dynamics: loss against step (seeds faint under their mean), convergence
step against frequency (each seed's evaluation intervals, censored subtasks, both fits over what they
fitted, the reference slopes), learned quanta against N and D (mean +- s.e. over seeds)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from analysis import plots as P


def plot_convergence(pts: pd.DataFrame, cv: dict, path: str) -> str:
    """Each subtask of each seed: its learning step as the interval between two evaluations (a bar),
    never-learned ones as triangles at the budget; the censored fit over every subtask's frequency,
    the learned-only fit over the learned ones', the paper's and the theory's slopes from the
    censored fit's own anchor (its value at the geometric mean frequency)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    markers = "osD^v<>"
    for i, (rid, g) in enumerate(pts.groupby("run_id")):
        m = markers[i % len(markers)]
        got = g[g["learned"].astype(bool)]
        top = got["hi"].to_numpy(float)
        bottom = np.where(
            got["lo"] > 0, got["lo"], top / 2
        )  # left-censored: the bar runs down off its first evaluation
        mid = np.sqrt(top * bottom)
        ax.errorbar(
            got["p"],
            mid,
            yerr=[mid - bottom, top - mid],
            fmt=m,
            ms=3.5,
            lw=0.8,
            alpha=0.75,
            color=f"C{i % 10}",
            label=f"run {rid}: learned in (lo, hi] ({len(got)})",
        )
        cens = g[~g["learned"].astype(bool)]
        if len(cens):
            ax.plot(
                cens["p"],
                cens["lo"],
                "^",
                ms=5,
                mfc="none",
                color=f"C{i % 10}",
                label=f"run {rid}: never learned, censored at step {int(cens['lo'].max())} ({len(cens)})",
            )
    cf, of = cv["censored_fit"], cv["learned_only_fit"]
    if cf:
        ps = np.geomspace(pts["p"].min(), pts["p"].max(), 50)
        ax.plot(
            ps,
            np.exp(cf["intercept"]) * ps ** cf["slope"],
            "-",
            color="k",
            lw=1.6,
            label=f"censored fit: slope {cf['slope']:.2f} [{cf['slope_ci'][0]:.2f}, {cf['slope_ci'][1]:.2f}]",
        )
        p0 = np.exp(np.mean(np.log(ps[[0, -1]])))
        t0 = np.exp(cf["intercept"]) * p0 ** cf["slope"]
        for (name, b), ls in zip(cv["reference"].items(), (":", "-.")):
            ax.plot(
                ps,
                t0 * (ps / p0) ** b,
                ls,
                color="gray",
                lw=1.2,
                label=f"{'paper fit' if name == 'paper_fit' else 'theory'}: slope {b:g} (through the censored fit)",
            )
    if of:
        got = pts[pts["learned"].astype(bool)]
        ps = np.geomspace(got["p"].min(), got["p"].max(), 50)
        ax.plot(
            ps,
            np.exp(of["intercept"]) * ps ** of["slope"],
            "--",
            color="C3",
            lw=1.4,
            label=f"learned only (OLS): slope {of['slope']:.2f} [{of['slope_ci'][0]:.2f}, {of['slope_ci'][1]:.2f}]",
        )
    P.log_axis(ax, "x", "subtask frequency p_t (share of training samples)")
    P.log_axis(ax, "y", "optimizer steps until subtask loss < threshold")
    ax.set_title(
        f"Convergence time vs frequency: {cv['n_learned']} learned, {cv['n_censored']} censored (95% intervals)",
        fontsize=9,
    )
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    P.save(fig, path)
    return path


def plot(result: dict, out_dir: str) -> list[str]:
    import matplotlib.pyplot as plt

    paths = []
    se = result["step_exponent"]
    s, y = np.array(se["steps"], float), np.array(se["mean_loss"], float)
    if len(s):
        fig, ax = plt.subplots(figsize=(5.8, 4.2))
        pos = s > 0  # step 0 has no place on a log axis: its loss is printed in the legend instead
        label = "mean test loss" + (f" (step 0: {y[~pos][0]:.3f})" if (~pos).any() else "")
        per_runs = list(se.get("per_run", {}).values()) if se["n_runs"] > 1 else []
        for i, per in enumerate(per_runs):  # each seed, faint, under the mean
            ps, pl = np.array(per["steps"], float), np.array(per["loss"], float)
            ax.plot(
                ps[ps > 0], pl[ps > 0], "-", lw=0.7, alpha=0.4, color="gray", label="single seeds" if i == 0 else None
            )
        label = label.replace("mean test loss", f"mean test loss over {se['n_runs']} seed(s)")
        ax.plot(s[pos], y[pos], "o-", ms=3, label=label)
        if se["alpha_S"] is not None:
            xs = np.geomspace(se["fit_from_step"], s.max(), 100)
            lo, hi = se["alpha_S_ci"] or (se["alpha_S"],) * 2
            ax.plot(
                xs,
                se["E"] + se["A"] * xs ** -se["alpha_S"],
                "-",
                label=f"fit {se['E']:.3g} + {se['A']:.3g} t^-{se['alpha_S']:.2f} (95% CI {lo:.2f}..{hi:.2f})",
            )
        P.log_axis(ax, "x", "optimizer step t")
        P.log_axis(ax, "y", "test loss (nats)")
        lg = result["largest"]
        ax.set_title(f"Largest runs ({lg['params']} params, D {lg['D']}, {se['n_runs']} run(s))", fontsize=9)
        ax.legend(fontsize=7)
        path = os.path.join(out_dir, "loss_vs_step.png")
        P.save(fig, path)
        paths.append(path)
    cv = result["convergence"]
    pts = pd.DataFrame(cv["points"], columns=["run_id", "item", "p", "step", "lo", "hi", "learned", "at_start"])
    pts = pts[~pts["at_start"].astype(bool)]
    if len(pts):
        paths.append(plot_convergence(pts, cv, os.path.join(out_dir, "convergence_vs_frequency.png")))
    lc = result["learned"]
    for key, x, xlabel, name, at in (
        ("vs_N", "params", "parameters N", "learned_vs_N.png", f"D {lc['N_at_D']}"),
        ("vs_D", "D", "training samples D", "learned_vs_D.png", f"width {lc['D_at_width']}"),
    ):
        rows = pd.DataFrame(lc[key])
        if not len(rows):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for col, mark, what in (
            ("n_learned", "o", "ever below threshold"),
            ("n_below_end", "x", "below it at the end"),
        ):
            if rows[col].isna().all():
                continue
            g = rows.groupby(x)[col]  # seeds aggregated: mean and standard error per x, each seed a faint dot
            m, se, n = g.mean(), g.sem().fillna(0.0), g.size()
            ax.plot(rows[x], rows[col], mark, ms=3, alpha=0.35, color="C0" if mark == "o" else "C1")
            ax.errorbar(
                m.index,
                m,
                yerr=se,
                fmt=mark + ("-" if mark == "o" else "--"),
                ms=5,
                capsize=2,
                color="C0" if mark == "o" else "C1",
                label=f"{what}: mean +- s.e. over {n.min()}-{n.max()} seed(s)"
                if n.min() != n.max()
                else f"{what}: mean +- s.e. over {n.min()} seed(s)",
            )
        P.log_axis(ax, "x", xlabel)
        P.count_axis(ax, "y", "subtasks learned (count)")
        ax.set_title(f"Learned quanta vs {xlabel.split()[-1]} ({at}; dots: single seeds)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        path = os.path.join(out_dir, name)
        P.save(fig, path)
        paths.append(path)
    return paths
