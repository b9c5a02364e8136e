"""Omnigrok MNIST study: grokking delay of large-init runs, and the LU landscape of fixed-norm runs.

    python -m analysis.omnigrok SOURCE [--sweep ID] --out DIR [--train-threshold 0.99] [--val-threshold 0.8]
                                                         [--max-delay 1000]

Writes DIR/omnigrok.json, DIR/curves.png (train/test accuracy and weight norm against step, log
axis, one line per run), DIR/lu.png (train/test loss and accuracy against alpha per training-set
size: mean and standard error over seeds), DIR/report.md. Runs of task mnist_omnigrok with
optim.fixed_norm=false are grokking runs; =true, landscape runs.

What the runs are, said in the report and the JSON (`data_note`): the paper's MNIST run
(KindXiaoming/Omnigrok, mnist/grokking/mnist-grokking.ipynb) trains on the first 1,000 images of the
60k training split (`Subset(train, range(1000))`), evaluates on all 10,000 test images, in float64
(`torch.set_default_dtype(torch.float64)`), seed 0. Without the training split (offline) the task's
stand-in trains on the first 1,000 of the 10k test images and evaluates on the other 9,000; the smoke
sweeps run float32. Numbers from the stand-in are not the paper's numbers.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.common import main_guard, parse_args, write_outputs  # noqa: E402
from analysis.plots import log_axis, save  # noqa: E402

if TYPE_CHECKING:
    from analysis.study import Section

STUDY = "omnigrok"
METRICS = ["train/loss", "train/acc", "val/loss", "val/acc", "model/weight_norm"]
# The loss of the MSE runs as logged (tasks/mnist_omnigrok.py, summary `loss_units`): the mean over the
# 10 one-hot outputs, as nn.MSELoss trains. The paper's landscape code reports the sum over them (10x).
LOSS_LABEL = {"mse per output": "MSE (mean over 10 one-hot outputs)", "nats": "cross-entropy (nats)"}
PAPER = (
    "the paper's run (KindXiaoming/Omnigrok, mnist/grokking/mnist-grokking.ipynb): train on the first 1,000 "
    "of the 60,000 MNIST training images, evaluate on all 10,000 test images, float64, seed 0"
)


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


def _precision(v) -> str:
    return {"64-true": "float64", "64": "float64", "32-true": "float32", "32": "float32"}.get(str(v), str(v))


def _col(runs: pd.DataFrame, *names: str) -> pd.Series:
    """The first of the columns `names` that the runs table has, filled from the next ones."""
    out = pd.Series([None] * len(runs), index=runs.index, dtype=object)
    for name in reversed(names):
        if name in runs:
            out = runs[name].astype(object).where(runs[name].notna(), out)
    return out


def run_setup(runs: pd.DataFrame) -> pd.DataFrame:
    """What each run was trained and evaluated on: kind, split (as resolved: summary data/source),
    n_train, n_test, precision, seed."""
    fixed = _cfg(runs, "optim.fixed_norm", False).map(_is_true)
    return pd.DataFrame(
        {
            "kind": np.where(fixed, "landscape", "grokking"),
            "split": _col(runs, "summary.data/source", "config.data.split").astype(str),
            "n_train": _col(runs, "summary.data/n_train", "config.data.n_train").map(_int),
            "n_test": _col(runs, "summary.data/n_test").map(_int),
            "precision": _col(runs, "config.trainer.precision").map(_precision),
            "seed": _col(runs, "config.seed"),
        },
        index=runs.index,
    )


def data_note(setup: pd.DataFrame) -> str:
    """What the runs were trained and evaluated on, against the paper's run: one paragraph."""
    if setup.empty:
        return ""
    parts = []
    for (kind, split, n_tr, n_te, prec), g in setup.groupby(
        ["kind", "split", "n_train", "n_test", "precision"], dropna=False
    ):
        seeds = sorted({int(v) for v in g["seed"].dropna()})
        n_tr_s = "?" if n_tr is None or pd.isna(n_tr) else f"{int(n_tr):,}"
        n_te_s = "?" if n_te is None or pd.isna(n_te) else f"{int(n_te):,}"
        what = (
            f"the offline stand-in split (trained on the first {n_tr_s} of the 10,000 MNIST test images, "
            f"evaluated on {n_te_s} of the others)"
            if split == "offline"
            else f"the standard split (trained on the first {n_tr_s} MNIST training images, evaluated on {n_te_s} "
            "test images)"
            if split == "standard"
            else f"split {split} ({n_tr_s} training, {n_te_s} test images)"
        )
        parts.append(
            f"{len(g)} {kind} run(s) on {what}, {prec}, seed{'s' if len(seeds) != 1 else ''} "
            f"{', '.join(map(str, seeds)) or '?'}"
        )
    note = "; ".join(parts) + f". Compare {PAPER}."
    if (setup["split"] == "offline").any():
        note += (
            " The stand-in trains and tests on images of the test split alone (whose first 5,000 images come "
            "from NIST's SD-3 writers and the rest from SD-1's, which the MNIST page calls harder), so its "
            "accuracies and steps are not the paper's and are not expected to match them."
        )
    return note


