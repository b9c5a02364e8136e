"""Local sweeps: validation, W&B's engine and macros, resume after SIGKILL, crashed runs."""

import functools
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from harness import runstore
from harness.errors import UserError
from harness.runstore.decoder import read_run_file
from harness.sweep.agent import Agent, run_env
from harness.sweep.engine import RepeatedPoint, expand_command, next_params
from harness.sweep.local import create_local_sweep, run_agent
from harness.sweep.spec import grid_size, load_sweep_yaml, validate_sweep, varied_keys
from tests.conftest import TINY_SWEEP, harness, write_sweep


def widths(values):
    return {**TINY_SWEEP, "model.width": f"{{values: [{', '.join(map(str, values))}]}}"}


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
        validate_sweep(load_sweep_yaml(path), path)


def test_schema_violations_and_bad_values_are_one_line(tmp_path):
    bad_method = write_sweep(tmp_path / "m.yaml", widths([2]), method="gird")
    with pytest.raises(UserError, match="gird"):
        validate_sweep(load_sweep_yaml(bad_method), bad_method)
    bad_value = write_sweep(tmp_path / "v.yaml", {**widths([2]), "data.k": "{value: 20}"})
    with pytest.raises(UserError, match=r"data.k=20 > data.n=8"):
        validate_sweep(load_sweep_yaml(bad_value), bad_value)
    with pytest.raises(UserError, match="sweep 'nosuchid' not found"):
        run_agent("nosuchid", str(tmp_path / "wandb"))


def cli(capsys, *argv) -> tuple[int, str]:
    """The `harness` entry point in this process (a subprocess per case would cost seconds each)."""
    from harness.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err


def _refused(capsys, tmp_path, text, *args):
    """`harness sweep` on this YAML: exit 2, one line, and no sweep directory left behind."""
    (tmp_path / "s.yaml").write_text(text)
    code, err = cli(capsys, "sweep", str(tmp_path / "s.yaml"), "--local", *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "wandb")
    return err


def test_sweeps_that_would_fail_late_are_refused_up_front(tmp_path, capsys):
    _refused = functools.partial(globals()["_refused"], capsys)
    path = write_sweep(tmp_path / "base.yaml", widths([2]))
    base = open(path).read()
    # A program: sweep runs `python PROGRAM --k=v`; the harness is a module.
    program = yaml.safe_load(base)
    program.pop("command")
    program = yaml.safe_dump({**program, "program": "train.py"})
    assert "harness is a module" in _refused(tmp_path, program)
    # bayes needs a metric; the engine would raise in a worker thread.
    bayes = base.replace("method: grid", "method: bayes").replace("metric: {name: val/loss, goal: minimize}\n", "")
    assert "bayes needs a metric" in _refused(tmp_path, bayes, "--count", "1")
    # Parameters passed in a form `harness train` does not read.
    assert "${args_json}" in _refused(tmp_path, base.replace("${args_no_hyphens}", "${args_json}"))
    # A value that fails only inside a run, and a nested block with a typo.
    assert "trainer.precision='banana'" in _refused(tmp_path, base + "  trainer.precision: {value: banana}\n")
    nested = base + "  optim:\n    parameters:\n      lrr: {values: [0.01]}\n"
    assert "optim.lrr" in _refused(tmp_path, nested) and "did you mean optim.lr" in _refused(tmp_path, nested)
    assert "run_cap" in _refused(tmp_path, base + "run_cap: 0\n")
    assert "--workers 0" in _refused(tmp_path, base, "--workers", "0")
    assert "--count 0" in _refused(tmp_path, base, "--count", "0")
    # A random sweep with no end: refused before its directory exists.
    random = base.replace("method: grid", "method: random")
    assert "--count N or run_cap" in _refused(tmp_path, random)


def test_command_expansion_matches_wandb_agent():
    cfg = {"command": ["${env}", "${interpreter}", "-m", "harness", "train", "${args_no_hyphens}"]}
    argv = expand_command(cfg, {"task": "sparse_parity", "optim.lr": 0.001, "model.width": 8}, "x.json")
    assert argv == [
        "/usr/bin/env",
        "python",
        "-m",
        "harness",
        "train",
        "task=sparse_parity",
        "optim.lr=0.001",
        "model.width=8",
    ]
    program = expand_command({"program": "train.py"}, {"a": 1}, "x.json")
    assert program == ["/usr/bin/env", "python", "train.py", "--a=1"]


