"""Packed vs unpacked sweeps, side by side (issue 14), wall clock of the whole `harness sweep --local`.

    python benchmarks/bench_packed.py [--sweeps sweeps/modadd_pair_smoke.yaml ...] [--steps N]
                                      [--workers 2] [--pack 16] [--pack-workers W]
    python benchmarks/bench_packed.py --device cuda [--steps 2000] [--warmup 50] [--solo-steps 200] [--smoke-on-cpu]

CPU (default): for each sweep file, the same grid unpacked (`--workers W`, one process per point)
and packed (`--pack M`, one process per block), one after the other; prints both wall times (start-up,
W&B and evaluation included: what a user waits for), their ratio, and whether every run finished
with the same `grok/phase` per seed. `--steps N` overrides trainer.steps in every sweep (a shorter
variant of a long study). Sweeps of a task that does not pack are reported and skipped.

`--device cuda`: the paper-scale sparse parity width sweep (sweeps/sparse_parity_width.yaml: n_tasks
500, n 100, k 3, batch 20000, 30 widths 9..500, Adam at the task's default lr) on one GPU. Packed: all
30 widths as one block (tasks.sparse_parity.build_block: the task's one model with its 30 members'
hidden layers concatenated, one shared batch drawn on the device, one matmul for the first hidden
layer of every width), its optimizer steps (harness.members.optim.block_step, what
harness.members.module.BlockModule runs under Lightning) without W&B or Lightning, timed for `--steps`
steps after `--warmup`; the device syncs of the timed loop are counted (torch's sync debug mode).
Unpacked: each width alone through a solo run's own Lightning fit (harness.training.train.make_trainer,
its block of one: harness train's path), timed for `--solo-steps` steps. Both are projected to the full
figure (200k steps each, plus 201 evaluations of every width, timed once), with the peak GPU memory;
the last line (`summary:`) gives both projections, their ratio and whether the packed figure fits in
an hour. `--smoke-on-cpu` runs the same code on the CPU at tiny sizes (tests/test_packed_sparse_parity.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SWEEPS = [
    "sweeps/modadd_pair_smoke.yaml",
    "sweeps/modadd_phase_smoke.yaml",
    "sweeps/sparse_parity_width_smoke.yaml",
    "sweeps/omnigrok_mnist_smoke.yaml",
]


def harness(*args: str, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness", *args], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"harness {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


OUTCOMES = ("grok/phase", "emergence/n_learned")  # what a point's result is, by task (the first one present)


def outcomes(root: str, varied: list[str]) -> dict:
    """Every run finished? and [(swept values, outcome)] sorted, to compare packed with unpacked."""
    from harness import runstore

    runs = runstore.load_runs(root)
    key = next((f"summary.{k}" for k in OUTCOMES if f"summary.{k}" in runs), None)
    points = runs[[f"config.{k}" for k in varied]].astype(str).agg(",".join, axis=1)
    return {
        "n": len(runs),
        "finished": bool((runs["state"] == "finished").all()),
        "key": key,
        "outcomes": sorted(zip(points, runs[key].astype(str))) if key else None,
    }


def cpu(args) -> None:
    from harness.members.rules import packable_keys
    from harness.sweep.packed_agent import sweep_task
    from harness.sweep.spec import varied_keys

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
        pack_workers = ["--workers", str(args.pack_workers)] if args.pack_workers else []
        with tempfile.TemporaryDirectory() as tmp:
            sweep = os.path.join(tmp, "sweep.yaml")
            with open(sweep, "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
            tu = harness("sweep", sweep, "--local", "--workers", str(args.workers), "--wandb-dir", f"{tmp}/u", env=env)
            tp = harness(
                "sweep", sweep, "--local", "--pack", str(args.pack), *pack_workers, "--wandb-dir", f"{tmp}/p", env=env
            )
            varied = varied_keys(cfg)
            u, p = outcomes(f"{tmp}/u/wandb", varied), outcomes(f"{tmp}/p/wandb", varied)
        same = u["outcomes"] == p["outcomes"] and u["outcomes"] is not None
        packed = f"--pack {args.pack}" + (
            f" --workers {args.pack_workers}" if args.pack_workers else " (default workers)"
        )
        print(
            f"{path}{f' (steps={args.steps})' if args.steps else ''}: {u['n']} runs; unpacked --workers "
            f"{args.workers} {tu:.0f}s, packed {packed} {tp:.0f}s = {tp / tu:.2f}x; all finished: "
            f"{u['finished'] and p['finished']}; same {u['key']} per point ({', '.join(varied)}): {same}",
            flush=True,
        )


PAPER_WIDTHS = [
    9,
    11,
    13,
    14,
    17,
    19,
    22,
    25,
    29,
    33,
    38,
    44,
    50,
    57,
    66,
    75,
    86,
    99,
    113,
    129,
    148,
    169,
    194,
    222,
    254,
    291,
    333,
    381,
    436,
    500,
]  # sweeps/sparse_parity_width.yaml: 30 log-spaced widths 10..500
FULL_STEPS, EVAL_EVERY = 200_000, 1000  # the paper's figure: 200k steps, evaluated every 1000


def width_sweep(args) -> list[tuple[str, ...]]:
    """The paper-scale width sweep (sweeps/sparse_parity_width.yaml), or a tiny one for --smoke-on-cpu."""
    if args.smoke_on_cpu:
        data, widths, acc = (
            ("data.n_tasks=20", "data.n=16", "data.k=3", "data.batch_size=256", "eval.test_per_task=20"),
            [4, 8, 16, 32],
            "cpu",
        )
    else:
        data, widths, acc = ("data.n_tasks=500", "data.n=100", "data.k=3", "data.batch_size=20000"), PAPER_WIDTHS, "gpu"
    base = (
        "task=sparse_parity",
        "seed=0",
        "data.zipf_alpha=0.4",
        *data,
        f"trainer.accelerator={acc}",
        "trainer.progress_bar=false",
        "model.save=false",
    )
    return [base + (f"model.width={w}",) for w in widths]


def cuda(args) -> None:
    """Packed vs unpacked time of the paper's width sweep on one GPU (see the module docstring)."""
    import warnings

    import lightning as L
    import torch

    from harness.config.run import load_config
    from harness.members.optim import block_optimizer, block_step
    from harness.training.data import batch_seed, seed_rng
    from harness.training.train import make_trainer
    from tasks.sparse_parity import build, build_block

    gpu = not args.smoke_on_cpu
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one fit per width: no banners
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch (--smoke-on-cpu runs the same code on a CPU)")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sweep = width_sweep(args)
    widths = [int(m[-1].split("=")[1]) for m in sweep]

    # ---- packed: one block of all widths, its steps as BlockModule takes them (no W&B, no Lightning) ----------
    t_build = time.perf_counter()
    cfgs = [load_config(m + ("trainer.steps=200000", f"trainer.eval_every={EVAL_EVERY}")) for m in sweep]
    block = build_block(cfgs)
    t_build = time.perf_counter() - t_build
    device = block.device
    # The packed stream draws exactly the solo run's first batch, on the device.
    solo_data = block.data[0]
    seed_rng(device, batch_seed(solo_data.seed, 0, 0))
    x_solo, y_solo = solo_data.train_batch(0, device)
    x_packed, y_packed = block.groups[0].stream.batch(0)
    equal = bool(torch.equal(x_solo, x_packed) and torch.equal(y_solo, y_packed))
    print(
        f"packed block: {len(cfgs)} widths {widths[0]}..{widths[-1]} in {len(block.groups)} stream(s); built in "
        f"{t_build:.1f}s; first batch on {x_packed.device}; batches equal to the solo run's: {equal}",
        flush=True,
    )
    opt = block_optimizer(block)
    log_every = cfgs[0].trainer.log_every
    pending: list = []

    def step(s: int) -> None:
        pending.append(block_step(block, opt, s))
        if (s + 1) % log_every == 0:
            torch.stack(pending).tolist()  # BlockModule reads the losses back once per log interval (a sync)
            pending.clear()

    warmup = min(args.warmup, args.steps)
    for s in range(warmup):
        step(s)
    sync()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if gpu:
            torch.cuda.set_sync_debug_mode("warn")  # counts every device sync of the timed loop
        t0 = time.perf_counter()
        for s in range(warmup, warmup + args.steps):
            step(s)
        sync()
        packed_step = (time.perf_counter() - t0) / args.steps
        if gpu:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    packed_peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0  # 0: no GPU (smoke run)
    for _repeat in range(2):  # the first moves the test sets to the device; the second is timed
        t0 = time.perf_counter()
        for i in range(len(cfgs)):
            block.evaluate(i, warmup + args.steps)
        sync()
        eval_all = time.perf_counter() - t0  # one evaluation of every width (the same code a solo run runs)
    n_evals = FULL_STEPS // EVAL_EVERY + 1  # and one at step 0
    packed_total = packed_step * FULL_STEPS + eval_all * n_evals
    print(
        f"packed: {packed_step * 1e3:.2f} ms/step over {args.steps} steps (after {warmup} warm-up), device syncs in "
        f"the timed loop: {syncs} (BlockModule reads losses every {log_every} steps); peak GPU memory "
        f"{packed_peak:.2f} GiB; one evaluation of all widths {eval_all:.2f}s; projected {FULL_STEPS} steps + "
        f"{n_evals} evaluations: {packed_total / 3600:.2f} h",
        flush=True,
    )
    block = opt = pending = None  # free the packed block before the solo runs (not del: step() closes over them)

    # ---- unpacked: each width alone through the solo run's own Lightning fit (its block of one) -----
    class Timer(L.Callback):
        def __init__(self, start: int, end: int):
            self.start, self.end, self.t = start, end, {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in (self.start, self.end):
                sync()
                self.t[trainer.global_step] = time.perf_counter()

    solo_warm = 20  # multiples of steps_per_batch (10): the timer sees those steps
    solo_steps = args.solo_steps or (10 if args.smoke_on_cpu else 200)
    solo_steps = max(10, -(-solo_steps // 10) * 10)
    solo_total, solo_peak = 0.0, 0.0
    per_width = []
    for overrides, _w in zip(sweep, widths):
        n = solo_warm + solo_steps
        cfg = load_config(overrides + (f"trainer.steps={n}", f"trainer.eval_every={n}"))
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        job = build(cfg)
        job.datamodule.seed = cfg.seed
        timer = Timer(solo_warm, n)
        trainer = make_trainer(cfg, False, [timer])
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(job.module, datamodule=job.datamodule)
        per_step = (timer.t[n] - timer.t[solo_warm]) / solo_steps
        per_width.append(per_step)
        solo_total += per_step * FULL_STEPS
        if gpu:
            solo_peak = max(solo_peak, torch.cuda.max_memory_allocated() / 2**30)
    solo_total += eval_all * n_evals  # the same evaluations, run by each width's own run
    print(
        "unpacked ms/step by width: " + ", ".join(f"{w}:{t * 1e3:.2f}" for w, t in zip(widths, per_width)), flush=True
    )
    print(
        f"unpacked: {len(widths)} runs one after another, each timed for {solo_steps} steps (after {solo_warm}); "
        f"peak GPU memory {solo_peak:.2f} GiB; projected {FULL_STEPS} steps + {n_evals} evaluations each: "
        f"{solo_total / 3600:.2f} h",
        flush=True,
    )
    name = torch.cuda.get_device_name() if gpu else "CPU smoke run (tiny sizes, not the paper's)"
    print(
        f"summary: {name}: the {len(widths)}-width sparse parity figure ({FULL_STEPS} steps) packed "
        f"{packed_total / 3600:.2f} h, unpacked {solo_total / 3600:.2f} h, ratio {solo_total / packed_total:.1f}x; "
        f"packed fits in an hour: {'yes' if packed_total <= 3600 else 'no'}; training loop + evaluations, W&B excluded",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweeps", nargs="+", default=DEFAULT_SWEEPS)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pack", type=int, default=16)
    ap.add_argument(
        "--pack-workers",
        type=int,
        default=None,
        help="--workers of the packed sweep (default: the controller's, one per core on a CPU)",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--warmup", type=int, default=50, help="--device cuda: packed steps before timing")
    ap.add_argument(
        "--solo-steps",
        type=int,
        default=None,
        help="--device cuda: timed steps of each unpacked width (default 200; 10 with --smoke-on-cpu)",
    )
    ap.add_argument(
        "--smoke-on-cpu",
        action="store_true",
        help="--device cuda: run the GPU benchmark's code on the CPU at tiny sizes (a check before GPU time)",
    )
    args = ap.parse_args()
    if args.device == "cuda":
        args.steps = args.steps or 2000
        cuda(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()
