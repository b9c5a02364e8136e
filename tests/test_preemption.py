"""Checkpoints, SIGTERM, resume into the same run (contract C5), the model artifact (C7), exit
codes (C6), and train() returning only once the run file is complete."""

import dataclasses
import glob
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import TINY, harness

from harness import runstore
from harness.config.run import load_config
from harness.runstore.decoder import read_run_file
from harness.training.artifacts import read_model
from harness.training.checkpoint import PREEMPTED_EXIT, Preempted
from harness.training.train import train

STEP = "trainer/global_step"
# 400 optimizer steps, 10 per Lightning batch, a resume point every 40 steps.
LONG = [a for a in TINY if not a.startswith("trainer.steps=")] + [
    "trainer.steps=400",
    "trainer.log_every=10",
    "trainer.ckpt_every=40",
]


def run_files(wandb_dir, run_id):
    """The run's offline files, oldest first (a resumed run adds one per start)."""
    # wandb names a second start within the same second `offline-run-<time>-<id>-1` (which a plain
    # sort would put first: '-' < '/')
    files = glob.glob(os.path.join(wandb_dir, f"offline-run-*-{run_id}*", f"run-{run_id}.wandb"))

    def order(f):  # (start time, same-second counter)
        name = os.path.basename(os.path.dirname(f))
        return name.split("-")[2], int(name.rsplit(f"-{run_id}", 1)[1].lstrip("-") or 0)

    return sorted(files, key=order)


def rows(history, key):
    """{step: value} of the rows that hold `key`."""
    h = history[history[key].notna()] if key in history else history.iloc[:0]
    return dict(zip(h[STEP].astype(int), h[key].astype(float)))