def test_local_sweep_runs_the_grid_with_one_consistent_config(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", widths([2, 4, 8]))
    proc = harness("sweep", path, "--local", "--workers", "2")
    sweep_id = proc.stdout.strip().splitlines()[-1]
    runs = runstore.load_runs("wandb", sweep=sweep_id)
    assert len(runs) == 3 and set(runs["state"]) == {"finished"}
    assert sorted(runs["config.model.width"]) == [2, 4, 8]
    assert set(runs["sweep"]) == {sweep_id}
    # Nested as in a plain run (contract C8), and only nested: no flat `model.width` beside it (a local
    # sweep's parameters file is not WANDB_SWEEP_PARAM_PATH, which wandb.init would copy in); named
    # from the one key the sweep varies (HARNESS_SWEEP_VARIED, set by the controller).
    rf = read_run_file(os.path.join(runs.loc[0, "path"], f"run-{runs.loc[0, 'id']}.wandb"))
    width = rf.config["model"]["width"]
    assert rf.config["model"]["depth"] == 1 and not [k for k in rf.config if "." in k]
    assert rf.name == f"sparse_parity[width={width}]"
    # The environment wandb agent sets reached the run: its id is the one the controller chose.
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert {r["id"] for r in state["runs"]} == set(runs["id"])
    # The controller learnt each run's metric from the result file the run wrote (not from its log):
    # the best val/loss of the run's own W&B summary (the sweep's metric, goal minimize).
    for r in state["runs"]:
        with open(f"wandb/sweep-{sweep_id}/{r['id']}.result.json") as f:
            result = json.load(f)[r["id"]]
        assert result["state"] == "finished" and result["exitcode"] == 0
        best = runs.set_index("id").loc[r["id"], "summary.val/loss.min"]
        assert r["summary"] == {"val/loss": result["summary"]["val/loss"]["min"]} and r["summary"]["val/loss"] == best
    # harness runs exports the same table.
    harness("runs", "wandb", "--sweep", sweep_id, "-o", "runs.csv")
    harness("runs", "wandb", "--sweep", sweep_id, "-o", "runs.parquet")
    csv, pq = pd.read_csv("runs.csv"), pd.read_parquet("runs.parquet")
    assert len(csv) == len(pq) == 3 and {"id", "name", "state", "sweep", "config.model.width"} <= set(csv.columns)
    assert any(c.startswith("summary.val/loss") for c in csv.columns)  # val/loss or its declared min
    proc = harness("runs", "wandb", "--sweep", "nope1234", check=False)
    assert proc.returncode == 2 and "nope1234" in proc.stderr


def test_a_crashing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    # width 0 passes the type check but the model refuses it inside the run: exit code != 0.
    path = write_sweep(tmp_path / "s.yaml", widths([2, 3]))
    sweep_id = create_local_sweep(path, "wandb")
    cfg_path = f"wandb/sweep-{sweep_id}/sweep.yaml"
    cfg = yaml.safe_load(open(cfg_path))
    cfg["parameters"]["model.width"]["values"] = [2, -1, 3]  # as if edited after validation
    yaml.safe_dump(cfg, open(cfg_path, "w"))
    proc = harness("agent", sweep_id, check=False)
    assert proc.returncode == 1  # a failed run is not a successful sweep
    assert "2 finished, 1 failed" in proc.stderr.splitlines()[-1]
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    by_width = {r["params"]["model.width"]: r["state"] for r in state["runs"]}
    assert by_width == {2: "finished", -1: "failed", 3: "finished"}


def test_nested_parameters_and_args_macro_run_each_point_once_under_wandb_dir(tmp_path):
    # W&B's nested syntax, wandb's default ${args} (--key=value), no --wandb-dir: runs go to $WANDB_DIR/wandb.
    params = {**TINY_SWEEP, "model": "{parameters: {width: {values: [2, 3]}, depth: {value: 1}}}"}
    path = write_sweep(
        tmp_path / "s.yaml", params, command=["${env}", "${interpreter}", "-m", "harness", "train", "${args}"]
    )
    scratch = tmp_path / "scratch"
    proc = harness("sweep", path, "--local", "--workers", "2", env={"WANDB_DIR": str(scratch)})
    sweep_id = proc.stdout.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "wandb")
    state = json.load(open(scratch / "wandb" / f"sweep-{sweep_id}" / "state.json"))
    assert sorted(r["params"]["model.width"] for r in state["runs"]) == [2, 3]  # once each, not 46 times
    assert {r["state"] for r in state["runs"]} == {"finished"}
    starts = [l for l in proc.stderr.splitlines() if " start:" in l]
    assert len(starts) == 2 and {l.split(" start:")[0].split()[-1] for l in starts} == {"1/2", "2/2"}
    runs = runstore.load_runs(str(scratch / "wandb"), sweep=sweep_id)
    assert sorted(runs["config.model.width"]) == [2, 3] and set(runs["state"]) == {"finished"}


