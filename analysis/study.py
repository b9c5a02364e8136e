"""The hook a study module offers `analysis.report` (one line in report.STUDIES plugs it in).

A study module (e.g. analysis/scaling.py) defines, beside its own CLI:

    def applies(runs: pd.DataFrame) -> bool        # the runs table of SOURCE (all job types)
    def run(source: str, sweep: str | None, out: str) -> Section

`run` writes its outputs (json, plots, report.md) under `out` (a directory of its own) and returns a
Section: its report.md text, the plots it drew, its fit points as DataFrames, its fitted numbers, and
the ids of the runs it analysed. The report stitches the sections into report.md / report.html and,
with --log, logs each as a W&B run of job_type "analysis". A study that finds nothing to analyse
raises harness.errors.UserError with one line; the report lists it and goes on.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field

import pandas as pd

from analysis.common import md_row


@dataclass
class Section:
    study: str  # short name: "scaling", "grokking", ...
    title: str
    markdown: str  # the study's report.md; links relative to `out`
    out: str  # the directory the study wrote into
    plots: list[str] = field(default_factory=list)  # PNG paths (SVG twins beside them)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # name -> fit points (a wandb.Table each)
    summary: dict[str, float] = field(default_factory=dict)  # fitted numbers (the analysis run's summary)
    run_ids: list[str] = field(default_factory=list)  # the runs analysed (config + lineage)


def task_runs(runs: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows of `runs` whose config.task is `task` (analysis runs have no task, so never match)."""
    if "config.task" not in runs or not len(runs):
        return runs.iloc[0:0]
    return runs[runs["config.task"] == task]


def has_task(runs: pd.DataFrame, task: str) -> bool:
    return len(task_runs(runs, task)) > 0


def numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) result dict, flattened with '/': what goes in a summary."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(numbers(v, key + "/"))
        elif isinstance(v, bool):
            out[key] = v
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = v
        elif isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
            out[key + "/lo"], out[key + "/hi"] = v
    return out


def run_emergence(hist: pd.DataFrame, continuous: str, thresholded: str, threshold: float) -> pd.DataFrame:
    """Per run (history rows: run_id, step, metrics): when `thresholded` (an accuracy) first reaches
    `threshold` (censored if never), a sigmoid fit of it in log step (midpoint, width, intervals), and
    the mirage check of it against the `continuous` metric (a loss) of the same run."""
    import numpy as np

    from analysis import emergence as em

    h = hist.dropna(subset=[continuous, thresholded])
    h = h[h["step"] > 0].groupby(["run_id", "step"], as_index=False)[[continuous, thresholded]].last()
    if h.empty or h["step"].nunique() < 5:
        return pd.DataFrame()
    C = h.pivot(index="run_id", columns="step", values=continuous)
    T = h.pivot(index="run_id", columns="step", values=thresholded).reindex(index=C.index, columns=C.columns)
    x = C.columns.to_numpy(float)
    cross = em.threshold_crossing(x, T.to_numpy(), threshold, below=False)
    fit = em.fit_sigmoid(x, T.to_numpy())
    mir = em.mirage_check(x, C.to_numpy(), T.to_numpy())
    return pd.DataFrame(
        {
            "run_id": C.index,
            "t_cross": cross.x,
            "reached": cross.reached,
            "t_lo": cross.lo,
            "t_hi": cross.hi,
            "midpoint": fit.midpoint,
            "mid_lo": fit.midpoint_ci[:, 0],
            "mid_hi": fit.midpoint_ci[:, 1],
            "width_decades": fit.width,
            "width_lo": fit.width_ci[:, 0],
            "width_hi": fit.width_ci[:, 1],
            "detected": fit.detected,
            "resolved": fit.resolved,
            "in_range": fit.in_range,
            "first_step": x[0],
            "last_step": x[-1],
            "jump_" + continuous: mir.sharp_continuous,
            "jump_" + thresholded: mir.sharp_thresholded,
            "verdict": mir.verdict,
        }
    ).replace({np.inf: np.nan, -np.inf: np.nan})


