"""Training dynamics of multitask sparse parity (the quantization model's third study).

    python -m analysis.dynamics SOURCE [--sweep ID] --out DIR

- the step exponent: mean test loss (`val/loss`, frequency-weighted) against step for the largest
  runs, L = E + A t^-alpha_S fitted over the tail of training (analysis.fits);
- convergence time against frequency: the step at which each subtask's test loss first falls below
  the run's threshold (the curves artifact, contract C4), against the subtask's frequency p_t, as a
  log-log slope with a bootstrap interval. The quantization model predicts steps ~ 1/p_t (slope
  ~ -1; the paper finds about that). Subtasks never learned are censored (left out, counted), those
  already below the threshold at step 0 too (no place on a log axis);
- learned quanta (`emergence/n_learned`, `emergence/n_below_end`) against parameters N (runs at one
  data budget) and against training samples D (finite-data runs at one width).

Writes DIR/dynamics.json, DIR/loss_vs_step.png, DIR/convergence_vs_frequency.png,
DIR/learned_vs_N.png, DIR/learned_vs_D.png (each with an SVG twin; a panel without runs is left
out) and DIR/report.md.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pandas as pd

from analysis import plots as P
from analysis.common import main_guard, parse_args, write_outputs
from analysis.fits import FitError, fit_loglog, fit_power_law
from analysis.scaling import one_alpha
from analysis.study import Section, has_task, numbers, task_runs
from harness.errors import UserError

STUDY = "dynamics"
PARAMS = "summary.model/params"
D_KEY = "config.data.n_train_samples"
LEARNED, BELOW_END = "summary.emergence/n_learned", "summary.emergence/n_below_end"
TAIL = 0.1  # the step-exponent fit uses the steps >= TAIL x the last step (the early transient left out)
MIN_POINTS = 5


def _num(runs: pd.DataFrame, key: str, default=np.nan) -> pd.Series:
    return pd.to_numeric(runs[key], errors="coerce") if key in runs else pd.Series(default, index=runs.index, dtype=float)


def data_budget(runs: pd.DataFrame) -> pd.Series:
    """D per run; infinite data (a fresh batch every step, n_train_samples 0) as inf."""
    d = _num(runs, D_KEY, 0.0).fillna(0.0)
    return d.where(d > 0, np.inf)


def largest_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished runs with the most parameters and, among them, the most data (seeds are kept)."""
    n = _num(runs, PARAMS)
    top = runs[n == n.max()]
    d = data_budget(top)
    return top[d == d.max()]


def frequencies(run: pd.Series) -> np.ndarray | None:
    """p_t ~ (t + offset)^-(zipf_alpha + 1), t = 1..n_tasks, from a run's config (tasks/sparse_parity.py)."""
    a, n, off = (run.get(k) for k in ("config.data.zipf_alpha", "config.data.n_tasks", "config.data.offset"))
    if a is None or n is None or pd.isna(a) or pd.isna(n):
        return None
    off = 0.0 if off is None or pd.isna(off) else float(off)
    p = (np.arange(1, int(n) + 1) + off) ** -(float(a) + 1)
    return p / p.sum()


def threshold(run: pd.Series) -> float:
    t = run.get("summary.emergence/threshold_nats")
    if t is not None and pd.notna(t):
        return float(t)
    bits = run.get("config.eval.threshold_bits")
    return (float(bits) if bits is not None and pd.notna(bits) else 0.1) * math.log(2)


# ---------------------------------------------------------------- the three analyses

