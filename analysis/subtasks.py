"""Per-subtask emergence in multitask sparse parity, with analysis.emergence.

    python -m analysis.subtasks SOURCE [--sweep ID] --out DIR

For every subtask of every finished sparse_parity run (the curves artifact of contract C4, or the
`subtask_loss/NNNN` history columns of runs older than it): the step it is learned (loss below the
run's threshold; censored when never), a sigmoid fit of its loss in log step (midpoint, 10-90% width,
intervals), its sharpness, and the mirage check of its accuracy (or, without accuracy, of the
thresholded loss) against its loss. Across model sizes: the same per subtask on the final loss
against parameters. Writes DIR/subtasks.json, DIR/emergence.parquet (one row per run and subtask),
plots and DIR/report.md.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pandas as pd

from analysis import emergence as em
from analysis import subtask_plots as sp
from analysis.common import main_guard, md_row, parse_args, write_outputs
from analysis.study import Section, has_task, numbers, task_runs
from harness.errors import UserError

STUDY = "subtasks"
TASK = "sparse_parity"
DEFAULT_THRESHOLD = 0.1 * math.log(2)  # 0.1 bits in nats, the task's default
FLAT_NATS = 0.25 * math.log(2)  # final loss moving less than a quarter of chance (ln 2) across sizes: flat
VERDICTS = ("mirage", "emergent", "gradual", "flat", "unresolved", "metric-dependent")


def applies(runs: pd.DataFrame) -> bool:
    return has_task(runs, TASK)


# ---------------------------------------------------------------- loading


def _history_curves(source: str, sweep: str | None, ids: list[str]) -> pd.DataFrame:
    from harness import runstore

    hist = runstore.load_history(source, run_ids=ids, sweep=sweep)
    cols = [c for c in hist.columns if c.startswith("subtask_loss/")]
    if not cols:
        return pd.DataFrame(columns=["run_id", "step", "item", "loss"])
    long = hist[["run_id", "step", *cols]].melt(["run_id", "step"], var_name="item", value_name="loss").dropna()
    long["item"] = long["item"].str.split("/").str[-1].astype("int64")
    return long


def load_subtask_curves(source: str, sweep: str | None, ids: list[str]) -> tuple[pd.DataFrame, str]:
    """run_id, step, item, loss[, acc]; and a note saying where the curves came from."""
    from harness import runstore

    frames, notes = [], []
    missing = list(ids)
    if hasattr(runstore, "load_curves"):
        c = runstore.load_curves(source, "subtask", run_ids=ids, sweep=sweep)
        missing = list(c.attrs.get("missing", []))
        if len(c):
            frames.append(c)
            notes.append(f"{len(ids) - len(missing)} runs from their curves artifact (subtask.parquet)")
    if missing:
        h = _history_curves(source, sweep, missing)
        if len(h):
            frames.append(h)
            notes.append(
                f"{h['run_id'].nunique()} runs from history columns subtask_loss/NNNN "
                "(logged before the curves artifact existed; no per-subtask accuracy)"
            )
    if not frames:
        raise UserError(
            f"no per-subtask curves in {source}: neither a curves artifact with subtask.parquet "
            "nor subtask_loss/NNNN history columns"
        )
    return pd.concat(frames, ignore_index=True), "; ".join(notes)


def _matrix(curves: pd.DataFrame, col: str, keys: pd.MultiIndex, steps: np.ndarray) -> np.ndarray:
    """[curves (run, item), steps] of one metric, NaN where a run was not evaluated."""
    out = np.full((len(keys), len(steps)), np.nan)
    r = keys.get_indexer(pd.MultiIndex.from_arrays([curves["run_id"], curves["item"]]))
    c = np.searchsorted(steps, curves["step"].to_numpy())
    out[r, c] = curves[col].to_numpy(float)
    return out


# ---------------------------------------------------------------- analysis


def run_meta(runs: pd.DataFrame) -> pd.DataFrame:
    def col(key, default=np.nan):
        return runs[key] if key in runs else pd.Series(default, index=runs.index)

    thr = pd.to_numeric(col("summary.emergence/threshold_nats"), errors="coerce")
    bits = pd.to_numeric(col("config.eval.threshold_bits"), errors="coerce") * math.log(2)
    return pd.DataFrame(
        {
            "run_id": runs["id"].to_numpy(),
            "width": pd.to_numeric(col("config.model.width"), errors="coerce").to_numpy(),
            "params": pd.to_numeric(col("summary.model/params"), errors="coerce").to_numpy(),
            "seed": col("config.seed", None).to_numpy(),
            "threshold": thr.fillna(bits).fillna(DEFAULT_THRESHOLD).to_numpy(),
        }
    )


def along_steps(curves: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, subtask): crossing, sigmoid fit in log step, sharpness, mirage verdict."""
    curves = curves[curves["run_id"].isin(meta["run_id"])]
    keys = pd.MultiIndex.from_frame(curves[["run_id", "item"]].drop_duplicates().sort_values(["run_id", "item"]))
    steps = np.unique(curves["step"].to_numpy())
    L = _matrix(curves, "loss", keys, steps)
    thr = meta.set_index("run_id")["threshold"].reindex(keys.get_level_values(0)).to_numpy()
    learned = np.where(np.isfinite(L), (L < thr[:, None]).astype(float), np.nan)
    has_acc = "acc" in curves and curves["acc"].notna().any()
    T = _matrix(curves, "acc", keys, steps) if has_acc else learned
    # crossing: loss below the run's own threshold (thresholds differ between runs: compare L - thr to 0)
    cross = em.threshold_crossing(steps, L - thr[:, None], 0.0)
    out = pd.DataFrame(
        {
            "run_id": keys.get_level_values(0),
            "item": keys.get_level_values(1),
            "t_learned": cross.x,
            "learned": cross.reached,
            "t_lo": cross.lo,
            "t_hi": cross.hi,
            "final_loss": _last(L),
            "thresholded": "acc" if has_acc else "loss<threshold",
        }
    )
    pos = steps > 0  # a fit in log step: step 0 (the initial evaluation) has no place on that axis
    if pos.sum() >= 5:
        x, Lp, Tp = steps[pos], L[:, pos], T[:, pos]
        fit = em.fit_sigmoid(x, Lp)
        mir = em.mirage_check(x, Lp, Tp)
        out = out.assign(
            midpoint=fit.midpoint,
            mid_lo=fit.midpoint_ci[:, 0],
            mid_hi=fit.midpoint_ci[:, 1],
            width_dec=fit.width,
            width_lo=fit.width_ci[:, 0],
            width_hi=fit.width_ci[:, 1],
            detected=fit.detected,
            in_range=fit.in_range,
            resolved=fit.resolved,
            fit_start=fit.start,
            fit_end=fit.end,
            jump_loss=mir.sharp_continuous,
            jump_thresholded=mir.sharp_thresholded,
            jump_resolved=mir.resolved,
            loss_share_at_jump=mir.share_at_jump,
            logloss_share_at_jump=mir.share_at_jump_log,
            verdict_loss=mir.verdict_loss,
            verdict_logloss=mir.verdict_log,
            verdict=mir.verdict,
        )
        out.attrs["steps"] = (float(x[0]), float(x[-1]))
    return out.merge(meta[["run_id", "width", "params"]], on="run_id")


