"""Local sweeps: validation, W&B's engine and macros, resume after SIGKILL, crashed runs."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from harness import controller, runstore
from harness.errors import UserError
from tests.conftest import TINY_SWEEP, harness, write_sweep


def widths(values):
    return {**TINY_SWEEP, "model.width": "{values: [%s]}" % ", ".join(map(str, values))}


def test_typo_in_a_parameter_name_is_refused_before_any_run(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", {**widths([2]), "model.widht": "{values: [3]}"})
    proc = harness("sweep", path, "--local", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "model.widht" in err[0] and "model.width" in err[0]
    assert not os.path.exists(tmp_path / "wandb")  # nothing started


def test_float_written_without_a_dot_is_refused(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", {**widths([2]), "optim.lr": "{values: [1e-3, 1.0e-2]}"})
    with pytest.raises(UserError, match=r"optim.lr value '1e-3' is a string in YAML; write it as 1.0e-03"):
        controller.validate_sweep(controller.load_sweep_yaml(path), path)


def test_schema_violations_and_bad_values_are_one_line(tmp_path):
    bad_method = write_sweep(tmp_path / "m.yaml", widths([2]), method="gird")
    with pytest.raises(UserError, match="gird"):
        controller.validate_sweep(controller.load_sweep_yaml(bad_method), bad_method)
    bad_value = write_sweep(tmp_path / "v.yaml", {**widths([2]), "data.k": "{value: 20}"})
    with pytest.raises(UserError, match=r"data.k=20 > data.n=8"):
        controller.validate_sweep(controller.load_sweep_yaml(bad_value), bad_value)
    with pytest.raises(UserError, match="sweep 'nosuchid' not found"):
        controller.run_agent("nosuchid", str(tmp_path / "wandb"))


def test_command_expansion_matches_wandb_agent():
    cfg = {"command": ["${env}", "${interpreter}", "-m", "harness", "train", "${args_no_hyphens}"]}
    argv = controller.expand_command(cfg, {"task": "sparse_parity", "optim.lr": 0.001, "model.width": 8}, "x.json")
    assert argv == ["/usr/bin/env", "python", "-m", "harness", "train", "task=sparse_parity", "optim.lr=0.001",
                    "model.width=8"]
    program = controller.expand_command({"program": "train.py"}, {"a": 1}, "x.json")
    assert program == ["/usr/bin/env", "python", "train.py", "--a=1"]


def test_local_sweep_runs_the_grid_with_one_consistent_config(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", widths([2, 4, 8]))
    proc = harness("sweep", path, "--local", "--workers", "2")
    sweep_id = proc.stdout.strip().splitlines()[-1]
    runs = runstore.load_runs("wandb", sweep=sweep_id)
    assert len(runs) == 3 and set(runs["state"]) == {"finished"}
    assert sorted(runs["config.model.width"]) == [2, 4, 8]
    assert set(runs["sweep"]) == {sweep_id}
    # Each key once: sweep parameters stay flat (as wandb.init injects them), the rest nested.
    rf = runstore.read_run_file(os.path.join(runs.loc[0, "path"], f"run-{runs.loc[0, 'id']}.wandb"))
    assert "model.width" in rf.config and "width" not in rf.config["model"]
    assert rf.config["model"]["depth"] == 1 and "model.depth" not in rf.config
    # The environment wandb agent sets reached the run: its id is the one the controller chose.
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert {r["id"] for r in state["runs"]} == set(runs["id"])
    # harness runs exports the same table.
    harness("runs", "wandb", "--sweep", sweep_id, "-o", "runs.csv")
    harness("runs", "wandb", "--sweep", sweep_id, "-o", "runs.parquet")
    csv, pq = pd.read_csv("runs.csv"), pd.read_parquet("runs.parquet")
    assert len(csv) == len(pq) == 3 and {"id", "name", "state", "sweep", "config.model.width",
                                         "summary.val/loss"} <= set(csv.columns)
    proc = harness("runs", "wandb", "--sweep", "nope1234", check=False)
    assert proc.returncode == 2 and "nope1234" in proc.stderr


def test_a_crashing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    # width 0 passes the type check but the model refuses it inside the run: exit code != 0.
    path = write_sweep(tmp_path / "s.yaml", widths([2, 3]))
    sweep_id = controller.create_local_sweep(path, "wandb")
    cfg_path = f"wandb/sweep-{sweep_id}/sweep.yaml"
    cfg = yaml.safe_load(open(cfg_path))
    cfg["parameters"]["model.width"]["values"] = [2, -1, 3]  # as if edited after validation
    yaml.safe_dump(cfg, open(cfg_path, "w"))
    harness("agent", sweep_id)
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    by_width = {r["params"]["model.width"]: r["state"] for r in state["runs"]}
    assert by_width == {2: "finished", -1: "failed", 3: "finished"}


def test_two_agents_share_a_sweep_without_overlap(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", widths([2, 3, 4, 5]))
    sweep_id = controller.create_local_sweep(path, "wandb")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agents = [subprocess.Popen([sys.executable, "-m", "harness", "agent", sweep_id], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    logs = [a.communicate(timeout=600)[1].decode() for a in agents]
    assert all(a.returncode == 0 for a in agents)
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert sorted(r["params"]["model.width"] for r in state["runs"]) == [2, 3, 4, 5]
    assert all(r["state"] == "finished" for r in state["runs"])
    assert all("start" in log for log in logs), logs  # both agents took work


def test_sigkilled_sweep_resumes_without_rerunning_a_finished_point(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", widths([2, 3, 4]))
    sweep_id = controller.create_local_sweep(path, "wandb")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agent = subprocess.Popen([sys.executable, "-m", "harness", "agent", sweep_id], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_path = f"wandb/sweep-{sweep_id}/state.json"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until one run finished and the next one is running
        runs = json.load(open(state_path))["runs"]
        if any(r["state"] == "finished" for r in runs) and any(r["state"] == "running" for r in runs):
            break
        time.sleep(0.2)
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    before = json.load(open(state_path))["runs"]
    finished_before = {r["id"] for r in before if r["state"] == "finished"}
    assert finished_before
    harness("agent", sweep_id)
    after = json.load(open(state_path))["runs"]
    finished = [r for r in after if r["state"] == "finished"]
    assert sorted(r["params"]["model.width"] for r in finished) == [2, 3, 4]  # each point once
    assert finished_before <= {r["id"] for r in finished}  # nothing finished was lost
    assert [r["state"] for r in after].count("killed") == 1
    table = runstore.load_runs("wandb", sweep=sweep_id)
    assert (table["state"] == "finished").sum() == 3


def test_wandb_sweep_without_credentials_points_to_local(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    path = write_sweep(tmp_path / "s.yaml", widths([2]))
    proc = harness("sweep", path, check=False)
    assert proc.returncode == 2
    assert "no W&B credentials" in proc.stderr and "--local" in proc.stderr

