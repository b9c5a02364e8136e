"""Per-step cost of `harness train` on sparse parity against a plain PyTorch loop.

    python benchmarks/bench_sparse_parity.py [--steps 600] [--repeats 5] [--width 128]

Same weights (the harness side: the task's model of one member, harness.training.nn.WidthPackedMLP; the
plain side: a plain nn.MLP with the same initial weights), batch, optimizer, data sampling and
evaluation schedule on both sides, one thread each, interleaved (so load on the machine hits both
alike); median of the repeats. Target: <= 1.10x.
The harness side includes Lightning and W&B logging (offline); start-up (imports, wandb.init) is
excluded on both sides: the clock runs from the first training step to the end of the last eval.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness.config.run import load_config  # noqa: E402
from harness.training.nn import MLP  # noqa: E402
from harness.training.train import train  # noqa: E402
from tasks.sparse_parity import SparseParityData, per_subtask  # noqa: E402


class Clock(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.t0


def harness_run(overrides: list[str]) -> float:
    import tasks.sparse_parity as sp

    clock = Clock()
    original = sp.build

    def build_with_clock(cfg):
        job = original(cfg)
        job.callbacks.append(clock)
        return job

    sp.build = build_with_clock
    try:
        train(load_config(overrides), overrides)
    finally:
        sp.build = original
    return clock.seconds


def plain_run(overrides: list[str]) -> float:
    cfg = load_config(overrides)
    L.seed_everything(cfg.seed, verbose=False)
    # A plain nn.MLP (the same weights as the task's model of one member draws), the task's data and
    # evaluation code: the harness side runs the task's WidthPackedMLP, which must cost no more.
    model = MLP(cfg.data.n_tasks + cfg.data.n, cfg.model.width, cfg.model.depth, 2)
    data = SparseParityData(cfg)
    p = data.p.float()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
    )
    cpu = torch.device("cpu")
    logged = []
    t0 = time.perf_counter()
    for step in range(cfg.trainer.steps):
        x, y = data.train_batch(step, cpu)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.trainer.log_every == 0:
            logged.append(loss.item())
        if (step + 1) % cfg.trainer.eval_every == 0 or step + 1 == cfg.trainer.steps:
            model.eval()
            loss_t, acc_t = per_subtask(cfg, model, data, cpu)
            logged.append({"val/loss": float((p * loss_t).sum()), **{i: float(v) for i, v in enumerate(loss_t)}})
            model.train()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps-per-batch", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    overrides = [
        "task=sparse_parity",
        "data.n_tasks=32",
        "data.n=32",
        "data.batch_size=4096",
        f"model.width={args.width}",
        f"trainer.steps={args.steps}",
        "trainer.eval_every=200",
        "trainer.progress_bar=false",
        "trainer.threads=1",
        f"wandb.dir={tempfile.mkdtemp()}",
        f"trainer.steps_per_batch={args.steps_per_batch}",
    ]
    harness_s, plain_s = [], []
    for _ in range(args.repeats):
        plain_s.append(plain_run(overrides))
        harness_s.append(harness_run(overrides))
    h, pl = statistics.median(harness_s), statistics.median(plain_s)
    print(f"sparse parity n_tasks=32 n=32 batch=4096 width={args.width}, {args.steps} steps, eval every 200, 1 thread")
    print(f"plain PyTorch loop: {1e3 * pl / args.steps:.2f} ms/step  (median of {args.repeats})")
    print(f"harness train:      {1e3 * h / args.steps:.2f} ms/step")
    print(f"ratio harness/plain: {h / pl:.3f}x   target <= 1.10x")


if __name__ == "__main__":
    main()