def _last(M: np.ndarray) -> np.ndarray:
    ok = np.isfinite(M)
    idx = M.shape[1] - 1 - np.argmax(np.flip(ok, 1), 1)
    return np.where(ok.any(1), M[np.arange(len(M)), idx], np.nan)


def across_params(table: pd.DataFrame) -> pd.DataFrame | None:
    """Per subtask, its final loss (mean over runs of one size) against parameters: emergence in N."""
    sizes = np.sort(table["params"].dropna().unique())
    if len(sizes) < 5:
        return None
    g = table.groupby(["item", "params"])["final_loss"].mean().unstack("params").reindex(columns=sizes)
    Y = g.to_numpy(float)
    fit = em.fit_sigmoid(sizes, Y)
    sharp = em.sharpness(sizes, Y)
    # sudden only where the sampling resolves it: widths further apart than the window make every
    # drop between neighbours a "step"
    change = np.nanmax(Y, 1) - np.nanmin(Y, 1)
    verdict = np.where(
        change < FLAT_NATS,
        "flat",
        np.where(sharp.fraction < em.SUDDEN, "gradual", np.where(sharp.resolved, "sudden", "unresolved")),
    )
    out = pd.DataFrame(
        {
            "item": g.index.to_numpy(),
            "midpoint_N": fit.midpoint,
            "mid_lo": fit.midpoint_ci[:, 0],
            "mid_hi": fit.midpoint_ci[:, 1],
            "width_dec": fit.width,
            "width_lo": fit.width_ci[:, 0],
            "width_hi": fit.width_ci[:, 1],
            "detected": fit.detected,
            "in_range": fit.in_range,
            "resolved": fit.resolved,
            "jump_loss": sharp.fraction,
            "jump_resolved": sharp.resolved,
            "jump_verdict": verdict,
        }
    )
    seeds = table.groupby("params")["run_id"].nunique()
    k = int(seeds.min())
    if k >= 2:  # a seed bootstrap of the jump: k runs at every size (independent runs: resampled per size)
        t = table[table["item"].isin(g.index)].copy()
        t["rank"] = t.groupby(["item", "params"]).cumcount()
        S = (
            t[t["rank"] < k]
            .set_index(["item", "rank", "params"])["final_loss"]
            .unstack("params")
            .reindex(columns=sizes)
            .to_numpy(float)
            .reshape(len(g), k, len(sizes))
        )
        if np.isfinite(S).all():
            _, lo, hi = em.jump_fraction_ci(sizes, S, paired=False, method="basic")
            out = out.assign(jump_lo=lo, jump_hi=hi, jump_seeds=k)
    out.attrs["sizes"], out.attrs["Y"] = sizes, Y
    return out


