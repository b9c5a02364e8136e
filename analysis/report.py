"""One report over every study that applies to the runs of SOURCE.

    python -m analysis.report SOURCE [--sweep ID] --out DIR [--log/--no-log] [--studies a,b]

Finds the runs (harness.runstore), asks each study in STUDIES whether it applies (its `applies(runs)`,
by the runs' config.task), runs those (`run(source, sweep, DIR/<study>)`, see analysis/study.py) and
writes DIR/report.md and a self-contained DIR/report.html (PNGs embedded, SVG twins linked). With
--log (the default when W&B is online), each study becomes a W&B run of job_type "analysis" whose
config lists the analysed run ids, holding the plots as images, the fit points as tables and the
fitted numbers in its summary; offline it is written into SOURCE's wandb directory.
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib
import os
import re
import sys
import time
import traceback
from collections import Counter

from analysis.study import Section
from harness.errors import UserError

# One line per study module. A module offers applies(runs) -> bool and run(source, sweep, out) -> Section.
STUDIES = (
    "analysis.scaling",
    "analysis.data_scaling",
    "analysis.alpha_study",
    "analysis.dynamics",
    "analysis.subtasks",
    "analysis.grokking",
    "analysis.omnigrok",
    "analysis.pythia",
    "analysis.quanta",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n")[0])
    p.add_argument("source", help="W&B path entity/project, or a local wandb directory")
    p.add_argument("--sweep", default=None, help="sweep id to select runs from")
    p.add_argument("--out", default="out/report", help="output directory")
    p.add_argument(
        "--log",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log each analysis as a W&B run of job_type analysis (default: on when W&B is online)",
    )
    p.add_argument("--studies", default=None, help="comma-separated study names to run (default: all that apply)")
    return p.parse_args(argv)


def study_name(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def select(names: str | None) -> list[str]:
    if names is None:
        return list(STUDIES)
    known = {study_name(m): m for m in STUDIES}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in wanted if n not in known]
    if bad:
        raise UserError(f"--studies {','.join(bad)}: unknown; known studies: {', '.join(known)}")
    return [known[n] for n in wanted]


# ---------------------------------------------------------------- markdown

IMG = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def rebase(md: str, prefix: str) -> str:
    """A study's report.md inside the combined one: headings one level down, relative links under
    the study's directory."""
    md = re.sub(r"^(#{1,5}) ", r"#\1 ", md, flags=re.M)
    return IMG.sub(
        lambda m: m.group(0) if re.match(r"^(\w+:|/)", m.group(2)) else f"![{m.group(1)}]({prefix}/{m.group(2)})", md
    )


def overview(sections: list[Section], out: str) -> str | None:
    """`out/overview.png`: the headline plot of every study (its first), tiled, so the report opens on
    the whole picture before the sections (PNG only: it tiles raster images, an SVG would add nothing;
    each study's own plots have their SVG twins). None when no study drew a plot."""
    heads = [(s.title, s.plots[0]) for s in sections if s.plots]
    if not heads:
        return None
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    cols = min(len(heads), 2)
    rows = (len(heads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, path) in zip(axes.flat, heads):
        ax.imshow(mpimg.imread(path))
        ax.set_title(title, fontsize=10)
    path = os.path.join(out, "overview.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def combine(
    sections: list[Section], problems: list[str], source: str, sweep: str | None, out: str, runs_by_task: dict
) -> str:
    lines = [
        "# Analysis report",
        "",
        f"Source `{source}`"
        + (f", sweep `{sweep}`" if sweep else "")
        + f"; written {time.strftime('%Y-%m-%d %H:%M')}.",
        "Runs by task: " + (", ".join(f"{t} {n}" for t, n in runs_by_task.items()) or "none") + ".",
        "",
    ]
    lines += [f"- [{s.title}](#{_anchor(s.title)})" for s in sections]
    if any(s.plots for s in sections):
        lines += ["", "![overview.png](overview.png)"]
    if problems:
        lines += ["", "Studies that did not run:"] + [f"- {p}" for p in problems]
    for s in sections:
        rel = os.path.relpath(s.out, out)
        body = rebase(s.markdown, rel)
        linked = {m[1] for m in IMG.findall(body)}
        extra = [p for p in s.plots if f"{rel}/{os.path.basename(p)}" not in linked]
        body = body.split("\n", 1)[1] if body.startswith("## ") else body  # the section's own title replaces it
        lines += ["", f"## {s.title}", "", body.strip("\n")]
        lines += [f"![{os.path.basename(p)}]({rel}/{os.path.basename(p)})" for p in extra]
    return "\n".join(lines) + "\n"


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).strip().replace(" ", "-")


