"""Every run is a correct W&B run: the step axis (metric records, trainer/global_step on every history
row, log_every in optimizer steps), typed events, compact per-item arrays, the logged config and the
run name. Run files are read back with the run store and with W&B's own decoder (`wandb leet`)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from harness import events
from harness.config.run import load_config
from harness.errors import UserError
from harness.runstore import load_curves, load_history, load_runs
from harness.training import tracking
from harness.training.curves import CurvesRecorder
from harness.training.detectors import EmergenceCallback, GrokkingCallback
from harness.training.train import train
from tests.conftest import TINY, harness

LEET = os.path.join(os.path.dirname(sys.executable), "wandb")
# 10 optimizer steps per Lightning batch, train/loss every 5 steps: Lightning's own logging (which
# counts batches) would put nothing at most of these steps.
_MORE = ["data.n_tasks=40", "data.n=10", "data.k=2", "trainer.log_every=5", "trainer.steps_per_batch=10"]
AXIS = [o for o in TINY if o.split("=")[0] not in {m.split("=")[0] for m in _MORE}] + _MORE


def leet_records(run_dir: str) -> list[dict]:
    out = subprocess.run(
        [LEET, "leet", "inspect", "--json", run_dir], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def axis_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("axis")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        for var in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH", tracking.VARIED_ENV):
            mp.delenv(var, raising=False)
        summary = train(load_config(AXIS), AXIS)
    run_dir = os.path.dirname(summary["_run_dir"])
    return {"summary": summary, "root": str(root), "run_dir": run_dir, "leet": leet_records(run_dir)}


def test_metric_records_declare_the_step_axis_and_best_values(axis_run):
    metrics = [r["metric"] for r in axis_run["leet"] if r["type"] == "metric"]
    by_name = {m.get("name") or m.get("glob_name"): m for m in metrics}
    assert by_name["trainer/global_step"]["options"]["defined"]
    assert by_name["*"]["step_metric"] == "trainer/global_step"
    assert by_name["val/loss"]["summary"] == {"min": True, "last": True}
    assert by_name["val/acc"]["summary"] == {"max": True, "last": True}
    s = axis_run["summary"]
    assert s["val/loss"]["min"] <= s["val/loss"]["last"] and s["val/acc"]["max"] >= s["val/acc"]["last"]


def test_every_history_row_sits_on_optimizer_steps(axis_run):
    rows = [r["history"]["item"] for r in axis_run["leet"] if r["type"] == "history"]
    assert rows and all(isinstance(r.get("trainer/global_step"), int) for r in rows)
    train_steps = [r["trainer/global_step"] for r in rows if "train/loss" in r]
    val_steps = [r["trainer/global_step"] for r in rows if "val/loss" in r]
    assert train_steps == list(range(0, 60, 5))  # the loss of step s (weights after s steps) at s
    assert val_steps == [0, 20, 40, 60]  # step 0: the first point of every curve
    steps = [r["trainer/global_step"] for r in rows]
    assert steps == sorted(steps)  # W&B's step_sync needs a non-decreasing axis
    # The run store's fast decoder reads the same rows onto the same axis.
    hist = load_history(axis_run["root"], keys=["train/loss", "val/loss"])
    assert hist.dropna(subset=["train/loss"])["step"].tolist() == train_steps
    assert hist.dropna(subset=["val/loss"])["step"].tolist() == val_steps
    assert hist["step"].dtype == "int64"


def test_history_and_summary_hold_aggregates_not_one_key_per_subtask(axis_run):
    rows = [r["history"]["item"] for r in axis_run["leet"] if r["type"] == "history"]
    keys = {k for r in rows for k in r if not k.startswith("_")}
    assert keys == {"trainer/global_step", "train/loss", "val/loss", "val/acc", "val/loss_uniform", "val/n_learned"}
    s = axis_run["summary"]
    assert len(s) < 25 and not [k for k in s if k[-4:].isdigit()], sorted(s)  # 40 subtasks, no per-subtask key
    curves = load_curves(axis_run["root"], "subtask")
    assert len(curves) == 4 * 40 and sorted(curves.columns) == ["acc", "item", "loss", "run_id", "step"]
    assert curves.groupby("step")["item"].apply(list).map(lambda x: x == list(range(40))).all()
    learned_at_end = int((curves[curves["step"] == 60]["loss"] < s["emergence/threshold_nats"]).sum())
    assert s["emergence/n_below_end"] == s["val/n_learned"] == learned_at_end


def test_run_table_columns_are_numeric_and_events_typed(axis_run):
    runs = load_runs(axis_run["root"])
    for col in (
        "summary.val/loss.min",
        "summary.val/loss.last",
        "summary.val/acc.max",
        "summary.emergence/n_learned",
        "summary.emergence/last_step",
        "summary.trainer/global_step",
        "summary.model/params",
    ):
        assert pd.api.types.is_numeric_dtype(runs[col]), (col, runs[col].dtype)
    strings = [
        k
        for k, v in axis_run["summary"].items()
        if k.startswith(("emergence/", "grok/")) and isinstance(v, str) and not k.endswith("phase")
    ]
    assert strings == []


def test_logged_config_is_science_and_schedule_and_name_skips_plumbing(axis_run):
    (run,) = [r["run"] for r in axis_run["leet"] if r["type"] == "run"]
    config = run["config"]["update"]
    assert (config["model"]["width"], config["model"]["depth"], config["trainer"]["log_every"]) == (100, 1, 5)
    for plumbing in ("wandb", "data_dir"):
        assert plumbing not in config
    assert "threads" not in config["trainer"] and "progress_bar" not in config["trainer"]
    assert run["display_name"] == (
        "sparse_parity[batch_size=256,test_per_task=200,steps=60,eval_every=20,"
        "n_tasks=40,n=10,k=2,log_every=5,steps_per_batch=10]"
    )
    assert run["job_type"] == "train"


def test_sweep_run_config_is_one_nested_shape_named_from_the_varied_keys(tmp_path):
    # What wandb agent (and the local controller) hand a run: a parameter file, a sweep and run id.
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "task": {"value": "sparse_parity"},
                "model.width": {"value": 8},
                "trainer.threads": {"value": 1},
                "seed": {"value": 2},
            }
        )
    )
    env = {
        "WANDB_SWEEP_ID": "sw1",
        "WANDB_RUN_ID": "sweeprun1",
        "WANDB_SWEEP_PARAM_PATH": str(params),
        tracking.VARIED_ENV: "model.width,seed",
    }
    harness("train", *TINY, "model.width=8", "seed=2", env=env)
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    recs = leet_records(run_dir)
    (run,) = [r["run"] for r in recs if r["type"] == "run"]
    config = run["config"]["update"]
    # wandb keeps the sweep's flat keys (its engine reads them back); the nested tree is complete.
    assert config["model"]["width"] == 8 and config["model.width"] == 8 and config["seed"] == 2
    assert "threads" not in config["trainer"]
    assert run["display_name"] == "sparse_parity[width=8,seed=2]" and run["sweep_id"] == "sw1"
    assert any(r["type"] == "metric" and r["metric"].get("step_metric") == "trainer/global_step" for r in recs)
    runs = load_runs(str(tmp_path), sweep="sw1")
    assert runs.loc[0, "config.model.width"] == 8  # the flat and the nested spelling: one column


def test_default_name_and_run_config_leave_plumbing_out(monkeypatch, tmp_path):
    monkeypatch.delenv(tracking.VARIED_ENV, raising=False)
    cfg = load_config(["task=sparse_parity", "model.width=16", "trainer.threads=1"])
    overrides = [
        "task=sparse_parity",
        "model.width=8",
        "trainer.threads=1",
        "wandb.dir=x",
        "data_dir=/d",
        "trainer.progress_bar=false",
        "seed=3",
        "model.width=16",
    ]
    assert tracking.default_name(cfg, overrides) == "sparse_parity[width=16,seed=3]"  # a repeated key: its last value
    monkeypatch.setenv(tracking.VARIED_ENV, "model.width,data.n,data.k")
    assert tracking.default_name(cfg, overrides) == "sparse_parity[width=16,seed=3]"  # a leftover, outside a sweep
    params = tmp_path / "params.yaml"
    params.write_text("model.width:\n  value: 16\n")
    monkeypatch.setenv(tracking.PARAM_ENV, str(params))  # a run the local controller handed parameters to
    assert tracking.default_name(cfg, overrides) == "sparse_parity[width=16,n=50,k=3]"
    logged = tracking.run_config(cfg)
    assert set(logged) == {"task", "seed", "data", "model", "optim", "eval", "trainer"}
    assert "threads" not in logged["trainer"] and logged["model"]["width"] == 16


# ---- typed events and checkpointable callback state -----------------------------------------------


def test_event_fields_are_numbers_with_a_reached_flag():
    assert events.event_fields("grok/t_val99", 4200, 5000) == {"grok/t_val99": 4200, "grok/t_val99/reached": True}
    assert events.event_fields("grok/t_val99", None, 5000) == {"grok/t_val99": 5000, "grok/t_val99/reached": False}
    assert events.duration_fields("grok/delay", 300, 4200, 5000) == {"grok/delay": 3900, "grok/delay/reached": True}
    assert events.duration_fields("grok/delay", 300, None, 5000)["grok/delay"] == 4700  # a lower bound
    assert events.duration_fields("grok/delay", None, None, 5000) == {"grok/delay": 0, "grok/delay/reached": False}
    table = pd.DataFrame({"summary.e": [100, 5000, np.nan], "summary.e/reached": [True, False, np.nan]})
    step, reached = events.read_event(table, "e")
    assert step.tolist()[:2] == [100.0, 5000.0] and np.isnan(step[2]) and reached.tolist() == [True, False, False]
    with pytest.raises(UserError, match="summary.e.*censored"):
        events.read_event(pd.DataFrame({"summary.e": [100, "censored"], "summary.e/reached": [True, False]}), "e")


def _feed(callbacks, evaluations):
    """Each evaluation as a block feeds it to a member's curves and detectors (harness.members.module)."""
    for step, loss, acc in evaluations:
        for cb in callbacks:
            if isinstance(cb, CurvesRecorder):
                cb.add(step, {"subtask": {"loss": np.array(loss), "acc": np.array(acc)}})
            elif isinstance(cb, EmergenceCallback):
                cb.observe(step, np.array(loss))
            else:
                cb.observe(step, max(acc), min(acc))


