"""Token-level scaling of language models (Michaud et al. 2023) from `pythia_eval` runs.

    python -m analysis.pythia SOURCE [--sweep ID] --out DIR [--mono-high 5 --mono-low 0.3 ...]

Pulls every run's `per_token_losses` artifact, merges a model's shards, aligns tokens across models
by (doc, pos), and along two axes (model size at one revision; one model over its `stepN`
revisions): fits mean loss against non-embedding parameters, classifies each token's loss curve as
monogenic or polygenic, and finds the scale at which each token is learned. Writes DIR/pythia.json,
DIR/scaling.png, DIR/tokens.png, DIR/checkpoints.png and DIR/report.md.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import tokens as tk  # noqa: E402
from analysis.common import main_guard, parse_args, write_outputs  # noqa: E402
from analysis.plots import log_axis, save  # noqa: E402
from analysis.study import legend_outside  # noqa: E402
from harness.config.resources import data_root  # noqa: E402
from harness.errors import UserError  # noqa: E402

if TYPE_CHECKING:
    from analysis.study import Section

STUDY = "pythia"
ARTIFACT = "per_token_losses"
REFERENCE_ALPHA_N = 0.083  # Michaud et al., Pythia 19m .. 6.4b (v0), step143000


def _options(p):
    t = tk.Thresholds()
    p.add_argument(
        "--mono-high", type=float, default=t.mono_high, help="monogenic: loss above this before the drop (nats)"
    )
    p.add_argument(
        "--mono-low", type=float, default=t.mono_low, help="monogenic: loss below this from the drop on (nats)"
    )
    p.add_argument("--poly-slope", type=float, default=t.poly_slope, help="polygenic: slope of loss vs ln N below this")
    p.add_argument("--poly-r2", type=float, default=t.poly_r2, help="polygenic: R^2 of that line above this")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for decoding (default: the runs' own)")
    p.add_argument("--examples", type=int, default=8, help="example tokens per class")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the fit's interval")


# -- runs -> models ------------------------------------------------------------------------------


def _col(runs: pd.DataFrame, key: str) -> pd.Series:
    return runs[key] if key in runs else pd.Series([None] * len(runs), index=runs.index)


def select_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Finished pythia_eval runs grouped into models (name, revision); the rest listed as excluded."""
    runs = runs[_col(runs, "config.task") == "pythia_eval"]
    if runs.empty:
        raise UserError("no pythia_eval runs in this source (or sweep)")
    excluded = [
        {"id": r.id, "name": r.name, "state": r.state, "reason": f"run {r.state}"}
        for r in runs.itertuples()
        if r.state != "finished"
    ]
    bad = {(r["config.model.name"], r["config.model.revision"]) for _, r in runs.iterrows() if r["state"] != "finished"}
    keep = runs[[(n, v) not in bad for n, v in zip(runs["config.model.name"], runs["config.model.revision"])]]
    for _, r in runs[(runs["state"] == "finished") & ~runs.index.isin(keep.index)].iterrows():
        excluded.append(
            {"id": r["id"], "name": r["name"], "state": r["state"], "reason": "another shard of this model failed"}
        )
    return keep, excluded


def _files(source: str, run: pd.Series) -> list[str]:
    from harness import runstore

    files = runstore.artifact_files(source, run["id"], ARTIFACT)
    out = []
    for name, local in sorted(files.items()):
        # Offline, the artifact's staged copy disappears once synced; the run directory keeps the original.
        beside = os.path.join(str(run.get("path") or ""), ARTIFACT, name)
        out.append(local if os.path.exists(local) else beside)
    missing = [p for p in out if not os.path.exists(p)]
    if not out or missing:
        raise UserError(f"run {run['id']}: per-token artifact files missing ({', '.join(missing) or 'none logged'})")
    return out