def step_exponent(hist: pd.DataFrame, n_bootstrap: int) -> dict:
    """Mean val/loss over the given runs (seeds) per step, and L = E + A t^-alpha fitted to its tail."""
    h = hist.dropna(subset=["val/loss"]).groupby(["run_id", "step"], as_index=False)["val/loss"].last()
    mean = h.groupby("step")["val/loss"].mean().sort_index()
    steps, loss = mean.index.to_numpy(float), mean.to_numpy(float)
    out = {"steps": steps.astype(int).tolist(), "mean_loss": loss.tolist(), "n_runs": int(h["run_id"].nunique()),
           "alpha_S": None, "alpha_S_ci": None, "E": None, "A": None, "fit_warnings": []}
    if not len(steps):
        out["note"] = "no val/loss history"
        return out
    start = TAIL * steps.max()
    tail = (steps > 0) & (steps >= start)
    if tail.sum() < MIN_POINTS:
        tail = steps > 0
    out["fit_from_step"] = int(steps[tail].min()) if tail.any() else None
    if tail.sum() < MIN_POINTS:
        out["note"] = f"{int(tail.sum())} evaluated steps after 0: need >= {MIN_POINTS} for the step exponent"
        return out
    try:
        fit = fit_power_law(steps[tail], loss[tail], n_bootstrap=n_bootstrap)
    except FitError as e:
        out["note"] = f"no fit: {e}"
        return out
    out.update(alpha_S=fit.alpha[0], alpha_S_ci=list(fit.alpha_ci[0]) if fit.alpha_ci else None,
               E=fit.E, A=fit.A[0], fit_warnings=fit.warnings, n_fit=int(tail.sum()))
    return out