def start_and_preempt(env, ckpt, args=LONG):
    """`harness train` in a subprocess; SIGTERM once its first periodic checkpoint exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "train", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    while not os.path.exists(ckpt):  # wait for the event, not for a guessed time
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(
            f"run ended ({proc.returncode}) before its first checkpoint:\n{proc.stderr.read()[-2000:]}"
        )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def sigterm_at(monkeypatch, step, task="sparse_parity"):
    """Make the task (sparse parity by default) send this process SIGTERM when training reaches `step`."""
    import importlib

    import lightning as L

    sp = importlib.import_module(f"tasks.{task}")

    class Kill(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)

    build = sp.build
    monkeypatch.setattr(
        sp, "build", lambda cfg: dataclasses.replace(build(cfg), callbacks=[*build(cfg).callbacks, Kill()])
    )


@pytest.mark.parametrize("step", [30, 40])  # inside an evaluation interval, and on an evaluation
def test_resume_after_sigterm_logs_what_the_uninterrupted_run_logs(offline, monkeypatch, step):
    args = [a for a in TINY if not a.startswith("trainer.steps=")] + ["trainer.steps=100", "trainer.log_every=10"]
    ref = train(load_config(args), args)
    ref_hist = read_run_file(run_files(str(offline / "wandb"), ref["_run_id"])[0]).history

    import tasks.sparse_parity as sp

    build = sp.build
    sigterm_at(monkeypatch, step)
    with pytest.raises(Preempted) as stop:
        train(load_config(args), args)
    assert stop.value.step == step and stop.value.exit_code == PREEMPTED_EXIT
    monkeypatch.setattr(sp, "build", build)  # no more SIGTERM
    monkeypatch.setenv("WANDB_RUN_ID", stop.value.run_id)
    summary = train(load_config(args), args)
    assert summary["trainer/resumed_from_step"] == step

    first, second = (read_run_file(f) for f in run_files(str(offline / "wandb"), stop.value.run_id))
    assert first.exit_code == PREEMPTED_EXIT and first.preempting and second.exit_code == 0
    for key in ("train/loss", "val/loss", "val/acc"):
        before, after, want = rows(first.history, key), rows(second.history, key), rows(ref_hist, key)
        assert not set(before) & set(after) and max(before) <= step <= min(after), key
        assert {**before, **after} == pytest.approx(want, rel=1e-6), key
    for key in ("emergence/n_learned", "emergence/n_below_end", "emergence/last_step", "val/n_learned"):
        if key in ref:
            assert summary[key] == ref[key], key


def test_a_float64_omnigrok_run_resumed_at_step_20_logs_the_uninterrupted_runs_values_bit_for_bit(offline, monkeypatch):
    # Before issue 20's one path its batch loss differed in the 8th digit from step 24 on.
    args = ["task=mnist_omnigrok", "data.n_train=200", "data.batch_size=50", "data.n_test=200"]
    args += ["trainer.precision=64-true", "trainer.steps=60", "trainer.eval_every=20", "trainer.log_every=1"]
    args += ["trainer.ckpt_every=20", "model.save=false", "trainer.progress_bar=false"]
    ref = train(load_config(args), args)
    (ref_hist,) = (read_run_file(f).history for f in run_files(str(offline / "wandb"), ref["_run_id"]))
    import tasks.mnist_omnigrok as og

    build = og.build
    sigterm_at(monkeypatch, 20, "mnist_omnigrok")
    with pytest.raises(Preempted) as stop:
        train(load_config(args), args)
    monkeypatch.setattr(og, "build", build)
    monkeypatch.setenv("WANDB_RUN_ID", stop.value.run_id)
    assert train(load_config(args), args)["trainer/resumed_from_step"] == 20
    first, second = (read_run_file(f).history for f in run_files(str(offline / "wandb"), stop.value.run_id))
    for key, n in (("train/batch_loss", 60), ("val/loss", 4)):
        assert {**rows(first, key), **rows(second, key)} == rows(ref_hist, key) and len(rows(ref_hist, key)) == n, key


def test_sigterm_during_the_last_step_lets_the_complete_run_finish(offline, monkeypatch):
    args = [a for a in TINY if not a.startswith("trainer.steps=")] + ["trainer.steps=40", "model.save=false"]
    sigterm_at(monkeypatch, 40)
    summary = train(load_config(args), args)  # no Preempted: nothing is left to resume
    rf = read_run_file(run_files(str(offline / "wandb"), summary["_run_id"])[0])
    assert rf.exit_code == 0 and summary["emergence/last_step"] == 40


@pytest.mark.slow
def test_sigterm_checkpoints_and_a_restart_continues_the_same_run_exactly(offline):
    wandb_dir = str(offline / "wandb")
    # The uninterrupted run, for reference (in-process).
    ref = train(load_config(LONG), LONG)
    ref_hist = read_run_file(run_files(wandb_dir, ref["_run_id"])[0]).history

    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_RUN_ID="preempt1")
    ckpt = os.path.join(wandb_dir, "checkpoints", "preempt1", "last.ckpt")
    code, out, err = start_and_preempt(env, ckpt)
    assert code == PREEMPTED_EXIT, err[-2000:]
    assert out == ""  # no summary line for a run that did not finish
    last = err.strip().splitlines()[-1]
    assert "preempted (SIGTERM) at step" in last and "WANDB_RUN_ID=preempt1" in last
    stopped = int(last.split("at step ")[1].split(";")[0])
    assert 40 <= stopped < 400 and stopped % 10 == 0  # a batch boundary
    assert torch.load(ckpt, weights_only=False)["global_step"] == stopped
    first = read_run_file(run_files(wandb_dir, "preempt1")[0])
    assert first.exit_code == PREEMPTED_EXIT and first.preempting

    # The restart (what the controller, wandb agent or a SLURM requeue does): same id, same args.
    proc = harness("train", *LONG, env={"WANDB_RUN_ID": "preempt1"})
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["_run_id"] == "preempt1" and summary["trainer/resumed_from_step"] == stopped
    files = run_files(wandb_dir, "preempt1")
    assert len(files) == 2
    second = read_run_file(files[1])
    assert second.exit_code == 0

    # No step twice, none missing: the first file ends at the checkpoint's step, the second starts
    # there (train/loss at step s is the loss of the batch that starts after s steps) ...
    s1, s2 = first.history[STEP].dropna().astype(int), second.history[STEP].dropna().astype(int)
    assert s1.max() <= stopped == s2.min()
    # ... and the resumed run is the uninterrupted run: same data stream (seeded per batch), same
    # optimizer state, same callback state (the emergence events in the summary).
    for key in ("train/loss", "val/loss", "val/acc"):
        before, after, want = rows(first.history, key), rows(second.history, key), rows(ref_hist, key)
        assert not set(before) & set(after), key
        assert sorted({**before, **after}) == sorted(want) and len(want) >= 20
        assert {**before, **after} == pytest.approx(want, rel=1e-6), key
    for key, value in ref.items():
        if key.startswith(("emergence/n_", "emergence/last_step", "val/n_learned")):
            assert summary[key] == value, key

    # The run store merges the two files into one run with one history.
    table = runstore.load_runs(wandb_dir)
    row = table[table["id"] == "preempt1"].iloc[0]
    assert row["state"] == "finished" and row["n_files"] == 2
    hist = runstore.load_history(wandb_dir, ["preempt1"])
    val = hist[hist["val/loss"].notna()][STEP].astype(int).tolist()
    assert val == list(range(0, 401, 20))  # step 0 once, not again on resume


def test_periodic_checkpoints_fall_on_the_requested_steps(offline):
    # 10 steps per batch would put step 25 inside a batch: batches shrink to gcd(10, 20, 25, 100) = 5.
    args = [a for a in TINY if not a.startswith("trainer.steps=")] + [
        "trainer.steps=100",
        "trainer.ckpt_every=25",
        "trainer.steps_per_batch=10",
        f"trainer.ckpt_dir={offline}/ck",
    ]
    cfg = load_config(args)
    assert cfg.trainer.batch_steps() == 5
    summary = train(cfg, args)
    # One directory per run under trainer.ckpt_dir: runs sharing it never resume from each other.
    assert os.listdir(offline / "ck") == [summary["_run_id"]]
    ckpt = torch.load(os.path.join(offline, "ck", summary["_run_id"], "last.ckpt"), weights_only=False)
    assert ckpt["global_step"] == 75  # the last multiple of 25 before the end (the end needs none)
    # The event callback's state travels in the checkpoint.
    assert any("Emergence" in k for k in ckpt["callbacks"]), list(ckpt["callbacks"])


def test_final_weights_are_a_model_artifact(offline):
    summary = train(load_config(TINY), TINY)
    run_id = summary["_run_id"]
    assert summary["model/artifact"] == f"model-{run_id}"
    files = runstore.artifact_files(str(offline / "wandb"), run_id, "model")
    assert list(files) == ["model.ckpt"]  # a Lightning checkpoint (harness.training.artifacts)
    assert torch.load(files["model.ckpt"], weights_only=True)["global_step"] == 60
    saved = read_model(files["model.ckpt"])
    assert saved["config"]["model"]["width"] == load_config(TINY).model.width
    assert saved["config"]["trainer"]["steps"] == 60
    # A pure nn.Module's state_dict: it loads into the task's MLP.
    from tasks.sparse_parity import MLP

    cfg = load_config(TINY)
    model = MLP(cfg.data.n_tasks + cfg.data.n, cfg.model.width, cfg.model.depth, 2)
    model.load_state_dict(saved["state_dict"])

    args = TINY + ["model.save=false"]
    off = train(load_config(args), args)
    assert (
        "model/artifact" not in off and runstore.artifact_files(str(offline / "wandb"), off["_run_id"], "model") == {}
    )


def test_a_non_finite_loss_fails_the_run_with_exit_1(offline):
    # An initial scale of 1e30 overflows float32 logits: the first evaluation's (step 0) loss is NaN.
    proc = harness(
        "train",
        "task=modular_addition",
        "data.p=7",
        "trainer.steps=20",
        "trainer.eval_every=10",
        "trainer.steps_per_batch=10",
        "model.init_scale=1.0e30",
        "trainer.progress_bar=false",
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout == ""  # no summary line, so no bare NaN in one
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("harness: error: ") and "loss=nan at step 0" in last
    rf = read_run_file(glob.glob(str(offline / "wandb" / "offline-run-*" / "*.wandb"))[0])
    assert rf.exit_code == 1 and "not finite" in rf.summary["error"]
    table = runstore.load_runs(str(offline / "wandb"))
    assert table["state"].tolist() == ["failed"]


def test_the_summary_line_is_strict_json(offline):
    from harness.training.tracking import result_line

    line = result_line({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -math.inf}})
    assert json.loads(line) == {"a": None, "b": [1.0, None], "c": {"d": None}}


def test_train_returns_only_once_the_exit_record_is_written(offline):
    # Before the fix, run.finish() returned before wandb-core wrote the exit record: read at once,
    # 5 of 10 such files lacked it. Each file is read the moment train() returns.
    args = [a for a in TINY if not a.startswith("trainer.steps=")] + ["trainer.steps=20", "model.save=false"]
    for _ in range(4):
        summary = train(load_config(args), args)
        rf = read_run_file(run_files(str(offline / "wandb"), summary["_run_id"])[0])
        assert rf.exit_code == 0 and not rf.truncated and rf.summary.get(STEP) == 20
