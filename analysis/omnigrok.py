"""Omnigrok MNIST study: grokking delay of large-init runs, and the LU landscape of fixed-norm runs.

    python -m analysis.omnigrok SOURCE [--sweep ID] --out DIR [--val-threshold 0.8]

Writes DIR/omnigrok.json, DIR/curves.png (train/test accuracy and weight norm against step, log
axis), DIR/lu.png (train/test loss and accuracy against alpha per training-set size), DIR/report.md.
Runs of task mnist_omnigrok with optim.fixed_norm=false are grokking runs; =true, landscape runs.
"""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.common import main_guard, parse_args, write_outputs  # noqa: E402
from analysis.plots import save  # noqa: E402

STUDY = "omnigrok"
METRICS = ["train/loss", "train/acc", "val/loss", "val/acc", "model/weight_norm"]


def _cfg(runs: pd.DataFrame, key: str, default=None) -> pd.Series:
    col = f"config.{key}"
    return runs[col] if col in runs else pd.Series([default] * len(runs), index=runs.index)


def _is_true(v) -> bool:
    return v is True or str(v).lower() == "true"


def first_step_at_least(hist: pd.DataFrame, key: str, threshold: float) -> int | None:
    """First logged step with `key` >= threshold in one run's history (None: never)."""
    h = hist.dropna(subset=[key]).sort_values("step")
    hit = h[h[key] >= threshold]
    return None if hit.empty else int(hit["step"].iloc[0])


def _evals(hist: pd.DataFrame) -> pd.DataFrame:
    present = [k for k in METRICS if k in hist]
    return hist.dropna(subset=present, how="all").sort_values("step") if present else hist.iloc[0:0]


def grokking_table(runs: pd.DataFrame, hist: pd.DataFrame, train_threshold: float = 0.99,
                   val_threshold: float = 0.8) -> pd.DataFrame:
    """One row per grokking run: when train accuracy reached `train_threshold`, when test accuracy
    first reached `val_threshold`, the delay between them, and final accuracies and norms."""
    rows = []
    for _, r in runs.iterrows():
        h = _evals(hist[hist["run_id"] == r["id"]])
        if h.empty:
            raise ValueError(f"run {r['id']} ({r['name']}) has no evaluation history")
        t_tr = first_step_at_least(h, "train/acc", train_threshold)
        t_va = first_step_at_least(h, "val/acc", val_threshold)
        last = h.iloc[-1]
        rows.append({
            "id": r["id"], "name": r["name"], "init_scale": float(r.get("config.model.init_scale", math.nan)),
            "seed": r.get("config.seed"), "split": r.get("config.data.split"),
            "precision": r.get("config.trainer.precision"), "weight_decay": r.get("config.optim.weight_decay"),
            "steps": int(last["step"]), "t_train": t_tr, "t_val": t_va,
            "delay": None if t_tr is None or t_va is None else t_va - t_tr,
            "final_train_acc": float(last.get("train/acc", math.nan)),
            "final_val_acc": float(last.get("val/acc", math.nan)),
            "first_norm": float(h["model/weight_norm"].dropna().iloc[0]) if "model/weight_norm" in h else math.nan,
            "final_norm": float(last.get("model/weight_norm", math.nan)),
            "phase": r.get("summary.grok/phase"),
        })
    return pd.DataFrame(rows)


def landscape_table(runs: pd.DataFrame, hist: pd.DataFrame) -> pd.DataFrame:
    """One row per (n_train, alpha), averaged over seeds: the best (min loss, max accuracy) over
    training as in the paper's landscape code, and the final evaluation."""
    rows = []
    for _, r in runs.iterrows():
        h = _evals(hist[hist["run_id"] == r["id"]])
        if h.empty:
            raise ValueError(f"run {r['id']} ({r['name']}) has no evaluation history")
        last = h.iloc[-1]
        rows.append({
            "n_train": int(r.get("summary.data/n_train", r.get("config.data.n_train"))),
            "alpha": float(r["config.model.init_scale"]),
            "train_loss": h["train/loss"].min(), "val_loss": h["val/loss"].min(),
            "train_acc": h["train/acc"].max(), "val_acc": h["val/acc"].max(),
            "final_train_loss": last["train/loss"], "final_val_loss": last["val/loss"],
            "final_train_acc": last["train/acc"], "final_val_acc": last["val/acc"],
        })
    if not rows:
        return pd.DataFrame(columns=["n_train", "alpha"])
    df = pd.DataFrame(rows)
    return df.groupby(["n_train", "alpha"], as_index=False).mean().sort_values(["n_train", "alpha"])


