"""DDP on CPU: one W&B run per training run, different data on each rank, a one-line error where
a task's data cannot be split."""

import glob
import json
import os

import pytest
import torch
from conftest import TINY, harness

from harness.config.run import load_config
from harness.runstore.decoder import read_run_file


class _Trainer:  # what DeviceDataModule reads from its trainer
    def __init__(self, rank):
        self.global_rank = rank
        self.strategy = type("S", (), {"root_device": torch.device("cpu")})()


def train_batches(rank: int, index: int):
    from tasks.sparse_parity import SparseParityData

    data = SparseParityData(load_config(TINY))
    data.seed, data.trainer = 0, _Trainer(rank)
    return data.on_after_batch_transfer(("train", index), 0)  # [x [256, 12], y [256]] x steps_per_batch


def test_each_rank_draws_its_own_batches_and_the_same_ones_again():
    r0, r0_again, r1 = train_batches(0, 3), train_batches(0, 3), train_batches(1, 3)
    assert len(r0) == load_config(TINY).trainer.batch_steps()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(r0, r0_again))  # a function of (seed, rank, index)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(r0, r1))
    assert not torch.equal(train_batches(0, 4)[0][0], r0[0][0])


def test_a_run_draws_its_ranks_batches_in_its_block(monkeypatch):
    """A solo run is a block of one (tasks.sparse_parity.build): its BatchStream reads the process's DDP
    rank (Lightning's, from the environment: each rank is a process of its own) and draws what
    DeviceDataModule draws for that rank."""
    from lightning.pytorch.utilities import rank_zero_only

    from tasks.sparse_parity import build

    def block_batches():
        cfg = load_config(TINY)
        stream = build(cfg).module.block.groups[0].stream
        return [stream.batch(s)[0] for s in range(3 * cfg.trainer.batch_steps(), 4 * cfg.trainer.batch_steps())]

    r0 = block_batches()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    r1 = block_batches()
    assert all(torch.equal(a, b[0]) for a, b in zip(r1, train_batches(1, 3)))
    assert all(torch.equal(a, b[0]) for a, b in zip(r0, train_batches(0, 3)))
    assert not torch.equal(r0[0], r1[0])


def test_two_cpu_processes_make_one_wandb_run(offline):
    proc = harness("train", *TINY, "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 1 prints nothing
    summary = json.loads(lines[0])
    assert summary["trainer/global_step"] == 60
    dirs = glob.glob(str(offline / "wandb" / "offline-run-*"))
    assert len(dirs) == 1 and dirs[0].endswith(summary["_run_id"])
    rf = read_run_file(os.path.join(dirs[0], f"run-{summary['_run_id']}.wandb"))
    assert rf.exit_code == 0
    val = rf.history[rf.history["val/loss"].notna()]["trainer/global_step"].astype(int).tolist()
    assert val == [0, 20, 40, 60]  # step 0 too (EvalAtStart)


def test_a_task_that_cannot_shard_says_so_in_one_line(offline):
    proc = harness("train", "task=modular_addition", "trainer.devices=2", "trainer.accelerator=cpu", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "harness: error: trainer.devices=2: data.batch_size=0 is full batch (911 training pairs), so every "
        "rank would see the same data; use trainer.devices=1"
    ]
    assert not os.path.exists(offline / "wandb")  # refused before a run was created
    proc = harness("train", *TINY, "trainer.devices=2", "trainer.strategy=ddp_spawn", check=False)
    assert proc.returncode == 2 and "use trainer.strategy=ddp" in proc.stderr


@pytest.mark.slow
@pytest.mark.skip(
    reason="known bug, left open: Lightning 2.6 broadcasts from inside its SIGTERM handler, "
    "so under DDP a SIGTERM can leave both ranks waiting in mismatched collectives "
    "(4 of 7 tries passed here; the others hung)"
)
def test_sigterm_under_ddp_checkpoints_both_ranks_and_resumes(offline):
    from test_preemption import run_files, start_and_preempt

    args = [a for a in TINY if not a.startswith("trainer.steps=")] + [
        "trainer.steps=400",
        "trainer.log_every=10",
        "trainer.ckpt_every=40",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.accelerator=cpu",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_RUN_ID="ddp1")
    code, out, err = start_and_preempt(env, str(offline / "wandb" / "checkpoints" / "ddp1" / "last.ckpt"), args)
    assert code == 143 and out == "", err[-2000:]
    stopped = int(err.strip().splitlines()[-1].split("at step ")[1].split(";")[0])
    proc = harness("train", *args, env={"WANDB_RUN_ID": "ddp1"})
    assert json.loads(proc.stdout.strip().splitlines()[-1])["trainer/resumed_from_step"] == stopped
    first, second = (read_run_file(f) for f in run_files(str(offline / "wandb"), "ddp1"))
    assert first.exit_code == 143 and second.exit_code == 0
    val = [int(s) for h in (first.history, second.history) for s in h[h["val/loss"].notna()]["trainer/global_step"]]
    assert val == list(range(0, 401, 20))  # step 0 once, not again on resume
