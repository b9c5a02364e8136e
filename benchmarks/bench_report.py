"""Time `python -m analysis.report` over many sparse-parity runs with per-subtask curves.

    python benchmarks/bench_report.py [--runs 500] [--subtasks 100] [--procs 2] [--dir /tmp/bench_report]

Generates real offline W&B runs (wandb.init / log / log_artifact / finish, several processes), each
with the shape of a sparse-parity run: config, history of aggregates on trainer/global_step, summary
(model/params, val/loss, emergence aggregates) and a `curves-<id>` artifact with subtask.parquet
(contract C4: step, item, loss, acc). Subtask k of a run of N parameters is learned around step
~ 100 (k+1) if the model has room for it (k < capacity(N)), as a sigmoid in log step with noise.
Then times the whole report as a user runs it (a subprocess: imports, run loading, every study,
plots, report.md/html): cold (run-store cache removed), cached, and cached with --log (offline).
Target: < 60 s for 500 runs x 100 subtasks. Generation is not timed against the target.
"""

from __future__ import annotations

import argparse
import glob
import math
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = np.unique(np.geomspace(4, 512, 25).round().astype(int))  # 25 sizes x 20 seeds = 500 runs


def curves(width: int, seed: int, n_sub: int, steps: np.ndarray) -> pd.DataFrame:
    rng = np.random.default_rng(seed * 1000 + width)
    capacity = 0.4 * width  # subtasks a model of this width can learn (quanta: frequent ones first)
    k = np.arange(n_sub)[:, None]
    mid = np.log10(100.0 * (k + 1)) + rng.normal(0, 0.05, (n_sub, 1))
    learned = k < capacity
    s = np.log10(np.maximum(steps, 1))[None, :]
    drop = 1 / (1 + np.exp(-(s - mid) / 0.03))  # sudden: 10-90% within 0.13 decade of steps
    loss = math.log(2) * (1 - np.where(learned, drop, 0.0) * 0.995) + rng.normal(0, 0.004, drop.shape)
    acc = 0.5 + 0.5 * np.where(learned, drop, 0.0) + rng.normal(0, 0.01, drop.shape)
    return pd.DataFrame(
        {
            "step": np.repeat(steps[None, :], n_sub, 0).ravel().astype("int64"),
            "item": np.repeat(np.arange(n_sub), len(steps)).astype("int64"),
            "loss": np.abs(loss).ravel(),
            "acc": np.clip(acc, 0, 1).ravel(),
        }
    )


def make_runs(jobs: list[tuple[int, int]], root: str, n_sub: int, n_evals: int) -> None:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    import wandb

    steps = np.linspace(0, 5000, n_evals).round().astype(int)
    tmp = os.path.join(root, "tmp")
    os.makedirs(tmp, exist_ok=True)
    for width, seed in jobs:
        params = (n_sub + 32) * width + width + width * 2 + 2  # one hidden layer, n = 32 bits
        cfg = {
            "task": "sparse_parity",
            "seed": seed,
            "model": {"width": int(width)},
            "data": {"n_tasks": n_sub, "n": 32, "k": 3, "zipf_alpha": 0.4},
            "eval": {"threshold_bits": 0.1},
            "trainer": {"steps": int(steps[-1]), "eval_every": int(steps[1])},
        }
        run = wandb.init(
            project="bench-report",
            config=cfg,
            job_type="train",
            name=f"sparse_parity[width={width},seed={seed}]",
            dir=root,
            settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
            reinit="finish_previous",
        )
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step")
        run.define_metric("val/loss", summary="min,last")
        c = curves(int(width), seed, n_sub, steps)
        thr = 0.1 * math.log(2)
        for st, g in c.groupby("step", sort=True):
            run.log(
                {
                    "trainer/global_step": int(st),
                    "val/loss": float(g["loss"].mean()),
                    "val/acc": float(g["acc"].mean()),
                    "emergence/n_below": int((g["loss"] < thr).sum()),
                }
            )
        below = c.pivot(index="item", columns="step", values="loss") < thr
        run.summary.update(
            {
                "model/params": params,
                "emergence/n_learned": int(below.any(axis=1).sum()),
                "emergence/n_below_end": int(below.iloc[:, -1].sum()),
                "emergence/last_step": int(steps[-1]),
                "emergence/threshold_nats": thr,
            }
        )
        path = os.path.join(tmp, f"{run.id}-subtask.parquet")
        c.to_parquet(path, index=False)
        art = wandb.Artifact(f"curves-{run.id}", type="curves")
        art.add_file(path, name="subtask.parquet")
        run.log_artifact(art)
        run.finish()
    wandb.teardown()  # returns once every run file has its exit record