def lu_shape(table: pd.DataFrame) -> dict:
    """Per training-set size: the alpha of least test loss, and how far test loss rises from there
    to the largest alpha (U) while train loss stays near its minimum (L)."""
    out = {}
    for n, g in table.groupby("n_train"):
        g = g.sort_values("alpha")
        best = g.loc[g["val_loss"].idxmin()]
        top = g.iloc[-1]
        out[int(n)] = {
            "alpha_best_val_loss": float(best["alpha"]), "best_val_loss": float(best["val_loss"]),
            "alpha_max": float(top["alpha"]), "val_loss_at_alpha_max": float(top["val_loss"]),
            "train_loss_at_alpha_max": float(top["train_loss"]),
            "val_loss_rise": float(top["val_loss"] / best["val_loss"]),
            "train_loss_at_alpha_min": float(g.iloc[0]["train_loss"]),
            "u_shaped": bool(top["val_loss"] > best["val_loss"] and g.iloc[0]["val_loss"] > best["val_loss"]),
        }
    return out


def plot_curves(gtable: pd.DataFrame, hist: pd.DataFrame, path: str, val_threshold: float) -> None:
    fig, (ax_acc, ax_norm) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (_, r) in enumerate(gtable.sort_values(["init_scale", "seed"]).iterrows()):
        h = _evals(hist[hist["run_id"] == r["id"]])
        h = h[h["step"] > 0]
        c = f"C{i}"
        label = f"alpha={r['init_scale']:g} seed={r['seed']}"
        ax_acc.plot(h["step"], h["train/acc"], c, ls="--", label=f"{label} train")
        ax_acc.plot(h["step"], h["val/acc"], c, label=f"{label} test")
        ax_norm.plot(h["step"], h["model/weight_norm"], c, label=label)
    ax_acc.axhline(val_threshold, color="grey", lw=0.5)
    ax_acc.set(xscale="log", xlabel="step", ylabel="accuracy", title="train (dashed) and test accuracy")
    ax_norm.set(xscale="log", xlabel="step", ylabel="weight norm", title="total parameter norm")
    ax_acc.legend(fontsize=7)
    ax_norm.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path, dpi=120)  # PNG + SVG


def plot_lu(table: pd.DataFrame, path: str) -> None:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (n, g) in enumerate(table.groupby("n_train")):
        g = g.sort_values("alpha")
        ax_loss.plot(g["alpha"], g["train_loss"], f"C{i}", ls="--", marker=".", label=f"train, n={n}")
        ax_loss.plot(g["alpha"], g["val_loss"], f"C{i}", marker="o", label=f"test, n={n}")
        ax_acc.plot(g["alpha"], g["train_acc"], f"C{i}", ls="--", marker=".", label=f"train, n={n}")
        ax_acc.plot(g["alpha"], g["val_acc"], f"C{i}", marker="o", label=f"test, n={n}")
    ax_loss.set(xscale="log", yscale="log", xlabel="alpha = |w| / |w0|", ylabel="loss (best over training)",
                title="LU: train loss L, test loss U")
    ax_acc.set(xscale="log", xlabel="alpha = |w| / |w0|", ylabel="accuracy (best over training)")
    ax_loss.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path, dpi=120)  # PNG + SVG


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "never"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _step(v) -> str:
    return "never" if v is None or (isinstance(v, float) and not math.isfinite(v)) else str(int(v))


