import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("HARNESS_DATA_DIR") or os.path.join(os.path.dirname(REPO), "shared", "data")

TINY = [
    "task=sparse_parity",
    "data.n_tasks=4",
    "data.n=8",
    "data.k=2",
    "data.batch_size=256",
    "eval.test_per_task=200",
    "trainer.steps=60",
    "trainer.eval_every=20",
    "trainer.progress_bar=false",
    "trainer.threads=1",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test: real wandb in offline mode, writing under its own tmp dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HARNESS_DATA_DIR", DATA)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test may reach for the Hugging Face hub
    for var in (
        "WANDB_SWEEP_ID",
        "WANDB_RUN_ID",
        "WANDB_SWEEP_PARAM_PATH",
        "WANDB_PROJECT",
        "WANDB_ENTITY",
        "WANDB_RUN_GROUP",
        "WANDB_TAGS",
        "HARNESS_SWEEP_ID",
        "HARNESS_SWEEP_PARAM_PATH",
        "HARNESS_SWEEP_METRIC",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def harness(*args, env=None, check=True, timeout=600):
    """Run the real CLI in a subprocess, as a user would."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "harness", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=os.getcwd(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"harness {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def write_sweep(path, params: dict, method="grid", command=None, extra=""):
    lines = [f"method: {method}", "metric: {name: val/loss, goal: minimize}"]
    cmd = command or ["${env}", "${interpreter}", "-m", "harness", "train", "${args_no_hyphens}"]
    lines += ["command:"] + [f"  - {c}" for c in cmd]
    lines += ["parameters:"] + [f"  {k}: {v}" for k, v in params.items()]
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(extra))
    return str(path)


TINY_SWEEP = {
    "task": "{value: sparse_parity}",
    "data.n_tasks": "{value: 4}",
    "data.n": "{value: 8}",
    "data.k": "{value: 2}",
    "data.batch_size": "{value: 256}",
    "eval.test_per_task": "{value: 200}",
    "trainer.steps": "{value: 60}",
    "trainer.eval_every": "{value: 20}",
    "trainer.progress_bar": "{value: false}",
}


def train_block(block, steps, start=0, opt=None):
    """Steps start..steps-1 of a packed block, as harness.members.module.BlockModule takes them: (optimizer, losses
    [steps - start, M] as numpy)."""
    import numpy as np

    from harness.members.optim import block_optimizer, block_step

    opt = opt or block_optimizer(block)
    return opt, np.array([block_step(block, opt, step).tolist() for step in range(start, steps)])
