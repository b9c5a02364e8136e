"""Data scaling of multitask sparse parity: alpha_D of the minimum test loss against D.

    python -m analysis.data_scaling SOURCE [--sweep ID] --out DIR

A run's loss is its minimum test loss over training (summary `val/loss.min`), as the paper takes it
(early stopping in its v5 script): with D fixed samples the test loss falls, then rises as the model
memorises. Fits L = E + B D^-alpha_D (Chinchilla approach 3, analysis.fits) and the paper's plain
log-log line in bits, beside the quantization model's prediction for the runs' own design
(alpha_D_design, analysis.design) and the asymptotic alpha_D = alpha / (alpha + 1). Runs still
learning in the last 10% of their steps are step-bound: drawn and listed, not fitted.
Writes DIR/data_scaling.json (alpha_D, alpha_D_ci, alpha_D_plain, alpha_D_plain_ci, alpha_D_design,
alpha_D_design_ci, theory_alpha_D, warnings, points), DIR/loss_vs_data.png and DIR/report.md.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pandas as pd

from analysis import plots as P
from analysis.common import main_guard, parse_args
from analysis.design import N_KEY, design_prediction
from analysis.fit_checks import few_x, offset_on_bound, still_learning
from analysis.fits import fit_loglog, fit_power_law
from analysis.study import Section, numbers, sparse_parity_study, task_runs
from harness.errors import UserError

STUDY = "data_scaling"
X_KEY = "config.data.n_train_samples"
THEORY_KEY = "config.data.zipf_alpha"


def min_loss_column(runs: pd.DataFrame) -> str:
    """The minimum test loss over training: `summary.val/loss.min` (val/loss is declared with summary
    "min", contract C2)."""
    col = "summary.val/loss.min"
    if col not in runs:
        raise UserError(
            f"no {col} column: the runs predate the min summary of val/loss, or are not "
            f"sparse-parity training runs (columns: {', '.join(c for c in runs if 'val/loss' in c) or 'none'})"
        )
    return col


def select_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Finished finite-data runs (D > 0) with a minimum test loss; every other run, with why."""
    if not len(runs) or X_KEY not in runs:
        raise UserError(f"no sparse-parity runs with {X_KEY} in this source ({len(runs)} runs)")
    y = min_loss_column(runs)
    d = pd.to_numeric(runs[X_KEY], errors="coerce")
    ok = (runs["state"] == "finished") & (d > 0) & runs[y].notna()
    return runs[ok].copy(), runs[~ok].copy()


def _why(r: pd.Series, y: str) -> str:
    if r["state"] != "finished":
        return r["state"]
    if not (pd.to_numeric(r.get(X_KEY), errors="coerce") > 0):
        return "infinite data (n_train_samples=0)"
    return f"no {y}"


HISTORY_KEYS = ["val/loss", "val/n_learned"]  # analysis.study loads these for analyze(history=...)