def models(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, revision): run ids, non-embedding params, step, mean loss, token count."""
    rows = []
    for (name, rev), g in runs.groupby(["config.model.name", "config.model.revision"], sort=False):
        shards = set(g["config.data.num_shards"].astype(int)) if "config.data.num_shards" in g else {1}
        indices = set(g["config.data.shard_index"].astype(int)) if "config.data.shard_index" in g else {0}
        step = re.fullmatch(r"step(\d+)", str(rev))
        tokens = g["summary.eval/tokens"].astype(float)
        rows.append(
            {
                "model": name,
                "revision": rev,
                "runs": list(g["id"]),
                "params_nonembedding": float(g["summary.model/params_nonembedding"].iloc[0]),
                "params": float(g["summary.model/params"].iloc[0]),
                "step": int(step.group(1)) if step else None,
                "mean_loss_summary": float((g["summary.eval/mean_loss"].astype(float) * tokens).sum() / tokens.sum()),
                "tokens": int(tokens.sum()),
                "complete_shards": len(shards) == 1 and indices == set(range(shards.pop())),
            }
        )
    return pd.DataFrame(rows)


def axes(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """size: the revision with the most distinct models, ordered by N; checkpoints: the model with
    the most stepN revisions, ordered by step. Each needs >= 2 points."""
    out = {}
    by_rev = table.groupby("revision")["model"].nunique()
    if len(by_rev) and by_rev.max() >= 2:
        sizes = table[table["revision"] == by_rev.idxmax()].drop_duplicates("model")
        out["size"] = sizes.sort_values("params_nonembedding").reset_index(drop=True)
    steps = table.dropna(subset=["step"])
    by_model = steps.groupby("model")["revision"].nunique()
    if len(by_model) and by_model.max() >= 2:
        ckpt = steps[steps["model"] == by_model.idxmax()]
        out["checkpoints"] = ckpt.sort_values("step").reset_index(drop=True)
    return out


# -- fits ----------------------------------------------------------------------------------------


def fit_mean_loss(n: np.ndarray, loss: np.ndarray, bootstrap: int) -> dict:
    """L(N) = E + A N^-alpha (Chinchilla approach 3, analysis.fits), and the plain log-log slope."""
    from analysis.fits import fit_power_law

    slope = float(np.polyfit(np.log(n), np.log(loss), 1)[0])
    out = {"loglog_slope": slope, "alpha_pure_power_law": -slope, "fit": None}
    if len(n) < 3:
        out["fit_note"] = f"{len(n)} models: E + A N^-alpha needs >= 3"
        return out
    f = fit_power_law(n, loss, n_bootstrap=bootstrap)
    out["fit"] = {
        "E": f.E,
        "A": f.A[0],
        "alpha": f.alpha[0],
        "n": f.n,
        "E_ci": f.E_ci,
        "A_ci": f.A_ci[0] if f.A_ci else None,
        "alpha_ci": f.alpha_ci[0] if f.alpha_ci else None,
    }
    return out


# -- one axis ------------------------------------------------------------------------------------


def analyse_axis(
    source: str, runs: pd.DataFrame, points: pd.DataFrame, scale_col: str, t: tk.Thresholds, decode, n_examples: int
) -> dict:
    """Align the points' per-token losses and classify every token (runs: indexed by run id)."""
    frames = []
    for _, p in points.iterrows():
        files = [f for rid in p["runs"] for f in _files(source, runs.loc[rid])]
        frames.append(tk.read_losses(files))
    index, losses = tk.align(frames)
    if not len(index):
        raise UserError("the models share no (doc, pos) tokens: were they evaluated on the same documents?")
    scale = points[scale_col].to_numpy(dtype=float)
    usable = scale > 0  # step 0 (initialisation) has no ln(step)
    cls = tk.classify(losses[:, usable], scale[usable], t)
    mean = losses.mean(0)
    res = {
        "points": [
            {
                **{k: _plain(v) for k, v in row.items() if k != "runs"},
                "runs": row["runs"],
                "mean_loss_aligned": float(m),
            }
            for row, m in zip(points.to_dict("records"), mean)
        ],
        "n_tokens": int(len(index)),
        "n_docs": int(index["doc"].nunique()),
        "class_fractions": tk.fractions(cls["class"]),
        "class_counts": {c: int((cls["class"] == c).sum()) for c in tk.CLASSES},
        "drop_histogram": tk.emergence_histogram(cls["drop"].to_numpy(), scale[usable]),
        "learned_histogram": tk.emergence_histogram(cls["learned"].to_numpy(), scale[usable]),
        "examples": examples(index, losses[:, usable], cls, decode, n_examples),
    }
    return res | {"_losses": losses, "_cls": cls, "_scale": scale, "_usable": usable}