def short_data_note(setup: pd.DataFrame) -> str:
    """The data note in one or two lines, for a figure's title."""
    parts = []
    for (split, prec), g in setup.groupby(["split", "precision"], dropna=False):
        sizes = "/".join(f"{int(n):,}" for n in sorted(set(g["n_train"].dropna())))
        tests = "/".join(f"{int(n):,}" for n in sorted(set(g["n_test"].dropna())))
        parts.append(
            (
                f"offline stand-in split (train: the first {sizes} of the 10k MNIST test images, test: "
                f"{tests or '?'} of the others)"
                if split == "offline"
                else f"{split} split (train: first {sizes} training images)"
            )
            + f", {prec}"
        )
    return "; ".join(parts) + (
        ". Paper: first 1,000 training images, all 10k test images, float64, seed 0 (report.md says more)."
    )


def grokking_table(
    runs: pd.DataFrame,
    hist: pd.DataFrame,
    train_threshold: float = 0.99,
    val_threshold: float = 0.8,
    max_delay: int = 1000,
) -> pd.DataFrame:
    """One row per grokking run: when train accuracy reached `train_threshold`, when test accuracy
    first reached `val_threshold`, the delay between them, the phase from these (Liu et al.'s four,
    harness.events.grokking_phase), and final accuracies and norms."""
    from harness.events import grokking_phase

    rows = []
    for _, r in runs.iterrows():
        h = _evals(hist[hist["run_id"] == r["id"]])
        if h.empty:
            raise ValueError(f"run {r['id']} ({r['name']}) has no evaluation history")
        t_tr = first_step_at_least(h, "train/acc", train_threshold)
        t_va = first_step_at_least(h, "val/acc", val_threshold)
        last = h.iloc[-1]
        rows.append(
            {
                "id": r["id"],
                "name": r["name"],
                "init_scale": float(r.get("config.model.init_scale", math.nan)),
                "seed": r.get("config.seed"),
                "split": r.get("summary.data/source", r.get("config.data.split")),
                "n_train": _int(r.get("summary.data/n_train", r.get("config.data.n_train"))),
                "n_test": _int(r.get("summary.data/n_test")),
                "precision": r.get("config.trainer.precision"),
                "weight_decay": r.get("config.optim.weight_decay"),
                "steps": int(last["step"]),
                "t_train": t_tr,
                "t_val": t_va,
                "delay": None if t_tr is None or t_va is None else t_va - t_tr,
                "final_train_acc": float(last.get("train/acc", math.nan)),
                "final_val_acc": float(last.get("val/acc", math.nan)),
                "first_norm": float(h["model/weight_norm"].dropna().iloc[0]) if "model/weight_norm" in h else math.nan,
                "final_norm": float(last.get("model/weight_norm", math.nan)),
                "phase": grokking_phase(t_tr, t_va, max_delay),
                "phase_logged": r.get("summary.grok/phase"),  # the run's own, at its eval.* thresholds
            }
        )
    return pd.DataFrame(rows)


