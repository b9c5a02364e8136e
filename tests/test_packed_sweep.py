"""`harness sweep --local --pack M` and `harness agent ID --pack M` (issue 14): compatible grid points
in one packed process, each its own run in state.json and in W&B; SIGTERM preempts every member and
the next agent resumes the block with the same run ids."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import harness, write_sweep

from harness import runstore
from harness.cli import main
from harness.runstore.decoder import read_run_file
from harness.sweep.local import create_local_sweep

MODADD = {
    "task": "{value: modular_addition}",
    "data.p": "{value: 11}",
    "model.embed_dim": "{value: 16}",
    "model.hidden": "{value: 8}",
    "trainer.eval_every": "{value: 20}",
    "trainer.progress_bar": "{value: false}",
}


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err


def test_pack_is_refused_in_one_line_before_a_sweep_exists(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", {**MODADD, "seed": "{values: [0, 1]}", "trainer.steps": "{value: 40}"})
    code, err = run_cli(capsys, "sweep", path, "--local", "--pack", "0")
    assert code == 2 and "--pack 0" in err and len(err.strip().splitlines()) == 1
    code, err = run_cli(capsys, "sweep", path, "--pack", "2")
    assert code == 2 and "local-controller feature" in err
    assert not glob.glob(str(tmp_path / "wandb" / "sweep-*"))


@pytest.mark.slow
def test_pack_trains_compatible_points_in_one_process_each_its_own_run(tmp_path):
    # 3 seeds x 2 step counts: trainer.steps is not packable, so two blocks of 3.
    path = write_sweep(
        tmp_path / "s.yaml", {**MODADD, "seed": "{values: [0, 1, 2]}", "trainer.steps": "{values: [40, 60]}"}
    )
    proc = harness("sweep", path, "--local", "--pack", "4")
    sweep_id = proc.stdout.split()[0]
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert [r["state"] for r in state["runs"]] == ["finished"] * 6
    assert len(glob.glob(f"wandb/sweep-{sweep_id}/pack-*.log")) == 2  # one process per block
    runs = runstore.load_runs("wandb", sweep=sweep_id).set_index("id")
    assert sorted(runs.index) == sorted(r["id"] for r in state["runs"])
    assert set(runs["state"]) == {"finished"} and set(runs["job_type"]) == {"train"}
    for r in state["runs"]:
        row = runs.loc[r["id"]]
        assert row["config.seed"] == r["params"]["seed"] and row["config.trainer.steps"] == r["params"]["trainer.steps"]
        assert row["name"] == f"modular_addition[seed={r['params']['seed']},steps={r['params']['trainer.steps']}]"
        assert row["summary.grok/last_step"] == r["params"]["trainer.steps"]
        assert "val/loss" in r["summary"]  # the sweep metric reached state.json, as for a solo run
        # a member is a local sweep's run like a solo one: grouped and tagged by the sweep, config nested only
        rf = read_run_file(os.path.join(row["path"], f"run-{r['id']}.wandb"))
        assert rf.group == f"sweep-{sweep_id}" and rf.tags == [f"sweep-{sweep_id}"] and not rf.sweep_id
        assert not [k for k in rf.config if "." in k] and rf.config["seed"] == r["params"]["seed"]


@pytest.mark.slow
def test_pack_shares_a_grid_between_workers_and_defaults_to_one_process_per_core(tmp_path):
    from harness.config.resources import available_cpus
    from harness.sweep.packed_agent import default_workers

    assert default_workers() == available_cpus()  # no GPU here: one single-threaded block per core
    path = write_sweep(
        tmp_path / "s.yaml", {**MODADD, "seed": "{values: [0, 1, 2, 3]}", "trainer.steps": "{value: 40}"}
    )
    proc = harness("sweep", path, "--local", "--pack", "16", "--workers", "2")
    sweep_id = proc.stdout.split()[0]
    blocks = [
        json.load(open(p))["members"]
        for p in glob.glob(f"wandb/sweep-{sweep_id}/pack-*.json")
        if not p.endswith("results.json")
    ]
    assert sorted(len(b) for b in blocks) == [2, 2]  # two blocks side by side, not one of 4 and an idle worker
    assert "2 worker(s), OMP_NUM_THREADS=1" in proc.stderr or available_cpus() != 2


def start_packed_agent(tmp_path, seeds: int, steps: int, stderr):
    """A local sweep of `seeds` PAIR-like points checkpointing every 100 steps, and one `harness agent`
    training all of them as one block (--workers 1: the default would split them between the cores)."""
    params = {
        **MODADD,
        "seed": f"{{values: {list(range(seeds))}}}",
        "trainer.steps": f"{{value: {steps}}}",
        "trainer.ckpt_every": "{value: 100}",
        "model.save": "{value: false}",
    }
    sweep_id = create_local_sweep(write_sweep(tmp_path / "s.yaml", params), "wandb")
    agent = subprocess.Popen(
        [sys.executable, "-m", "harness", "agent", sweep_id, "--pack", str(seeds), "--workers", "1"],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )
    return sweep_id, agent


@pytest.mark.slow
def test_sigterm_preempts_every_member_and_the_next_agent_resumes_the_block(tmp_path):
    sweep_id, agent = start_packed_agent(tmp_path, seeds=3, steps=6000, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while len(glob.glob("wandb/checkpoints/*/last.ckpt")) < 3:  # mid-run, every member with a resume point
        assert agent.poll() is None and time.time() < deadline, "the block ended before its first checkpoint"
        time.sleep(0.2)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=600) == 143, agent.stderr.read()
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert [(r["state"], r["exitcode"]) for r in state["runs"]] == [("preempted", 143)] * 3
    ids = [r["id"] for r in state["runs"]]

    proc = harness("agent", sweep_id, "--pack", "3", "--workers", "1")  # the block resumes as one
    assert all(f"run {i} " in proc.stderr and "resume" in proc.stderr for i in ids)
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert [(r["id"], r["state"]) for r in state["runs"]] == [(i, "finished") for i in ids]
    runs = runstore.load_runs("wandb", sweep=sweep_id).set_index("id")
    for i in ids:
        assert runs.loc[i, "state"] == "finished" and runs.loc[i, "n_files"] == 2
        assert 100 <= runs.loc[i, "summary.trainer/resumed_from_step"] < 6000
        hist = runstore.load_history("wandb", run_ids=[i], keys=["val/loss"]).dropna(subset=["val/loss"])
        assert sorted(hist["step"]) == list(range(0, 6001, 20))  # continuous: none missing, none twice


@pytest.mark.slow
def test_sigkill_of_the_controller_reopens_every_unfinished_member(tmp_path):
    sweep_id, agent = start_packed_agent(tmp_path, seeds=2, steps=3000, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while len(glob.glob("wandb/checkpoints/*/last.ckpt")) < 2:  # mid-run
        assert agent.poll() is None and time.time() < deadline, "the block ended before its first checkpoint"
        time.sleep(0.2)
    agent.kill()  # SIGKILL: no record written; the packed process dies with it (PR_SET_PDEATHSIG)
    agent.wait()
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert [r["state"] for r in state["runs"]] == ["running", "running"]
    killed = sorted(r["id"] for r in state["runs"])

    harness("agent", sweep_id, "--pack", "2")
    state = json.load(open(f"wandb/sweep-{sweep_id}/state.json"))
    assert sorted((r["state"], r["params"]["seed"]) for r in state["runs"]) == [
        ("finished", 0),
        ("finished", 1),
        ("killed", 0),
        ("killed", 1),
    ]  # both points ran again, once
    assert sorted(r["id"] for r in state["runs"] if r["state"] == "killed") == killed


RESUMABLE = [
    "task=modular_addition",
    "data.p=11",
    "model.embed_dim=16",
    "model.hidden=8",
    "trainer.eval_every=20",
    "trainer.steps=200",
    "trainer.ckpt_every=100",
    "trainer.progress_bar=false",
    "trainer.threads=1",
]


def _summary(proc) -> dict:
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def _train_block(run_id: str, tmp_path):
    spec = tmp_path / f"block-{run_id}.json"
    spec.write_text(json.dumps({"members": [{"overrides": RESUMABLE, "run_id": run_id}]}))
    return harness("train-packed", str(spec))


def test_a_point_preempted_in_a_block_resumes_alone_and_a_solo_point_in_a_block(tmp_path):
    """Issue 18 point 7 and issue 20's one checkpoint format: a packed member's resume point is a solo
    run's last.ckpt, so it resumes through Lightning's own resume whichever way it is started again.
    The resume points are the step-100 checkpoints (trainer.ckpt_every) that a 200-step run leaves."""
    ckpts = tmp_path / "wandb" / "checkpoints"
    # a block's member, then `harness train` with the same run id: Lightning resumes it from step 100
    first = _summary(_train_block("packedfirst", tmp_path))
    assert sorted(os.listdir(ckpts / "packedfirst")) == ["finished.json", "last.ckpt"]
    # A finished run's id is not trained again (issue 18 point 4), packed or solo: one line, exit 2.
    refused = harness("train", *RESUMABLE, env={"WANDB_RUN_ID": "packedfirst"}, check=False)
    assert refused.returncode == 2 and "already finished" in refused.stderr.strip().splitlines()[-1]
    # As if it had been killed after its step-100 checkpoint (the finished mark not yet written):
    os.remove(ckpts / "packedfirst" / "finished.json")
    resumed = _summary(harness("train", *RESUMABLE, env={"WANDB_RUN_ID": "packedfirst"}))
    assert resumed["trainer/resumed_from_step"] == 100
    # the same trajectory up to the rounding of torch's fused AdamW (block) against its single-tensor one (solo)
    assert resumed["val/loss"]["last"] == pytest.approx(first["val/loss"]["last"], rel=1e-5)
    assert sorted(os.listdir(ckpts / "packedfirst")) == ["finished.json", "last.ckpt"]

    # a solo run's last.ckpt, then a block holding that run id: it continues in the block
    solo = _summary(harness("train", *RESUMABLE, env={"WANDB_RUN_ID": "solofirst"}))
    assert sorted(os.listdir(ckpts / "solofirst")) == ["finished.json", "last.ckpt"]
    os.remove(ckpts / "solofirst" / "finished.json")  # as if killed after its step-100 checkpoint
    block = _summary(_train_block("solofirst", tmp_path))
    assert block["trainer/resumed_from_step"] == 100
    assert block["val/loss"]["last"] == pytest.approx(solo["val/loss"]["last"], rel=1e-5)
    assert sorted(os.listdir(ckpts / "solofirst")) == ["finished.json", "last.ckpt"]


# A best value that lies before the resume point (tests/test_resume_summary.py: val/loss rises after
# its early minimum at this init scale); checkpoints at steps 100 and 200.
BEST_EARLY = [
    "task=modular_addition",
    "data.p=23",
    "data.train_fraction=0.5",
    "model.init_scale=0.5",
    "trainer.steps=300",
    "trainer.eval_every=50",
    "trainer.ckpt_every=100",
    "trainer.threads=1",
    "trainer.progress_bar=false",
    "model.save=false",
]


def _block(tmp_path, name: str, members: list[tuple[list[str], str]], check=True):
    spec = tmp_path / f"block-{name}.json"
    spec.write_text(json.dumps({"members": [{"overrides": o, "run_id": r} for o, r in members]}))
    return harness("train-packed", str(spec), check=check)


def test_a_packed_member_keeps_its_best_values_and_its_identity_across_a_resume(tmp_path):
    """Issue 18 (4) and 19 (6) for packed runs: its last.ckpt records the member's config and its summary
    aggregates; a resume merges them (best values = the whole run's), another config is refused."""
    from harness import runstore

    ckpts = tmp_path / "wandb" / "checkpoints" / "best1"
    first = _summary(_block(tmp_path, "first", [(BEST_EARLY, "best1")]))
    os.remove(ckpts / "finished.json")  # as if killed after its step-200 checkpoint
    again = _summary(harness("train", *BEST_EARLY, env={"WANDB_RUN_ID": "best1"}))
    assert again["trainer/resumed_from_step"] == 200
    assert again["val/loss"]["min"] == first["val/loss"]["min"]
    assert again["val/acc"]["max"] == first["val/acc"]["max"]
    hist = runstore.load_history(str(tmp_path / "wandb"), run_ids=["best1"])
    after = hist[hist["step"] > 200]["val/loss"].dropna()
    assert len(after) and after.min() > first["val/loss"]["min"]  # the resumed part alone would report worse

    os.remove(ckpts / "finished.json")
    other = [a for a in BEST_EARLY if not a.startswith("data.train_fraction=")] + ["data.train_fraction=0.6"]
    proc = harness("train", *other, env={"WANDB_RUN_ID": "best1"}, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "another run config" in last and "data.train_fraction" in last, last
    # In a block, the refused member fails alone; its neighbour trains.
    lr = [a for a in other if not a.startswith("optim.lr=")]
    proc = _block(tmp_path, "mixed", [(lr + ["optim.lr=0.002"], "best1"), (lr + ["optim.lr=0.001"], "fresh2")], False)
    states = {
        s["_run_id"]: s["_state"]
        for s in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
        if "_run_id" in s
    }
    assert proc.returncode == 1 and states == {"best1": "failed", "fresh2": "finished"}, proc.stdout[-2000:]