def generate(root: str, n_runs: int, n_sub: int, n_evals: int, procs: int) -> float:
    jobs = [(int(WIDTHS[i % len(WIDTHS)]), i // len(WIDTHS)) for i in range(n_runs)]
    t = time.time()
    ctx = mp.get_context("spawn")
    ps = [ctx.Process(target=make_runs, args=(jobs[i::procs], root, n_sub, n_evals)) for i in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
        if p.exitcode:
            raise SystemExit(f"generator process failed with exit code {p.exitcode}")
    return time.time() - t


def timed_report(root: str, out: str, *extra: str) -> float:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=REPO)
    t, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.report", os.path.join(root, "wandb"), "--out", out, *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    dt = time.time() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if proc.returncode:
        raise SystemExit(f"analysis.report failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print("  " + "\n  ".join(line for line in proc.stderr.splitlines() if line.startswith("report:")))
    # CPU seconds of the report and its worker processes: on a loaded machine wall time grows with
    # the load, CPU time much less (on an idle 2-core machine wall ~ CPU time / parallelism)
    print(f"  wall {dt:.1f} s, CPU {cpu:.1f} s (user + sys, all processes)")
    return dt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=500)
    p.add_argument("--subtasks", type=int, default=100)
    p.add_argument("--evals", type=int, default=51, help="evaluations per run (steps 0..5000)")
    p.add_argument("--procs", type=int, default=2, help="processes writing runs")
    p.add_argument("--dir", default="/tmp/bench_report")
    p.add_argument("--regenerate", action="store_true", help="write the runs again even if --dir has them")
    args = p.parse_args()
    have = len(glob.glob(os.path.join(args.dir, "wandb", "offline-run-*", "*.wandb")))
    if args.regenerate or have < args.runs:
        shutil.rmtree(args.dir, ignore_errors=True)
        os.makedirs(args.dir)
        dt = generate(args.dir, args.runs, args.subtasks, args.evals, args.procs)
        with open(os.path.join(args.dir, "generated.txt"), "w") as f:
            f.write("\n".join(sorted(glob.glob(os.path.join(args.dir, "wandb", "offline-run-*")))))
        print(f"generated {args.runs} offline runs x {args.subtasks} subtasks x {args.evals} evaluations in {dt:.0f} s")
    else:
        print(f"reusing {have} runs in {args.dir}")
    # analysis runs of earlier timings would be read as runs too: start from the generated runs only
    listing = os.path.join(args.dir, "generated.txt")
    if not os.path.exists(listing):
        with open(listing, "w") as f:
            f.write("\n".join(sorted(glob.glob(os.path.join(args.dir, "wandb", "offline-run-*")))))
    keep = set(open(listing).read().split())
    for d in glob.glob(os.path.join(args.dir, "wandb", "offline-run-*")):
        if d not in keep:
            shutil.rmtree(d)
    shutil.rmtree(os.path.join(args.dir, "wandb", ".harness-cache"), ignore_errors=True)
    out = os.path.join(args.dir, "out")
    cold = timed_report(args.dir, out, "--no-log")
    print(f"report, cold run-store cache: {cold:.1f} s")
    warm = timed_report(args.dir, out, "--no-log")
    print(f"report, cached: {warm:.1f} s")
    logged = timed_report(args.dir, out, "--log")
    print(f"report, cached, --log (offline analysis runs): {logged:.1f} s")
    print(
        f"target < 60 s: {'met' if max(cold, logged) < 60 else 'NOT met'} (cold {cold:.1f} s, with --log {logged:.1f} s)"
    )


if __name__ == "__main__":
    main()