def examples(index: pd.DataFrame, losses: np.ndarray, cls: pd.DataFrame, decode, n: int) -> dict:
    out = {}
    mono = np.flatnonzero(cls["class"].to_numpy() == "monogenic")
    # Sharpest drops first: largest loss fall across the drop.
    fall = np.array([losses[i, cls["drop"].iat[i] - 1] - losses[i, cls["drop"].iat[i]] for i in mono])
    picks = {
        "monogenic": mono[np.argsort(-fall)][:n] if len(mono) else mono,
        "polygenic": np.flatnonzero(cls["class"].to_numpy() == "polygenic"),
    }
    picks["polygenic"] = picks["polygenic"][np.argsort(cls["slope"].to_numpy()[picks["polygenic"]])][:n]
    for name, rows in picks.items():
        out[name] = [
            {
                **tk.context(index, int(i), decode),
                "losses": [round(float(x), 4) for x in losses[i]],
                "drop": int(cls["drop"].iat[i]),
                "slope": float(cls["slope"].iat[i]),
                "r2": float(cls["r2"].iat[i]),
            }
            for i in rows
        ]
    return out


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def decoder(runs: pd.DataFrame, path: str | None):
    """ids -> text with the runs' tokenizer (a tokenizer.json under the data directory), or ids shown."""
    import tokenizers

    if path is None and "config.model.tokenizer" in runs:
        names = [t for t in runs["config.model.tokenizer"].dropna().unique() if t]
        root = data_root() or ""
        for name in names:
            for cand in (name, os.path.join(root, name)):
                if os.path.isfile(cand):
                    path = cand
                    break
    if path is None:
        return lambda ids: " ".join(f"<{i}>" for i in ids)
    tok = tokenizers.Tokenizer.from_file(path)
    return lambda ids: tok.decode(list(ids), skip_special_tokens=False)


# -- plots and report ----------------------------------------------------------------------------

COLORS = {"monogenic": "tab:red", "polygenic": "tab:blue", "other": "0.75"}


