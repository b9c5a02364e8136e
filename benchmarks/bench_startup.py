"""Start-up cost of `harness train`: a tiny run's whole process against the floor any W&B + Lightning
script pays (import torch, Lightning and wandb, `wandb.init` offline, `run.finish()`).

    python benchmarks/bench_startup.py [--repeats 5] [--steps 20]

Each repetition runs the floor script, the tiny harness run, the same run written as a plain
Lightning + WandbLogger script (PLAIN_FIT) and `harness train ... --cfg` as fresh processes, one
after the other (alternating, so load on the machine hits all alike); the medians and the harness's
overhead beyond each reference (median of the paired differences) are printed with the load average.
Target: overhead < 1 s. The tiny run trains `--steps` optimizer steps of a 4-subtask sparse parity
model on one thread (a few ms of training): the rest of its time is start-up and shut-down.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

FLOOR = """
import sys, torch, lightning, wandb
run = wandb.init(mode="offline", dir=sys.argv[1], project="startup-floor", config={"x": 1})
run.log({"loss": 1.0})
run.finish()
"""


# The same work written by hand as a Lightning user would: a width-8 MLP on random bits, `steps`
# optimizer steps, one validation, WandbLogger with the checkpoint logged as a model artifact (what
# log_model=True does online; Lightning refuses it offline),
# and a wandb.Table in the summary (the harness logs its per-subtask emergence table). What a run of
# this size costs under Lightning and W&B whatever wraps it: the harness's overhead beyond *this* is
# what it adds itself.
PLAIN_FIT = """
import sys, torch, lightning as L, wandb
from lightning.pytorch.loggers import WandbLogger
torch.set_num_threads(1)
steps = int(sys.argv[2])
x = torch.randint(0, 2, (256 * max(steps, 1), 12)).float(); y = (x[:, :3].sum(1) % 2).long()
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
class M(L.LightningModule):
    def __init__(self):
        super().__init__(); self.net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    def training_step(self, b, i):
        loss = torch.nn.functional.cross_entropy(self.net(b[0]), b[1]); self.log("train/loss", loss); return loss
    def validation_step(self, b, i):
        self.log("val/loss", torch.nn.functional.cross_entropy(self.net(b[0]), b[1]))
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), 1e-2)
logger = WandbLogger(project="startup-plain", save_dir=sys.argv[1])  # offline: WANDB_MODE
trainer = L.Trainer(max_steps=steps, val_check_interval=steps, limit_val_batches=1, logger=logger,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
trainer.fit(M(), data, data)
run = logger.experiment
trainer.save_checkpoint(sys.argv[1] + "/model.ckpt")  # as log_model=True would log it online
art = wandb.Artifact(f"model-{run.id}", type="model"); art.add_file(sys.argv[1] + "/model.ckpt")
run.log_artifact(art, aliases=["latest", "best"])
run.summary["items"] = wandb.Table(columns=["item", "step", "reached", "loss"], data=[[0, 1, True, 0.1]])
wandb.finish()
"""


def tiny_run(steps: int) -> list[str]:
    return [
        "task=sparse_parity",
        "data.n_tasks=4",
        "data.n=8",
        "data.k=2",
        "data.batch_size=256",
        "eval.test_per_task=200",
        f"trainer.steps={steps}",
        f"trainer.eval_every={steps}",
        "trainer.progress_bar=false",
        "trainer.threads=1",
        "model.width=8",
    ]


def wall(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one process. CPU time (user + system, the child's own) is what
    load on a shared machine inflates least: on 2 cores shared with other jobs, wall time mostly
    measures the wait for a core."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    harness = [sys.executable, "-m", "harness", "train"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp, "OMP_NUM_THREADS": "1"}
        cases = {
            "floor (import torch+lightning+wandb, init, finish)": [sys.executable, "-c", FLOOR, tmp],
            f"harness train (tiny run, {args.steps} steps)": harness + tiny_run(args.steps),
            f"plain Lightning + WandbLogger, same work ({args.steps} steps)": [
                sys.executable,
                "-c",
                PLAIN_FIT,
                tmp,
                str(args.steps),
            ],
            "harness train task=sparse_parity --cfg": harness + ["task=sparse_parity", "--cfg"],
        }
        for argv in cases.values():  # warm the file cache once; not timed
            wall(argv, env)
        print(f"load average before: {load()}  ({os.cpu_count()} CPUs)", flush=True)
        times: dict[str, list[float]] = {name: [] for name in cases}
        cpu: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(args.repeats):
            for name, argv in cases.items():
                w, c = wall(argv, env)
                times[name].append(w)
                cpu[name].append(c)
            print(
                f"repeat {i + 1}: "
                + ", ".join(f"{times[n][-1]:.2f} s ({cpu[n][-1]:.2f} s CPU)" for n in cases)
                + f"  (load {load()})",
                flush=True,
            )
        print(f"load average after:  {load()}", flush=True)
    for name in cases:
        t, c = times[name], cpu[name]
        print(
            f"{name:55s} wall median {statistics.median(t):6.2f} s (min {min(t):.2f}, max {max(t):.2f}); "
            f"CPU median {statistics.median(c):6.2f} s  n={len(t)}"
        )
    floor, run, plain = list(cases)[:3]
    for base, label in ((floor, "the import-and-init floor"), (plain, "the same work in plain Lightning + W&B")):
        for what, d in (("wall", times), ("CPU", cpu)):
            paired = [r - f for r, f in zip(d[run], d[base])]
            print(
                f"harness overhead beyond {label} ({what}): median {statistics.median(paired):+.2f} s "
                f"(paired differences {', '.join(f'{x:+.2f}' for x in paired)}); target < 1 s"
            )


if __name__ == "__main__":
    main()
