"""Grokking of modular arithmetic: when each run learns, its phase, and the phase diagram.

    python -m analysis.grokking SOURCE [--sweep ID] --out DIR [--threshold 0.99] [--max-delay 1000]

Writes DIR/grokking.json (the threshold and its convention; one record per run: seed, the config
keys the runs vary, t_train and t_val (first evaluated step with train / validation accuracy >=
the threshold), delay, phase, final weight norm, key frequencies), DIR/curves.png (train/val
accuracy against step on a log axis, one panel per configuration, one line per seed, t_val marked),
DIR/progress.png (weight norm, restricted and excluded loss against step), DIR/spectrum.png (final
Fourier power of the embedding, from each run's curves artifact), DIR/phase.png (weight decay
against train fraction coloured by phase, one square per seed) and DIR/report.md. Runs are those of
task modular_addition in SOURCE.

The threshold: 0.99 (the default) is Power et al.'s t_train99 / t_val99, and what the task's
GrokkingCallback logs by default (`eval.threshold`); Liu et al.'s phase diagrams ("Towards
Understanding Grokking", code: ejmichaud/grokking-squared, phase_diagram_plot/phase_diagram.ipynb
and plot_pd.ipynb, "steps to train/test acc >= 0.9") use 0.9, with grokking = a delay of more than
1e3 steps (phase_diagram_plot/simple_phase_diagram.ipynb). `--threshold 0.9` gives their phases.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import TYPE_CHECKING

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.common import main_guard, md_row, parse_args, write_outputs  # noqa: E402
from analysis.plots import log_axis, save  # noqa: E402
from harness.events import PHASES, grokking_phase  # noqa: E402,F401  (PHASES: re-exported)

if TYPE_CHECKING:
    from analysis.study import Section

STUDY = "grokking"
TASK = "modular_addition"
CURVES = [
    "train/acc",
    "val/acc",
    "train/loss",
    "val/loss",
    "model/weight_norm",
    "val/restricted_loss",
    "train/excluded_loss",
    "fourier/n_keys",
    "fourier/key_power",
]
# Config keys that name a run but are not the science: never "varied keys".
IGNORED = ("config.wandb.", "config.trainer.threads", "config.trainer.progress_bar", "config.data_dir")
POWER_THRESHOLD = 0.99  # Power et al. 2022: t_train99 / t_val99; the default here and in the task
LIU_THRESHOLD = 0.9  # Liu et al. 2022's phase diagrams (grokking-squared, phase_diagram_plot/*.ipynb)
LIU_MAX_DELAY = 1000  # their comprehension / grokking boundary (simple_phase_diagram.ipynb: 1e3 steps)
PHASE_COLOURS = {
    "comprehension": "tab:green",
    "grokking": "tab:purple",
    "memorization": "tab:orange",
    "confusion": "tab:gray",
}


# ---------------------------------------------------------------- pure helpers


def first_step_at_least(steps, values, threshold: float) -> int | None:
    """First step whose value is >= threshold (None: never): Power et al.'s t_train99 / t_val99."""
    for s, v in sorted(zip(steps, values)):
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and v >= threshold:
            return int(s)
    return None


def classify(t_train: int | None, t_val: int | None, max_delay: int) -> str:
    return grokking_phase(t_train, t_val, max_delay)


def threshold_note(threshold: float, max_delay: int) -> str:
    """One line that says which convention a threshold and delay are, so a reader can compare."""
    conv = {
        POWER_THRESHOLD: "Power et al.'s t_99; Liu et al.'s phase diagrams use 0.9",
        LIU_THRESHOLD: "Liu et al.'s phase diagrams; Power et al.'s t_99 uses 0.99",
    }.get(threshold, "neither Power et al.'s 0.99 nor Liu et al.'s 0.9")
    return (
        f"accuracy >= {threshold:g} ({conv}); grokking = validation later than training by more than "
        f"{max_delay} steps (Liu et al.: {LIU_MAX_DELAY})"
    )