def _int(v):
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


VALUES = [
    "train_loss",
    "val_loss",
    "train_acc",
    "val_acc",
    "final_train_loss",
    "final_val_loss",
    "final_train_acc",
    "final_val_acc",
]


def landscape_runs(runs: pd.DataFrame, hist: pd.DataFrame) -> pd.DataFrame:
    """One row per landscape run (its seed, n_train, alpha): the best (min loss, max accuracy) over
    training as in the paper's landscape code, and the final evaluation."""
    rows = []
    for _, r in runs.iterrows():
        h = _evals(hist[hist["run_id"] == r["id"]])
        if h.empty:
            raise ValueError(f"run {r['id']} ({r['name']}) has no evaluation history")
        last = h.iloc[-1]
        rows.append(
            {
                "id": r["id"],
                "seed": r.get("config.seed"),
                "n_train": int(r.get("summary.data/n_train", r.get("config.data.n_train"))),
                "alpha": float(r["config.model.init_scale"]),
                "train_loss": h["train/loss"].min(),
                "val_loss": h["val/loss"].min(),
                "train_acc": h["train/acc"].max(),
                "val_acc": h["val/acc"].max(),
                "final_train_loss": last["train/loss"],
                "final_val_loss": last["val/loss"],
                "final_train_acc": last["train/acc"],
                "final_val_acc": last["val/acc"],
            }
        )
    return pd.DataFrame(rows, columns=["id", "seed", "n_train", "alpha"] + VALUES)


def landscape_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """One row per (n_train, alpha): the mean over seeds of each value, its standard error (`<value>_se`,
    NaN for one seed), the number of seeds and which."""
    from analysis.study import mean_se

    rows = []
    for (n, a), g in per_run.groupby(["n_train", "alpha"]):
        row = {
            "n_train": int(n),
            "alpha": float(a),
            "n_seeds": len(g),
            "seeds": sorted(int(v) for v in g["seed"].dropna()),
        }
        for v in VALUES:
            row[v], row[v + "_se"], _ = mean_se(g[v].astype(float))
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["n_train", "alpha"])
    return pd.DataFrame(rows).sort_values(["n_train", "alpha"]).reset_index(drop=True)


def lu_shape(table: pd.DataFrame) -> dict:
    """Per training-set size: the alpha of least test loss, and how far test loss rises from there
    to the largest alpha (U) while train loss stays near its minimum (L)."""
    out = {}
    for n, g in table.groupby("n_train"):
        g = g.sort_values("alpha")
        best = g.loc[g["val_loss"].idxmin()]
        top = g.iloc[-1]
        out[int(n)] = {
            "alpha_best_val_loss": float(best["alpha"]),
            "best_val_loss": float(best["val_loss"]),
            "alpha_max": float(top["alpha"]),
            "val_loss_at_alpha_max": float(top["val_loss"]),
            "train_loss_at_alpha_max": float(top["train_loss"]),
            "val_loss_rise": float(top["val_loss"] / best["val_loss"]),
            "train_loss_at_alpha_min": float(g.iloc[0]["train_loss"]),
            "u_shaped": bool(top["val_loss"] > best["val_loss"] and g.iloc[0]["val_loss"] > best["val_loss"]),
        }
    return out


