"""Quanta discovered from gradients (Michaud et al. 2023, section 5) from `quanta_discovery` runs.

    python -m analysis.quanta SOURCE [--sweep ID] --out DIR [--examples 6 --clusters 8]

For each finished run: the rank-frequency curve of cluster sizes at every cluster count, their
envelope and its log-log fit beside the paper's reference slope -1.083 (DIR/rank_frequency_<run>.png);
for language models the largest clusters with example contexts, the predicted token highlighted;
for planted quanta (sparse parity) the adjusted Rand index and purity against the true subtasks and
a confusion table of clusters x subtasks. Writes DIR/quanta.json, the plots and DIR/report.md.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.common import main_guard, parse_args, write_outputs  # noqa: E402
from analysis.study import Section, has_task, numbers, task_runs  # noqa: E402
from harness import quanta_stats as qs  # noqa: E402
from harness.errors import UserError  # noqa: E402

STUDY = "quanta"
TASK = "quanta_discovery"
ARTIFACT = "quanta"


def _options(p):
    p.add_argument("--examples", type=int, default=6, help="example contexts per cluster (LMs)")
    p.add_argument("--clusters", type=int, default=8, help="largest clusters shown (LMs) / rows of the confusion table")
    p.add_argument(
        "--count", type=int, default=0, help="cluster count for examples and tables (0: the one nearest 400)"
    )


def _files(source: str, run: pd.Series) -> dict[str, str]:
    from harness import runstore

    files = runstore.artifact_files(source, run["id"], ARTIFACT)
    out = {}
    for name, local in files.items():
        beside = os.path.join(str(run.get("path") or ""), ARTIFACT, name)  # offline staging copy may be gone
        out[name] = local if os.path.exists(local) else beside
    need = ("samples.parquet", "clusters.parquet", "result.json")
    missing = [n for n in need if n not in out or not os.path.exists(out[n])]
    if missing:
        raise UserError(f"run {run['id']}: quanta artifact files missing ({', '.join(missing)})")
    return out


def analyse_run(
    files: dict[str, str], run: pd.Series, count: int = 0, n_clusters_shown: int = 8, n_examples: int = 6
) -> dict:
    samples = pd.read_parquet(files["samples.parquet"])
    clusters = pd.read_parquet(files["clusters.parquet"])
    meta = json.load(open(files["result.json"]))
    fit_min = int(run.get("config.cluster.fit_rank_min", 101))
    fit_max = int(run.get("config.cluster.fit_rank_max", 1000))
    counts = sorted(clusters["n_clusters"].unique().tolist())
    labels = {k: clusters[clusters["n_clusters"] == k].sort_values("sample")["label"].to_numpy() for k in counts}
    per = {k: qs.sizes(v) for k, v in labels.items()}
    env = qs.envelope(list(per.values()))
    out = {
        "id": run["id"],
        "name": run.get("name"),
        "kind": meta.get("kind"),
        "signed": meta.get("signed"),
        "n_samples": int(len(samples)),
        "counts": counts,
        "per_count": {str(k): {"sizes": per[k].tolist()} for k in counts},
        "envelope": env.tolist(),
        "fit": qs.fit_slope(env, fit_min, fit_max),
        "reference_slope": qs.REFERENCE_SLOPE,
    }
    show = count if count in labels else min(counts, key=lambda k: abs(k - 400))
    out["shown_count"] = show
    if "subtask" in samples:
        true = samples["subtask"].to_numpy()
        for k in counts:
            out["per_count"][str(k)].update(qs.agreement(true, labels[k]))
        best = max(counts, key=lambda k: out["per_count"][str(k)]["ari"])
        out["best"] = {"n_clusters": best, **{m: out["per_count"][str(best)][m] for m in ("ari", "purity")}}
        out["n_subtasks"] = int(len(np.unique(true)))
        cl, subs, table = qs.confusion(true, labels[best])
        out["confusion"] = {
            "n_clusters": best,
            "clusters": cl.tolist(),
            "subtasks": subs.tolist(),
            "counts": table.tolist(),
        }
    if "context" in samples:
        lab = labels[show]
        top = []
        for c in [int(c) for c in pd.Series(lab).value_counts().index[:n_clusters_shown]]:
            rows = samples[lab == c].head(n_examples)
            top.append(
                {
                    "cluster": c,
                    "size": int((lab == c).sum()),
                    "examples": [
                        {"context": r.context, "target": r.target, "doc": int(r.doc), "pos": int(r.pos)}
                        for r in rows.itertuples()
                    ],
                }
            )
        out["top_clusters"] = top
    return out


def plot_run(r: dict, out: str) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    counts = r["counts"]
    colors = plt.cm.viridis(np.linspace(0, 1, max(len(counts), 2)))
    for c, k in zip(colors, counts):
        s = r["per_count"][str(k)]["sizes"]
        ax.plot(np.arange(1, len(s) + 1), s, color=c, lw=1, label=f"{k} clusters" if len(counts) <= 8 else None)
    env = np.array(r["envelope"], dtype=float)
    ranks = np.arange(1, len(env) + 1)
    ax.plot(ranks, env, color="pink", ls="--", lw=2, label="envelope")
    f = r["fit"]
    if np.isfinite(f["slope"]):
        x = np.arange(f["rank_min"], f["rank_max"] + 1)
        ax.plot(
            x,
            np.exp(f["intercept"]) * x ** f["slope"],
            color="red",
            label=f"fit ranks {f['rank_min']}-{f['rank_max']}: {f['slope']:.2f} [{f['slope_lo']:.2f}, {f['slope_hi']:.2f}]",
        )
    ax.plot(
        ranks, env[0] * ranks**qs.REFERENCE_SLOPE, color="black", ls=":", label=f"reference slope {qs.REFERENCE_SLOPE}"
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="cluster rank",
        ylabel="cluster size (samples)",
        title=f"rank-frequency, run {r['id']} ({r['n_samples']} samples)",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, f"rank_frequency_{r['id']}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _md_escape(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "\\|").replace("<", "&lt;").replace("`", "'")


def report(result: dict, source: str, sweep: str | None, plots: dict[str, str]) -> str:
    lines = [
        "# Quanta discovery from gradients\n",
        f"Source: `{source}`" + (f", sweep `{sweep}`" if sweep else "") + f"; {len(result['runs'])} runs. Reference "
        f"rank-frequency slope {qs.REFERENCE_SLOPE} (the paper's figure; its envelope fit gave about -1.24).\n",
    ]
    for r in result["runs"]:
        f = r["fit"]
        lines.append(
            f"## Run {r['id']} ({r['name']}): {r['kind']}, {r['n_samples']} samples, "
            f"{'signed' if r['signed'] else 'sign-invariant'} similarity\n"
        )
        lines.append(
            f"Cluster counts {r['counts']}. Envelope slope over ranks {f['rank_min']}-{f['rank_max']} "
            f"({f['n_ranks']} ranks): {f['slope']:.3f} [{f['slope_lo']:.3f}, {f['slope_hi']:.3f}]\n"
        )
        lines.append(f"![rank-frequency]({os.path.basename(plots[r['id']])})\n")
        if "best" in r:
            lines.append("| clusters | ARI | purity |\n|---|---|---|")
            lines += [
                f"| {k} | {r['per_count'][str(k)]['ari']:.3f} | {r['per_count'][str(k)]['purity']:.3f} |"
                for k in r["counts"]
            ]
            c = r["confusion"]
            lines.append(
                f"\nConfusion table at {c['n_clusters']} clusters (rows: clusters by size; columns: true subtasks):\n"
            )
            lines.append("| cluster | " + " | ".join(f"subtask {s}" for s in c["subtasks"]) + " |")
            lines.append("|---" * (len(c["subtasks"]) + 1) + "|")
            lines += [
                f"| {cl} | " + " | ".join(str(v) for v in row) + " |" for cl, row in zip(c["clusters"], c["counts"])
            ]
            lines.append("")
        for t in r.get("top_clusters", []):
            lines.append(f"### Cluster {t['cluster']} ({t['size']} tokens, {r['shown_count']} clusters)\n")
            for e in t["examples"]:
                lines.append(
                    f"- `…{_md_escape(e['context'][-160:])}`**{_md_escape(e['target'])}** (doc {e['doc']}, pos {e['pos']})"
                )
            lines.append("")
    if result["excluded"]:
        lines.append("## Runs not analysed\n")
        lines += [f"- {e['id']} ({e['name']}): {e['reason']}" for e in result["excluded"]]
    return "\n".join(lines) + "\n"


def analyse(
    source: str, sweep: str | None, out: str, count: int = 0, clusters: int = 8, examples: int = 6
) -> tuple[dict, dict, str]:
    from harness.runstore import load_runs

    runs = task_runs(load_runs(source, sweep=sweep), TASK)
    if runs.empty:
        raise UserError(f"no {TASK} runs in {source}" + (f" (sweep {sweep})" if sweep else ""))
    excluded = [
        {"id": r["id"], "name": r["name"], "reason": f"run {r['state']}"}
        for _, r in runs.iterrows()
        if r["state"] != "finished"
    ]
    done = runs[runs["state"] == "finished"]
    if done.empty:
        raise UserError(
            f"no finished {TASK} run in {source}: {', '.join(e['id'] + ' ' + e['reason'] for e in excluded)}"
        )
    os.makedirs(out, exist_ok=True)
    result = {"runs": [], "excluded": excluded, "reference_slope": qs.REFERENCE_SLOPE}
    plots = {}
    for _, run in done.iterrows():
        r = analyse_run(_files(source, run), run, count, clusters, examples)
        result["runs"].append(r)
        plots[r["id"]] = plot_run(r, out)
    best = [r["best"]["ari"] for r in result["runs"] if "best" in r]
    if best:
        result["max_ari"] = max(best)
    md = report(result, source, sweep, plots)
    write_outputs(out, STUDY, result, md)
    return result, plots, md


def applies(runs: pd.DataFrame) -> bool:
    return has_task(runs, TASK)


def run(source: str, sweep: str | None, out: str) -> Section:
    """The analysis.report hook (analysis/study.py)."""
    result, plots, md = analyse(source, sweep, out)
    fitted = {f"{r['id']}/slope": r["fit"]["slope"] for r in result["runs"]}
    fitted.update({f"{r['id']}/ari": r["best"]["ari"] for r in result["runs"] if "best" in r})
    return Section(
        STUDY,
        "Quanta discovery from gradients",
        md,
        out,
        list(plots.values()),
        {},
        numbers(fitted),
        [r["id"] for r in result["runs"]],
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(STUDY, argv, _options)
    analyse(args.source, args.sweep, args.out, args.count, args.clusters, args.examples)


if __name__ == "__main__":
    main_guard(main)