def varied_keys(runs: pd.DataFrame) -> list[str]:
    """Config columns with more than one value among the runs (what the sweep varies)."""
    out = []
    for c in runs.columns:
        if c.startswith("config.") and not c.startswith(IGNORED):
            if runs[c].dropna().map(repr).nunique() > 1:  # a key added to the schema later is NaN in older runs
                out.append(c[len("config.") :])
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
    return pd.DataFrame(
        {"k": last["item"].to_numpy() + 1, "power": last["power"].to_numpy(), "key": last["key"].to_numpy() > 0.5}
    )


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


def run_record(
    run: pd.Series,
    hist: pd.DataFrame,
    keys: list[str],
    threshold: float,
    max_delay: int,
    curves: pd.DataFrame | None = None,
) -> dict:
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
    rec = {"id": run["id"], "name": run["name"], "state": run["state"], "seed": _num(run.get("config.seed"))}
    rec.update({k: run.get(f"config.{k}") for k in keys if k != "seed"})
    rec.update(
        {
            "t_train": t_train,
            "t_val": t_val,
            "delay": None if t_train is None or t_val is None else t_val - t_train,
            "phase": classify(t_train, t_val, max_delay),
            "last_step": int(last["step"]),
            "final_train_acc": float(last["train/acc"]),
            "final_val_acc": float(last["val/acc"]),
            "final_weight_norm": _num(last.get("model/weight_norm")),
            "peak_weight_norm": _num(h["model/weight_norm"].max()) if "model/weight_norm" in h else None,
            "key_freqs": keys_final,
            "summary_agrees": not has_summary or summary_t == t_val,
        }
    )
    return rec


