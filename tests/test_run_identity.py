"""Issue 18 (4): a run id names one run. A leftover WANDB_RUN_ID (the SLURM recipe exports one) must
not let a run with other values resume, or replace, the run that owns the id: `harness train` resumes
only a checkpoint written for an equal run config, never a finished run's, and refuses otherwise with
one line (exit 2) before anything is written."""

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, harness
from test_preemption import sigterm_at

from harness.config.run import load_config
from harness.training import checkpoint
from harness.training.checkpoint import Preempted, ResumeRefused
from harness.training.train import train

REPO = Path(__file__).resolve().parents[1]
BASE = [a for a in TINY if not a.startswith("trainer.steps=")] + ["trainer.steps=60"]


def snapshot(root) -> dict:
    """Every file under the wandb root, with its size and mtime: what a refused run must leave alone."""
    out = {}
    for p in glob.glob(os.path.join(root, "**", "*"), recursive=True):
        if os.path.isfile(p):
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def refused(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), proc.stderr[-2000:]
    assert proc.stdout == ""
    return lines[0]


def runs_table(root, tmp_path) -> pd.DataFrame:
    out = tmp_path / "runs.csv"
    harness("runs", root, "--output", str(out))
    return pd.read_csv(out)


def test_a_stale_run_id_never_replaces_the_finished_run(offline):
    """The issue's case: WANDB_RUN_ID=stale001 left exported; run A finishes (its last.ckpt kept),
    then B (another learning rate) and C (another width) start under the same id."""
    root = str(offline / "wandb")
    env = {"WANDB_RUN_ID": "stale001"}
    harness("train", *BASE, "trainer.ckpt_every=20", "optim.lr=0.001", "model.width=32", env=env)  # A
    assert os.path.isfile(os.path.join(root, "checkpoints", "stale001", "last.ckpt"))
    before = snapshot(root)

    line_b = refused(harness("train", *BASE, "optim.lr=0.05", "model.width=32", env=env, check=False))
    line_c = refused(harness("train", *BASE, "optim.lr=0.001", "model.width=64", env=env, check=False))
    for line in (line_b, line_c):
        assert "run stale001 already finished (step 60" in line and "trainer.resume=never" in line
    assert snapshot(root) == before  # nothing written: no W&B run, no checkpoint touched

    table = runs_table(root, offline)
    row = table[table["id"] == "stale001"]
    assert len(row) == 1
    row = row.iloc[0]
    assert row["state"] == "finished" and row["n_files"] == 1
    assert row["config.model.width"] == 32 and row["config.optim.lr"] == pytest.approx(0.001)


def test_a_resume_point_of_another_config_is_refused_naming_the_keys(offline, monkeypatch):
    root = str(offline / "wandb")
    monkeypatch.setenv("WANDB_RUN_ID", "mixed01")
    import tasks.sparse_parity as sp

    build = sp.build
    sigterm_at(monkeypatch, 40)
    with pytest.raises(Preempted):
        train(load_config(BASE + ["model.width=32"]), BASE)
    monkeypatch.setattr(sp, "build", build)
    before = snapshot(root)

    other = BASE + ["model.width=64", "optim.lr=0.05"]
    with pytest.raises(ResumeRefused) as e:
        train(load_config(other), other)
    msg = str(e.value)
    assert "\n" not in msg and "mixed01" in msg
    assert "model.width (32 there, 64 here)" in msg and "optim.lr (0.001 there, 0.05 here)" in msg
    assert snapshot(root) == before

    # Plumbing (threads, progress bar) may differ; the same run config resumes where it stopped.
    same = [a for a in BASE if not a.startswith("trainer.threads=")] + ["model.width=32", "trainer.threads=2"]
    summary = train(load_config(same), same)
    assert summary["trainer/resumed_from_step"] == 40 and summary["_run_id"] == "mixed01"
    assert os.path.isfile(os.path.join(root, "checkpoints", "mixed01", checkpoint.FINISHED))


def test_the_cli_refuses_a_mismatch_with_exit_2_and_resume_never_starts_over(offline, monkeypatch):
    """A preempted run's checkpoint under a reused id: another config is refused on the command
    line; trainer.resume=never trains the id again from step 0."""
    root = str(offline / "wandb")
    monkeypatch.setenv("WANDB_RUN_ID", "again01")
    sigterm_at(monkeypatch, 20)
    with pytest.raises(Preempted):
        train(load_config(BASE), BASE)
    line = refused(harness("train", *BASE, "optim.lr=0.02", env={"WANDB_RUN_ID": "again01"}, check=False))
    assert "optim.lr (0.001 there, 0.02 here)" in line

    proc = harness("train", *BASE, "optim.lr=0.02", "trainer.resume=never", env={"WANDB_RUN_ID": "again01"})
    assert '"trainer/resumed_from_step"' not in proc.stdout.splitlines()[-1]
    assert os.path.isfile(os.path.join(root, "checkpoints", "again01", checkpoint.FINISHED))


def test_bad_resume_value_is_one_line():
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.resume='sometimes': valid values are auto, never"):
        load_config(BASE + ["trainer.resume=sometimes"])


def slurm_recipe() -> str:
    """The SLURM requeue recipe of docs/sweeps.md, as written there."""
    text = (REPO / "docs" / "sweeps.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    recipe = [b for b in blocks if "--requeue" in b and "WANDB_RUN_ID" in b]
    assert len(recipe) == 1, "docs/sweeps.md should hold one SLURM requeue recipe"
    return recipe[0]


def run_recipe(recipe: str, runs_dir: str, job_id: str):
    """The recipe as SLURM would run it for job `job_id` (its first start or a requeue: SLURM keeps
    the job id), made tiny: its own overrides, then the tiny test problem's."""
    lines = []
    for line in recipe.splitlines():
        if line.startswith("#SBATCH") or line.startswith("source "):
            continue
        line = line.replace("/shared/$USER/runs", runs_dir)
        if line.startswith("harness train "):
            own = line.split()[2:]
            keys = {o.split("=", 1)[0] for o in own}
            line = " ".join(["harness", "train", *own, *(a for a in BASE if a.split("=", 1)[0] not in keys)])
        lines.append(line)
    env = dict(
        os.environ,
        SLURM_JOB_ID=job_id,
        OMP_NUM_THREADS="1",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )
    env.pop("WANDB_RUN_ID", None)
    env.pop("WANDB_DIR", None)
    return subprocess.run(["bash", "-euc", "\n".join(lines)], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # the stale-id test covers the same refusal in the default suite; make test-all
def test_the_slurm_recipe_stays_safe_when_a_job_is_submitted_again_by_hand(offline):
    recipe = slurm_recipe()
    assert "export WANDB_RUN_ID=" in recipe and "--requeue" in recipe
    runs = str(offline / "runs")
    first = run_recipe(recipe, runs, "1001")
    assert first.returncode == 0, first.stderr[-2000:]
    root = os.path.join(runs, "wandb")
    before = snapshot(root)

    # `scontrol requeue 1001` by hand after it finished: the same job id, so the same run id.
    again = run_recipe(recipe, runs, "1001")
    assert "slurm-1001-0 already finished" in refused(again)
    assert snapshot(root) == before

    # `sbatch` again: a new job id, a new run beside the first.
    second = run_recipe(recipe, runs, "1002")
    assert second.returncode == 0, second.stderr[-2000:]
    table = runs_table(root, offline).set_index("id")
    assert table.loc["slurm-1001-0", "state"] == "finished" and table.loc["slurm-1001-0", "n_files"] == 1
    assert table.loc["slurm-1002-0", "state"] == "finished"