def _round_trip(cb, fresh, tmp_path):
    path = tmp_path / "cb.pt"
    torch.save(cb.state_dict(), path)
    fresh.load_state_dict(torch.load(path, weights_only=True))  # what Lightning's checkpoint load allows
    return fresh


def test_callback_state_survives_a_checkpoint(tmp_path):
    first = [(100, [0.5, 0.01, 0.9], [0.5, 1.0, 0.995]), (200, [0.02, 0.01, 0.8], [1.0, 1.0, 0.995])]
    then = [(300, [0.01, 0.3, 0.7], [1.0, 0.9, 0.995])]
    whole = [CurvesRecorder(), EmergenceCallback(0.1), GrokkingCallback(0.99, 50)]
    _feed(whole, first + then)
    part = [CurvesRecorder(), EmergenceCallback(0.1), GrokkingCallback(0.99, 50)]
    _feed(part, first)
    resumed = [_round_trip(cb, type(cb)(*args), tmp_path) for cb, args in zip(part, [(), (0.1,), (0.99, 50)])]
    _feed(resumed, then)
    assert resumed[0].frames()["subtask"].equals(whole[0].frames()["subtask"])
    assert (
        resumed[1].summary()
        == whole[1].summary()
        == {
            "emergence/n_learned": 3 - 1,
            "emergence/n_below_end": 1,
            "emergence/last_step": 300,
            "emergence/threshold_nats": 0.1,
        }
    )
    assert (
        resumed[1].table_rows()
        == whole[1].table_rows()
        == [[0, 200, True, 0.01], [1, 100, True, 0.3], [2, 300, False, 0.7]]
    )
    assert resumed[2].summary() == whole[2].summary()
    s = whole[2].summary()
    assert (s["grok/t_train99"], s["grok/t_val99"], s["grok/t_val99/reached"]) == (100, 200, True)
    assert (s["grok/delay"], s["grok/phase"], s["grok/last_step"]) == (100, "grokking", 300)
    # A second evaluation at one step (a resumed run re-validating) replaces the first.
    _feed(whole[:1], [(300, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])])
    frame = whole[0].frames()["subtask"]
    assert frame["step"].tolist().count(300) == 3 and frame.loc[frame["step"] == 300, "loss"].sum() == 0