def analyse(
    runs: pd.DataFrame,
    hist: pd.DataFrame,
    threshold: float = 0.99,
    max_delay: int = 1000,
    curves: pd.DataFrame | None = None,
) -> dict:
    keys = varied_keys(runs)
    records, problems = [], []
    for _, run in runs.iterrows():
        h = hist[hist["run_id"] == run["id"]]
        if h.empty:
            problems.append(f"{run['id']} ({run['name']}, {run['state']}): no history")
            continue
        if run["state"] != "finished":
            problems.append(
                f"{run['id']} ({run['name']}): state {run['state']}, counted up to step {int(h['step'].max())}"
            )
        records.append(run_record(run, h, keys, threshold, max_delay, curves))
    records.sort(
        key=lambda r: [(0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in (r.get(k) for k in keys)]
    )
    return {
        "varied_keys": keys,
        "threshold": threshold,
        "max_delay": max_delay,
        "threshold_note": threshold_note(threshold, max_delay),
        "runs": records,
        "problems": problems,
        "phase_counts": dict(Counter(r["phase"] for r in records)),
    }


# ---------------------------------------------------------------- plots


def _label(rec: dict, keys: list[str]) -> str:
    """The configuration of a run without its seed ("all runs" when only the seed varies)."""
    return ", ".join(f"{k.split('.')[-1]}={rec.get(k)}" for k in keys if k != "seed") or "all runs"


def _run_label(rec: dict, keys: list[str]) -> str:
    """A run: its configuration and its seed ("seed 3" when only the seed varies)."""
    label = _label(rec, keys)
    return f"seed {rec.get('seed')}" if label == "all runs" else f"{label}, seed {rec.get('seed')}"


def _seed_key(r: dict):
    return (r.get("seed") is None, r.get("seed") if r.get("seed") is not None else 0)


def config_groups(records: list[dict], keys: list[str]) -> list[tuple[str, list[dict]]]:
    """Runs grouped by every varied key but the seed, in record order: [(label, runs by seed)]."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(repr(r.get(k)) for k in keys if k != "seed"), []).append(r)
    return [(_label(rs[0], keys), sorted(rs, key=_seed_key)) for rs in groups.values()]


def _run_hist(hist: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """One run's evaluations at steps > 0: step 0 has no place on a log axis."""
    h = hist[hist["run_id"] == run_id].dropna(subset=["val/acc"]).sort_values("step")
    return h[h["step"] > 0]


def plot_curves(result: dict, hist: pd.DataFrame, path: str, max_panels: int = 12):
    """One panel per configuration; in it one train (dashed) and one validation (solid) line per seed,
    coloured by seed, the threshold and each seed's t_val marked. Seeds are never averaged here: a mean
    of curves that jump at different steps is a smooth curve no seed followed."""
    from matplotlib.lines import Line2D

    from analysis.study import legend_outside, suptitle

    groups = config_groups(result["runs"], result["varied_keys"])
    shown, th = groups[:max_panels], result["threshold"]
    ncols = max(1, min(len(shown), 3))
    nrows = max(1, math.ceil(len(shown) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 1.8, 2.8 * nrows + 0.6), squeeze=False, sharey=True)
    seeds = sorted({r.get("seed") for _, rs in shown for r in rs}, key=lambda s: (s is None, s or 0))
    colour = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    for ax, (label, rs) in zip(axes.flat, shown):
        for r in rs:
            h, c = _run_hist(hist, r["id"]), colour[r.get("seed")]
            ax.plot(h["step"], h["train/acc"], color=c, ls="--", lw=1)
            ax.plot(h["step"], h["val/acc"], color=c, lw=1.5)
            if r["t_val"] is not None:
                ax.plot([r["t_val"]], [th], marker="o", ms=6, mfc="none", color=c, ls="")
        ax.axhline(th, color="0.5", lw=0.8, ls=":")
        log_axis(ax, "x", label="optimizer step")
        ax.set_title(f"{label} (n={len(rs)} seed{'s' if len(rs) > 1 else ''})", fontsize=8)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    handles = [Line2D([], [], color=colour[s], label=f"seed {s}") for s in seeds] + [
        Line2D([], [], color="k", ls="--", lw=1, label="train"),
        Line2D([], [], color="k", lw=1.5, label="validation"),
        Line2D([], [], color="0.5", ls=":", label=f"threshold {th:g}"),
        Line2D([], [], color="k", marker="o", mfc="none", ls="", label=f"t_val (val acc >= {th:g})"),
    ]
    legend_outside(axes[0][ncols - 1], handles=handles)
    title = threshold_note(th, result["max_delay"])
    if len(groups) > len(shown):
        title += f"\n{len(shown)} of {len(groups)} configurations shown; all in grokking.json"
    suptitle(fig, title)
    save(fig, path, dpi=110)  # PNG + SVG
    return fig


def plot_progress(result: dict, hist: pd.DataFrame, path: str, max_groups: int = 10):
    """Weight norm and Nanda et al.'s progress measures: one line per run (seed), coloured by
    configuration, the legend naming each configuration with its number of seeds."""
    from matplotlib.lines import Line2D

    from analysis.study import legend_outside

    groups = config_groups(result["runs"], result["varied_keys"])[:max_groups]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = ["model/weight_norm", "val/restricted_loss", "train/excluded_loss"]
    for i, (_label, rs) in enumerate(groups):
        for r in rs:
            h = _run_hist(hist, r["id"])
            for ax, key in zip(axes, keys):
                if key in h:
                    ax.plot(h["step"], h[key], color=f"C{i % 10}", lw=1, alpha=0.8)
    for ax, title, ylabel in zip(
        axes,
        ["total L2 weight norm", "restricted loss (val, key freqs only)", "excluded loss (train, key freqs removed)"],
        ["L2 norm of all parameters", "cross-entropy (nats)", "cross-entropy (nats)"],
    ):
        ax.set(ylabel=ylabel, title=title)
        log_axis(ax, "x", label="optimizer step")
    for ax in axes[1:]:
        log_axis(ax, "y")
    handles = [
        Line2D([], [], color=f"C{i % 10}", label=f"{label} (n={len(rs)} seed{'s' if len(rs) > 1 else ''})")
        for i, (label, rs) in enumerate(groups)
    ]
    legend_outside(axes[-1], handles=handles, title="one line per seed")
    save(fig, path, dpi=110)  # PNG + SVG
    return fig


def plot_spectrum(result: dict, curves: pd.DataFrame, path: str, max_runs: int = 12):
    from analysis.study import legend_outside

    fig, ax = plt.subplots(figsize=(10, 4))
    runs = result["runs"][:max_runs]
    for i, r in enumerate(runs):
        spec = final_spectrum(curves, r["id"])
        if len(spec):
            ax.plot(
                spec["k"],
                spec["power"],
                marker="o",
                ms=2,
                lw=1,
                color=f"C{i % 10}",
                label=f"{_run_label(r, result['varied_keys'])}: keys {r['key_freqs']}",
            )
    title = "final embedding Fourier power (one line per run)"
    if len(result["runs"]) > len(runs):
        title += f"; {len(runs)} of {len(result['runs'])} runs shown"
    ax.set(xlabel="frequency k", ylabel="share of embedding power", title=title)
    if ax.get_legend_handles_labels()[0]:
        legend_outside(ax)
    save(fig, path, dpi=110)  # PNG + SVG
    return fig


def plot_phase(result: dict, path: str, x: str = "data.train_fraction", y: str = "optim.weight_decay"):
    """Liu et al.'s phase diagram on a categorical grid: one square per run (seeds side by side),
    one panel per learning rate when the runs vary it. Returns the figure, or None without the keys."""
    recs = [r for r in result["runs"] if r.get(x) is not None and r.get(y) is not None]
    if not recs:
        return None
    panels = sorted({r.get("optim.lr") for r in recs}, key=lambda v: (v is None, v))
    xs, ys = sorted({r[x] for r in recs}), sorted({r[y] for r in recs})
    fig, axes = plt.subplots(
        1, len(panels), figsize=(2.6 + 0.9 * len(xs) * len(panels), 1.9 + 0.5 * len(ys)), squeeze=False
    )
    for ax, lr in zip(axes[0], panels):
        cells: dict[tuple, list] = {}
        for r in sorted(recs, key=_seed_key):
            if r.get("optim.lr") == lr:
                cells.setdefault((xs.index(r[x]), ys.index(r[y])), []).append(r["phase"])
        for (i, j), phases in cells.items():
            offsets = np.linspace(-0.25, 0.25, len(phases)) if len(phases) > 1 else [0.0]
            for dx, phase in zip(offsets, phases):
                ax.scatter(i + dx, j, marker="s", s=60, color=PHASE_COLOURS[phase])
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        ax.set_yticks(range(len(ys)), [str(v) for v in ys])
        ax.set(
            xlabel=x,
            ylabel=y,
            xlim=(-0.6, len(xs) - 0.4),
            ylim=(-0.6, len(ys) - 0.4),
            title=f"lr={lr}" if lr is not None else "",
        )
    handles = [matplotlib.patches.Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()]
    axes[0][-1].legend(
        handles=handles,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1),
        title="one square per seed",
        title_fontsize=7,
    )
    from analysis.study import suptitle

    suptitle(
        fig,
        f"phases at {threshold_note(result.get('threshold', POWER_THRESHOLD), result.get('max_delay', 1000))}",
        fontsize=7,
    )
    save(fig, path, dpi=110)  # PNG + SVG
    return fig


