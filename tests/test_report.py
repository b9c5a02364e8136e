"""analysis.report: studies found by task, report.md + report.html, analysis runs read back from the
offline wandb directory through the run store."""

import importlib.util
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from analysis import report
from analysis.study import Section, task_runs
from harness import runstore
from harness.errors import UserError
from tests.conftest import REPO, harness, write_sweep

WIDTHS = [8, 16, 24, 32, 48]  # subtask k is learned iff k < 0.4 width: 3, 6, 9, 12, 19 of 20


def _bench():
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(REPO, "benchmarks", "bench_report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def generated_once(tmp_path_factory):
    """Five real offline W&B runs shaped like sparse-parity runs, with curves artifacts (contract C4)."""
    root = tmp_path_factory.mktemp("generated")
    saved = dict(os.environ)
    try:
        _bench().make_runs([(w, 0) for w in WIDTHS], str(root), n_sub=20, n_evals=26)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return root / "wandb"


@pytest.fixture
def generated(generated_once, tmp_path):
    """A copy per test: a test may add analysis runs to it."""
    shutil.copytree(generated_once, tmp_path / "wandb", ignore=shutil.ignore_patterns(".harness-cache"))
    return str(tmp_path / "wandb")


def test_report_finds_studies_writes_md_html_and_logs_analysis_runs(generated, tmp_path):
    out = str(tmp_path / "out")
    res = report.build(generated, None, out, log=True, studies="subtasks")
    assert [s.study for s in res["sections"]] == ["subtasks"] and not res["problems"]
    md = open(os.path.join(out, "report.md")).read()
    assert "## Per-subtask emergence (sparse parity)" in md and "](subtasks/fraction_learned.png)" in md
    assert "![overview.png](overview.png)" in md and os.path.getsize(os.path.join(out, "overview.png")) > 10_000
    html = open(os.path.join(out, "report.html")).read()
    assert html.count("data:image/png;base64,") == 6 and 'href="subtasks/sharpness.svg"' in html
    assert "<table>" in html and "<h2" in html
    for png in res["sections"][0].plots:
        assert os.path.exists(png) and os.path.exists(png[:-4] + ".svg")

    # the numbers: subtask k of width w is learned iff k < 0.4 w, around step 100 (k + 1), suddenly
    t = pd.read_parquet(os.path.join(out, "subtasks", "emergence.parquet"))
    expect = t["item"] < 0.4 * t["width"]
    assert (t["learned"] == expect).all()
    # evaluations every 200 steps: drops at >= 600 steps are resolved (earlier ones precede step 200-400)
    seen = t[expect & (100 * (t["item"] + 1) >= 600)]
    assert len(seen) == 30
    err = np.abs(
        np.log10(seen["midpoint"] / (100 * (seen["item"] + 1)))
    )  # the generator jitters it by 0.05 decade (sd)
    assert err.max() < 0.2 and err.median() < 0.06
    # loss and accuracy drop together: never a mirage. Drops before step 1000 fall between evaluations
    # 200 steps apart, > 0.1 decade there: unresolved. Later ones are sudden in the loss (emergent on it
    # for most: 10-90% width 0.13 decade, near the 0.5 line); in the log-loss the logistic's tail
    # stretches the drop, so the two metrics disagree: metric-dependent, never "emergent" on one alone
    assert seen["detected"].all() and not (seen["verdict"] == "mirage").any()
    early = seen["midpoint"] < 760  # evaluations at 600 and 800 are 0.125 decade apart
    assert early.sum() >= 5 and (seen.loc[early, "verdict"] == "unresolved").mean() >= 0.8
    late = seen[~early & (seen["verdict"] != "gradual")]
    assert len(late) >= 10 and (late["verdict_loss"] == "emergent").mean() > 0.6
    assert late["verdict"].isin(["emergent", "metric-dependent", "unresolved"]).all()
    assert late["verdict"].isin(["emergent", "metric-dependent"]).mean() > 0.9
    assert (t.loc[~expect, "verdict"] == "flat").all()

    # the analysis run, read back from the same offline directory
    runs = runstore.load_runs(generated)
    a = runs[runs["job_type"] == "analysis"]
    assert len(a) == 1 and len(runs) == len(WIDTHS) + 1
    assert (runs["state"] == "finished").all()  # every file complete (exit record) when build returns
    row = a.iloc[0]
    assert row["config.study"] == "subtasks" and row["name"] == "analysis-subtasks"
    assert sorted(
        row["config.analysed_runs"]
        if isinstance(row["config.analysed_runs"], list)
        else eval(row["config.analysed_runs"])
    ) == sorted(runs.loc[runs["job_type"] == "train", "id"])
    assert row["summary.n_curves"] == 100 and row["summary.n_emergent"] == int((t["verdict"] == "emergent").sum())
    assert row["summary.subtasks/fraction_learned._type"] == "image-file"
    assert row["summary.subtasks/by_size._type"] == "table-file"
    # a later report does not take the analysis run for a training run
    assert report.select("subtasks") == ["analysis.subtasks"]
    assert len(task_runs(runs, "sparse_parity")) == len(WIDTHS)


def test_study_selection_and_bad_input(generated, tmp_path):
    with pytest.raises(
        UserError,
        match="--studies nope: unknown; known studies: scaling, data_scaling, alpha_study, dynamics, subtasks",
    ):
        report.build(generated, None, str(tmp_path / "o"), studies="nope")
    with pytest.raises(UserError, match="no study applies to the 5 runs.*sparse_parity"):
        report.build(generated, None, str(tmp_path / "o"), studies="grokking,omnigrok")


def test_markdown_rebase_and_html():
    md = "# Title\n\ntext `code` **bold**\n\n![a](a.png)\n![b](http://x/b.png)\n"
    assert report.rebase(md, "study") == "## Title\n\ntext `code` **bold**\n\n![a](study/a.png)\n![b](http://x/b.png)\n"
    h = report.to_html("## T\n\n| x | y |\n|---|---|\n| 1 | a\\|b |\n\n- one\n- two\n\npara <b>\n", "/nonexistent")
    assert '<h2 id="t">T</h2>' in h and "<td>a|b</td>" in h and "<li>two</li>" in h and "para &lt;b&gt;" in h


def test_a_run_name_with_a_pipe_or_newline_stays_in_its_cell():
    from analysis.common import md_row

    rows = "| run | seed | verdict |\n|---|---|---|\n" + md_row(["a|b\nc", 0, "emergent"]) + "\n"
    h = report.to_html(rows, "/nonexistent")
    assert "<td>a|b c</td><td>0</td><td>emergent</td>" in h.replace("\n", ""), h


@pytest.mark.slow
def test_report_over_a_real_offline_sweep(tmp_path):
    """harness sweep (real training, W&B's sweep engine) -> analysis.report --log -> harness runs."""
    params = {
        "task": "{value: sparse_parity}",
        "data.n_tasks": "{value: 4}",
        "data.n": "{value: 8}",
        "data.k": "{value: 2}",
        "data.batch_size": "{value: 256}",
        "eval.test_per_task": "{value: 200}",
        "trainer.steps": "{value: 200}",
        "trainer.eval_every": "{value: 20}",
        "trainer.progress_bar": "{value: false}",
        "model.width": "{values: [4, 8, 16, 32, 64]}",
    }
    harness("sweep", write_sweep(tmp_path / "s.yaml", params), "--local", "--workers", "2")
    wandb_dir = str(tmp_path / "wandb")
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "analysis.report", wandb_dir, "--out", str(tmp_path / "out"), "--log"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = open(tmp_path / "out" / "report.md").read()
    assert "## Sparse parity: parameter scaling" in md and "## Per-subtask emergence" in md
    harness("runs", wandb_dir, "-o", str(tmp_path / "runs.csv"))
    runs = pd.read_csv(tmp_path / "runs.csv")
    a = runs[runs["job_type"] == "analysis"].set_index("name")
    # a width sweep at one alpha and infinite data: no data-scaling or alpha study
    assert set(a.index) == {"analysis-scaling", "analysis-dynamics", "analysis-subtasks"}
    assert math.isfinite(a.loc["analysis-scaling", "summary.alpha_N"])
    assert "## Sparse parity: training dynamics" in md
    assert a.loc["analysis-subtasks", "summary.n_curves"] == 5 * 4


def test_a_study_without_data_is_listed_and_a_crashing_one_fails_the_exit_code(generated, tmp_path, monkeypatch):
    import sys
    import types

    def fake(name, run):
        mod = types.ModuleType(name)
        mod.applies = lambda runs: True
        mod.run = run
        monkeypatch.setitem(sys.modules, name, mod)

    def empty(source, sweep, out):
        raise UserError("nothing to fit here")

    def broken(source, sweep, out):
        raise ZeroDivisionError("bug")

    def fine(source, sweep, out):
        os.makedirs(out)
        return Section("fake_fine", "Fine", "# Fine\n\nall good\n", out, run_ids=["a"])

    fake("tests.fake_empty", empty)
    fake("tests.fake_broken", broken)
    fake("tests.fake_fine", fine)
    monkeypatch.setattr(report, "STUDIES", ("tests.fake_empty", "tests.fake_broken", "tests.fake_fine"))
    res = report.build(generated, None, str(tmp_path / "o"), log=False)
    assert [s.study for s in res["sections"]] == ["fake_fine"] and res["failed"] == ["fake_broken"]
    md = open(tmp_path / "o" / "report.md").read()
    assert (
        "## Fine\n\nall good" in md
        and "- fake_empty: nothing to fit here" in md
        and "- fake_broken FAILED: ZeroDivisionError: bug" in md
    )
    monkeypatch.setattr(report, "build", lambda *a, **k: res)
    assert report.main([generated, "--out", str(tmp_path / "o")]) == 1


def test_run_emergence_flags_an_accuracy_jump_of_a_smooth_loss():
    from analysis import emergence as em
    from analysis.study import emergence_markdown, run_emergence

    steps = np.geomspace(100, 1e5, 40).round()
    smooth = 2.0 * (steps / 100) ** -0.3  # val loss falls as a power law
    rows = []
    for rid, loss, acc in [
        ("mirage", smooth, (smooth < 0.5) * 0.99),  # accuracy thresholded from a smooth loss
        ("grok", em.sigmoid(steps, 1e4, 0.05, 3.0, 0.01), em.sigmoid(steps, 1e4, 0.05, 0.0, 1.0)),  # both jump
        ("never", np.full(40, 3.0), np.full(40, 0.02)),
    ]:
        rows += [{"run_id": rid, "step": s, "val/loss": l, "val/acc": a} for s, l, a in zip(steps, loss, acc)]
    t = run_emergence(pd.DataFrame(rows), "val/loss", "val/acc", 0.99).set_index("run_id")
    assert t.loc["mirage", "verdict"] == "mirage" and t.loc["grok", "verdict"] == "emergent"
    assert t.loc["never", "verdict"] == "flat" and not t.loc["never", "reached"]
    assert t.loc["never", "t_cross"] == 1e5  # censored at the last evaluation
    assert abs(np.log10(t.loc["grok", "midpoint"] / 1e4)) < 0.05 and t.loc["grok", "reached"]
    md = emergence_markdown(t.reset_index(), "val/loss", "val/acc", 0.99)
    assert "| never | never (censored at 100000) | no transition | - | flat |" in md


def test_nested_cells_become_json_so_a_wandb_table_accepts_them():
    import wandb

    df = pd.DataFrame({"id": ["a", "b"], "learned": [[0, 1], [2]], "first": [{0: 250}, {1: 3, 2: 4}], "x": [1.0, 2.0]})
    t = report.table_frame(df)
    assert t["learned"].tolist() == ["[0, 1]", "[2]"] and t["first"].tolist() == ['{"0": 250}', '{"1": 3, "2": 4}']
    assert len(wandb.Table(dataframe=t).data) == 2
