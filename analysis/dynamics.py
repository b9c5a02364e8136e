"""Training dynamics of multitask sparse parity (the quantization model's third study).

    python -m analysis.dynamics SOURCE [--sweep ID] --out DIR

- the step exponent: mean test loss (`val/loss`, frequency-weighted) against step for the largest
  runs, L = E + A t^-alpha_S fitted over the tail of training (analysis.fits);
- convergence time against frequency: when each subtask's test loss first falls below the run's
  threshold (the curves artifact, contract C4) against its frequency p_t. The step is known only to
  lie between two evaluations, and subtasks never learned only to need more than the budget: a
  log-normal accelerated-failure-time fit of log step on log p_t with each step interval-censored and
  the unlearned right-censored (analysis.censored), profile-likelihood interval; printed beside the
  learned-only least-squares slope (which drops the slow, rare subtasks and so flattens the slope).
  References: the quantization model's -1 (steps ~ 1/p_t) and the paper's fitted -0.81. Subtasks
  below the threshold already at step 0 are counted, not fitted (no place on a log axis);
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
from scipy import stats

from analysis import dynamics_plots
from analysis import emergence as em
from analysis.censored import lognormal_aft
from analysis.common import main_guard, parse_args, write_outputs
from analysis.design import run_frequencies
from analysis.fits import FitError, fit_power_law
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
    return (
        pd.to_numeric(runs[key], errors="coerce") if key in runs else pd.Series(default, index=runs.index, dtype=float)
    )


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


frequencies = run_frequencies  # p_t of a run's design from its config (analysis.design, one home)


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
    per_run = {
        rid: {"steps": g["step"].astype(int).tolist(), "loss": g["val/loss"].tolist()}
        for rid, g in h.sort_values("step").groupby("run_id")
    }
    out = {
        "steps": steps.astype(int).tolist(),
        "mean_loss": loss.tolist(),
        "n_runs": int(h["run_id"].nunique()),
        "per_run": per_run,
        "alpha_S": None,
        "alpha_S_ci": None,
        "E": None,
        "A": None,
        "fit_warnings": [],
    }
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
    out.update(
        alpha_S=fit.alpha[0],
        alpha_S_ci=list(fit.alpha_ci[0]) if fit.alpha_ci else None,
        E=fit.E,
        A=fit.A[0],
        fit_warnings=fit.warnings,
        n_fit=int(tail.sum()),
    )
    return out


def convergence_steps(curves: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, subtask): p_t and when its test loss first fell below the run's threshold,
    as an interval (lo, hi] between two evaluations: `step` = hi, the first evaluation below (NaN:
    never, right-censored at lo = the last evaluated step); lo = the evaluation before (0 when the
    first evaluation after step 0 is already below: left-censored). `at_start`: below already at step
    0 (no time to learn on a log axis: counted, not fitted)."""
    rows = []
    by_id = runs.set_index("id")
    for rid, c in curves.groupby("run_id"):
        if rid not in by_id.index:
            continue
        run = by_id.loc[rid]
        p = frequencies(run)
        if p is None:
            continue
        wide = c.pivot_table(index="step", columns="item", values="loss").sort_index()  # [steps, items]
        steps = wide.index.to_numpy(float)
        cross = em.threshold_crossing(steps, wide.to_numpy().T - threshold(run), 0.0)  # per item
        at_start = cross.reached & (cross.x <= 0)
        for j, item in enumerate(wide.columns):
            learned = bool(cross.reached[j])
            rows.append(
                {
                    "run_id": rid,
                    "item": int(item),
                    "p": float(p[int(item)]),
                    "step": float(cross.x[j]) if learned else np.nan,
                    "lo": max(float(cross.lo[j]), 0.0),
                    "hi": float(cross.hi[j]),
                    "learned": learned,
                    "at_start": bool(at_start[j]),
                }
            )
    return pd.DataFrame(rows, columns=["run_id", "item", "p", "step", "lo", "hi", "learned", "at_start"])


REFERENCE = {"paper_fit": -0.81, "theory": -1.0}  # Michaud et al.'s fitted slope on their figure; steps ~ 1/p_t
METHOD = (
    "log-normal accelerated-failure-time regression of log(step) on log(p_t), maximum likelihood with each "
    "learning step interval-censored between two evaluations and never-learned subtasks right-censored at "
    "the last evaluated step (analysis.censored.lognormal_aft); 95% profile-likelihood interval"
)


def _ols(p: np.ndarray, t: np.ndarray, level: float = 0.95) -> dict | None:
    """Learned-only least squares of log t on log p with its t-interval (scipy.stats.linregress)."""
    if len(np.unique(p)) < 3:
        return None
    r = stats.linregress(np.log(p), np.log(t))
    q = stats.t.ppf(0.5 + level / 2, len(p) - 2) * r.stderr
    return {
        "slope": float(r.slope),
        "slope_ci": [float(r.slope - q), float(r.slope + q)],
        "intercept": float(r.intercept),
        "n": len(p),
        "interval": "95% t-interval of ordinary least squares",
    }