def seed_jumps(curves: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame | None:
    """Per model size and subtask: the jump fraction of the loss curve averaged over seeds, with a
    bootstrap interval over the seeds (whole runs resampled). None without 2+ seeds at one size."""
    rows = []
    for params, m in meta.groupby("params"):
        ids = list(m["run_id"])
        c = curves[curves["run_id"].isin(ids) & (curves["step"] > 0)]
        wide = c.pivot_table(index=["item", "run_id"], columns="step", values="loss")
        if len(ids) < 2 or wide.shape[1] < 2 or wide.isna().any().any():
            continue
        items = wide.index.get_level_values(0).unique()
        if len(wide) != len(items) * len(ids):
            continue
        S = wide.to_numpy(float).reshape(len(items), len(ids), wide.shape[1])  # [items, seeds, steps]
        j, lo, hi = em.jump_fraction_ci(wide.columns.to_numpy(float), S, paired=True, method="basic")
        rows.append(
            pd.DataFrame({"params": params, "item": items, "seeds": len(ids), "jump": j, "jump_lo": lo, "jump_hi": hi})
        )
    return pd.concat(rows, ignore_index=True) if rows else None


def _spearman(a, b) -> float:
    a, b = pd.Series(a, dtype=float), pd.Series(b, dtype=float)
    ok = a.notna() & b.notna()
    return float(a[ok].rank().corr(b[ok].rank())) if ok.sum() >= 3 else float("nan")


def summarise(table: pd.DataFrame, size: pd.DataFrame | None) -> tuple[dict, pd.DataFrame]:
    by = table.groupby("params", dropna=False)
    agg = pd.DataFrame(
        {
            "width": by["width"].first(),
            "runs": by["run_id"].nunique(),
            "curves": by.size(),
            "learned_share": by["learned"].mean(),
            "median_t_learned": by.apply(lambda g: g.loc[g["learned"], "t_learned"].median(), include_groups=False),
        }
    )
    if "verdict" in table:
        # among curves whose thresholded metric moves at all (not "flat"): noise alone fills a flat curve's range
        agg["sudden_loss_share"] = by.apply(
            lambda g: (
                float(np.mean(g.loc[g["verdict"] != "flat", "jump_loss"] >= em.SUDDEN))
                if (g["verdict"] != "flat").any()
                else float("nan")
            ),
            include_groups=False,
        )
        for v in VERDICTS:
            agg[v.replace("-", "_")] = by["verdict"].apply(lambda s, v=v: int(np.sum(s == v)))
    agg = agg.reset_index()
    largest = table[table["params"] == table["params"].max()]
    res = {
        "n_runs": int(table["run_id"].nunique()),
        "n_curves": len(table),
        "learned_share": float(table["learned"].mean()),
        # quanta: frequent (low index) subtasks are learned first
        "spearman_item_vs_t_learned_largest": _spearman(
            largest["item"], largest["t_learned"].where(largest["learned"])
        ),
    }
    if "verdict" in table:
        res.update({f"n_{v.replace('-', '_')}": int(np.sum(table["verdict"] == v)) for v in VERDICTS})
        for metric in ("loss", "logloss"):  # what each metric alone would say: the disagreement, shown
            res[f"n_by_{metric}"] = {v: int(np.sum(table[f"verdict_{metric}"] == v)) for v in VERDICTS[:-1]}
        moving = table["verdict"] != "flat"
        res["sudden_loss_share"] = (
            float(np.mean(table.loc[moving, "jump_loss"] >= em.SUDDEN)) if moving.any() else float("nan")
        )
        det = table[table["detected"] & table["in_range"]]
        res["median_midpoint_step"] = float(det["midpoint"].median()) if len(det) else float("nan")
        res["median_width_decades"] = float(det["width_dec"].median()) if len(det) else float("nan")
    if size is not None:
        d = size[size["detected"] & size["in_range"]]
        res["size_fits"] = len(d)
        res["size_jumps"] = {
            v: int(np.sum(size["jump_verdict"] == v)) for v in ("sudden", "unresolved", "gradual", "flat")
        }
        res["spearman_item_vs_midpoint_N"] = _spearman(d["item"], d["midpoint_N"])
    return res, agg


# ---------------------------------------------------------------- report


def _f(v, fmt="{:.3g}"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def report(
    res: dict,
    agg: pd.DataFrame,
    size: pd.DataFrame | None,
    note: str,
    excluded: list[str],
    plot_names: list[str],
    jumps: pd.DataFrame | None = None,
) -> str:
    lines = [
        "# Sparse parity: per-subtask emergence",
        "",
        (
            f"{res['n_curves']} subtask curves from {res['n_runs']} finished runs ({note}). "
            "Learned = first evaluation with the subtask's test loss below the run's threshold "
            "(right-censored at the last evaluation when never). Sigmoid: loss = a + b sigmoid((log10 step - m)/s), "
            "midpoint 10^m, width = 10-90% of the drop in decades, 95% curvature intervals. Sharpness: the "
            "largest share of a curve's change within 0.1 decade of steps (sudden >= 0.5); unresolved when that "
            "change is one gap between evaluations wider than 0.1 decade. Mirage check (Schaeffer et al. 2023): "
            "the thresholded metric jumps while the loss, where it jumps, does not; judged on the loss and on "
            "the log-loss, metric-dependent when they disagree."
        ),
        "",
    ]
    if excluded:
        lines += ["Excluded runs (not finished): " + ", ".join(excluded), ""]
    lines += [
        f"- share of subtask curves learned: {res['learned_share']:.3f}",
        (
            f"- Spearman(subtask index, step learned) in the largest model: "
            f"{_f(res['spearman_item_vs_t_learned_largest'], '{:.2f}')} (> 0: frequent subtasks first)"
        ),
    ]
    if "n_mirage" in res:
        bl, bg = res["n_by_loss"], res["n_by_logloss"]
        lines += [
            (
                f"- verdicts: {res['n_emergent']} emergent (loss and thresholded metric both jump), "
                f"{res['n_mirage']} mirage (only the thresholded metric jumps), {res['n_metric_dependent']} "
                f"metric-dependent (loss and log-loss disagree), {res['n_unresolved']} unresolved (the jump lies "
                f"between two evaluations further apart than the window), {res['n_gradual']} gradual, "
                f"{res['n_flat']} flat"
            ),
            (
                f"  (on the loss alone: {bl['emergent']} emergent / {bl['mirage']} mirage; on the log-loss alone: "
                f"{bg['emergent']} emergent / {bg['mirage']} mirage)"
            ),
            (
                f"- median sigmoid midpoint {_f(res['median_midpoint_step'])} steps, median width "
                f"{_f(res['median_width_decades'], '{:.2f}')} decades (detected fits inside the range)"
            ),
        ]
    if size is not None:
        sj = res["size_jumps"]
        lines += [
            (
                f"- across sizes: {res['size_fits']} subtasks with a detected transition in N; "
                f"Spearman(subtask index, midpoint N) = {_f(res['spearman_item_vs_midpoint_N'], '{:.2f}')}; "
                f"final loss against N: {sj['sudden']} sudden, {sj['unresolved']} unresolved (largest drop between "
                f"two sizes further apart than 0.1 decade), {sj['gradual']} gradual, {sj['flat']} flat (final loss moves < "
                f"{FLAT_NATS:.2f} nats)"
            )
        ]
    if jumps is not None:
        lines += [
            (
                f"- jump fraction of each subtask's loss averaged over seeds ({int(jumps['seeds'].min())}-"
                f"{int(jumps['seeds'].max())} per size), 95% seed-bootstrap intervals (basic): median "
                f"{jumps['jump'].median():.2f}, median interval width {(jumps['jump_hi'] - jumps['jump_lo']).median():.2f}. "
                "With under ~10 seeds these intervals undercover (0.79 measured at 5 seeds, tests/test_emergence.py)."
            )
        ]
    else:
        lines += [
            ("- jump fractions without intervals: one run per model size (a seed bootstrap needs >= 2 seeds at a size)")
        ]
    cols = ["params", "width", "runs", "curves", "learned_share", "median_t_learned"]
    extra = [
        c
        for c in ("sudden_loss_share", "emergent", "mirage", "metric_dependent", "unresolved", "gradual", "flat")
        if c in agg
    ]
    lines += [
        "",
        "| N (params) | width | runs | subtask curves | learned share | median step learned | "
        + " | ".join(c.replace("_", " ") for c in extra)
        + " |",
        "|" + "---|" * (len(cols) + len(extra)),
    ]
    for r in agg.itertuples():
        cells = [
            _f(r.params, "{:.0f}"),
            _f(r.width, "{:.0f}"),
            str(r.runs),
            str(r.curves),
            _f(r.learned_share, "{:.3f}"),
            _f(r.median_t_learned, "{:.0f}"),
        ]
        cells += [_f(getattr(r, c), "{:.3f}") if c == "sudden_loss_share" else str(getattr(r, c)) for c in extra]
        lines.append(md_row(cells))
    if size is not None:
        lines += [
            "",
            "Emergence in model size (final loss, mean over seeds, sigmoid in log N), first 20 subtasks:",
            "",
            "| subtask | midpoint N [95%] | width (decades) [95%] | detected | jump in N [95%, seeds] |",
            "|---|---|---|---|---|",
        ]
        lo_n, hi_n = float(size.attrs["sizes"][0]), float(size.attrs["sizes"][-1])
        for r in size.head(20).itertuples():
            if not r.detected:  # no transition (F-test against a constant): a midpoint would mean nothing
                lines.append(f"| {r.item} | no transition | - | False | - |")
                continue
            jump = f"{r.jump_loss:.2f} ({r.jump_verdict})"
            if hasattr(r, "jump_lo") and np.isfinite(r.jump_lo):
                jump = f"{r.jump_loss:.2f} [{r.jump_lo:.2f}, {r.jump_hi:.2f}] ({r.jump_verdict})"
            mid = em.midpoint_text(r.midpoint_N, lo_n, hi_n)  # outside the sizes run: marked as extrapolated
            ci = f" [{_f(r.mid_lo)}, {_f(r.mid_hi)}]" if r.in_range else ""
            lines.append(
                f"| {r.item} | {mid}{ci} | {_f(r.width_dec, '{:.2f}')} "
                f"[{_f(r.width_lo, '{:.2f}')}, {_f(r.width_hi, '{:.2f}')}] | {r.detected} | {jump} |"
            )
    lines += [""] + [f"![{n}]({n})" for n in plot_names]
    lines += ["", "All fits, one row per run and subtask: `emergence.parquet`."]
    return "\n".join(lines) + "\n"


def analyse(source: str, sweep: str | None, out: str, runs: pd.DataFrame | None = None) -> Section:
    from harness import runstore

    runs = runstore.load_runs(source, sweep=sweep) if runs is None else runs
    runs = task_runs(runs, TASK)
    if runs.empty:
        raise UserError(f"no {TASK} runs in {source}" + (f" (sweep {sweep})" if sweep else ""))
    done = runs[runs["state"] == "finished"]
    excluded = [f"{r.id} ({r.state})" for r in runs[runs["state"] != "finished"].itertuples()]
    if done.empty:
        raise UserError(f"no finished {TASK} runs in {source} (states: {runs['state'].value_counts().to_dict()})")
    meta = run_meta(done)
    curves, note = load_subtask_curves(source, sweep, list(meta["run_id"]))
    print(
        f"subtasks: {len(curves)} points of {curves[['run_id', 'item']].drop_duplicates().shape[0]} "
        f"subtask curves from {curves['run_id'].nunique()} runs",
        file=sys.stderr,
    )
    table = along_steps(curves, meta)
    size = across_params(table)
    res, agg = summarise(table, size)
    os.makedirs(out, exist_ok=True)
    paths = sp.plot_fraction_learned(table, os.path.join(out, "fraction_learned.png"))
    paths += sp.plot_emergence_steps(table, os.path.join(out, "emergence_steps.png"))
    if "verdict" in table:
        paths += sp.plot_sharpness(table, os.path.join(out, "sharpness.png"))
        paths += sp.plot_examples(curves, table, os.path.join(out, "examples.png"))
    if size is not None:
        paths += sp.plot_size(size, os.path.join(out, "subtasks_vs_params.png"))
    pngs = [p for p in paths if p.endswith(".png")]
    table.to_parquet(os.path.join(out, "emergence.parquet"), index=False)
    jumps = seed_jumps(curves, meta)
    md = report(res, agg, size, note, excluded, [os.path.basename(p) for p in pngs], jumps)
    write_outputs(
        out,
        STUDY,
        {
            **res,
            "source": note,
            "by_size": agg.to_dict("records"),
            "across_params": None if size is None else size.to_dict("records"),
            "seed_jumps": None if jumps is None else jumps.to_dict("records"),
        },
        md,
    )
    tables = {"by_size": agg, "curves": table}
    if size is not None:
        tables["across_params"] = size
    return Section(
        STUDY, "Per-subtask emergence (sparse parity)", md, out, pngs, tables, numbers(res), list(meta["run_id"])
    )


def run(source: str, sweep: str | None, out: str) -> Section:
    return analyse(source, sweep, out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(STUDY, argv)
    analyse(args.source, args.sweep, args.out)


if __name__ == "__main__":
    main_guard(main)