# Run names, tags, config values and sweep names reach the markdown (the studies' lists, tables and
# headings), and a shared W&B project lets anyone choose them: the HTML is rendered by a real
# CommonMark parser with raw HTML off (everything is escaped), links only to http(s) or in-page
# anchors, images only from the PNGs this report wrote inside its output directory (embedded), and
# a Content-Security-Policy that allows no script and no request at all.
SAFE_LINK = re.compile(r"^(https?://|#)", re.I)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _written_png(src: str, out: str, allowed: set[str]) -> str | None:
    """The real path of image `src` if it is one of the PNGs the report wrote (`allowed`) inside `out`."""
    from urllib.parse import unquote

    src = unquote(src)
    if not src or SCHEME.match(src) or os.path.isabs(src) or src.startswith(("\\", "//")):
        return None
    root = os.path.realpath(out)
    path = os.path.realpath(os.path.join(root, src))
    if path not in allowed or not path.startswith(root + os.sep) or not path.lower().endswith(".png"):
        return None
    try:
        with open(path, "rb") as f:
            return path if f.read(8) == PNG_MAGIC else None
    except OSError:
        return None


def _parser(out: str, allowed: set[str]):
    from markdown_it import MarkdownIt
    from markdown_it.token import Token

    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def sanitize(state) -> None:
        """Drop links that are not http(s) or in-page (their text stays, as text) and images that
        are not the report's own PNGs (their alt text stays, as text)."""
        for block in state.tokens:
            if block.type != "inline" or not block.children:
                continue
            kept, skip_close = [], False
            for tok in block.children:
                if tok.type == "link_open" and not SAFE_LINK.match(tok.attrGet("href") or ""):
                    skip_close = True
                    continue
                if tok.type == "link_close" and skip_close:
                    skip_close = False
                    continue
                if tok.type == "image":
                    path = _written_png(tok.attrGet("src") or "", out, allowed)
                    if path is None:
                        text = Token("text", "", 0)
                        text.content = tok.content
                        kept.append(text)
                        continue
                    tok.meta["path"] = path
                kept.append(tok)
            block.children = kept

    md.core.ruler.push("sanitize", sanitize)

    def image(self, tokens, idx, options, env) -> str:
        tok = tokens[idx]
        alt = html.escape(tok.content, quote=True)
        with open(tok.meta["path"], "rb") as f:
            data = base64.b64encode(f.read()).decode()
        svg = tok.meta["path"][:-4] + ".svg"
        link = ""
        if os.path.isfile(svg):
            rel = os.path.relpath(svg, os.path.realpath(out)).replace(os.sep, "/")
            link = f' (<a href="{html.escape(rel, quote=True)}">SVG</a>)'
        return (
            f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{alt}{link}</figcaption></figure>'
        )

    def heading_open(self, tokens, idx, options, env) -> str:
        anchor = _anchor(tokens[idx + 1].content) if idx + 1 < len(tokens) else ""
        return f'<{tokens[idx].tag} id="{html.escape(anchor, quote=True)}">'

    md.add_render_rule("image", image)
    md.add_render_rule("heading_open", heading_open)
    return md


def to_html(md: str, out: str, title: str = "Analysis report", images: list[str] | None = None) -> str:
    """report.md as a self-contained page. `images`: the PNGs the report wrote (embedded where the
    markdown shows them); any other image is dropped (its alt text kept)."""
    allowed = {os.path.realpath(p) for p in images or []}
    body = _parser(out, allowed).render(md)
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{max-width:100%}figure{margin:1em 0}code{background:#f4f4f4}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n{body}</body></html>\n"
    )


# ---------------------------------------------------------------- W&B


def _wandb_root(source: str) -> str | None:
    """Where wandb.init(dir=...) puts the analysis run: beside the runs it read, when local."""
    from harness import runstore

    if runstore.is_local(source):
        root = os.path.abspath(runstore.wandb_dir(source))
        return os.path.dirname(root) if os.path.basename(root) == "wandb" else root
    return os.environ.get("WANDB_DIR")


def table_frame(df):
    """A DataFrame a wandb.Table accepts: nested cells (lists, dicts: per-subtask arrays in a study's
    points) as JSON text, since a Table column must hold one type in every row."""
    import json

    import numpy as np

    from analysis.common import to_jsonable

    out = df.reset_index(drop=True).copy()
    for c in out.columns:
        if out[c].dtype == object and out[c].map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray))).any():
            out[c] = out[c].map(lambda v: json.dumps(to_jsonable(v)) if v is not None else None)
    return out