def _aft(g: pd.DataFrame, interval: bool = True) -> dict | None:
    try:
        f = lognormal_aft(np.log(g["p"].to_numpy()), g["lo"].to_numpy(), g["hi"].to_numpy(), interval=interval)
    except ValueError:
        return None
    return {
        "slope": f.slope,
        "slope_ci": list(f.slope_ci),
        "slope_se": f.slope_se,
        "intercept": f.intercept,
        "sigma": f.sigma,
        "n": f.n,
        "n_interval": f.n_interval,
        "n_left_censored": f.n_left,
        "n_right_censored": f.n_right,
        "converged": f.converged,
        "interval": "95% profile likelihood",
    }


def convergence_slope(conv: pd.DataFrame) -> dict:
    """Slope of log(learning step) against log p_t, pooled over the runs given (seeds of the largest
    size) and per run: the censored fit (every subtask) beside learned-only least squares."""
    at_start = conv["at_start"].astype(bool)
    use = conv[~at_start]
    learned = use[use["learned"].astype(bool)]
    out = {
        "method": METHOD,
        "n_subtasks": len(conv),
        "n_learned": len(learned),
        "n_censored": int((~use["learned"].astype(bool)).sum()),
        "n_at_start": int(at_start.sum()),
        "censored_fit": _aft(use) if len(use) else None,
        "learned_only_fit": _ols(learned["p"].to_numpy(), learned["step"].to_numpy()),
        "reference": dict(REFERENCE),
        "per_run": {},
    }
    for rid, g in use.groupby("run_id"):
        c, o = (
            _aft(g, interval=False),
            _ols(g.loc[g["learned"], "p"].to_numpy(), g.loc[g["learned"], "step"].to_numpy()),
        )
        out["per_run"][rid] = {"censored": c and c["slope"], "learned_only": o and o["slope"]}
    if out["censored_fit"] is None:
        out["note"] = (
            f"{len(learned)} learned subtasks: too few for a censored fit (need >= 3 events at >= 2 frequencies)"
        )
    return out


def learned_counts(runs: pd.DataFrame) -> dict:
    """emergence/n_learned and n_below_end against N (runs at one data budget: infinite data if any,
    else the D with most model sizes) and against D (finite-data runs at the width with most D values)."""
    t = pd.DataFrame(
        {
            "id": runs["id"].to_numpy(),
            "params": _num(runs, PARAMS).to_numpy(),
            "width": _num(runs, "config.model.width").to_numpy(),
            "D": data_budget(runs).to_numpy(),
            "n_learned": _num(runs, LEARNED).to_numpy(),
            "n_below_end": _num(runs, BELOW_END).to_numpy(),
        }
    )
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
        raise UserError(
            f"no finished sparse-parity runs with {PARAMS} in {source} "
            f"(states: {runs['state'].value_counts().to_dict()})"
        )
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
        "largest": {
            "ids": ids,
            "params": int(n),
            "D": "infinite" if d == np.inf else int(d),
            "width": _num(big, "config.model.width").iloc[0],
        },
        "zipf_alpha": alpha,
        "zipf_alphas_in_source": alphas,
        "step_exponent": step_exponent(hist, n_bootstrap),
        "convergence": {**convergence_slope(conv), "points": conv.replace({np.nan: None}).to_dict("records")},
        "learned": learned_counts(good),
        "excluded_runs": [
            {"id": r["id"], "state": r["state"]} for _, r in runs[runs["state"] != "finished"].iterrows()
        ],
        "loss_units": "nats",
    }


# ---------------------------------------------------------------- report


def _ci(v) -> str:
    return f" (95% CI {v[0]:.2f} .. {v[1]:.2f})" if v else ""


