"""Packed vs unpacked sweeps, side by side (issue 14), wall clock of the whole `harness sweep --local`.

    python benchmarks/bench_packed.py [--sweeps sweeps/modadd_pair_smoke.yaml ...] [--steps N]
                                      [--workers 2] [--pack 16] [--pack-workers 1]
    python benchmarks/bench_packed.py --device cuda [--steps 2000] [--members 10]

CPU (default): for each sweep file, the same grid unpacked (`--workers W`, one process per point)
and packed (`--pack M`, one process per block), one after the other; prints both wall times (start-up,
W&B and evaluation included: what a user waits for), their ratio, and whether every run finished
with the same `grok/phase` per seed. `--steps N` overrides trainer.steps in every sweep (a shorter
variant of a long study). Sweeps of a task that does not pack are reported and skipped.

`--device cuda`: times the packed training loop (no W&B) of the PAIR seed study's model on one GPU
for `--steps` steps with `--members` members, and the same steps solo (one member), and projects the
50k-step figure for both. Untested here (no GPU on the build machine): its numbers are the device's.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SWEEPS = ["sweeps/modadd_pair_smoke.yaml", "sweeps/modadd_phase_smoke.yaml",
                  "sweeps/sparse_parity_width_smoke.yaml", "sweeps/omnigrok_mnist_smoke.yaml"]


def harness(*args: str, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness", *args], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"harness {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def phases(root: str) -> dict:
    from harness import runstore

    runs = runstore.load_runs(root)
    key = "summary.grok/phase"
    finished = bool((runs["state"] == "finished").all())
    return {"n": len(runs), "finished": finished,
            "phases": sorted(zip(runs["config.seed"], runs[key])) if key in runs else None}


def cpu(args) -> None:
    from harness.packed import packable_keys
    from harness.packed_agent import sweep_task

    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("OMP_NUM_THREADS", None)  # the controller shares the CPUs out (threads_per_run)
    for path in args.sweeps:
        with open(os.path.join(REPO, path)) as f:
            cfg = yaml.safe_load(f)
        task = sweep_task(cfg)
        if packable_keys(task) is None:
            print(f"{path}: task {task} does not pack yet; skipped", flush=True)
            continue
        if args.steps:
            cfg["parameters"]["trainer.steps"] = {"value": args.steps}
        with tempfile.TemporaryDirectory() as tmp:
            sweep = os.path.join(tmp, "sweep.yaml")
            with open(sweep, "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
            tu = harness("sweep", sweep, "--local", "--workers", str(args.workers), "--wandb-dir", f"{tmp}/u", env=env)
            tp = harness("sweep", sweep, "--local", "--pack", str(args.pack), "--workers", str(args.pack_workers),
                         "--wandb-dir", f"{tmp}/p", env=env)
            u, p = phases(f"{tmp}/u/wandb"), phases(f"{tmp}/p/wandb")
        same = u["phases"] == p["phases"]
        print(f"{path}{f' (steps={args.steps})' if args.steps else ''}: {u['n']} runs; unpacked --workers "
              f"{args.workers} {tu:.0f}s, packed --pack {args.pack} --workers {args.pack_workers} {tp:.0f}s = {tp / tu:.2f}x; all finished: "
              f"{u['finished'] and p['finished']}; same grok/phase per seed: {same}", flush=True)


def cuda(args) -> None:
    import torch

    from harness.config import load_config
    from harness.packed import StackedAdamW
    from tasks.modular_addition_packed import PackedModular

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")

    def time_block(m: int) -> float:
        cfgs = [load_config(("task=modular_addition", f"seed={s}", "trainer.accelerator=gpu")) for s in range(m)]
        block = PackedModular(cfgs)
        params = list(block.params().values())
        opt = StackedAdamW(params, block.lr, block.weight_decay, block.betas, block.eps)

        def step(s: int) -> None:
            losses = block.losses(s)
            for p in params:
                p.grad = None
            losses.sum().backward()
            opt.step()

        for s in range(50):
            step(s)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(args.steps):
            step(s)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps

    solo, packed = time_block(1), time_block(args.members)
    full = 50000
    print(f"{torch.cuda.get_device_name()}: solo {solo * 1e3:.3f} ms/step -> {args.members} runs one after another "
          f"{solo * full * args.members / 60:.1f} min; packed ({args.members} members) {packed * 1e3:.3f} ms/step -> "
          f"{packed * full / 60:.1f} min for all ({solo * args.members / packed:.1f}x); training loop only, "
          f"evaluations and W&B excluded", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweeps", nargs="+", default=DEFAULT_SWEEPS)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pack", type=int, default=16)
    ap.add_argument("--pack-workers", type=int, default=1, help="packed processes in parallel (--workers of the packed sweep)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--members", type=int, default=10)
    args = ap.parse_args()
    if args.device == "cuda":
        args.steps = args.steps or 2000
        cuda(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()
