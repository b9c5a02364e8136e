"""Scaling exponents against the Zipf exponent alpha of multitask sparse parity.

    python -m analysis.alpha_study SOURCE [--sweep ID] --out DIR

Groups the finished sparse_parity runs by `data.zipf_alpha`; in each group the infinite-data runs
across widths give alpha_N (final test loss, analysis.scaling's fit) and the finite-data runs across D
give alpha_D (minimum test loss over training, analysis.data_scaling's fit), each with its bootstrap
interval and the paper's plain log-log fit. Plots both against alpha with the theory lines
alpha_N = alpha and alpha_D = alpha/(alpha+1) and the paper's measured values at alpha = 0.4
(alpha_N ~ 0.33, alpha_D ~ 0.31). Writes DIR/alpha_study.json, DIR/exponents_vs_alpha.png, DIR/report.md.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pandas as pd

from analysis import plots as P
from analysis.common import final_metric_column, main_guard, parse_args
from analysis.design import design_prediction
from analysis.fit_checks import few_x, offset_on_bound, still_learning
from analysis.fits import FitError, fit_loglog, fit_power_law
from analysis.study import Section, numbers, sparse_parity_study, task_runs
from harness.errors import UserError

STUDY = "alpha_study"
PAPER = {"alpha": 0.4, "alpha_N": 0.33, "alpha_D": 0.31}  # Michaud et al. 2023, measured


HISTORY_KEYS = ["val/loss", "val/n_learned"]  # analysis.study loads these: step-bound finite-data runs


def _fit(g: pd.DataFrame, x: np.ndarray, y: np.ndarray, n_bootstrap: int) -> dict:
    """Both fits and the design prediction (analysis.design) over the runs `g` (x and y theirs), or why
    there is none (< 3 runs, or a fit the data cannot support). Several runs at one x: resampled within it."""
    if len(x) < 3:
        return {"error": f"{len(x)} usable runs (need >= 3)"}
    strata = x if pd.Series(x).value_counts().min() >= 2 else None
    try:
        f = fit_power_law(x, y, n_bootstrap=n_bootstrap, strata=strata)
        plain = fit_loglog(x, y / math.log(2), n_bootstrap=n_bootstrap, strata=strata)
    except FitError as e:
        return {"error": str(e)}
    out = {
        "alpha": f.alpha[0],
        "ci": list(f.alpha_ci[0]) if f.alpha_ci else None,
        "plain": plain.alpha,
        "plain_ci": list(plain.alpha_ci) if plain.alpha_ci else None,
        "n_runs": len(x),
        "warnings": f.warnings + [w for w in (few_x(x, g["id"]), offset_on_bound(f.E, y, g["id"])) if w],
    }
    design = design_prediction(g, x, n_bootstrap, strata)
    out["design"], out["design_ci"] = design.get("alpha"), design.get("ci")
    if "note" in design:
        out["design_note"] = design["note"]
    return out


def analyze(runs: pd.DataFrame, n_bootstrap: int = 200, history: pd.DataFrame | None = None) -> dict:
    """Per Zipf exponent: alpha_N over widths at D = 0 and alpha_D over D (step-bound runs, still
    learning in their last 10% of steps, not fitted), each beside its design prediction."""
    need = ["config.data.zipf_alpha", "config.data.n_train_samples", "summary.model/params"]
    missing = [c for c in need if c not in runs]
    if missing or not len(runs):
        raise UserError(
            f"no sparse-parity runs with {', '.join(need)} ({len(runs)} runs; missing: {', '.join(missing) or 'none'})"
        )
    fin = runs["state"] == "finished"
    excluded = [{"id": r["id"], "state": r["state"]} for _, r in runs[~fin].iterrows()]
    good = runs[fin]
    last, low = final_metric_column(good, "val/loss"), "summary.val/loss.min"
    rows = []
    for a, g in good.groupby(good["config.data.zipf_alpha"].astype(float)):
        D = pd.to_numeric(g["config.data.n_train_samples"], errors="coerce").fillna(0)
        inf, finite = g[D == 0], g[D > 0]
        n_fit = (
            _fit(
                inf,
                inf["summary.model/params"].astype(float).to_numpy(),
                inf[last].astype(float).to_numpy(),
                n_bootstrap,
            )
            if len(inf) and last in inf
            else {"error": "no infinite-data runs"}
        )
        bound = (
            [r["id"] for r in still_learning(history[history["run_id"].isin(finite["id"])])]
            if history is not None and len(history) and len(finite)
            else []
        )
        finite = finite[~finite["id"].isin(bound)]
        d_fit = (
            _fit(finite, D[finite.index].astype(float).to_numpy(), finite[low].astype(float).to_numpy(), n_bootstrap)
            if len(finite) and low in finite
            else {"error": "no finite-data runs"}
        )
        if bound:
            d_fit["step_bound_not_fitted"] = bound
        rows.append(
            {
                "zipf_alpha": float(a),
                "alpha_N": n_fit,
                "alpha_D": d_fit,
                "alpha_N_design": n_fit.get("design"),
                "alpha_D_design": d_fit.get("design"),
                "theory_alpha_N": float(a),
                "theory_alpha_D": float(a) / (float(a) + 1),
            }
        )
    if not any("alpha" in r["alpha_N"] or "alpha" in r["alpha_D"] for r in rows):
        raise UserError(
            "no alpha group has >= 3 usable runs of one kind (widths at D = 0, or several D): "
            + "; ".join(
                f"alpha={r['zipf_alpha']}: N {r['alpha_N'].get('error')}, D {r['alpha_D'].get('error')}" for r in rows
            )
        )
    return {"groups": rows, "paper": PAPER, "excluded_runs": excluded, "n_runs": int(fin.sum())}


def plot(result: dict, out_dir: str) -> list[str]:
    import matplotlib.pyplot as plt

    fig, (ax, ax_leg) = plt.subplots(2, 1, figsize=(6, 5.6), gridspec_kw={"height_ratios": [4.3, 1.3]})
    grid = np.linspace(0.05, max(0.85, max(r["zipf_alpha"] for r in result["groups"]) + 0.05), 50)
    ax.plot(grid, grid, "-", color="C0", alpha=0.4, label="asymptotic theory alpha_N = alpha")
    ax.plot(grid, grid / (grid + 1), "-", color="C1", alpha=0.4, label="asymptotic theory alpha_D = alpha/(alpha+1)")
    for key, c, dx in (("alpha_N", "C0", -0.008), ("alpha_D", "C1", 0.008)):
        pts = [(r["zipf_alpha"], r[key]) for r in result["groups"] if "alpha" in r[key]]
        if not pts:
            continue
        a = np.array([p[0] for p in pts]) + dx  # N and D side by side, not on top of each other
        v = np.array([p[1]["plain"] for p in pts])
        ci = np.array([p[1]["plain_ci"] or [p[1]["plain"]] * 2 for p in pts])
        err = np.clip([v - ci[:, 0], ci[:, 1] - v], 0, None)  # a percentile CI may miss the point estimate
        ax.errorbar(a, v, yerr=err, fmt="o", color=c, capsize=3, label=f"measured {key}, plain log-log fit (95% CI)")
        ax.plot(a, [p[1]["alpha"] for p in pts], "x", color=c, label=f"measured {key}, offset fit")
        des = [(x, p[1]["design"]) for x, p in zip(a, pts) if p[1].get("design") is not None]
        if des:
            ax.plot(*zip(*des), "s", mfc="none", color=c, ms=7, label=f"design-predicted {key} (these runs' design)")
    pp = result["paper"]
    ax.plot([pp["alpha"]], [pp["alpha_N"]], "*", ms=12, color="C0", mec="k", label="paper alpha_N (0.33, 500 subtasks)")
    ax.plot([pp["alpha"]], [pp["alpha_D"]], "*", ms=12, color="C1", mec="k", label="paper alpha_D (0.31, 500 subtasks)")
    ax.set_xlabel("Zipf exponent alpha (p_t ~ t^-(alpha+1))")
    ax.set_ylabel("scaling exponent")
    ax.set_title("Exponents against alpha", fontsize=9)
    h, lab = ax.get_legend_handles_labels()
    ax_leg.axis("off")
    ax_leg.legend(h, lab, loc="upper center", fontsize=7, frameon=False, ncol=2)
    path = os.path.join(out_dir, "exponents_vs_alpha.png")
    P.save(fig, path)
    return [path]


def _cell(f: dict) -> str:
    """Measured (plain log-log and offset fits) and design-predicted, each labelled."""
    if "alpha" not in f:
        return f"({f['error']})"
    ci = lambda c: " [{:.2f}, {:.2f}]".format(*c) if c else ""  # noqa: E731
    design = f"; design-predicted {f['design']:.3f}{ci(f['design_ci'])}" if f.get("design") is not None else ""
    bound = f"; {len(f['step_bound_not_fitted'])} step-bound not fitted" if f.get("step_bound_not_fitted") else ""
    return (
        f"measured plain {f['plain']:.3f}{ci(f['plain_ci'])}, offset {f['alpha']:.3f}{ci(f['ci'])}{design} "
        f"({f['n_runs']} runs{bound})"
    )


def report(result: dict, source: str, sweep: str | None, plots: list[str]) -> str:
    lines = [
        "# Sparse parity: exponents against alpha",
        "",
        f"Source: `{source}`" + (f", sweep `{sweep}`" if sweep else "") + f"; {result['n_runs']} finished runs.",
        "",
        "| alpha | alpha_N [95% CI] | asymptotic alpha_N | alpha_D [95% CI] | asymptotic alpha_D |",
        "|---|---|---|---|---|",
    ]
    for r in result["groups"]:
        lines.append(
            f"| {r['zipf_alpha']:g} | {_cell(r['alpha_N'])} | {r['theory_alpha_N']:.3f} | "
            f"{_cell(r['alpha_D'])} | {r['theory_alpha_D']:.3f} |"
        )
    lines += [
        "",
        f"The paper measured alpha_N ~ {PAPER['alpha_N']} and alpha_D ~ {PAPER['alpha_D']} at alpha = {PAPER['alpha']} "
        "(plain log-log fits, 500 subtasks). Design-predicted: the quantization model's exponent for these runs' "
        "own design, L_pred(n) = ln 2 * sum_{k>n} p_k from each run's learned count, by the same plain fit "
        "(analysis.design); asymptotic: infinitely many subtasks.",
    ]
    warns = [
        f"alpha={r['zipf_alpha']:g} {k}: {w}"
        for r in result["groups"]
        for k in ("alpha_N", "alpha_D")
        for w in r[k].get("warnings", [])
    ]
    lines += [f"- warning: {w}" for w in warns]
    if result["excluded_runs"]:
        lines += ["", "Excluded runs: " + ", ".join(f"{r['id']} ({r['state']})" for r in result["excluded_runs"])]
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(STUDY, argv, lambda p: p.add_argument("--bootstrap", type=int, default=200))
    _, result, _, _ = sparse_parity_study(sys.modules[__name__], args.source, args.sweep, args.out, args.bootstrap)
    for r in result["groups"]:
        print(
            f"alpha={r['zipf_alpha']:g}: alpha_N {_cell(r['alpha_N'])}, asymptotic {r['theory_alpha_N']:.3f}; "
            f"alpha_D {_cell(r['alpha_D'])}, asymptotic {r['theory_alpha_D']:.3f}"
        )
        for k in ("alpha_N", "alpha_D"):
            for w in r[k].get("warnings", []):
                print(f"warning: alpha={r['zipf_alpha']:g} {k}: {w}")
    return result


def applies(runs: pd.DataFrame) -> bool:
    """Sparse-parity runs at two or more Zipf exponents (one alpha is analysis.scaling / data_scaling)."""
    sp = task_runs(runs, "sparse_parity")
    return (
        "config.data.zipf_alpha" in sp and pd.to_numeric(sp["config.data.zipf_alpha"], errors="coerce").nunique() >= 2
    )


def run(source: str, sweep: str | None, out: str) -> Section:
    """The analysis.report hook (analysis/study.py)."""
    runs, result, paths, md = sparse_parity_study(sys.modules[__name__], source, sweep, out)
    table = pd.DataFrame(
        [
            {
                "zipf_alpha": r["zipf_alpha"],
                "theory_alpha_N": r["theory_alpha_N"],
                "theory_alpha_D": r["theory_alpha_D"],
                **{
                    f"{k}{suffix}": r[k].get(field)
                    for k in ("alpha_N", "alpha_D")
                    for suffix, field in (
                        ("", "alpha"),
                        ("_plain", "plain"),
                        ("_design", "design"),
                        ("_n_runs", "n_runs"),
                    )
                },
            }
            for r in result["groups"]
        ]
    )
    fitted = {
        f"alpha={r['zipf_alpha']:g}/{k}": {
            "value": r[k]["alpha"],
            "ci": r[k]["ci"],
            "plain": r[k]["plain"],
            "plain_ci": r[k]["plain_ci"],
            "design": r[k].get("design"),
            "design_ci": r[k].get("design_ci"),
        }
        for r in result["groups"]
        for k in ("alpha_N", "alpha_D")
        if "alpha" in r[k]
    }
    ids = list(runs.loc[runs["state"] == "finished", "id"])
    return Section(
        STUDY, "Sparse parity: exponents against alpha", md, out, paths, {"groups": table}, numbers(fitted), ids
    )


if __name__ == "__main__":
    main_guard(main)