def plot_curves(ax, res: dict, xlabel: str, max_per_class: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = res["_scale"][res["_usable"]]
    losses, cls = res["_losses"][:, res["_usable"]], res["_cls"]["class"].to_numpy()
    for c in ("other", "polygenic", "monogenic"):
        rows = np.flatnonzero(cls == c)
        for i in rng.choice(rows, min(len(rows), max_per_class), replace=False) if len(rows) else []:
            ax.plot(x, losses[i], color=COLORS[c], alpha=0.5 if c != "other" else 0.3, lw=0.8)
        ax.plot([], [], color=COLORS[c], label=f"{c} ({res['class_fractions'][c]:.1%} of tokens)")
    log_axis(ax, "x", label=xlabel)
    ax.set_ylabel("per-token loss (nats)")
    ax.set_title(f"one line per token (at most {max_per_class} per class, drawn at random)", fontsize=8)
    legend_outside(ax)


def plot_size(res: dict, fit: dict, out: str) -> None:
    pts = pd.DataFrame(res["points"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    a.plot(pts["params_nonembedding"], pts["mean_loss_aligned"], "o", label=f"mean per-token loss ({len(pts)} models)")
    # The fitted curves span the fitted models only: nothing drawn beyond the data.
    n = np.geomspace(pts["params_nonembedding"].min(), pts["params_nonembedding"].max(), 50)
    f = fit.get("fit") or {}
    if all(k in f for k in ("E", "A", "alpha")):
        a.plot(n, f["E"] + f["A"] * n ** -f["alpha"], "-", label=f"fit E + A N^-alpha, alpha={f['alpha']:.3f}")
    slope = fit.get("loglog_slope")
    if slope is not None:
        anchor = np.exp(np.mean(np.log(pts["mean_loss_aligned"])) - slope * np.mean(np.log(pts["params_nonembedding"])))
        a.plot(n, anchor * n**slope, ":", color="0.4", label=f"plain log-log fit, alpha={-slope:.3g}")
    log_axis(a, "x", label="non-embedding parameters N")
    a.set_ylabel("mean loss (nats)")
    a.set_title(f"these models; reference (Pythia, Michaud et al.): alpha_N ~ {REFERENCE_ALPHA_N}", fontsize=8)
    legend_outside(a)
    plot_curves(b, res, "non-embedding parameters N")
    fig.tight_layout()
    save(fig, os.path.join(out, "scaling.png"), dpi=120)  # PNG + SVG
    return fig


def plot_checkpoints(res: dict, out: str) -> None:
    pts = pd.DataFrame(res["points"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    later = pts[pts["step"] > 0]
    a.plot(later["step"], later["mean_loss_aligned"], "o-", label="mean per-token loss (one model)")
    for _, p in pts[pts["step"] <= 0].iterrows():  # step 0 has no place on a log axis: a level, labelled
        a.axhline(
            p["mean_loss_aligned"],
            color="0.5",
            ls="--",
            lw=0.8,
            label=f"step 0 (initialisation): {p['mean_loss_aligned']:.2f}",
        )
    log_axis(a, "x", label="training step")
    a.set_ylabel("mean loss (nats)")
    legend_outside(a)
    plot_curves(b, res, "training step")
    fig.tight_layout()
    save(fig, os.path.join(out, "checkpoints.png"), dpi=120)  # PNG + SVG
    return fig


def _examples_md(ex: dict) -> list[str]:
    lines = []
    for c, items in ex.items():
        if not items:
            lines.append(f"No {c} tokens at these thresholds.\n")
            continue
        lines += [
            f"**{c}** (context, then the [token]; losses from the smallest model / earliest step):\n",
            "| doc:pos | context [token] | losses (nats) |",
            "|---|---|---|",
        ]
        for e in items:
            text = (e["context"][-80:] + f"[{e['token']}]").replace("|", "\\|").replace("\n", "⏎")
            lines.append(f"| {e['doc']}:{e['pos']} | `{text}` | {', '.join(f'{x:.2f}' for x in e['losses'])} |")
        lines.append("")
    return lines


def report(result: dict) -> str:
    t = result["thresholds"]
    lines = [
        f"# Token-level scaling ({result['source']}"
        + (f", sweep {result['sweep']}" if result["sweep"] else "")
        + ")\n",
        f"Thresholds: monogenic = loss > {t['mono_high']} nats for every smaller model and < {t['mono_low']} "
        f"from the drop on; polygenic = slope of loss vs ln N < {t['poly_slope']} with R^2 > {t['poly_r2']}.\n",
    ]
    if result["excluded"]:
        lines.append("Excluded runs: " + ", ".join(f"{e['id']} ({e['reason']})" for e in result["excluded"]) + "\n")
    for axis, title in (("size", "Model size"), ("checkpoints", "Training checkpoints")):
        res = result.get(axis)
        if not res:
            lines.append(
                f"## {title}\n\nNo {axis} axis in these runs (needs >= 2 models at one revision, or "
                "one model at >= 2 stepN revisions).\n"
            )
            continue
        lines += [
            f"## {title}\n",
            f"{res['n_tokens']} tokens in {res['n_docs']} documents, aligned across "
            f"{len(res['points'])} {'models' if axis == 'size' else 'checkpoints'}.\n",
            "| model | revision | non-emb. params | mean loss (aligned) | tokens (summary) |",
            "|---|---|---|---|---|",
        ]
        for p in res["points"]:
            lines.append(
                f"| {os.path.basename(str(p['model']).rstrip('/'))} | {p['revision']} | {p['params_nonembedding']:.4g} "
                f"| {p['mean_loss_aligned']:.4f} | {p['tokens']} |"
            )
        lines.append("")
        if axis == "size":
            f = res["fit"]
            lines.append(f"Pure power law (log-log slope): alpha_N = {f['alpha_pure_power_law']:.4f}.")
            if f.get("fit"):
                ff = f["fit"]
                ci = lambda v: f" [{v[0]:.4g}, {v[1]:.4g}]" if v else ""  # noqa: E731
                lines.append(
                    f"Fit L = E + A N^-alpha ({ff['n']} models, 95% bootstrap intervals): "
                    f"alpha_N = {ff['alpha']:.4f}{ci(ff['alpha_ci'])}, E = {ff['E']:.4f}{ci(ff['E_ci'])}, "
                    f"A = {ff['A']:.4g}{ci(ff['A_ci'])}."
                )
            else:
                lines.append(f["fit_note"] + ".")
            lines.append(f"Reference (Pythia, Michaud et al.): alpha_N ~ {REFERENCE_ALPHA_N}. Plot: scaling.png.\n")
        else:
            lines.append("Plot: checkpoints.png.\n")
        fr, cn = res["class_fractions"], res["class_counts"]
        lines += (
            ["| class | tokens | fraction |", "|---|---|---|"]
            + [f"| {c} | {cn[c]} | {fr[c]:.4f} |" for c in tk.CLASSES]
            + [""]
        )
        hist = ", ".join(f"{h['scale']:.4g}: {h['count']}" for h in res["drop_histogram"] if h["scale"] is not None)
        learned = ", ".join(
            f"{h['scale']:.4g}: {h['count']}" for h in res["learned_histogram"] if h["scale"] is not None
        )
        lines += [
            f"Monogenic drops at each scale: {hist or 'none'}.",
            f"Tokens learned (loss < {t['mono_low']} from this scale on) at each scale: {learned}; never: "
            f"{res['learned_histogram'][-1]['count']}.\n",
        ]
        lines += _examples_md(res["examples"])
    return "\n".join(lines) + "\n"


def analyse(
    source: str,
    sweep: str | None,
    t: tk.Thresholds,
    tokenizer: str | None,
    n_examples: int,
    bootstrap: int,
    out_dir: str,
) -> dict:
    from harness import runstore

    try:
        runs, excluded = select_runs(runstore.load_runs(source, sweep=sweep))
    except runstore.SourceError as e:  # a bad SOURCE is bad input: one line, exit 2
        raise UserError(str(e)) from None
    by_id = runs.set_index("id", drop=False)
    table = models(runs)
    found = axes(table)
    if not found:
        raise UserError(
            f"{len(table)} model(s) found: need >= 2 models at one revision or one model at >= 2 stepN revisions"
        )
    decode = decoder(runs, tokenizer)
    result = {
        "source": source,
        "sweep": sweep,
        "thresholds": t.__dict__,
        "excluded": excluded,
        "models": table.to_dict("records"),
        "reference_alpha_N": REFERENCE_ALPHA_N,
    }
    os.makedirs(out_dir, exist_ok=True)
    if "size" in found:
        res = analyse_axis(source, by_id, found["size"], "params_nonembedding", t, decode, n_examples)
        pts = pd.DataFrame(res["points"])
        res["fit"] = fit_mean_loss(
            pts["params_nonembedding"].to_numpy(float), pts["mean_loss_aligned"].to_numpy(float), bootstrap
        )
        plot_size(res, res["fit"], out_dir)
        result["size"] = res
    if "checkpoints" in found:
        res = analyse_axis(source, by_id, found["checkpoints"], "step", t, decode, n_examples)
        plot_checkpoints(res, out_dir)
        result["checkpoints"] = res
    for axis in ("size", "checkpoints"):
        if axis in result:
            result[axis] = {k: v for k, v in result[axis].items() if not k.startswith("_")}
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(STUDY, argv, _options)
    t = tk.Thresholds(args.mono_high, args.mono_low, args.poly_slope, args.poly_r2)
    result = analyse(args.source, args.sweep, t, args.tokenizer, args.examples, args.bootstrap, args.out)
    write_outputs(args.out, STUDY, result, report(result))


def applies(runs: pd.DataFrame) -> bool:
    from analysis.study import has_task

    return has_task(runs, "pythia_eval")


def run(source: str, sweep: str | None, out: str) -> Section:
    """The analysis.report hook (analysis/study.py): this module's CLI, then its outputs as a Section."""
    from analysis.study import Section, numbers, run_cli

    result, md, plots = run_cli(main, STUDY, source, sweep, out)
    tables, summary = {}, {}
    for axis in ("size", "checkpoints"):
        if result.get(axis):
            tables[f"{axis}_points"] = pd.DataFrame(result[axis]["points"])
            summary.update(
                numbers(
                    {
                        axis: {
                            "class_fractions": result[axis]["class_fractions"],
                            "fit": (result[axis].get("fit") or {}).get("fit") or {},
                        }
                    }
                )
            )
    ids = [i for m in result["models"] for i in m["runs"]]
    return Section(STUDY, "Token-level scaling (Pythia)", md, out, plots, tables, summary, ids)


if __name__ == "__main__":
    main_guard(main)