def test_the_controller_never_starts_a_grid_point_that_already_ran():
    # A run recorded in W&B's nested form is a point the engine does not recognise (it suggested it
    # again, 46 times, before): the controller compares points itself and stops instead.
    cfg = {"method": "grid", "parameters": {"task": {"value": "sparse_parity"}, "model.width": {"values": [2, 3]}}}
    state = {"runs": [{"id": "a", "state": "finished", "params": {"task": "sparse_parity", "model": {"width": 2}}}]}
    with pytest.raises(RepeatedPoint, match="grid point .* again, which run a already holds"):
        next_params(cfg, state)
    state["runs"][0]["params"] = {"task": "sparse_parity", "model.width": 2}
    assert next_params(cfg, state) == {"task": "sparse_parity", "model.width": 3}


def test_varied_keys_and_threads_per_run(monkeypatch):
    cfg = {
        "parameters": {
            "task": {"value": "x"},
            "seed": {"values": [0, 1]},
            "optim.lr": {"min": 0.1, "max": 1.0},
            "model": {"parameters": {"width": {"values": [2, 4]}, "depth": {"values": [1]}}},
        }
    }
    assert varied_keys(cfg) == ["seed", "optim.lr", "model.width"]
    assert grid_size({"parameters": {"a": {"values": [1, 2, 3]}, "b": {"min": 1, "max": 2}}}) == 6
    from harness.config.resources import available_cpus

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = run_env(cfg, "s", "r", "p.yaml", "wandb", workers=2)
    assert env["OMP_NUM_THREADS"] == str(max(1, available_cpus() // 2))
    assert env["HARNESS_SWEEP_VARIED"] == "seed,optim.lr,model.width" and env["WANDB_RUN_ID"] == "r"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # set by the user: passed on as is
    assert run_env(cfg, "s", "r", "p.yaml", "wandb", workers=2)["OMP_NUM_THREADS"] == "3"


def test_available_cpus_follows_the_affinity_mask():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity API on this platform")
    code = "from harness.config.resources import available_cpus; print(available_cpus())"
    one = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert one.stdout.strip() == "1"  # os.cpu_count() would still say every core of the machine


def test_run_cap_counts_the_whole_sweep_not_each_agent(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", widths([2, 3, 4]), extra="run_cap: 2\n")
    sweep_id = create_local_sweep(path, "wandb")
    first = Agent(sweep_id, "wandb", workers=1, count=None)
    assert first.claim_block()[0][2] == 1 and first.claim_block()[0][2] == 2 and first.claim_block() is None
    second = Agent(sweep_id, "wandb", workers=1, count=None)  # another agent, same sweep
    assert second.claim_block() is None
    assert len(json.load(open(f"wandb/sweep-{sweep_id}/state.json"))["runs"]) == 2


def test_a_corrupt_state_file_is_one_line_with_the_way_back(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", widths([2, 3]), extra="run_cap: 1\n")
    sweep_id = create_local_sweep(path, "wandb")
    Agent(sweep_id, "wandb", workers=1, count=None).claim_block()  # a second write: .bak exists
    state = f"wandb/sweep-{sweep_id}/state.json"
    with open(state, "w") as f:
        f.write('{"runs": [')  # cut mid-write by a full disk
    proc = harness("agent", sweep_id, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    full = os.path.abspath(state)  # the agent found the sweep under $WANDB_DIR/wandb
    assert len(err) == 1 and "state.json is corrupt" in err[0] and f"`cp {full}.bak {full}`" in err[0], err
    os.replace(state + ".bak", state)  # the hint works: the state before the last write
    assert json.load(open(state))["runs"] == []


def test_a_worker_that_cannot_start_its_run_makes_the_agent_fail(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", widths([2, 3]))
    sweep_id = create_local_sweep(path, "wandb")
    cfg_path = f"wandb/sweep-{sweep_id}/sweep.yaml"
    cfg = yaml.safe_load(open(cfg_path))
    cfg["command"] = ["no-such-program-here", "${args}"]  # as if edited, or PATH changed, after validation
    yaml.safe_dump(cfg, open(cfg_path, "w"))
    proc = harness("agent", sweep_id, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "stopped: FileNotFoundError" in proc.stderr
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert [r["state"] for r in state["runs"]] == ["failed"]  # recorded, not left `running`


def test_two_agents_share_a_sweep_without_overlap(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", widths([2, 3, 4, 5]))
    sweep_id = create_local_sweep(path, "wandb")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "harness", "agent", sweep_id],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    logs = [a.communicate(timeout=600)[1].decode() for a in agents]
    assert all(a.returncode == 0 for a in agents)
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert sorted(r["params"]["model.width"] for r in state["runs"]) == [2, 3, 4, 5]
    assert all(r["state"] == "finished" for r in state["runs"])
    assert all("start" in log for log in logs), logs  # both agents took work


def test_sigkilled_sweep_resumes_without_rerunning_a_finished_point(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", widths([2, 3, 4]))
    sweep_id = create_local_sweep(path, "wandb")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agent = subprocess.Popen(
        [sys.executable, "-m", "harness", "agent", sweep_id],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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


@pytest.mark.slow
def test_sigterm_to_the_controller_preempts_and_the_next_agent_resumes_the_point_once(tmp_path):
    # Contract C5 end to end: SIGTERM to the local controller mid-run -> the run checkpoints and exits 143,
    # the controller records it preempted and exits 143; `harness agent` relaunches the point first with
    # the same run id, it resumes from last.ckpt, and the history has every evaluation exactly once.
    params = {
        **widths([2]),
        "trainer.steps": "{value: 4000}",
        "trainer.eval_every": "{value: 100}",
        "trainer.ckpt_every": "{value: 100}",
    }
    sweep_id = create_local_sweep(write_sweep(tmp_path / "s.yaml", params), "wandb")
    agent = subprocess.Popen(
        [sys.executable, "-m", "harness", "agent", sweep_id],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    while not glob.glob("wandb/checkpoints/*/last.ckpt"):  # mid-run, with a resume point on disk
        assert agent.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=600) == 143, agent.stderr.read()
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert [(r["state"], r["exitcode"]) for r in state["runs"]] == [("preempted", 143)]
    run_id = state["runs"][0]["id"]

    proc = harness("agent", sweep_id)
    assert f"run {run_id} 1/1 resume:" in proc.stderr
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert [(r["id"], r["state"]) for r in state["runs"]] == [(run_id, "finished")]  # the point ran once
    runs = runstore.load_runs("wandb", sweep=sweep_id)
    assert list(runs["id"]) == [run_id] and list(runs["state"]) == ["finished"] and list(runs["n_files"]) == [2]
    hist = runstore.load_history("wandb", run_ids=[run_id], keys=["val/loss"]).dropna(subset=["val/loss"])
    assert sorted(hist["step"]) == list(range(0, 4001, 100))  # continuous: none missing, none twice
    # Resumed, not restarted: the first file was preempted at a checkpoint, the second starts after it.
    first, second = (read_run_file(p) for p in sorted(glob.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")))
    assert first.exit_code == 143 and first.preempting and second.exit_code == 0
    stopped = first.history["trainer/global_step"].max()
    assert 100 <= stopped < 4000 and second.history["trainer/global_step"].min() > 100
