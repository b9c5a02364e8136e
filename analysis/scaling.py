"""Parameter scaling of multitask sparse parity: fit alpha_N of the final test loss.

    python -m analysis.scaling SOURCE [--sweep ID] --out DIR

Prints, each labelled, the measured alpha_N (the paper's plain log-log fit of the loss in bits, and the
offset fit E + A N^-alpha), the quantization model's prediction for the runs' own design
(analysis.design: alpha_N_design) and the asymptotic alpha, with intervals over seeds (a cluster
bootstrap: every width kept, its seeds resampled), and warnings naming the runs (fewer than 5
widths, E on its bound, runs still learning at the end: analysis.fit_checks).
Writes DIR/scaling.json (alpha_N and alpha_N_primary, alpha_N_plain, alpha_N_offset, alpha_N_design,
each with _ci; E, A, the theory alpha, warnings, per run its seed and the subtasks learned),
DIR/quanta_vs_params.png, DIR/loss_vs_params.png, DIR/learned_vs_params.png (analysis.scaling_plots,
in bits) and DIR/report.md.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

from analysis.common import final_metric_column, main_guard, parse_args, write_outputs
from analysis.design import N_KEY, design_prediction
from analysis.fit_checks import few_x, offset_on_bound, still_learning, still_learning_warning
from analysis.fits import fit_loglog, fit_power_law
from analysis.study import Section, has_task, numbers, task_runs
from harness.errors import UserError

X_KEY = "summary.model/params"
LOSS = "val/loss"  # the final test loss: column summary.val/loss.last (final_metric_column)
THEORY_KEY = "config.data.zipf_alpha"


def select_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Finished runs with a parameter count and a final test loss; the rest, reported."""
    y_key = final_metric_column(runs, LOSS)
    need = [X_KEY, y_key]
    missing = [k for k in need if k not in runs.columns]
    if missing or not len(runs):
        raise UserError(
            f"no sparse-parity runs with {', '.join(need)} in this source "
            f"({len(runs)} runs; missing columns: {', '.join(missing) or 'none'})"
        )
    ok = (runs["state"] == "finished") & runs[X_KEY].notna() & runs[y_key].notna()
    return runs[ok].copy(), runs[~ok].copy()


D_KEY = "config.data.n_train_samples"  # D: 0 (or absent) = a fresh batch every step


