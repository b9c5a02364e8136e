"""Run store load time: 200 offline runs (2,000 steps x 100 metrics each), cold and cached.

    python benchmarks/bench_runstore.py [--runs 200] [--dir /tmp/bench_runstore]

Target (issues 2, 10): cold load of the runs table + history < 30 s, cached < 3 s, with every
chunk's checksum verified and the parquet + JSON cache. Also times one file with and without the
checksums, and W&B's official decoder (`wandb leet inspect --json`) for the ratio.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def make_runs(args_tuple):
    root, start, stop, steps, metrics = args_tuple
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    import wandb

    for i in range(start, stop):
        run = wandb.init(
            project="bench",
            dir=root,
            name=f"run{i}",
            config={"model": {"width": i}},
            settings=wandb.Settings(console="off", x_disable_stats=True),
            reinit="finish_previous",
        )
        for s in range(steps):
            # Values as a float32 metric prints them (~9 significant digits).
            run.log(
                {f"metric/{j:03d}": round((s * 0.37 + j) % 7.1, 6) for j in range(metrics)} | {"trainer/global_step": s}
            )
        run.finish()
    wandb.teardown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--metrics", type=int, default=100)
    p.add_argument("--dir", default="/tmp/bench_runstore2")
    args = p.parse_args()
    root = os.path.join(args.dir, "wandb")
    have = len(glob.glob(os.path.join(root, "offline-run-*")))
    if have < args.runs:
        print(f"writing {args.runs - have} runs of {args.steps} steps x {args.metrics} metrics ...", flush=True)
        chunks = [
            (args.dir, have + k, min(args.runs, have + k + (args.runs - have + 1) // 2), args.steps, args.metrics)
            for k in range(0, args.runs - have, (args.runs - have + 1) // 2)
        ]
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(make_runs, chunks))
    from harness import runstore
    from harness.config.resources import available_cpus

    files = runstore.run_files(root)[: args.runs]
    size = sum(os.path.getsize(f) for f in files) / len(files) / 1e6
    shutil.rmtree(os.path.join(root, runstore.CACHE_DIR), ignore_errors=True)

    t0 = time.perf_counter()
    runs = runstore.load_runs(root)
    hist = runstore.load_history(root)
    cold = time.perf_counter() - t0
    # The cached load, as a second analysis script sees it: a new process reading the disk cache,
    # after the cold load's cache files have reached the disk (else their writeback competes).
    os.sync()
    code = (
        "import time; from harness import runstore as r; t0 = time.perf_counter(); "
        f"a = r.load_runs({root!r}); h = r.load_history({root!r}); "
        "print(len(a), len(h), time.perf_counter() - t0)"
    )
    warms = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        assert int(out[0]) == len(runs) and int(out[1]) == len(hist)
        warms.append(float(out[2]))
    warm = statistics.median(warms)
    print("cached loads:", [round(w, 2) for w in warms])

    leet = os.path.join(os.path.dirname(sys.executable), "wandb")
    from harness.runstore import decoder as wandb_file
    from harness.runstore.decoder import read_run_file

    k = 3
    t0 = time.perf_counter()
    for f in files[:k]:
        subprocess.run([leet, "leet", "inspect", "--json", f], capture_output=True, check=True)
    t_leet = (time.perf_counter() - t0) / k

    def per_file(n=10):
        times = []
        for f in files[:n]:
            t0 = time.perf_counter()
            read_run_file(f)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_fast = per_file()
    wandb_file._VERIFY = False  # what verifying every chunk's checksum costs
    t_unchecked = per_file()
    wandb_file._VERIFY = True

    print(f"{len(runs)} runs, {size:.1f} MB per run file, {len(hist)} history rows x {hist.shape[1]} columns")
    print(
        f"cold load (table + history, checksums verified, {min(available_cpus(), 8)} processes): "
        f"{cold:.1f} s   target < 30 s"
    )
    print(
        f"cached load (new process, imports excluded, median of 3): {warm:.2f} s   target < 3 s   "
        f"(cold/cached = {cold / warm:.1f}x)"
    )
    print(
        f"one run file: fast reader {t_fast:.3f} s (median of 10; without checksums {t_unchecked:.3f} s), "
        f"wandb leet inspect --json {t_leet:.2f} s (official decoder / fast = {t_leet / t_fast:.1f}x)"
    )


if __name__ == "__main__":
    main()