def _f2(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def report(result: dict, source: str, sweep: str | None, plots: list[str]) -> str:
    lg, se, cv, lc = result["largest"], result["step_exponent"], result["convergence"], result["learned"]
    lines = [
        "# Sparse parity: training dynamics",
        "",
        f"Source: `{source}`"
        + (f", sweep `{sweep}`" if sweep else "")
        + f"; largest runs: {lg['params']} parameters, D {lg['D']} ({len(lg['ids'])} run(s): {', '.join(lg['ids'])})"
        + (
            f"; runs at zipf_alpha = {result['zipf_alpha']:g} only (the source has {result['zipf_alphas_in_source']}: "
            "analysis.alpha_study compares them)"
            if len(result["zipf_alphas_in_source"]) > 1
            else ""
        )
        + ".",
        "",
    ]
    if se["alpha_S"] is not None:
        lines.append(
            f"- step exponent: mean test loss L = {se['E']:.3g} + {se['A']:.3g} t^-alpha_S, alpha_S = "
            f"**{se['alpha_S']:.3f}**{_ci(se['alpha_S_ci'])}, fitted over {se['n_fit']} evaluations from "
            f"step {se['fit_from_step']} (the last {100 * (1 - TAIL):.0f}% of training)"
        )
    else:
        lines.append(f"- step exponent: not fitted ({se.get('note', 'no fit')})")
    lines += [f"- warning (step fit): {w}" for w in se["fit_warnings"]]
    cf, of = cv["censored_fit"], cv["learned_only_fit"]
    lines.append(
        f"- convergence time vs frequency, log(learning step) = c + slope log p_t (the quantization model: "
        f"{REFERENCE['theory']:g}, steps ~ 1/p_t; the paper's fit on its figure: {REFERENCE['paper_fit']:g}); "
        f"{cv['n_learned']} subtasks learned, {cv['n_censored']} never learned:"
    )
    if cf:
        lines.append(
            f"  - censored fit, every subtask: slope **{cf['slope']:.2f}**{_ci(cf['slope_ci'])}, scatter "
            f"sigma {cf['sigma']:.2f} in log steps ({cf['n_interval']} learned between two evaluations, "
            f"{cf['n_left_censored']} by the first evaluation after step 0, {cf['n_right_censored']} "
            "right-censored at the last evaluated step); method: " + cv["method"]
        )
    else:
        lines.append(f"  - censored fit: none ({cv.get('note', 'no per-subtask curves')})")
    if of:
        lines.append(
            f"  - learned-only least squares (first evaluation below the threshold; selects on the outcome, "
            f"for comparison): slope {of['slope']:.2f}{_ci(of['slope_ci'])} over {of['n']} subtasks"
        )
    lines.append(f"  ({cv['n_at_start']} subtasks below the threshold already at step 0: counted, not fitted)")
    if cv["per_run"]:
        lines.append(
            "  per run (censored / learned-only): "
            + ", ".join(f"{k} {_f2(v['censored'])} / {_f2(v['learned_only'])}" for k, v in cv["per_run"].items())
        )
    for key, x, what in (
        ("vs_N", "params", f"parameters (D {lc['N_at_D']})"),
        ("vs_D", "D", f"training samples (width {lc['D_at_width']})"),
    ):
        if lc[key]:
            lines += [
                "",
                f"Learned quanta against {what}:",
                "",
                f"| {x} | learned (ever) | below threshold at end |",
                "|---|---|---|",
            ]
            lines += [
                f"| {int(r[x])} | {int(r['n_learned'])} | "
                f"{'' if r['n_below_end'] is None or pd.isna(r['n_below_end']) else int(r['n_below_end'])} |"
                for r in lc[key]
            ]
    if result["excluded_runs"]:
        lines += [
            "",
            "Excluded runs (not finished): " + ", ".join(f"{r['id']} ({r['state']})" for r in result["excluded_runs"]),
        ]
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"


def _runs(source: str, sweep: str | None) -> pd.DataFrame:
    from harness.runstore import load_runs

    return task_runs(load_runs(source, sweep=sweep), "sparse_parity")


def analyse(source: str, sweep: str | None, out: str, n_bootstrap: int = 200) -> tuple[dict, list[str], str]:
    result = analyze(source, sweep, _runs(source, sweep), n_bootstrap=n_bootstrap)
    os.makedirs(out, exist_ok=True)
    paths = dynamics_plots.plot(result, out)
    md = report(result, source, sweep, paths)
    write_outputs(out, STUDY, result, md)
    return result, paths, md


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(STUDY, argv, lambda p: p.add_argument("--bootstrap", type=int, default=200))
    result, _, _ = analyse(args.source, args.sweep, args.out, args.bootstrap)
    se, cv = result["step_exponent"], result["convergence"]
    print(f"alpha_S = {se['alpha_S']}  CI {se['alpha_S_ci']}")
    for name in ("censored_fit", "learned_only_fit"):
        f = cv[name] or {}
        print(f"convergence slope, {name.replace('_', ' ')}: {f.get('slope')}  95% CI {f.get('slope_ci')}")
    print(
        f"  ({cv['n_learned']} learned, {cv['n_censored']} censored; paper's fit {REFERENCE['paper_fit']}, "
        f"theory {REFERENCE['theory']})"
    )
    return result


def applies(runs: pd.DataFrame) -> bool:
    return has_task(runs, "sparse_parity")


def run(source: str, sweep: str | None, out: str) -> Section:
    """The analysis.report hook (analysis/study.py)."""
    result, paths, md = analyse(source, sweep, out)
    fitted = {"alpha_S": result["step_exponent"]["alpha_S"], "alpha_S_ci": result["step_exponent"]["alpha_S_ci"]}
    for name in ("censored", "learned_only"):  # the W&B summary: both slopes, each with its interval
        fit = result["convergence"][f"{name}_fit"] or {}
        fitted[f"convergence_slope_{name}"], fitted[f"convergence_slope_{name}_ci"] = (
            fit.get("slope"),
            fit.get("slope_ci"),
        )
    tables = {"convergence": pd.DataFrame(result["convergence"]["points"])}
    for key in ("vs_N", "vs_D"):
        if result["learned"][key]:
            tables[f"learned_{key}"] = pd.DataFrame(result["learned"][key])
    return Section(
        STUDY,
        "Sparse parity: training dynamics",
        md,
        out,
        paths,
        tables,
        numbers({k: v for k, v in fitted.items() if v is not None}),
        result["largest"]["ids"],
    )


if __name__ == "__main__":
    main_guard(main)