def analyze(runs: pd.DataFrame, n_bootstrap: int = 200, history: pd.DataFrame | None = None) -> dict:
    """alpha_D over the finished finite-data runs that are not step-bound; beside it the prediction
    for this design (analysis.design) and the asymptotic alpha/(alpha+1).

    Step-bound: a run still learning in the last 10% of its steps (analysis.fit_checks.still_learning,
    from `history`): its minimum loss is set by the step budget, not by D, so it is drawn and listed but
    not fitted. Without history no run is known to be step-bound (a warning says so)."""
    good, bad = select_runs(runs)
    y_col = min_loss_column(runs)
    if len(good) < 3:
        raise UserError(
            f"need >= 3 finished finite-data runs to fit alpha_D, found {len(good)} "
            f"(states: {runs['state'].value_counts().to_dict()})"
        )
    good = good.sort_values(X_KEY)
    ids = good["id"].tolist()
    flagged = still_learning(history[history["run_id"].isin(ids)]) if history is not None and len(history) else []
    bound = {r["id"]: r for r in flagged}
    warnings = []
    fitted = good[~good["id"].isin(bound)]
    if len(fitted) < 3:
        warnings.append(f"only {len(fitted)} runs are not step-bound: all {len(good)} fitted, step-bound ones included")
        fitted = good
    elif bound:
        warnings.append(
            "not fitted, step-bound (still learning in the last 10% of their steps: more steps, not "
            "more data, would lower their loss): "
            + "; ".join(
                f"{r['id']} (D={int(good.loc[good['id'] == r['id'], X_KEY].iloc[0])}): {r['why']}" for r in flagged
            )
        )
    if history is None:
        warnings.append("no history read: runs still learning at the end (step-bound) could not be found")
    x = fitted[X_KEY].astype(float).to_numpy()
    y = fitted[y_col].astype(float).to_numpy()
    fit = fit_power_law(x, y, n_bootstrap=n_bootstrap)
    plain = fit_loglog(x, y / math.log(2), n_bootstrap=n_bootstrap)
    fids = fitted["id"].tolist()
    warnings += [w for w in (few_x(x, fids, "data budgets D"), offset_on_bound(fit.E, y, fids)) if w]
    design = design_prediction(fitted, x, n_bootstrap)
    predicted = dict(zip(fitted["id"], design.get("predicted", [])))
    alphas = sorted(set(good[THEORY_KEY].astype(float))) if THEORY_KEY in good else []
    theory = alphas[0] / (alphas[0] + 1) if len(alphas) == 1 else None
    final_col = "summary.val/loss.last" if "summary.val/loss.last" in good else None
    nval = lambda r, k: float(r[k]) if k in r and pd.notna(r[k]) else None  # noqa: E731
    return {
        "alpha_D": fit.alpha[0],
        "alpha_D_ci": list(fit.alpha_ci[0]) if fit.alpha_ci else None,
        "alpha_D_plain": plain.alpha,
        "alpha_D_plain_ci": list(plain.alpha_ci) if plain.alpha_ci else None,
        "alpha_D_design": design.get("alpha"),
        "alpha_D_design_ci": design.get("ci"),
        "design_note": design.get("note"),
        "E": fit.E,
        "E_ci": list(fit.E_ci) if fit.E_ci else None,
        "B": fit.A[0],
        "plain_intercept_bits": plain.intercept,
        "theory_alpha": alphas[0] if len(alphas) == 1 else alphas,
        "theory_alpha_D": theory,
        "n_runs": len(good),
        "n_fitted": len(fitted),
        "n_bootstrap": fit.n_bootstrap,
        "fit_warnings": fit.warnings,
        "warnings": warnings,
        "step_bound": flagged,
        "excluded_runs": [{"id": r["id"], "state": r["state"], "why": _why(r, y_col)} for _, r in bad.iterrows()],
        "points": [
            {
                "id": r["id"],
                "D": int(r[X_KEY]),
                "min_loss": float(r[y_col]),
                "final_loss": nval(r, final_col) if final_col else None,
                "width": r.get("config.model.width"),
                "seed": nval(r, "config.seed"),
                "n_learned": nval(r, "summary.emergence/n_learned"),
                "n_below_end": nval(r, N_KEY),
                "predicted_loss": predicted.get(r["id"]),
                "fitted": r["id"] in set(fids),
                "step_bound": r["id"] in bound,
            }
            for _, r in good.iterrows()
        ],
        "loss": "minimum test loss over training (nats)",
    }


def plot(result: dict, out_dir: str) -> list[str]:
    import matplotlib.pyplot as plt

    ln2 = math.log(2)
    pts = result["points"]
    fit_pts = [p for p in pts if p["fitted"]]
    xf = np.array([p["D"] for p in fit_pts], float)
    fig, (ax, ax_leg) = plt.subplots(2, 1, figsize=(6, 5.6), gridspec_kw={"height_ratios": [4, 1.6]})
    ax.plot(xf, [p["min_loss"] / ln2 for p in fit_pts], "o", color="C0", label="minimum test loss (fitted runs)")
    out = [p for p in pts if not p["fitted"]]
    if out:
        ax.plot(
            [p["D"] for p in out],
            [p["min_loss"] / ln2 for p in out],
            "o",
            mfc="none",
            color="C0",
            label="step-bound: still learning at the end (not fitted)",
        )
    fin = [(p["D"], p["final_loss"] / ln2) for p in pts if p["final_loss"] is not None]
    if fin:
        ax.plot(*zip(*fin), "x", color="0.5", label="final test loss (overfits at small D)")
    xs = np.logspace(np.log10(xf.min()), np.log10(xf.max()), 100)  # the fitted range only
    a, ci = result["alpha_D_plain"], result["alpha_D_plain_ci"] or [math.nan] * 2
    c = math.exp(result["plain_intercept_bits"])
    ax.plot(
        xs,
        c * xs**-a,
        "-",
        color="C0",
        label=f"measured: plain log-log fit, alpha_D = {a:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]",
    )
    E, B, ao = result["E"], result["B"], result["alpha_D"]
    aci = result["alpha_D_ci"] or [math.nan] * 2
    ax.plot(
        xs,
        (E + B * xs**-ao) / ln2,
        "-.",
        color="C2",
        lw=1,
        label=f"offset fit E + B D^-alpha: alpha_D = {ao:.3f} [{aci[0]:.2f}, {aci[1]:.2f}], E = {E / ln2:.2g} bits",
    )
    xc = math.exp(np.mean(np.log(xf)))
    yc = c * xc**-a  # the plain fit's own anchor: the slopes below pass through it
    if result["theory_alpha_D"] is not None:
        t = result["theory_alpha_D"]
        ax.plot(
            xs,
            yc * (xs / xc) ** -t,
            "--",
            color="0.4",
            lw=1,
            label=f"asymptotic theory: slope alpha/(alpha+1) = {t:.3f}",
        )
    if result.get("alpha_D_design") is not None:
        d, dci = result["alpha_D_design"], result.get("alpha_D_design_ci") or [math.nan] * 2
        ax.plot(
            xs,
            yc * (xs / xc) ** -d,
            ":",
            color="C3",
            lw=1.5,
            label=f"design prediction (this design, learned counts): slope {d:.3f} [{dci[0]:.3f}, {dci[1]:.3f}]",
        )
    P.log_axis(ax, "x", "training samples D")
    P.log_axis(ax, "y", "test loss (bits)")
    ax.set_title("Multitask sparse parity: loss vs data (one seed per D)", fontsize=9)
    h, lab = ax.get_legend_handles_labels()
    ax_leg.axis("off")
    ax_leg.legend(h, lab, loc="upper center", fontsize=7, frameon=False)
    path = os.path.join(out_dir, "loss_vs_data.png")
    P.save(fig, path)
    return [path]