def report(result: dict, val_threshold: float) -> str:
    lines = ["# Omnigrok MNIST", ""]
    if result["skipped_runs"]:
        lines += [f"Skipped runs (not finished): {', '.join(result['skipped_runs'])}", ""]
    if result["grokking"]:
        pct = round(val_threshold * 100)
        lines += ["## Grokking runs", "",
                  f"t_train99: first evaluated step with train accuracy >= 0.99; t_val{pct}: first with "
                  f"test accuracy >= {val_threshold}.", "",
                  f"| alpha | wd | seed | split | steps | t_train99 | t_val{pct} | delay | final train acc | "
                  "final test acc | norm first eval -> final |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["grokking"]:
            lines.append(f"| {r['init_scale']:g} | {r['weight_decay']} | {r['seed']} | {r['split']} | {r['steps']} | "
                         f"{_step(r['t_train'])} | {_step(r['t_val'])} | {_step(r['delay'])} | "
                         f"{_fmt(r['final_train_acc'])} | {_fmt(r['final_val_acc'])} | "
                         f"{r['first_norm']:.1f} -> {r['final_norm']:.1f} |")
        lines += ["", "![curves](curves.png)", ""]
    if result["landscape"]:
        lines += ["## LU landscape (fixed weight norm)", "",
                  "| n_train | alpha of least test loss | least test loss | test loss at alpha max | "
                  "rise | train loss at alpha max | train loss at alpha min |", "|---|---|---|---|---|---|---|"]
        for n, s in result["lu_shape"].items():
            lines.append(f"| {n} | {s['alpha_best_val_loss']:g} | {s['best_val_loss']:.4f} | "
                         f"{s['val_loss_at_alpha_max']:.4f} (alpha {s['alpha_max']:g}) | {s['val_loss_rise']:.2f}x | "
                         f"{s['train_loss_at_alpha_max']:.2e} | {s['train_loss_at_alpha_min']:.4f} |")
        lines += ["", "Best over training (min loss, max accuracy), mean over seeds:", "",
                  "| n_train | alpha | train loss | test loss | train acc | test acc |", "|---|---|---|---|---|---|"]
        for r in result["landscape"]:
            lines.append(f"| {r['n_train']} | {r['alpha']:g} | {r['train_loss']:.2e} | {r['val_loss']:.4f} | "
                         f"{r['train_acc']:.3f} | {r['val_acc']:.3f} |")
        lines += ["", "![LU](lu.png)", ""]
    return "\n".join(lines) + "\n"


def analyse(runs: pd.DataFrame, hist: pd.DataFrame, out_dir: str, val_threshold: float = 0.8) -> dict:
    """Everything but the loading: runs and history frames in, outputs written, result returned."""
    runs = runs[_cfg(runs, "task") == "mnist_omnigrok"]
    if runs.empty:
        raise ValueError("no mnist_omnigrok runs in this source")
    done = runs["state"] == "finished"
    skipped = [f"{r['id']} ({r['state']})" for _, r in runs[~done].iterrows()]
    runs = runs[done]
    fixed = _cfg(runs, "optim.fixed_norm", False).map(_is_true)
    gtable = grokking_table(runs[~fixed], hist, val_threshold=val_threshold)
    ltable = landscape_table(runs[fixed], hist)
    os.makedirs(out_dir, exist_ok=True)
    if len(gtable):
        plot_curves(gtable, hist, os.path.join(out_dir, "curves.png"), val_threshold)
    if len(ltable):
        plot_lu(ltable, os.path.join(out_dir, "lu.png"))
    result = {
        "val_threshold": val_threshold, "skipped_runs": skipped,
        "grokking": gtable.replace({np.nan: None}).to_dict("records"),
        "landscape": ltable.to_dict("records"),
        "lu_shape": lu_shape(ltable) if len(ltable) else {},
    }
    write_outputs(out_dir, STUDY, result, report(result, val_threshold))
    return result


def main(argv: list[str] | None = None) -> None:
    from harness.errors import UserError
    from harness.runstore import load_history, load_runs

    args = parse_args(STUDY, argv, extra=lambda p: p.add_argument(
        "--val-threshold", type=float, default=0.8, help="test accuracy that counts as generalised"))
    runs = load_runs(args.source, sweep=args.sweep)
    if runs.empty:
        raise UserError(f"no runs in {args.source}" + (f" for sweep {args.sweep}" if args.sweep else ""))
    hist = load_history(args.source, run_ids=runs["id"], sweep=args.sweep, keys=METRICS)
    try:
        analyse(runs, hist, args.out, args.val_threshold)
    except ValueError as e:
        raise UserError(str(e)) from None


def applies(runs: pd.DataFrame) -> bool:
    from analysis.study import has_task

    return has_task(runs, "mnist_omnigrok")


def run(source: str, sweep: str | None, out: str) -> "Section":
    """The analysis.report hook (analysis/study.py): this module's CLI, then its outputs as a Section."""
    from analysis.study import Section, add_run_emergence, numbers, run_cli

    result, md, plots = run_cli(main, STUDY, source, sweep, out)
    tables = {k: pd.DataFrame(result[k]) for k in ("grokking", "landscape") if result[k]}
    ids = [r["id"] for r in result["grokking"] + result["landscape"] if "id" in r]
    summary = numbers({"lu_shape": result["lu_shape"], "n_grokking_runs": len(result["grokking"]),
                       "n_landscape_runs": len(result["landscape"])})
    grok_ids = [r["id"] for r in result["grokking"] if "id" in r]  # test accuracy beside test loss
    md = add_run_emergence(source, grok_ids, result["val_threshold"], md, tables, summary)
    return Section(STUDY, "Omnigrok MNIST", md, out, plots, tables, summary, ids)


if __name__ == "__main__":
    main_guard(main)