def log_section(sec: Section, source: str, sweep: str | None, runs, mode: str) -> str:
    import wandb

    from harness import runstore

    chosen = runs[runs["id"].isin(sec.run_ids)] if len(runs) else runs
    projects = Counter(chosen["project"].dropna()) if "project" in chosen else Counter()
    remote = not runstore.is_local(source)
    project = source.split("/")[1] if remote else (projects.most_common(1)[0][0] if projects else "quanta-harness")
    root = _wandb_root(source)
    run = wandb.init(
        project=project,
        entity=source.split("/")[0] if remote else None,
        job_type="analysis",
        name=f"analysis-{sec.study}",
        group=sweep,
        mode=mode,
        dir=root,
        tags=["analysis", sec.study],
        config={
            "study": sec.study,
            "source": source,
            "sweep": sweep,
            "analysed_runs": list(sec.run_ids),
            "n_analysed_runs": len(sec.run_ids),
        },
        settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
        reinit="finish_previous",
    )
    if remote and mode == "online":
        # Lineage in the W&B graph: the analysed runs' artifacts (curves, models, per-token losses) as inputs.
        api = wandb.Api()
        for rid in sec.run_ids:
            for art in api.run(f"{source}/{rid}").logged_artifacts():
                run.use_artifact(art)
    payload = {f"{sec.study}/{os.path.splitext(os.path.basename(p))[0]}": wandb.Image(p) for p in sec.plots}
    big = {}
    for name, df in sec.tables.items():
        if len(df) <= wandb.Table.MAX_ROWS:
            payload[f"{sec.study}/{name}"] = wandb.Table(dataframe=table_frame(df))
        else:
            # run.log would truncate a wandb.Table to MAX_ROWS rows, and building one row by row took
            # minutes at 50,000 rows: larger tables go into the analysis artifact as parquet
            big[name] = df
    run.log(payload)
    if big:
        art = wandb.Artifact(
            f"analysis-{sec.study}-{run.id}", type="analysis", metadata={"tables": {k: len(v) for k, v in big.items()}}
        )
        for name, df in big.items():
            path = os.path.join(sec.out, f"{name}.table.parquet")
            df.to_parquet(path, index=False)
            art.add_file(path, name=f"{name}.parquet")
        run.log_artifact(art)
        run.summary.update({f"{sec.study}/{k}_rows": len(v) for k, v in big.items()})
    run.summary.update(sec.summary)
    run_id = run.id
    run.finish()
    return run_id


# ---------------------------------------------------------------- main


def build(source: str, sweep: str | None, out: str, log: bool | None = None, studies: str | None = None) -> dict:
    from harness import runstore
    from harness.wandb_mode import resolve_mode

    modules = select(studies)
    mode = resolve_mode()
    log = (mode == "online") if log is None else log
    t0 = time.time()
    runs = runstore.load_runs(source, sweep=sweep)
    print(f"report: {len(runs)} runs from {source} ({time.time() - t0:.1f} s)", file=sys.stderr)
    tasks = Counter(runs["config.task"].dropna()) if "config.task" in runs else Counter()
    os.makedirs(out, exist_ok=True)
    sections, problems, failed = [], [], []
    for name in modules:
        mod = importlib.import_module(name)
        if not mod.applies(runs):
            continue
        t, cpu = time.time(), time.process_time()
        try:
            sec = mod.run(source, sweep, os.path.join(out, study_name(name)))
        except UserError as e:
            problems.append(f"{study_name(name)}: {e}")
            print(f"report: {study_name(name)} skipped: {e}", file=sys.stderr)
            continue
        except Exception as e:  # one broken study must not hide the others; it is reported and fails the exit code
            failed.append(study_name(name))
            problems.append(f"{study_name(name)} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
            continue
        # CPU time beside wall time: on a shared machine the wall time measures the load as well
        print(
            f"report: {sec.study} done ({time.time() - t:.1f} s, CPU {time.process_time() - cpu:.1f} s)",
            file=sys.stderr,
        )
        sections.append(sec)
    if not sections and not problems:
        raise UserError(
            f"no study applies to the {len(runs)} runs in {source}"
            + (f" (sweep {sweep})" if sweep else "")
            + f"; tasks found: {dict(tasks) or 'none'}; "
            f"studies: {', '.join(study_name(m) for m in modules)}"
        )
    head = overview(sections, out)
    md = combine(sections, problems, source, sweep, out, dict(tasks))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(to_html(md, out, images=[p for s in sections for p in s.plots] + ([head] if head else [])))
    logged = {}
    if log and sections:
        import wandb

        try:
            for sec in sections:
                t = time.time()
                logged[sec.study] = log_section(sec, source, sweep, runs, "offline" if mode == "dryrun" else mode)
                print(
                    f"report: logged {sec.study} as analysis run {logged[sec.study]} ({time.time() - t:.1f} s)",
                    file=sys.stderr,
                )
        finally:
            # run.finish() returns before wandb-core has written the exit record; teardown waits for
            # it (as harness.training.train.train does), so the runs are complete when this returns
            wandb.teardown()
    print(
        f"report: wrote {out}/report.md and {out}/report.html ({len(sections)} studies, {time.time() - t0:.1f} s)",
        file=sys.stderr,
    )
    return {"sections": sections, "problems": problems, "failed": failed, "logged": logged}


def main(argv=None) -> int:
    args = parse_args(argv)
    res = build(args.source, args.sweep, args.out, args.log, args.studies)
    print(os.path.join(args.out, "report.md"))
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    from analysis.common import main_guard

    main_guard(lambda: sys.exit(main()))
