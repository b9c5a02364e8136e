"""Steps/s of `harness train task=mnist_omnigrok` against a plain PyTorch loop of the same model.

    python benchmarks/bench_mnist_omnigrok.py [--steps 2000] [--reps 5] [--precision 32-true]

Both sides train the same MLP (the harness: the task's StackedMLP with one member; the loop: the plain
nn.Sequential MLP, the same initial weights) on the same on-device minibatches and evaluate on the same
schedule, in one process, alternating which goes first so that load from other processes hits both alike. The
steady-state rate excludes start-up (W&B init, Lightning setup): for the harness it is read from the
`_timestamp` of the logged training rows, for the loop from clocks taken at the same steps. Beside the
wall-clock rate, the CPU rate (steps per CPU-second of this process) is robust to other processes
taking the cores: for the harness, a sampling thread maps those timestamps to process CPU time. The
end-to-end rate (whole call, start-up included) is printed too. Target: steady ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.config.run import data_dir, load_config  # noqa: E402
from harness.runstore import load_history  # noqa: E402
from harness.training.train import train  # noqa: E402
from tasks import mnist_omnigrok as mo  # noqa: E402


def overrides(args) -> list[str]:
    return [
        "task=mnist_omnigrok",
        f"trainer.steps={args.steps}",
        f"trainer.eval_every={args.eval_every}",
        f"trainer.log_every={args.log_every}",
        f"trainer.precision={args.precision}",
        "trainer.threads=1",
        "trainer.progress_bar=false",
        f"model.init_scale={args.init_scale}",
    ]


def rate(steps: list[int], times: list[float], skip: int) -> float:
    """Steps per second between the first logged step past `skip` and the last one."""
    pairs = [(s, t) for s, t in zip(steps, times) if s > skip]
    (s0, t0), (s1, t1) = pairs[0], pairs[-1]
    return (s1 - s0) / (t1 - t0)


class CpuClock(threading.Thread):
    """(time.time(), process CPU seconds) every 0.25 s, to read CPU time at logged wall times. Rarely,
    so that the sampler (which takes the GIL) does not slow the run it measures."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.25):
            self.samples.append((time.time(), time.process_time()))

    def cpu_at(self, walls: list[float]) -> list[float]:
        w, c = np.array(self.samples).T
        return np.interp(walls, w, c).tolist()


def run_harness(args, wandb_dir: str) -> tuple[float, float, float]:
    cfg = load_config(overrides(args))
    clock = CpuClock()
    clock.start()
    start = time.perf_counter()
    summary = train(cfg, overrides(args))
    wall = time.perf_counter() - start
    clock.stop.set()
    clock.join()
    h = load_history(wandb_dir, run_ids=[summary["_run_id"]], keys=["train/batch_loss", "_timestamp"])
    h = h.dropna(subset=["train/batch_loss"]).sort_values("step")
    steps, stamps = h["step"].tolist(), h["_timestamp"].tolist()
    return (rate(steps, stamps, args.log_every), rate(steps, clock.cpu_at(stamps), args.log_every), args.steps / wall)


def run_plain(args) -> tuple[float, float, float]:
    """The same training without Lightning or W&B: what the harness must not be much slower than."""
    start = time.perf_counter()
    cfg = load_config(overrides(args))
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    dtype = torch.float64 if args.precision == "64-true" else torch.float32
    arrays = mo.load_mnist(
        os.path.join(data_dir(cfg), cfg.data.folder), cfg.data.split, cfg.data.n_train, cfg.data.n_test
    )
    data = mo.MnistData(arrays, cfg.data.batch_size)
    t = data.tensors(torch.device("cpu"), dtype)
    model = mo.MLP(784, cfg.model.width, cfg.model.depth, 10).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(cfg.model.init_scale)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2))
    steps, times, cpus = [], [], []
    for step in range(1, args.steps + 1):
        idx = data.next_indices(step - 1, torch.device("cpu"))
        x, y = (
            (t["x_train"], t["y_train"])
            if idx is None
            else (t["x_train"].index_select(0, idx), t["y_train"].index_select(0, idx))
        )
        loss = mo.loss_fn(o.loss, model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                for xs, ys in ((t["x_train"], t["y_train"]), (t["x_test"], t["y_test"])):
                    out = model(xs)
                    float(mo.loss_fn(o.loss, out, ys)), float((out.argmax(1) == ys).float().mean())
                float(mo.weight_norm(model))
        if step % args.log_every == 0:
            float(loss)  # the harness logs (and so syncs) the batch loss at these steps
            steps.append(step)
            times.append(time.perf_counter())
            cpus.append(time.process_time())
    wall = time.perf_counter() - start
    return rate(steps, times, args.log_every), rate(steps, cpus, args.log_every), args.steps / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--precision", default="32-true", choices=["32-true", "64-true"])
    p.add_argument("--init-scale", type=float, default=8.0)
    args = p.parse_args()
    wandb_dir = tempfile.mkdtemp(prefix="bench_omnigrok_")
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=wandb_dir)
    os.environ.setdefault("HARNESS_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    results = {"harness": [], "plain": []}
    for rep in range(args.reps):
        order = ["harness", "plain"] if rep % 2 == 0 else ["plain", "harness"]
        for side in order:
            r = run_harness(args, wandb_dir) if side == "harness" else run_plain(args)
            results[side].append(r)
            print(
                f"rep {rep} {side:8s} steady {r[0]:7.1f} steps/s, {r[1]:7.1f} steps/CPU-s; "
                f"end-to-end {r[2]:7.1f} steps/s",
                flush=True,
            )
    med = {side: [statistics.median(v[i] for v in rs) for i in (0, 1, 2)] for side, rs in results.items()}
    print(f"\n{args.steps} steps, batch 200, {args.precision}, 1 thread, median of {args.reps}:")
    print(f"{'':10s} {'steady steps/s':>15s} {'steady steps/CPU-s':>19s} {'end-to-end steps/s':>19s}")
    for side in ("plain", "harness"):
        print(f"{side:10s} {med[side][0]:15.1f} {med[side][1]:19.1f} {med[side][2]:19.1f}")
    ratios = [med["plain"][i] / med["harness"][i] for i in (0, 1, 2)]
    print(
        f"ratio (plain / harness): steady wall {ratios[0]:.3f}x, steady CPU {ratios[1]:.3f}x, "
        f"end-to-end {ratios[2]:.3f}x  (target: steady <= 1.10)"
    )


if __name__ == "__main__":
    main()
