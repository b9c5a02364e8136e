"""Grokking of modular arithmetic: when each run learns, its phase, and the phase diagram.

    python -m analysis.grokking SOURCE [--sweep ID] --out DIR [--max-delay 1000]

Writes DIR/grokking.json (one record per run: the config keys the runs vary, t_train99, t_val99,
delay, phase, final weight norm, key frequencies), DIR/curves.png (train/val accuracy against step on a
log axis, t_val99 marked), DIR/progress.png (weight norm, restricted and excluded loss against step),
DIR/spectrum.png (final Fourier power of the embedding, from each run's curves artifact),
DIR/phase.png (weight decay against train fraction coloured by phase) and DIR/report.md. Runs are
those of task modular_addition in SOURCE.
"""
from __future__ import annotations

import math
import os
from collections import Counter

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.common import main_guard, parse_args, write_outputs  # noqa: E402
from analysis.plots import save  # noqa: E402
from harness.events import PHASES, grokking_phase  # noqa: E402,F401  (PHASES: re-exported)

STUDY = "grokking"
TASK = "modular_addition"
CURVES = ["train/acc", "val/acc", "train/loss", "val/loss", "model/weight_norm",
          "val/restricted_loss", "train/excluded_loss", "fourier/n_keys", "fourier/key_power"]
# Config keys that name a run but are not the science: never "varied keys".
IGNORED = ("config.wandb.", "config.trainer.threads", "config.trainer.progress_bar", "config.data_dir")
PHASE_COLOURS = {"comprehension": "tab:green", "grokking": "tab:purple",
                 "memorization": "tab:orange", "confusion": "tab:gray"}


# ---------------------------------------------------------------- pure helpers

def first_step_at_least(steps, values, threshold: float) -> int | None:
    """First step whose value is >= threshold (None: never): Power et al.'s t_train99 / t_val99."""
    for s, v in sorted(zip(steps, values)):
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and v >= threshold:
            return int(s)
    return None


def classify(t_train: int | None, t_val: int | None, max_delay: int) -> str:
    return grokking_phase(t_train, t_val, max_delay)


def varied_keys(runs: pd.DataFrame) -> list[str]:
    """Config columns with more than one value among the runs (what the sweep varies)."""
    out = []
    for c in runs.columns:
        if c.startswith("config.") and not c.startswith(IGNORED):
            if runs[c].dropna().map(repr).nunique() > 1:  # a key added to the schema later is NaN in older runs
                out.append(c[len("config."):])
    return sorted(out)


def parse_keys(v) -> list[int]:
    """The summary label `fourier/key_freqs` ("4,11,31"; "" or missing: none) as integers."""
    if not isinstance(v, str) or not v.strip():
        return []
    return [int(k) for k in v.split(",")]