def plot_curves(gtable: pd.DataFrame, hist: pd.DataFrame, path: str, th: dict, note: str):
    """Accuracy and weight norm against step: one line per run (never an average over seeds, whose
    jumps at different steps would make a smooth curve that no run followed), thresholds marked."""
    from matplotlib.lines import Line2D

    from analysis.study import legend_outside, suptitle

    fig, (ax_acc, ax_norm) = plt.subplots(1, 2, figsize=(13, 4.4))
    handles = []
    for i, (_, r) in enumerate(gtable.sort_values(["init_scale", "seed"]).iterrows()):
        h = _evals(hist[hist["run_id"] == r["id"]])
        h = h[h["step"] > 0]  # step 0 has no place on a log axis
        c = f"C{i % 10}"
        ax_acc.plot(h["step"], h["train/acc"], color=c, ls="--", lw=1)
        ax_acc.plot(h["step"], h["val/acc"], color=c, lw=1.5)
        for t, y in ((r["t_train"], th["train"]), (r["t_val"], th["val"])):
            if t is not None and not pd.isna(t):
                ax_acc.plot([t], [y], marker="o", mfc="none", color=c, ls="")
        ax_norm.plot(h["step"], h["model/weight_norm"], color=c, lw=1.5)
        handles.append(Line2D([], [], color=c, label=f"alpha={r['init_scale']:g}, seed {r['seed']}"))
    ax_acc.axhline(th["val"], color="0.5", lw=0.7, ls=":")
    ax_acc.axhline(th["train"], color="0.5", lw=0.7, ls="-.")
    ax_acc.set(ylabel="accuracy", title="train (dashed) and test (solid) accuracy")
    ax_norm.set(ylabel="L2 norm of all parameters", title="total parameter norm")
    for ax in (ax_acc, ax_norm):
        log_axis(ax, "x", label="optimizer step")
    handles += [
        Line2D([], [], color="0.5", ls="-.", label=f"train threshold {th['train']:g}"),
        Line2D([], [], color="0.5", ls=":", label=f"test threshold {th['val']:g}"),
        Line2D([], [], color="k", marker="o", mfc="none", ls="", label="first step past a threshold"),
    ]
    legend_outside(ax_norm, handles=handles, title="one line per run")
    suptitle(fig, note)
    save(fig, path, dpi=120)  # PNG + SVG
    return fig