def convergence_steps(curves: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, subtask): p_t, the first evaluated step below the run's threshold (NaN:
    never, censored), and whether it was already below at step 0."""
    rows = []
    by_id = runs.set_index("id")
    for rid, c in curves.groupby("run_id"):
        if rid not in by_id.index:
            continue
        run = by_id.loc[rid]
        p = frequencies(run)
        if p is None:
            continue
        thr = threshold(run)
        wide = c.pivot_table(index="step", columns="item", values="loss").sort_index()  # [steps, items]
        below = wide.to_numpy() < thr
        steps = wide.index.to_numpy()
        for j, item in enumerate(wide.columns):
            hit = np.flatnonzero(below[:, j])
            first = float(steps[hit[0]]) if len(hit) else np.nan
            rows.append({"run_id": rid, "item": int(item), "p": float(p[int(item)]), "step": first,
                         "at_start": bool(len(hit) and steps[hit[0]] == 0)})
    return pd.DataFrame(rows, columns=["run_id", "item", "p", "step", "at_start"])


def convergence_slope(conv: pd.DataFrame, n_bootstrap: int) -> dict:
    """Slope of log(first step below threshold) against log p_t, pooled over the runs given, and per run."""
    ok = conv["step"].notna() & ~conv["at_start"].astype(bool)
    out = {"n_subtasks": int(len(conv)), "n_used": int(ok.sum()), "n_censored": int(conv["step"].isna().sum()),
           "n_at_start": int(conv["at_start"].astype(bool).sum()), "slope": None, "slope_ci": None,
           "per_run": {}}
    used = conv[ok]
    for rid, g in used.groupby("run_id"):
        if g["p"].nunique() >= 3:
            out["per_run"][rid] = float(np.polyfit(np.log(g["p"]), np.log(g["step"]), 1)[0])
    if used["p"].nunique() < 3:
        out["note"] = f"{used['p'].nunique()} learned subtasks with distinct frequencies: need >= 3 for a slope"
        return out
    fit = fit_loglog(used["p"].to_numpy(), used["step"].to_numpy(), n_bootstrap=n_bootstrap)
    # fit_loglog fits log step = c - alpha log p: the slope is -alpha
    out.update(slope=-fit.alpha, slope_ci=[-fit.alpha_ci[1], -fit.alpha_ci[0]] if fit.alpha_ci else None,
               intercept=fit.intercept)
    return out


def learned_counts(runs: pd.DataFrame) -> dict:
    """emergence/n_learned and n_below_end against N (runs at one data budget: infinite data if any,
    else the D with most model sizes) and against D (finite-data runs at the width with most D values)."""
    t = pd.DataFrame({"id": runs["id"].to_numpy(), "params": _num(runs, PARAMS).to_numpy(),
                      "width": _num(runs, "config.model.width").to_numpy(), "D": data_budget(runs).to_numpy(),
                      "n_learned": _num(runs, LEARNED).to_numpy(), "n_below_end": _num(runs, BELOW_END).to_numpy()})
    t = t.dropna(subset=["params", "n_learned"])
    out = {"vs_N": [], "vs_D": [], "N_at_D": None, "D_at_width": None}
    if len(t):
        sizes = t.groupby("D")["params"].nunique()
        d0 = np.inf if np.inf in sizes.index else sizes.idxmax()
        at = t[t["D"] == d0].sort_values("params")
        if at["params"].nunique() >= 2:
            out["vs_N"] = at.drop(columns="D").to_dict("records")
            out["N_at_D"] = "infinite" if d0 == np.inf else int(d0)
        fin = t[np.isfinite(t["D"])]
        if len(fin):
            w = fin.groupby("width")["D"].nunique()
            at = fin[fin["width"] == w.idxmax()].sort_values("D")
            if at["D"].nunique() >= 2:
                out["vs_D"] = at.to_dict("records")
                out["D_at_width"] = int(w.idxmax())
    return out


def analyze(source: str, sweep: str | None, runs: pd.DataFrame, n_bootstrap: int = 200) -> dict:
    from harness.runstore import load_curves, load_history

    if not len(runs):
        raise UserError(f"no sparse-parity runs in {source}" + (f" (sweep {sweep})" if sweep else ""))
    good = runs[runs["state"] == "finished"]
    if not len(good) or PARAMS not in good or good[PARAMS].isna().all():
        raise UserError(f"no finished sparse-parity runs with {PARAMS} in {source} "
                        f"(states: {runs['state'].value_counts().to_dict()})")
    good, alpha, alphas = one_alpha(good)
    big = largest_runs(good)
    ids = list(big["id"])
    hist = load_history(source, run_ids=ids, sweep=sweep, keys=["val/loss"])
    if "val/loss" not in hist:
        hist = hist.assign(**{"val/loss": np.nan})
    try:
        curves = load_curves(source, "subtask", run_ids=ids, sweep=sweep)
    except UserError as e:  # no curves artifact: the step exponent and the counts stand, the report says so
        print(f"dynamics: no per-subtask curves ({e})", file=sys.stderr)
        curves = pd.DataFrame(columns=["run_id", "step", "item", "loss"])
    conv = convergence_steps(curves, big)
    n = float(big[PARAMS].iloc[0])
    d = float(data_budget(big).iloc[0])
    return {
        "largest": {"ids": ids, "params": int(n), "D": "infinite" if d == np.inf else int(d),
                    "width": _num(big, "config.model.width").iloc[0]},
        "zipf_alpha": alpha, "zipf_alphas_in_source": alphas,
        "step_exponent": step_exponent(hist, n_bootstrap),
        "convergence": {**convergence_slope(conv, n_bootstrap),
                        "points": conv.replace({np.nan: None}).to_dict("records")},
        "learned": learned_counts(good),
        "excluded_runs": [{"id": r["id"], "state": r["state"]} for _, r in runs[runs["state"] != "finished"].iterrows()],
        "loss_units": "nats",
    }


# ---------------------------------------------------------------- plots and report

def plot(result: dict, out_dir: str) -> list[str]:
    import matplotlib.pyplot as plt

    paths = []
    se = result["step_exponent"]
    s, y = np.array(se["steps"], float), np.array(se["mean_loss"], float)
    if len(s):
        fig, ax = plt.subplots(figsize=(5.8, 4.2))
        pos = s > 0  # step 0 has no place on a log axis: its loss is printed in the legend instead
        label = "mean test loss" + (f" (step 0: {y[~pos][0]:.3f})" if (~pos).any() else "")
        ax.plot(s[pos], y[pos], "o-", ms=3, label=label)
        if se["alpha_S"] is not None:
            xs = np.geomspace(se["fit_from_step"], s.max(), 100)
            lo, hi = se["alpha_S_ci"] or (se["alpha_S"],) * 2
            ax.plot(xs, se["E"] + se["A"] * xs ** -se["alpha_S"], "-",
                    label=f"fit {se['E']:.3g} + {se['A']:.3g} t^-{se['alpha_S']:.2f} (95% CI {lo:.2f}..{hi:.2f})")
        P.log_axis(ax, "x", "optimizer step t")
        P.log_axis(ax, "y", "test loss (nats)")
        lg = result["largest"]
        ax.set_title(f"Largest runs ({lg['params']} params, D {lg['D']}, {se['n_runs']} run(s))", fontsize=9)
        ax.legend(fontsize=7)
        path = os.path.join(out_dir, "loss_vs_step.png")
        P.save(fig, path)
        paths.append(path)
    cv = result["convergence"]
    pts = pd.DataFrame(cv["points"], columns=["run_id", "item", "p", "step", "at_start"])
    used = pts[pts["step"].notna() & ~pts["at_start"].astype(bool)]
    if len(used):
        fig, ax = plt.subplots(figsize=(5.8, 4.2))
        ax.plot(used["p"], used["step"], "o", ms=4, label=f"subtasks learned ({len(used)})")
        if cv["slope"] is not None:
            ps = np.geomspace(used["p"].min(), used["p"].max(), 50)
            lo, hi = cv["slope_ci"] or (cv["slope"],) * 2
            ax.plot(ps, np.exp(cv["intercept"]) * ps ** cv["slope"], "-",
                    label=f"slope {cv['slope']:.2f} (95% CI {lo:.2f}..{hi:.2f})")
            i = used["p"].idxmax()  # the theory line (slope -1) through the most frequent learned subtask
            ax.plot(ps, used.loc[i, "step"] * (ps / used.loc[i, "p"]) ** -1.0, "--", color="gray", label="theory: slope -1")
        P.log_axis(ax, "x", "subtask frequency p_t")
        P.log_axis(ax, "y", "first step below threshold")
        ax.set_title(f"Convergence time vs frequency ({cv['n_censored']} never learned, censored)", fontsize=9)
        ax.legend(fontsize=7)
        path = os.path.join(out_dir, "convergence_vs_frequency.png")
        P.save(fig, path)
        paths.append(path)
    lc = result["learned"]
    for key, x, xlabel, name, at in (("vs_N", "params", "parameters N", "learned_vs_N.png", f"D {lc['N_at_D']}"),
                                     ("vs_D", "D", "training samples D", "learned_vs_D.png", f"width {lc['D_at_width']}")):
        rows = pd.DataFrame(lc[key])
        if not len(rows):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.plot(rows[x], rows["n_learned"], "o-", label="ever below threshold")
        if rows["n_below_end"].notna().any():
            ax.plot(rows[x], rows["n_below_end"], "x--", label="below it at the end")
        P.log_axis(ax, "x", xlabel)
        P.count_axis(ax, "y", "subtasks learned (count)")
        ax.set_title(f"Learned quanta vs {xlabel.split()[-1]} ({at})", fontsize=9)
        ax.legend(fontsize=7)
        path = os.path.join(out_dir, name)
        P.save(fig, path)
        paths.append(path)
    return paths


def _ci(v) -> str:
    return f" (95% CI {v[0]:.2f} .. {v[1]:.2f})" if v else ""


def report(result: dict, source: str, sweep: str | None, plots: list[str]) -> str:
    lg, se, cv, lc = result["largest"], result["step_exponent"], result["convergence"], result["learned"]
    lines = ["# Sparse parity: training dynamics", "",
             f"Source: `{source}`" + (f", sweep `{sweep}`" if sweep else "")
             + f"; largest runs: {lg['params']} parameters, D {lg['D']} ({len(lg['ids'])} run(s): {', '.join(lg['ids'])})"
             + (f"; runs at zipf_alpha = {result['zipf_alpha']:g} only (the source has {result['zipf_alphas_in_source']}: "
                "analysis.alpha_study compares them)" if len(result["zipf_alphas_in_source"]) > 1 else "") + ".", ""]
    if se["alpha_S"] is not None:
        lines.append(f"- step exponent: mean test loss L = {se['E']:.3g} + {se['A']:.3g} t^-alpha_S, alpha_S = "
                     f"**{se['alpha_S']:.3f}**{_ci(se['alpha_S_ci'])}, fitted over {se['n_fit']} evaluations from "
                     f"step {se['fit_from_step']} (the last {100 * (1 - TAIL):.0f}% of training)")
    else:
        lines.append(f"- step exponent: not fitted ({se.get('note', 'no fit')})")
    lines += [f"- warning (step fit): {w}" for w in se["fit_warnings"]]
    if cv["slope"] is not None:
        lines.append(f"- convergence time vs frequency: log(first step below threshold) = c + **{cv['slope']:.2f}** "
                     f"log p_t{_ci(cv['slope_ci'])} over {cv['n_used']} learned subtasks (the quantization model: "
                     "-1, steps ~ 1/p_t)")
    else:
        lines.append(f"- convergence time vs frequency: no slope ({cv.get('note', 'no per-subtask curves')})")
    lines.append(f"  ({cv['n_censored']} of {cv['n_subtasks']} subtasks never below the threshold: censored, left out; "
                 f"{cv['n_at_start']} below it already at step 0: left out)")
    if cv["per_run"]:
        lines.append("  per run: " + ", ".join(f"{k} {v:.2f}" for k, v in cv["per_run"].items()))
    for key, x, what in (("vs_N", "params", f"parameters (D {lc['N_at_D']})"),
                         ("vs_D", "D", f"training samples (width {lc['D_at_width']})")):
        if lc[key]:
            lines += ["", f"Learned quanta against {what}:", "", f"| {x} | learned (ever) | below threshold at end |",
                      "|---|---|---|"]
            lines += [f"| {int(r[x])} | {int(r['n_learned'])} | "
                      f"{'' if r['n_below_end'] is None or pd.isna(r['n_below_end']) else int(r['n_below_end'])} |"
                      for r in lc[key]]
    if result["excluded_runs"]:
        lines += ["", "Excluded runs (not finished): " + ", ".join(f"{r['id']} ({r['state']})" for r in result["excluded_runs"])]
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"


def _runs(source: str, sweep: str | None) -> pd.DataFrame:
    from harness.runstore import load_runs

    return task_runs(load_runs(source, sweep=sweep), "sparse_parity")


def analyse(source: str, sweep: str | None, out: str, n_bootstrap: int = 200) -> tuple[dict, list[str], str]:
    result = analyze(source, sweep, _runs(source, sweep), n_bootstrap=n_bootstrap)
    os.makedirs(out, exist_ok=True)
    paths = plot(result, out)
    md = report(result, source, sweep, paths)
    write_outputs(out, STUDY, result, md)
    return result, paths, md


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(STUDY, argv, lambda p: p.add_argument("--bootstrap", type=int, default=200))
    result, _, _ = analyse(args.source, args.sweep, args.out, args.bootstrap)
    se, cv = result["step_exponent"], result["convergence"]
    print(f"alpha_S = {se['alpha_S']}  CI {se['alpha_S_ci']}  convergence slope {cv['slope']}  CI {cv['slope_ci']}")
    return result


def applies(runs: pd.DataFrame) -> bool:
    return has_task(runs, "sparse_parity")


def run(source: str, sweep: str | None, out: str) -> Section:
    """The analysis.report hook (analysis/study.py)."""
    result, paths, md = analyse(source, sweep, out)
    fitted = {"alpha_S": result["step_exponent"]["alpha_S"], "alpha_S_ci": result["step_exponent"]["alpha_S_ci"],
              "convergence_slope": result["convergence"]["slope"],
              "convergence_slope_ci": result["convergence"]["slope_ci"]}
    tables = {"convergence": pd.DataFrame(result["convergence"]["points"])}
    for key in ("vs_N", "vs_D"):
        if result["learned"][key]:
            tables[f"learned_{key}"] = pd.DataFrame(result["learned"][key])
    return Section(STUDY, "Sparse parity: training dynamics", md, out, paths, tables,
                   numbers({k: v for k, v in fitted.items() if v is not None}), result["largest"]["ids"])


if __name__ == "__main__":
    main_guard(main)
