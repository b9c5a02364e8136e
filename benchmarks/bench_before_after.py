"""The speed figures of a redesign, before and after, side by side in one run (issue 20).

    python benchmarks/bench_before_after.py CHECKOUT [CHECKOUT ...] [--only solo|packed] [--pair-steps N]

Each CHECKOUT is a directory holding this repository at some commit and its own `.venv` (e.g. a
`git worktree` of the commit before the change, with `make setup` run in it, and this checkout). For
every benchmark the checkouts take turns, one right after the other, so that both sides see the same
machine load; each benchmark's own ratio (the harness against a plain PyTorch loop, or a packed sweep
against the same sweep unpacked) is measured side by side inside it. Prints one table: one row per
benchmark, one column per checkout, and the load average beside each figure (ratios measured on a busy
machine are noisier; the inner side by side keeps them comparable).

The benchmarks are the repository's own scripts, run as they are:
  solo    bench_sparse_parity.py, bench_mnist_omnigrok.py, bench_modular_addition.py: a solo run's step
          against a plain PyTorch loop doing the same work (target <= 1.10x)
  packed  bench_packed.py on the PAIR seed sweep (trainer.steps cut to --pair-steps: the full 50k steps
          take ~14 minutes a side), the phase smoke and the sparse-parity width smoke: the ratio to the
          same sweep unpacked, and the packed sweep's wall time
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

SOLO = [
    ("sparse parity solo/plain", ["benchmarks/bench_sparse_parity.py"], r"ratio harness/plain: ([0-9.]+)x"),
    ("Omnigrok solo/plain (steady wall)", ["benchmarks/bench_mnist_omnigrok.py"], r"steady wall ([0-9.]+)x"),
    ("modular addition solo/plain", ["benchmarks/bench_modular_addition.py"], r"^ratio\s+([0-9.]+)x"),
]


def packed(pair_steps: int) -> list[tuple[str, list[str], str]]:
    # the ratio, and the packed sweep's own wall time: a faster solo path makes the unpacked side faster
    # too, so the packed seconds say whether packing itself got faster
    one = r", packed .*? ([0-9]+)s = ([0-9.]+)x"
    return [
        (
            f"PAIR 10 seeds, {pair_steps} steps, packed/unpacked",
            ["benchmarks/bench_packed.py", "--sweeps", "sweeps/modadd_pair.yaml", "--steps", str(pair_steps)],
            one,
        ),
        (
            "phase smoke packed/unpacked",
            ["benchmarks/bench_packed.py", "--sweeps", "sweeps/modadd_phase_smoke.yaml"],
            one,
        ),
        (
            "sparse-parity width smoke packed/unpacked",
            ["benchmarks/bench_packed.py", "--sweeps", "sweeps/sparse_parity_width_smoke.yaml"],
            one,
        ),
    ]


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def run(checkout: str, args: list[str], pattern: str) -> str:
    python = os.path.join(checkout, ".venv", "bin", "python")
    proc = subprocess.run([python, *args], cwd=checkout, capture_output=True, text=True)
    found = re.search(pattern, proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"failed ({proc.returncode}: {tail[0][:60]})"
    if len(found.groups()) == 2:  # (packed seconds, ratio)
        return f"{float(found.group(2)):.2f}x, {found.group(1)}s"
    return f"{float(found.group(1)):.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkouts", nargs="+")
    ap.add_argument("--only", choices=["solo", "packed"])
    ap.add_argument("--pair-steps", type=int, default=10000)
    a = ap.parse_args()
    for c in a.checkouts:
        if not os.path.isfile(os.path.join(c, ".venv", "bin", "python")):
            sys.exit(f"{c}: no .venv/bin/python there (run `make setup` in that checkout)")
    names = [os.path.basename(os.path.abspath(c)) for c in a.checkouts]
    benches = ([] if a.only == "packed" else SOLO) + ([] if a.only == "solo" else packed(a.pair_steps))
    print(f"{'benchmark':45s}" + "".join(f"{n:>28s}" for n in names), flush=True)
    for label, args, pattern in benches:
        cells = []
        for c in a.checkouts:
            before = load()
            figure = run(c, args, pattern)
            cells.append(f"{figure} (load {before}-{load()})")
        print(f"{label:45s}" + "".join(f"{x:>28s}" for x in cells), flush=True)


if __name__ == "__main__":
    main()