def emergence_markdown(table: pd.DataFrame, continuous: str, thresholded: str, threshold: float) -> str:
    """A report subsection for run_emergence's table (with its `seed` column when it has one)."""
    if table.empty:
        return ""

    from analysis import emergence as em

    def f(v, fmt="{:.3g}"):
        return "-" if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) else fmt.format(v)

    lines = [
        "",
        "## Emergence of each run (analysis.emergence)",
        "",
        f"{thresholded} against log step: first evaluation at >= {threshold} (censored: never, at the last "
        f"step), sigmoid midpoint and 10-90% width with 95% curvature intervals, and the mirage check against "
        f"{continuous} (mirage: {thresholded} jumps within 0.1 decade of steps while {continuous} does not there; "
        f"unresolved: the jump lies between two evaluations further apart; metric-dependent: {continuous} and "
        f"its log disagree). A midpoint outside the evaluated steps is the fit's extrapolation, marked.",
        "",
    ]
    seeded = "seed" in table  # which draw each row is, when the caller knows the runs' seeds
    head = (
        ["run"]
        + (["seed"] if seeded else [])
        + [f"first step >= {threshold}", "sigmoid midpoint [95%]", "width (decades) [95%]", "verdict"]
    )
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples():
        cross = f"{r.t_cross:.0f}" if r.reached else f"never (censored at {r.t_cross:.0f})"
        mid = (
            (
                f"{f(r.midpoint)} [{f(r.mid_lo)}, {f(r.mid_hi)}]"
                if r.in_range  # outside: an extrapolation, marked
                else em.midpoint_text(r.midpoint, r.first_step, r.last_step)
            )
            if r.detected
            else "no transition"
        )
        width = (
            f"{f(r.width_decades, '{:.2f}')} [{f(r.width_lo, '{:.2f}')}, {f(r.width_hi, '{:.2f}')}]"
            if r.detected
            else "-"
        )
        seed = [str(r.seed) if pd.notna(r.seed) else "-"] if seeded else []
        lines.append(md_row([r.run_id, *seed, cross, mid, width, r.verdict]))
    return "\n".join(lines) + "\n"


def legend_outside(ax, **kw):
    """A legend right of the axes, never over the data (matplotlib's loc="best" still covers crowded
    curves). tight_layout (analysis.plots.save) makes room for it."""
    kw.setdefault("fontsize", 7)
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kw)


def suptitle(fig, text: str, fontsize: float = 8) -> None:
    """A figure title wrapped to the figure's width (a long line is cut off at the edges otherwise)."""
    import textwrap

    width = max(30, int(fig.get_figwidth() * 72 / (fontsize * 0.6)))  # characters that fit (points / char width)
    fig.suptitle("\n".join(textwrap.fill(part, width) for part in text.split("\n")), fontsize=fontsize)


def mean_se(values) -> tuple[float, float, int]:
    """(mean, standard error, n) of the finite values: the SE is NaN for one value (no spread to show)."""
    import numpy as np

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan, 0
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return float(v.mean()), se, len(v)


def run_cli(main, study: str, source: str, sweep: str | None, out: str) -> tuple[dict, str, list[str]]:
    """Run a study module's CLI into `out`: (its json result, its report.md text, its PNG plots)."""
    main([source, "--out", out] + (["--sweep", sweep] if sweep else []))
    with open(os.path.join(out, f"{study}.json")) as f:
        result = json.load(f)
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    return result, md, sorted(glob.glob(os.path.join(out, "*.png")))


def add_run_emergence(
    source: str, run_ids: list[str], threshold: float, md: str, tables: dict, summary: dict, seeds: dict | None = None
) -> str:
    """Validation accuracy beside validation loss for each run (a jump, or a mirage of the threshold):
    adds the table and verdict counts to `tables` / `summary`, returns `md` with the subsection.
    `seeds` (run id -> seed) adds a seed column, so that each row says which draw it is."""
    if not run_ids:
        return md
    from harness import runstore

    hist = runstore.load_history(source, run_ids=run_ids, keys=["val/loss", "val/acc"])
    table = run_emergence(hist, "val/loss", "val/acc", threshold)
    if len(table):
        if seeds:
            table.insert(1, "seed", table["run_id"].map(seeds))
        md += emergence_markdown(table, "val/loss", "val/acc", threshold)
        tables["emergence"] = table
        summary.update({f"verdict/{k}": int(v) for k, v in table["verdict"].value_counts().items()})
    return md


def sparse_parity_study(module, source: str, sweep: str | None, out: str, n_bootstrap: int = 200):
    """The body shared by the sparse-parity study modules (data_scaling, alpha_study): their runs of
    SOURCE -> module.analyze -> module.plot -> `<study>.json` + report.md in `out`.
    Returns (runs, result, plot paths, report markdown)."""
    from analysis.common import write_outputs
    from harness.runstore import load_runs

    runs = task_runs(load_runs(source, sweep=sweep), "sparse_parity")
    kw = {}
    if getattr(module, "HISTORY_KEYS", None):  # the still-learning check reads the runs' histories
        from harness.runstore import load_history

        ids = list(runs.loc[runs["state"] == "finished", "id"])
        kw["history"] = load_history(source, run_ids=ids, sweep=sweep, keys=module.HISTORY_KEYS) if ids else None
    result = module.analyze(runs, n_bootstrap=n_bootstrap, **kw)
    os.makedirs(out, exist_ok=True)
    paths = module.plot(result, out)
    md = module.report(result, source, sweep, paths)
    write_outputs(out, module.STUDY, result, md)
    return runs, result, paths, md