def final_spectrum(curves: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """One run's last evaluated Fourier spectrum from the curves artifact: k, power, key."""
    c = curves[curves["run_id"] == run_id]
    if c.empty:
        return pd.DataFrame(columns=["k", "power", "key"])
    last = c[c["step"] == c["step"].max()].sort_values("item")
    return pd.DataFrame({"k": last["item"].to_numpy() + 1, "power": last["power"].to_numpy(),
                         "key": last["key"].to_numpy() > 0.5})


def merge_rows(hist: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, step): a task may log one evaluation in several history rows."""
    return hist.groupby(["run_id", "step"], as_index=False, sort=True).first()


def phase_cells(records: list[dict], x: str, y: str) -> dict[tuple, Counter]:
    """{(x value, y value): Counter of phases over seeds}: one cell of the phase diagram each."""
    cells: dict[tuple, Counter] = {}
    for r in records:
        if r.get(x) is not None and r.get(y) is not None:
            cells.setdefault((r[x], r[y]), Counter())[r["phase"]] += 1
    return cells


def _num(v):
    """A step or norm as a number; None for missing and NaN."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if math.isnan(f):
        return None
    return int(f) if f.is_integer() else f


# ---------------------------------------------------------------- records

def _summary_event(run: pd.Series, name: str):
    """(present, step or None) of a typed event in one row of the runs table (harness.events)."""
    value, reached = run.get(f"summary.{name}"), run.get(f"summary.{name}/reached")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False, None
    reached = reached is not None and not (isinstance(reached, float) and math.isnan(reached)) and bool(reached)
    return True, (int(value) if reached else None)


def run_record(run: pd.Series, hist: pd.DataFrame, keys: list[str], threshold: float,
               max_delay: int, curves: pd.DataFrame | None = None) -> dict:
    """One run's numbers; t_* recomputed from history so that a crashed run (no summary) still
    counts, and checked against the summary the callback wrote when there is one."""
    h = hist.sort_values("step")
    for k in ("train/acc", "val/acc"):
        if k not in h or h[k].notna().sum() == 0:
            raise ValueError(f"run {run['id']} ({run['name']}) has no {k} history")
    t_train = first_step_at_least(h["step"], h["train/acc"], threshold)
    t_val = first_step_at_least(h["step"], h["val/acc"], threshold)
    last = h.dropna(subset=["val/acc"]).iloc[-1]
    has_summary, summary_t = _summary_event(run, f"grok/t_val{round(threshold * 100)}")
    keys_final = parse_keys(run.get("summary.fourier/key_freqs"))
    if not keys_final and curves is not None:  # a run without a summary (crashed): its last evaluation
        spec = final_spectrum(curves, run["id"])
        keys_final = [int(k) for k in spec.loc[spec["key"], "k"]]
    rec = {"id": run["id"], "name": run["name"], "state": run["state"]}
    rec.update({k: run.get(f"config.{k}") for k in keys})
    rec.update({
        "t_train99": t_train, "t_val99": t_val,
        "delay": None if t_train is None or t_val is None else t_val - t_train,
        "phase": classify(t_train, t_val, max_delay),
        "last_step": int(last["step"]),
        "final_train_acc": float(last["train/acc"]), "final_val_acc": float(last["val/acc"]),
        "final_weight_norm": _num(last.get("model/weight_norm")),
        "peak_weight_norm": _num(h["model/weight_norm"].max()) if "model/weight_norm" in h else None,
        "key_freqs": keys_final,
        "summary_agrees": not has_summary or summary_t == t_val,
    })
    return rec


def analyse(runs: pd.DataFrame, hist: pd.DataFrame, threshold: float = 0.99,
            max_delay: int = 1000, curves: pd.DataFrame | None = None) -> dict:
    keys = varied_keys(runs)
    records, problems = [], []
    for _, run in runs.iterrows():
        h = hist[hist["run_id"] == run["id"]]
        if h.empty:
            problems.append(f"{run['id']} ({run['name']}, {run['state']}): no history")
            continue
        if run["state"] != "finished":
            problems.append(f"{run['id']} ({run['name']}): state {run['state']}, counted up to step "
                            f"{int(h['step'].max())}")
        records.append(run_record(run, h, keys, threshold, max_delay, curves))
    records.sort(key=lambda r: [(0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
                                for v in (r.get(k) for k in keys)])
    return {"varied_keys": keys, "threshold": threshold, "max_delay": max_delay,
            "runs": records, "problems": problems,
            "phase_counts": dict(Counter(r["phase"] for r in records))}


# ---------------------------------------------------------------- plots

def _label(rec: dict, keys: list[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={rec.get(k)}" for k in keys) or rec["name"]


def plot_curves(result: dict, hist: pd.DataFrame, path: str, max_runs: int = 12) -> None:
    recs = result["runs"][:max_runs]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(recs):
        h = hist[hist["run_id"] == r["id"]].dropna(subset=["val/acc"]).sort_values("step")
        c = f"C{i % 10}"
        ax.plot(h["step"], h["train/acc"], color=c, ls="--", lw=1)
        ax.plot(h["step"], h["val/acc"], color=c, lw=1.5, label=_label(r, result["varied_keys"]))
        if r["t_val99"] is not None:
            ax.axvline(r["t_val99"], color=c, ls=":", lw=1)
    ax.set(xscale="log", xlabel="step", ylabel="accuracy (dashed: train, solid: val; dotted: t_val99)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path, dpi=110)  # PNG + SVG


def plot_progress(result: dict, hist: pd.DataFrame, path: str, max_runs: int = 12) -> None:
    recs = result["runs"][:max_runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for i, r in enumerate(recs):
        h = hist[hist["run_id"] == r["id"]].dropna(subset=["val/acc"]).sort_values("step")
        for ax, key in zip(axes, ["model/weight_norm", "val/restricted_loss", "train/excluded_loss"]):
            if key in h:
                ax.plot(h["step"], h[key], color=f"C{i % 10}", lw=1, label=_label(r, result["varied_keys"]))
    for ax, title in zip(axes, ["total L2 weight norm", "restricted loss (val, key freqs only)",
                                "excluded loss (train, key freqs removed)"]):
        ax.set(xscale="log", xlabel="step", title=title)
    for ax in axes[1:]:
        ax.set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    save(fig, path, dpi=110)  # PNG + SVG


def plot_spectrum(result: dict, curves: pd.DataFrame, path: str, max_runs: int = 12) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, r in enumerate(result["runs"][:max_runs]):
        spec = final_spectrum(curves, r["id"])
        if len(spec):
            ax.plot(spec["k"], spec["power"], marker="o", ms=2, lw=1, color=f"C{i % 10}",
                    label=f"{_label(r, result['varied_keys'])}: keys {r['key_freqs']}")
    ax.set(xlabel="frequency k", ylabel="share of embedding power", title="final embedding Fourier power")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save(fig, path, dpi=110)  # PNG + SVG


def plot_phase(result: dict, path: str, x: str = "data.train_fraction", y: str = "optim.weight_decay"
               ) -> bool:
    """Liu et al.'s phase diagram on a categorical grid: one square per run (seeds side by side),
    one panel per learning rate when the runs vary it."""
    recs = [r for r in result["runs"] if r.get(x) is not None and r.get(y) is not None]
    if not recs:
        return False
    panels = sorted({r.get("optim.lr") for r in recs}, key=lambda v: (v is None, v))
    xs, ys = sorted({r[x] for r in recs}), sorted({r[y] for r in recs})
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.9 * len(xs) * len(panels), 1.5 + 0.5 * len(ys)),
                             squeeze=False)
    for ax, lr in zip(axes[0], panels):
        cells: dict[tuple, list] = {}
        for r in recs:
            if r.get("optim.lr") == lr:
                cells.setdefault((xs.index(r[x]), ys.index(r[y])), []).append(r["phase"])
        for (i, j), phases in cells.items():
            offsets = np.linspace(-0.25, 0.25, len(phases)) if len(phases) > 1 else [0.0]
            for dx, phase in zip(offsets, phases):
                ax.scatter(i + dx, j, marker="s", s=60, color=PHASE_COLOURS[phase])
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        ax.set_yticks(range(len(ys)), [str(v) for v in ys])
        ax.set(xlabel=x, ylabel=y, xlim=(-0.6, len(xs) - 0.4), ylim=(-0.6, len(ys) - 0.4),
               title=f"lr={lr}" if lr is not None else "")
    handles = [matplotlib.patches.Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    save(fig, path, dpi=110)  # PNG + SVG
    return True


# ---------------------------------------------------------------- report

def report(result: dict) -> str:
    keys = result["varied_keys"]
    lines = [f"# Grokking of modular arithmetic ({len(result['runs'])} runs)", "",
             f"Threshold {result['threshold']} (Power et al.), comprehension when validation follows "
             f"training within {result['max_delay']} steps. Phases: {result['phase_counts']}.", ""]
    head = keys + ["t_train99", "t_val99", "delay", "phase", "final val acc", "weight norm (peak -> final)",
                   "key freqs"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        norm = f"{r['peak_weight_norm'] or 0:.1f} -> {r['final_weight_norm'] or 0:.1f}"
        cells = [str(r.get(k)) for k in keys] + [str(r["t_train99"]), str(r["t_val99"]), str(r["delay"]),
                                                 r["phase"], f"{r['final_val_acc']:.3f}", norm,
                                                 str(r["key_freqs"])]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in result["runs"] if r["phase"] != "grokking" and r["phase"] != "comprehension"]
    lines += ["", f"Runs that did not generalise (val acc < {result['threshold']}): "
              + (", ".join(_label(r, keys) for r in failed) or "none") + "."]
    if result["problems"]:
        lines += ["", "Problems:"] + [f"- {p}" for p in result["problems"]]
    lines += ["", "Plots: curves.png, progress.png, spectrum.png, phase.png (when the runs vary weight "
              "decay and train fraction)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from harness import runstore
    from harness.errors import UserError

    args = parse_args(STUDY, argv, extra=lambda p: (
        p.add_argument("--threshold", type=float, default=0.99),
        p.add_argument("--max-delay", type=int, default=1000)))
    runs = runstore.load_runs(args.source, sweep=args.sweep)
    if "config.task" in runs:
        runs = runs[runs["config.task"] == TASK].reset_index(drop=True)
    if runs.empty:
        raise UserError(f"no {TASK} runs in {args.source}" + (f" (sweep {args.sweep})" if args.sweep else ""))
    hist = merge_rows(runstore.load_history(args.source, run_ids=runs["id"], keys=CURVES))
    curves = runstore.load_curves(args.source, "fourier", run_ids=runs["id"])
    result = analyse(runs, hist, args.threshold, args.max_delay, curves)
    if curves.attrs.get("missing"):
        result["problems"].append(f"no Fourier curves (curves artifact) for: {', '.join(curves.attrs['missing'])}")
    os.makedirs(args.out, exist_ok=True)
    plot_curves(result, hist, os.path.join(args.out, "curves.png"))
    plot_progress(result, hist, os.path.join(args.out, "progress.png"))
    plot_spectrum(result, curves, os.path.join(args.out, "spectrum.png"))
    plot_phase(result, os.path.join(args.out, "phase.png"))
    write_outputs(args.out, STUDY, result, report(result))


def applies(runs: pd.DataFrame) -> bool:
    from analysis.study import has_task

    return has_task(runs, "modular_addition")


def run(source: str, sweep: str | None, out: str) -> "Section":
    """The analysis.report hook (analysis/study.py): this module's CLI, then its outputs as a Section."""
    from analysis.study import Section, add_run_emergence, numbers, run_cli

    result, md, plots = run_cli(main, STUDY, source, sweep, out)
    recs = pd.DataFrame(result["runs"])
    summary = {f"phase/{k}": v for k, v in result["phase_counts"].items()}
    summary.update(numbers({"n_runs": len(recs), "threshold": result["threshold"]}))
    tables = {"runs": recs.astype({c: str for c in recs.columns if recs[c].map(type).eq(list).any()})}
    ids = list(recs["id"]) if len(recs) else []
    md = add_run_emergence(source, ids, result["threshold"], md, tables, summary)
    return Section(STUDY, "Grokking of modular arithmetic", md, out, plots, tables, summary, ids)


if __name__ == "__main__":
    main_guard(main)