def comparison_lines(result: dict) -> list[str]:
    """Measured, design-predicted and asymptotic alpha_D, each labelled (printed and in the report)."""
    ci = lambda c: f" (95% CI {c[0]:.3f} .. {c[1]:.3f})" if c else ""  # noqa: E731
    t = result["theory_alpha_D"]
    return [
        f"measured alpha_D (plain log-log fit, bits, the paper's) = {result['alpha_D_plain']:.3f}"
        + ci(result["alpha_D_plain_ci"]),
        f"measured alpha_D (offset fit E + B D^-alpha) = {result['alpha_D']:.3f}"
        + ci(result["alpha_D_ci"])
        + f"; E = {result['E']:.4g} nats ({result['n_bootstrap']} resamples of the runs)",
        (
            f"design-predicted alpha_D (this design's frequencies, each run's learned count) = "
            f"{result['alpha_D_design']:.3f}" + ci(result.get("alpha_D_design_ci"))
        )
        if result.get("alpha_D_design") is not None
        else f"design-predicted alpha_D: {result.get('design_note')}",
        f"asymptotic alpha_D = alpha/(alpha+1) = {t:.3f} at alpha = {result['theory_alpha']}"
        if t is not None
        else f"asymptotic alpha_D = alpha/(alpha+1); alphas in these runs: {result['theory_alpha']}",
    ]


def report(result: dict, source: str, sweep: str | None, plots: list[str]) -> str:
    lines = [
        "# Sparse parity: data scaling",
        "",
        f"Source: `{source}`" + (f", sweep `{sweep}`" if sweep else "") + f"; {result['n_runs']} finished runs, "
        f"{result['n_fitted']} fitted; a run's loss is its minimum test loss over training (the paper's choice).",
        "",
    ]
    lines += [f"- {line}" for line in comparison_lines(result)]
    lines += ["- the paper measured alpha_D ~ 0.31 at alpha = 0.4 with 500 subtasks (asymptotic 0.286)"]
    lines += [f"- warning: {w}" for w in result.get("warnings", []) + result["fit_warnings"]]
    lines += [
        "",
        "| D | seed | min test loss (nats) | final test loss | subtasks learned | below threshold at end "
        "| predicted loss (nats) | fitted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        f = lambda v, fmt="{:.4f}": "" if v is None else fmt.format(v)  # noqa: E731
        why = "yes" if p["fitted"] else ("no: step-bound" if p["step_bound"] else "no")
        lines.append(
            f"| {p['D']} | {f(p['seed'], '{:.0f}')} | {p['min_loss']:.4f} | {f(p['final_loss'])} | "
            f"{f(p['n_learned'], '{:.0f}')} | {f(p['n_below_end'], '{:.0f}')} | {f(p['predicted_loss'])} | {why} |"
        )
    if result["excluded_runs"]:
        lines += ["", "Excluded runs: " + ", ".join(f"{r['id']} ({r['why']})" for r in result["excluded_runs"])]
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(STUDY, argv, lambda p: p.add_argument("--bootstrap", type=int, default=200))
    _, result, _, _ = sparse_parity_study(sys.modules[__name__], args.source, args.sweep, args.out, args.bootstrap)
    print(f"{result['n_runs']} runs, {result['n_fitted']} fitted")
    for line in comparison_lines(result) + [f"warning: {w}" for w in result["warnings"]]:
        print(line)
    return result


def applies(runs: pd.DataFrame) -> bool:
    """Sparse-parity runs with finite data (D > 0) in the source."""
    sp = task_runs(runs, "sparse_parity")
    return X_KEY in sp and bool((pd.to_numeric(sp[X_KEY], errors="coerce") > 0).any())


def run(source: str, sweep: str | None, out: str) -> Section:
    """The analysis.report hook (analysis/study.py)."""
    _, result, paths, md = sparse_parity_study(sys.modules[__name__], source, sweep, out)
    fitted = {
        k: result[k]
        for k in (
            "alpha_D",
            "alpha_D_ci",
            "alpha_D_plain",
            "alpha_D_plain_ci",
            "alpha_D_design",
            "alpha_D_design_ci",
            "E",
            "B",
            "theory_alpha_D",
            "n_runs",
            "n_fitted",
        )
        if result[k] is not None
    }
    return Section(
        STUDY,
        "Sparse parity: data scaling",
        md,
        out,
        paths,
        {"points": pd.DataFrame(result["points"])},
        numbers(fitted),
        [p["id"] for p in result["points"]],
    )


if __name__ == "__main__":
    main_guard(main)