def split_by_data(good: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the parameter-scaling runs, the others): runs at one data budget, the infinite one if any.

    Finite-data runs that vary D (at fixed width) are a data-scaling sweep (analysis.data_scaling):
    fitting them here would fit one parameter count against several losses. With no infinite-data
    run, the D with the most distinct parameter counts is taken (a width sweep at fixed finite D)."""
    D = pd.to_numeric(good[D_KEY], errors="coerce").fillna(0) if D_KEY in good else pd.Series(0, index=good.index)
    if (D == 0).any():
        keep = D == 0
    else:
        widths = good.groupby(D)[X_KEY].nunique()
        keep = D == widths.idxmax()  # idxmax: the first (smallest) D on a tie
    return good[keep].copy(), good[~keep].copy()


def subtask_learning(curves: pd.DataFrame | None, good: pd.DataFrame) -> dict[str, dict]:
    """Per run: the subtasks (0 = most frequent) ever below the run's threshold, those below it at
    the end, the final loss of every subtask, and whether the learned set is the most frequent ones.

    `curves`: run_id, step, item, loss (the curves artifact, contract C4; analysis.subtasks reads
    whichever form a run has). None or a run without curves: that run gets no entry."""
    if curves is None or not len(curves):
        return {}
    thr_col = "summary.emergence/threshold_nats"
    out = {}
    for rid, c in curves.groupby("run_id"):
        row = good[good["id"] == rid]
        if not len(row):
            continue
        thr = float(row[thr_col].iloc[0]) if thr_col in row and pd.notna(row[thr_col].iloc[0]) else 0.1 * math.log(2)
        wide = c.pivot_table(index="step", columns="item", values="loss").sort_index()  # [steps, items]
        ever = [int(i) for i in wide.columns[(wide < thr).any(axis=0).to_numpy()]]
        end = [int(i) for i in wide.columns[(wide.iloc[-1] < thr).to_numpy()]]
        first = {int(i): int(wide.index[(wide[i] < thr).to_numpy()][0]) for i in ever}
        out[rid] = {
            "learned": ever,
            "below_end": end,
            "first_step": first,
            "final_loss": wide.iloc[-1].to_numpy(float).tolist(),
            "top_ranks": ever == list(range(len(ever))),
        }  # learned = the most frequent ones
    return out


SEED_KEY = "config.seed"


def analyze(
    runs: pd.DataFrame, n_bootstrap: int = 200, curves: pd.DataFrame | None = None, history: pd.DataFrame | None = None
) -> dict:
    """Fit alpha_N over the finished runs of one data budget and one Zipf exponent; beside it the
    quantization model's prediction for this design (analysis.design) and the asymptotic alpha.

    Intervals: a cluster bootstrap that keeps every width and resamples its seeds (its runs) with
    replacement, so they measure what varies between seeds; with one run per width that is no
    interval (a warning says so). `history` (run_id, step, val/loss, val/n_learned) feeds the
    still-learning check; None skips it."""
    good, bad = select_runs(runs)
    if len(good) < 3:
        raise UserError(
            f"need >= 3 finished runs to fit a scaling law, found {len(good)} "
            f"(states: {runs['state'].value_counts().to_dict()})"
        )
    good, other_data = split_by_data(good)
    good, _, alphas = one_alpha(good)
    n_sizes = good[X_KEY].nunique()
    if n_sizes < 3:
        Ds = sorted({int(d) for d in pd.to_numeric(runs.get(D_KEY, pd.Series(dtype=float)), errors="coerce").dropna()})
        raise UserError(
            f"need >= 3 model sizes at one data budget to fit alpha_N, found {n_sizes} at "
            f"D = {_d_label(good)} (data.n_train_samples in this source: {Ds[:6]}"
            f"{' ...' if len(Ds) > 6 else ''}): runs varying D at a fixed width are data scaling, "
            "see analysis.data_scaling"
        )
    if SEED_KEY not in good:
        good = good.assign(**{SEED_KEY: np.nan})
    good = good.sort_values([X_KEY, SEED_KEY])
    ids = good["id"].tolist()
    x = good[X_KEY].astype(float).to_numpy()
    y = good[final_metric_column(good, LOSS)].astype(float).to_numpy()
    runs_per_x = good.groupby(X_KEY)["id"].count()
    # One run per size: resampling within sizes would change nothing, so points are resampled.
    strata = x if runs_per_x.min() >= 2 else None
    fit = fit_power_law(x, y, n_bootstrap=n_bootstrap, strata=strata)
    # The paper's own fit: a straight line in log-log, loss in bits, no offset.
    plain = fit_loglog(x, y / math.log(2), n_bootstrap=n_bootstrap, strata=strata)
    design = design_prediction(good, x, n_bootstrap, strata)
    theory = sorted(set(good[THEORY_KEY].astype(float))) if THEORY_KEY in good else []
    learned = (
        good["summary.emergence/n_learned"].astype(float).tolist() if "summary.emergence/n_learned" in good else []
    )
    per_run = subtask_learning(curves, good)
    below = good[N_KEY].astype(float).tolist() if N_KEY in good else [None] * len(good)
    labels = {i: f"width {w} seed {s}" for i, w, s in zip(ids, good.get("config.model.width", x), good[SEED_KEY])}
    checks = [few_x(x, ids, "parameter counts"), offset_on_bound(fit.E, y, ids)]
    if strata is None:
        checks.append(
            f"one run per width (runs {', '.join(ids)}): the interval resamples widths, not seeds, and "
            "cannot say how much a width's loss varies between seeds; train >= 3 seeds per width"
        )
    flagged = still_learning(history[history["run_id"].isin(ids)]) if history is not None and len(history) else []
    checks.append(still_learning_warning(flagged, labels))
    e_bound = offset_on_bound(fit.E, y, ids) is not None
    primary = "plain" if e_bound else "offset"
    return {
        "alpha_N": plain.alpha if e_bound else fit.alpha[0],
        "alpha_N_ci": (list(plain.alpha_ci) if plain.alpha_ci else None)
        if e_bound
        else (list(fit.alpha_ci[0]) if fit.alpha_ci else None),
        "alpha_N_primary": primary,
        "alpha_N_plain": plain.alpha,
        "alpha_N_plain_ci": list(plain.alpha_ci) if plain.alpha_ci else None,
        "alpha_N_offset": fit.alpha[0],
        "alpha_N_offset_ci": list(fit.alpha_ci[0]) if fit.alpha_ci else None,
        "alpha_N_design": design.get("alpha"),
        "alpha_N_design_ci": design.get("ci"),
        "design_note": design.get("note"),
        "interval": (
            f"cluster bootstrap over seeds: every width kept, its runs resampled with replacement "
            f"({fit.n_bootstrap} resamples, percentile 95%)"
        )
        if strata is not None
        else f"bootstrap over runs ({fit.n_bootstrap} resamples, percentile 95%; one run per width)",
        "runs_per_width": {str(int(k)): int(v) for k, v in runs_per_x.items()},
        "n_bootstrap": fit.n_bootstrap,
        "fit_warnings": fit.warnings,
        "warnings": [w for w in checks if w],
        "still_learning": flagged,
        "E": fit.E,
        "E_ci": list(fit.E_ci) if fit.E_ci else None,
        "A": fit.A[0],
        "plain_intercept_bits": plain.intercept,
        "theory_alpha": theory[0] if len(theory) == 1 else theory,
        "n_runs": len(good),
        "n_widths": int(n_sizes),
        "excluded_runs": [{"id": r.id, "state": r.state} for r in bad.itertuples()],
        "data_budget": _d_label(good),
        "zipf_alphas_in_source": alphas,
        "other_data_runs": [
            {"id": i, "n_train_samples": int(d) if pd.notna(d) else 0}
            for i, d in zip(other_data["id"], other_data.get(D_KEY, [0] * len(other_data)))
        ],
        "points": [
            {
                "id": i,
                "width": w,
                "seed": None if pd.isna(sd) else int(sd),
                "params": p,
                "loss": loss,
                "n_learned": n,
                "n_below_end": b,
                "predicted_loss": pl,
                **(
                    {k: per_run[i][k] for k in ("learned", "below_end", "top_ranks", "final_loss", "first_step")}
                    if i in per_run
                    else {}
                ),
            }
            for i, w, sd, p, loss, n, b, pl in zip(
                ids,
                good.get("config.model.width", [None] * len(good)),
                good[SEED_KEY],
                x,
                y,
                learned or [None] * len(good),
                below,
                design.get("predicted", [None] * len(good)),
            )
        ],
        "loss_units": "nats",
    }


def one_alpha(runs: pd.DataFrame) -> tuple[pd.DataFrame, float | None, list[float]]:
    """The runs at one Zipf exponent (the one with most runs; the paper's 0.4 on a tie): losses at
    different alphas lie on different curves (analysis.alpha_study fits each)."""
    a = pd.to_numeric(runs[THEORY_KEY], errors="coerce") if THEORY_KEY in runs else pd.Series(np.nan, index=runs.index)
    alphas = sorted(float(x) for x in a.dropna().unique())
    if len(alphas) <= 1:
        return runs, (alphas[0] if alphas else None), alphas
    counts = a.value_counts()
    best = counts[counts == counts.max()].index
    pick = 0.4 if 0.4 in best else float(min(best))
    return runs[a == pick], pick, alphas


def _d_label(runs: pd.DataFrame) -> str:
    D = pd.to_numeric(runs[D_KEY], errors="coerce").fillna(0) if D_KEY in runs else pd.Series([0])
    return "infinite" if not len(D) or D.iloc[0] == 0 else str(int(D.iloc[0]))


def plot(result: dict, out_dir: str) -> list[str]:
    from analysis.scaling_plots import plot as draw

    return draw(result, out_dir)


def comparison_lines(result: dict) -> list[str]:
    """Measured, design-predicted and asymptotic alpha_N, each labelled (printed and in the report)."""

    def ci(c):
        return f" (95% CI {c[0]:.3f} .. {c[1]:.3f})" if c else ""

    out = [
        f"measured alpha_N (plain log-log fit, the paper's) = {result['alpha_N_plain']:.3f}"
        + ci(result.get("alpha_N_plain_ci")),
        f"measured alpha_N (offset fit E + A N^-alpha) = {result['alpha_N_offset']:.3f}"
        + ci(result.get("alpha_N_offset_ci"))
        + f", E = {result['E']:.3g} nats",
        (
            f"design-predicted alpha_N (this design's frequencies, each run's learned count) = "
            f"{result['alpha_N_design']:.3f}" + ci(result.get("alpha_N_design_ci"))
        )
        if result.get("alpha_N_design") is not None
        else f"design-predicted alpha_N: {result.get('design_note')}",
        f"asymptotic alpha_N (infinitely many subtasks) = alpha = {result['theory_alpha']}",
    ]
    return out


def report(result: dict, source: str, sweep: str | None, plots: list[str]) -> str:
    primary = (
        "the plain log-log fit (the offset fit's E sits on its bound: that model is mis-specified here)"
        if result.get("alpha_N_primary") == "plain"
        else "the offset fit"
    )
    lines = [
        "# Sparse parity: parameter scaling",
        "",
        f"Source: `{source}`" + (f", sweep `{sweep}`" if sweep else "") + f"; {result['n_runs']} finished runs, "
        f"{result.get('n_widths', '?')} widths, runs per width: {result.get('runs_per_width')}.",
        "",
        f"- alpha_N = **{result['alpha_N']:.3f}**, from {primary}",
    ]
    lines += [f"- {line}" for line in comparison_lines(result)]
    lines += [
        f"- intervals: {result.get('interval')}",
        "- the design prediction: L_pred(n) = ln 2 * sum_{k>n} p_k for the n subtasks a run learned "
        "(emergence/n_below_end), fitted against N by the same plain log-log line; the paper measured "
        "~0.33 at alpha = 0.4 with 500 subtasks",
    ]
    lines += [f"- warning: {w}" for w in result.get("warnings", []) + result.get("fit_warnings", [])]
    lines += [
        "",
        "| width | seed | params | final test loss (nats) | learned (ever) | below threshold at end "
        "| predicted loss (nats) | subtasks learned (0 = most frequent) | the most frequent ones? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        learned = "" if p["n_learned"] is None else int(p["n_learned"])
        below = "" if p.get("n_below_end") is None else int(p["n_below_end"])
        pred = "" if p.get("predicted_loss") is None else f"{p['predicted_loss']:.4f}"
        seed = "" if p.get("seed") is None else p["seed"]
        which = ", ".join(map(str, p["learned"])) if "learned" in p else "(no per-subtask curves)"
        order = "" if "top_ranks" not in p else ("yes" if p["top_ranks"] else "no")
        lines.append(
            f"| {p['width']} | {seed} | {int(p['params'])} | {p['loss']:.4f} | {learned} | {below} | {pred} "
            f"| {which} | {order} |"
        )
    lines += _order_summary(result["points"])
    if len(result.get("zipf_alphas_in_source") or []) > 1:
        lines += [
            "",
            f"Fitted at zipf_alpha = {result['theory_alpha']} only; the source has "
            f"{result['zipf_alphas_in_source']} (analysis.alpha_study fits each).",
        ]
    if result.get("other_data_runs"):
        lines += [
            "",
            f"Fitted at data budget D = {result['data_budget']}; not fitted here (another D: data "
            "scaling, analysis.data_scaling): "
            + ", ".join(f"{r['id']} (D={r['n_train_samples']})" for r in result["other_data_runs"]),
        ]
    if result["excluded_runs"]:
        lines += [
            "",
            "Excluded runs (not finished or missing metrics): "
            + ", ".join(f"{r['id']} ({r['state']})" for r in result["excluded_runs"]),
        ]
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"


def _order_summary(points: list[dict]) -> list[str]:
    """Were subtasks learned in frequency order: per run (the learned set is the top ranks), across
    sizes (each larger model's set contains the smaller one's), in time (first steps rise with rank)?"""
    pts = [p for p in points if "learned" in p]
    if not pts:
        return []
    top = sum(p["top_ranks"] for p in pts)
    nested = sum(set(a["learned"]) <= set(b["learned"]) for a, b in zip(pts, pts[1:]))
    out = [
        "",
        f"Frequency order: in {top} of {len(pts)} runs the learned subtasks are exactly the most "
        f"frequent ones; {nested} of {len(pts) - 1} steps up in size keep every subtask the smaller model learned.",
    ]
    big = max(pts, key=lambda p: (p["params"], -(p.get("seed") or 0)))  # the largest width, its first seed
    steps = big.get("first_step") or {}
    # The slope of log(learning step) against log p_t, with never-learned subtasks censored, is
    # analysis.dynamics' (which `make run` runs too): a fit over the learned ones alone selects on the outcome.
    if len(steps) >= 3:
        ranks = np.array(sorted(steps), float)
        t = np.array([steps[i] for i in sorted(steps)], float)
        rho = pd.Series(ranks).corr(pd.Series(t), method="spearman")
        out.append(
            f"In the largest model ({int(big['params'])} params) the step at which a subtask is first "
            f"learned rises with its rank: Spearman rho = {rho:.2f} over {len(steps)} subtasks."
        )
    return out


def _curves(source: str, sweep: str | None, runs: pd.DataFrame) -> pd.DataFrame | None:
    """Per-subtask curves of the finished runs: the curves artifact, or history columns of older runs."""
    from analysis.subtasks import load_subtask_curves

    ids = list(runs.loc[runs["state"] == "finished", "id"])
    try:
        return load_subtask_curves(source, sweep, ids)[0] if ids else None
    except UserError as e:  # no per-subtask data at all: the fit stands, the report says so
        print(f"scaling: no per-subtask curves ({e})", file=__import__("sys").stderr)
        return None


def _history(source: str, sweep: str | None, runs: pd.DataFrame) -> pd.DataFrame | None:
    """val/loss and val/n_learned of the finished runs over steps (the still-learning check)."""
    from harness.runstore import load_history

    ids = list(runs.loc[runs["state"] == "finished", "id"])
    return load_history(source, run_ids=ids, sweep=sweep, keys=["val/loss", "val/n_learned"]) if ids else None


def main(argv: list[str] | None = None) -> dict:
    from harness.runstore import load_runs

    args = parse_args("scaling", argv, lambda p: p.add_argument("--bootstrap", type=int, default=200))
    runs = task_runs(load_runs(args.source, sweep=args.sweep), "sparse_parity")  # not analysis runs
    result = analyze(
        runs,
        n_bootstrap=args.bootstrap,
        curves=_curves(args.source, args.sweep, runs),
        history=_history(args.source, args.sweep, runs),
    )
    os.makedirs(args.out, exist_ok=True)
    plots = plot(result, args.out)
    write_outputs(args.out, "scaling", result, report(result, args.source, args.sweep, plots))
    print(f"{result['n_runs']} runs, runs per width {result['runs_per_width']}; intervals: {result['interval']}")
    for line in comparison_lines(result):
        print(line)
    print(f"alpha_N = {result['alpha_N']:.3f}  CI {result['alpha_N_ci']}  ({result['alpha_N_primary']} fit is primary)")
    for w in result["warnings"]:
        print(f"warning: {w}")
    print(f"plot: {plots[0]}\nreport: {os.path.join(args.out, 'report.md')}")
    return result


def applies(runs: pd.DataFrame) -> bool:
    return has_task(runs, "sparse_parity")


def run(source: str, sweep: str | None, out: str) -> Section:
    """The analysis.report hook (analysis/study.py)."""
    from harness.runstore import load_runs

    runs = task_runs(load_runs(source, sweep=sweep), "sparse_parity")
    result = analyze(runs, curves=_curves(source, sweep, runs), history=_history(source, sweep, runs))
    os.makedirs(out, exist_ok=True)
    paths = plot(result, out)
    md = report(result, source, sweep, paths)
    write_outputs(out, "scaling", result, md)
    fitted = {
        k: result[k]
        for k in (
            "alpha_N",
            "alpha_N_ci",
            "alpha_N_plain",
            "alpha_N_plain_ci",
            "alpha_N_design",
            "alpha_N_design_ci",
            "E",
            "E_ci",
            "A",
            "n_runs",
            "theory_alpha",
        )
    }
    return Section(
        "scaling",
        "Sparse parity: parameter scaling",
        md,
        out,
        paths,
        {"points": pd.DataFrame(result["points"])},
        numbers(fitted),
        [p["id"] for p in result["points"]],
    )


if __name__ == "__main__":
    main_guard(main)