def plot_lu(table: pd.DataFrame, path: str, loss_label: str, note: str = ""):
    """The LU landscape: per training-set size, the mean over seeds at each alpha with its standard
    error as an error bar (none for one seed), and the number of seeds in the legend."""
    from analysis.study import legend_outside, suptitle

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.4))
    for i, (n, g) in enumerate(table.groupby("n_train")):
        g = g.sort_values("alpha")
        k = sorted(set(g["n_seeds"]))
        seeds = f"{k[0]}" if len(k) == 1 else f"{k[0]}-{k[-1]}"
        for ax, what in ((ax_loss, "loss"), (ax_acc, "acc")):
            for split, ls, marker in (("train", "--", "."), ("val", "-", "o")):
                col = f"{split}_{what}"
                ax.errorbar(
                    g["alpha"],
                    g[col],
                    yerr=g[col + "_se"].fillna(0.0),
                    color=f"C{i}",
                    ls=ls,
                    marker=marker,
                    capsize=2,
                    label=f"{'train' if split == 'train' else 'test'}, n_train={n} "
                    f"(mean of {seeds} seed{'s' if seeds != '1' else ''})",
                )
    ax_loss.set(ylabel=f"{loss_label}\nbest over training", title="LU: train loss L, test loss U")
    ax_acc.set(ylabel="accuracy, best over training", title="accuracy")
    for ax in (ax_loss, ax_acc):
        log_axis(ax, "x", label="alpha = |w| / |w0| (norm held fixed)")
    log_axis(ax_loss, "y")
    legend_outside(ax_acc, title="error bars: standard error over seeds", title_fontsize=7)
    if note:
        suptitle(fig, note)
    save(fig, path, dpi=120)  # PNG + SVG
    return fig


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "never"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _step(v, last=None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "never" if last is None else f"never (censored at {last})"
    return str(int(v))


def _pm(mean: float, se: float, fmt: str) -> str:
    return fmt.format(mean) + ("" if se is None or not math.isfinite(se) else " ± " + fmt.format(se))


def report(result: dict) -> str:
    th = result["thresholds"]
    lines = ["# Omnigrok MNIST", "", f"**Data.** {result['data_note']}", ""]
    if result["skipped_runs"]:
        lines += [f"Skipped runs (not finished): {', '.join(result['skipped_runs'])}", ""]
    if result["grokking"]:
        tr, va = th["train"], th["val"]
        lines += [
            "## Grokking runs",
            "",
            f"t_train: first evaluated step with train accuracy >= {tr:g} (Power et al.'s 0.99; Liu et al.'s "
            f"phase diagrams use 0.9: `--train-threshold 0.9`); t_val: first with test accuracy >= {va:g} (MNIST "
            f"test accuracy stays below 0.99). Phase (Liu et al.'s four) from these, grokking = t_val later than "
            f"t_train by more than {th['max_delay']} steps. Censored: never reached by the last step.",
            "",
            f"| alpha | wd | seed | split | precision | steps | t_train (acc >= {tr:g}) | t_val (acc >= {va:g}) | "
            "delay | phase | final train acc | final test acc | norm first eval -> final |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["grokking"]:
            lines.append(
                f"| {r['init_scale']:g} | {r['weight_decay']} | {r['seed']} | {r['split']} | "
                f"{_precision(r['precision'])} | {r['steps']} | {_step(r['t_train'], r['steps'])} | "
                f"{_step(r['t_val'], r['steps'])} | {_step(r['delay'])} | {r['phase']} | "
                f"{_fmt(r['final_train_acc'])} | {_fmt(r['final_val_acc'])} | "
                f"{r['first_norm']:.1f} -> {r['final_norm']:.1f} |"
            )
        lines += ["", "![curves](curves.png)", ""]
    if result["landscape"]:
        lines += [
            "## LU landscape (fixed weight norm)",
            "",
            f"Loss: {result['loss_label']}.",
            "",
            "| n_train | alpha of least test loss | least test loss | test loss at alpha max | "
            "rise | train loss at alpha max | train loss at alpha min |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, s in result["lu_shape"].items():
            lines.append(
                f"| {n} | {s['alpha_best_val_loss']:g} | {s['best_val_loss']:.4f} | "
                f"{s['val_loss_at_alpha_max']:.4f} (alpha {s['alpha_max']:g}) | {s['val_loss_rise']:.2f}x | "
                f"{s['train_loss_at_alpha_max']:.2e} | {s['train_loss_at_alpha_min']:.2e} |"
            )
        lines += [
            "",
            "Best over training (min loss, max accuracy): mean ± standard error over the seeds listed "
            "(no ± for one seed); every run is in omnigrok.json (`landscape_runs`).",
            "",
            "| n_train | alpha | seeds | train loss | test loss | train acc | test acc |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["landscape"]:
            lines.append(
                f"| {r['n_train']} | {r['alpha']:g} | {', '.join(map(str, r['seeds']))} | "
                f"{_pm(r['train_loss'], r['train_loss_se'], '{:.2e}')} | "
                f"{_pm(r['val_loss'], r['val_loss_se'], '{:.4f}')} | "
                f"{_pm(r['train_acc'], r['train_acc_se'], '{:.3f}')} | "
                f"{_pm(r['val_acc'], r['val_acc_se'], '{:.3f}')} |"
            )
        lines += ["", "![LU](lu.png)", ""]
    return "\n".join(lines) + "\n"


def analyse(
    runs: pd.DataFrame,
    hist: pd.DataFrame,
    out_dir: str,
    val_threshold: float = 0.8,
    train_threshold: float = 0.99,
    max_delay: int = 1000,
) -> dict:
    """Everything but the loading: runs and history frames in, outputs written, result returned."""
    runs = runs[_cfg(runs, "task") == "mnist_omnigrok"]
    if runs.empty:
        raise ValueError("no mnist_omnigrok runs in this source")
    done = runs["state"] == "finished"
    skipped = [f"{r['id']} ({r['state']})" for _, r in runs[~done].iterrows()]
    runs = runs[done]
    fixed = _cfg(runs, "optim.fixed_norm", False).map(_is_true)
    gtable = grokking_table(runs[~fixed], hist, train_threshold, val_threshold, max_delay)
    per_run = landscape_runs(runs[fixed], hist)
    ltable = landscape_table(per_run)
    units = sorted({str(v) for v in _col(runs, "summary.loss_units").dropna()})
    loss_label = " / ".join(LOSS_LABEL.get(u, u) for u in units) or "loss"
    th = {"train": train_threshold, "val": val_threshold, "max_delay": max_delay}
    setup = run_setup(runs)
    note = data_note(setup)
    os.makedirs(out_dir, exist_ok=True)
    if len(gtable):
        plot_curves(gtable, hist, os.path.join(out_dir, "curves.png"), th, short_data_note(setup[~fixed]))
    if len(ltable):
        plot_lu(ltable, os.path.join(out_dir, "lu.png"), loss_label, short_data_note(setup[fixed]))
    result = {
        "thresholds": th,
        "val_threshold": val_threshold,
        "data_note": note,
        "paper_setup": PAPER,
        "loss_label": loss_label,
        "skipped_runs": skipped,
        "grokking": gtable.replace({np.nan: None}).to_dict("records"),
        "landscape": ltable.to_dict("records"),
        "landscape_runs": per_run.to_dict("records"),
        "lu_shape": lu_shape(ltable) if len(ltable) else {},
    }
    write_outputs(out_dir, STUDY, result, report(result))
    return result


def main(argv: list[str] | None = None) -> None:
    from harness.errors import UserError
    from harness.runstore import load_history, load_runs

    args = parse_args(
        STUDY,
        argv,
        extra=lambda p: (
            p.add_argument(
                "--train-threshold",
                type=float,
                default=0.99,
                help="train accuracy that counts as fitted: 0.99 = Power et al. (default), 0.9 = Liu et al.'s "
                "phase diagrams",
            ),
            p.add_argument(
                "--val-threshold",
                type=float,
                default=0.8,
                help="test accuracy that counts as generalised (MNIST stays below 0.99; default 0.8)",
            ),
            p.add_argument(
                "--max-delay",
                type=int,
                default=1000,
                help="steps from t_train to t_val still counted as comprehension (Liu et al.: 1000)",
            ),
        ),
    )
    for name, v in (("--train-threshold", args.train_threshold), ("--val-threshold", args.val_threshold)):
        if not 0 < v <= 1:
            raise UserError(f"{name} {v}: an accuracy in (0, 1] (Power et al. 0.99, Liu et al. 0.9)")
    runs = load_runs(args.source, sweep=args.sweep)
    if runs.empty:
        raise UserError(f"no runs in {args.source}" + (f" for sweep {args.sweep}" if args.sweep else ""))
    hist = load_history(args.source, run_ids=runs["id"], sweep=args.sweep, keys=METRICS)
    try:
        result = analyse(runs, hist, args.out, args.val_threshold, args.train_threshold, args.max_delay)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(
        f"omnigrok: {len(result['grokking'])} grokking runs (train acc >= {args.train_threshold:g}, test acc >= "
        f"{args.val_threshold:g}), {len(result['landscape_runs'])} landscape runs. {result['data_note']}"
    )


def applies(runs: pd.DataFrame) -> bool:
    from analysis.study import has_task

    return has_task(runs, "mnist_omnigrok")


def run(source: str, sweep: str | None, out: str) -> Section:
    """The analysis.report hook (analysis/study.py): this module's CLI, then its outputs as a Section."""
    from analysis.study import Section, add_run_emergence, numbers, run_cli

    result, md, plots = run_cli(main, STUDY, source, sweep, out)
    tables = {k: pd.DataFrame(result[k]) for k in ("grokking", "landscape", "landscape_runs") if result[k]}
    ids = [r["id"] for r in result["grokking"] + result["landscape_runs"]]
    summary = numbers(
        {
            "lu_shape": result["lu_shape"],
            "n_grokking_runs": len(result["grokking"]),
            "n_landscape_runs": len(result["landscape"]),
        }
    )
    grok_ids = [r["id"] for r in result["grokking"] if "id" in r]  # test accuracy beside test loss
    seeds = {r["id"]: r["seed"] for r in result["grokking"]}
    md = add_run_emergence(source, grok_ids, result["val_threshold"], md, tables, summary, seeds)
    return Section(STUDY, "Omnigrok MNIST", md, out, plots, tables, summary, ids)


if __name__ == "__main__":
    main_guard(main)