# ---------------------------------------------------------------- report


def report(result: dict) -> str:
    keys = [k for k in result["varied_keys"] if k != "seed"]
    th = result["threshold"]
    lines = [
        f"# Grokking of modular arithmetic ({len(result['runs'])} runs)",
        "",
        f"Threshold: {result['threshold_note']}. t_train / t_val: first evaluated step with train / "
        f"validation accuracy >= {th:g} (`--threshold 0.9` gives Liu et al.'s phases). "
        f"Phases: {result['phase_counts']}.",
        "",
    ]
    head = keys + [
        "seed",
        f"t_train (acc >= {th:g})",
        f"t_val (acc >= {th:g})",
        "delay",
        "phase",
        "final val acc",
        "weight norm (peak -> final)",
        "key freqs",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        norm = f"{r['peak_weight_norm'] or 0:.1f} -> {r['final_weight_norm'] or 0:.1f}"
        never = f"never (censored at {r['last_step']})"
        cells = [str(r.get(k)) for k in keys] + [
            str(r.get("seed")),
            never if r["t_train"] is None else str(r["t_train"]),
            never if r["t_val"] is None else str(r["t_val"]),
            "-" if r["delay"] is None else str(r["delay"]),
            r["phase"],
            f"{r['final_val_acc']:.3f}",
            norm,
            str(r["key_freqs"]),
        ]
        lines.append(md_row(cells))
    failed = [r for r in result["runs"] if r["phase"] not in ("grokking", "comprehension")]
    lines += [
        "",
        f"Runs that did not generalise (val acc < {th:g} at every evaluation): "
        + (", ".join(_run_label(r, keys) for r in failed) or "none")
        + ".",
    ]
    if result["problems"]:
        lines += ["", "Problems:"] + [f"- {p}" for p in result["problems"]]
    lines += [
        "",
        "Plots: curves.png (one panel per configuration, one line per seed), progress.png, spectrum.png, "
        "phase.png (when the runs vary weight decay and train fraction; one square per seed).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from harness import runstore
    from harness.errors import UserError

    args = parse_args(
        STUDY,
        argv,
        extra=lambda p: (
            p.add_argument(
                "--threshold",
                type=float,
                default=POWER_THRESHOLD,
                help=f"accuracy that counts as reached: {POWER_THRESHOLD} = Power et al.'s t_99 (default), "
                f"{LIU_THRESHOLD} = Liu et al.'s phase diagrams",
            ),
            p.add_argument(
                "--max-delay",
                type=int,
                default=LIU_MAX_DELAY,
                help="steps from t_train to t_val still counted as comprehension (Liu et al.: 1000)",
            ),
        ),
    )
    if not 0 < args.threshold <= 1 or args.max_delay < 0:
        raise UserError(
            f"--threshold {args.threshold}, --max-delay {args.max_delay}: need 0 < threshold <= 1 "
            f"(Power et al. {POWER_THRESHOLD}, Liu et al. {LIU_THRESHOLD}) and max-delay >= 0"
        )
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
    print(f"grokking: {len(result['runs'])} runs, {result['threshold_note']}; phases {result['phase_counts']}")


def applies(runs: pd.DataFrame) -> bool:
    from analysis.study import has_task

    return has_task(runs, "modular_addition")


def run(source: str, sweep: str | None, out: str) -> Section:
    """The analysis.report hook (analysis/study.py): this module's CLI, then its outputs as a Section."""
    from analysis.study import Section, add_run_emergence, numbers, run_cli

    result, md, plots = run_cli(main, STUDY, source, sweep, out)
    recs = pd.DataFrame(result["runs"])
    summary = {f"phase/{k}": v for k, v in result["phase_counts"].items()}
    summary.update(numbers({"n_runs": len(recs), "threshold": result["threshold"], "max_delay": result["max_delay"]}))
    tables = {"runs": recs.astype({c: str for c in recs.columns if recs[c].map(type).eq(list).any()})}
    ids = list(recs["id"]) if len(recs) else []
    seeds = {r["id"]: r.get("seed") for r in result["runs"]}
    md = add_run_emergence(source, ids, result["threshold"], md, tables, summary, seeds)
    return Section(STUDY, "Grokking of modular arithmetic", md, out, plots, tables, summary, ids)


if __name__ == "__main__":
    main_guard(main)
