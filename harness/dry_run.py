"""`harness sweep FILE --dry-run`: the runs a sweep would start, its grid, and an estimate of its wall
time on this machine, unpacked and with --pack, timed on real runs of its costliest point.

The timing runs are real (child processes, offline W&B into a temporary directory that is removed;
this process imports no torch): `harness train` on the costliest point for a few steps, and the same
point packed with M seeds through `harness sweep --local --pack M`. Their history rows carry W&B's
`_runtime`, which splits each into a fixed cost (start-up, wandb, shut-down), a training step and an
evaluation; those extrapolate to the sweep's steps, evaluations and runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import yaml

from harness.config.registry import config_class
from harness.config.run import flatten, valid_keys
from harness.errors import UserError
from harness.sweep import plan
from harness.sweep.spec import flat_parameters, load_sweep_yaml, validate_sweep, varied_keys


def describe_sweep(path: str, count: int | None = None) -> tuple[dict, str, list[dict] | None, list[str]]:
    """Validate the sweep and print its runs and grid. Returns (cfg, task, points, lines printed)."""
    cfg = load_sweep_yaml(path)
    task = validate_sweep(cfg, path)
    points = plan.grid_points(cfg)
    varied = varied_keys(cfg)
    lines = [f"sweep {path}: task {task}, method {cfg.get('method', 'grid')}"]
    fixed = {k: v for k, v in plan.fixed_parameters(cfg).items() if k != "task"}
    lines.append("fixed: " + (" ".join(f"{k}={v}" for k, v in fixed.items()) or "(none)"))
    if points is None:
        n = count or cfg.get("run_cap")
        lines.append(
            f"runs: drawn by W&B's {cfg.get('method')} engine while the sweep runs; "
            f"{f'{n} runs (--count or run_cap)' if n else 'no --count or run_cap: it would not stop'}"
        )
        lines += [f"  {k}: {spec}" for k, spec in flat_parameters(cfg.get("parameters") or {}).items() if k in varied]
    else:
        if count is not None:
            points = points[:count]
        lines.append(f"grid: {len(points)} runs; varied keys: {', '.join(varied) or '(none)'}")
        for key in varied:
            values = list(dict.fromkeys(json.dumps(flatten(p).get(key), default=str) for p in points))
            lines.append(f"  {key}: {len(values)} values: {', '.join(values)}")
        lines.append("runs it would start:")
        for i, p in enumerate(points, 1):
            flat = flatten(p)
            lines.append(f"  {i:4d}  " + " ".join(f"{k}={flat.get(k)}" for k in varied))
    return cfg, task, points, lines


def _steps_of(task: str, point: dict) -> tuple[int, int, int]:
    """(trainer.steps, trainer.eval_every, optimizer steps per Lightning batch) of a point."""
    from harness.config.run import load_config

    cfg = load_config([f"task={task}"] + [f"{k}={v}" for k, v in flatten(point).items() if k != "task"])
    return cfg.trainer.steps, cfg.trainer.eval_every, cfg.trainer.batch_steps()


def _timing_overrides(task: str, k: int, batch: int) -> dict:
    """K steps, evaluated at the start and the end, a train row per Lightning batch, no artifacts."""
    out = {
        "trainer.steps": k,
        "trainer.eval_every": k,
        "trainer.log_every": batch,
        "trainer.progress_bar": False,
        "trainer.ckpt_every": 0,
    }
    if "model.save" in valid_keys(config_class(task)):
        out["model.save"] = False
    return out


def _split(history, wall: float, k: int) -> plan.Timing:
    """Fixed cost, step and evaluation from one run's history (`_runtime` of each row)."""
    train = history[history["train/loss"].notna()].sort_values("_runtime")
    val = history[history["val/loss"].notna()].sort_values("_runtime") if "val/loss" in history else train[:0]
    if len(train) < 2:
        raise UserError("the timing run logged fewer than two train rows; raise --estimate-steps")
    steps = float(train["step"].iloc[-1] - train["step"].iloc[0])
    step_s = max(0.0, float(train["_runtime"].iloc[-1] - train["_runtime"].iloc[0])) / max(steps, 1.0)
    last_val = float(val["_runtime"].iloc[-1]) if len(val) else float(train["_runtime"].iloc[-1])
    eval_s = max(0.0, last_val - float(train["_runtime"].iloc[-1]))  # the final evaluation
    fixed_s = max(0.0, wall - k * step_s - 2 * eval_s)
    return plan.Timing(fixed_s, step_s, eval_s)


def _timed_run(argv: list[str], tmp: str, threads: int, what: str, k: int) -> plan.Timing:
    """Run `argv` with offline W&B into `tmp`/wandb on `threads` threads; split its wall time."""
    from harness.runstore import load_history, load_runs

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp}
    env.pop("WANDB_SWEEP_ID", None)
    env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"the timing run ({what}) failed with exit code {out.returncode}: {last}")
    wandb_dir = os.path.join(tmp, "wandb")
    runs = load_runs(wandb_dir)
    if not len(runs):
        raise UserError(f"the timing run left no run in {wandb_dir}")
    return _split(load_history(wandb_dir, run_ids=sorted(runs["id"])[:1]), wall, k)


def time_solo(task: str, point: dict, k: int, batch: int, threads: int) -> plan.Timing:
    overrides = {**{k_: v for k_, v in flatten(point).items() if k_ != "task"}, **_timing_overrides(task, k, batch)}
    with tempfile.TemporaryDirectory(prefix="harness-dry-run-") as tmp:
        argv = [sys.executable, "-m", "harness", "train", f"task={task}"] + [f"{a}={b}" for a, b in overrides.items()]
        return _timed_run(argv, tmp, threads, "one run", k)


def time_packed(cfg: dict, task: str, point: dict, k: int, batch: int, members: int, threads: int) -> plan.Timing:
    """The point trained with `members` seeds in one packed process, through the local controller, on
    the threads each of the sweep's packed workers would get."""
    params = {key: {"value": v} for key, v in flatten(point).items()}
    params.update({key: {"value": v} for key, v in _timing_overrides(task, k, batch).items()})
    seed = int(flatten(point).get("seed", 0))
    params["seed"] = {"values": list(range(seed, seed + members))}
    sweep = {"method": "grid", "command": cfg["command"], "parameters": params}  # validation required one
    with tempfile.TemporaryDirectory(prefix="harness-dry-run-") as tmp:
        path = os.path.join(tmp, "timing.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(sweep, f)
        argv = [
            sys.executable,
            "-m",
            "harness",
            "sweep",
            path,
            "--local",
            "--pack",
            str(members),
            "--workers",
            "1",
            "--wandb-dir",
            os.path.join(tmp, "wandb"),
        ]
        return _timed_run(argv, tmp, threads, f"{members} points packed", k)


def estimate(
    cfg: dict, task: str, points: list[dict], workers: int, pack: int | None, pack_workers: int, k: int
) -> list[str]:
    """Lines of the wall-time estimate, timed on the costliest point."""
    from harness.sweep.agent import threads_per_run

    top = plan.costliest(points)
    steps, eval_every, batch = _steps_of(task, top)
    k = max(batch, min(steps, k) // batch * batch)
    lines = [
        f"estimate (timed on the costliest point, {k} steps: "
        + " ".join(f"{key}={flatten(top).get(key)}" for key in varied_keys(cfg))
        + "):"
    ]
    solo = time_solo(task, top, k, batch, threads_per_run(workers))
    per_run = [solo.run_seconds(*_steps_of(task, p)[:2]) for p in points]
    lines.append(
        f"  one run: {solo.fixed_s:.1f} s fixed (start-up, wandb, shut-down) + {solo.step_s * 1e3:.2f} ms/step "
        f"x {steps} steps + {solo.eval_s:.2f} s/eval; the costliest run {solo.run_seconds(steps, eval_every):.0f} s"
    )
    total = plan.makespan(per_run, workers)
    lines.append(
        f"  unpacked, --workers {workers}: {plan.hms(total)} ({total:.0f} s; each run counted at the "
        "costliest point's step time: an upper bound)"
    )
    m = pack or min(len(points), 8)
    try:
        packed = time_packed(cfg, task, top, k, batch, m, threads_per_run(pack_workers))
    except UserError as e:
        lines.append(f"  --pack {m}: not estimated ({e})")
        return lines
    block = packed.run_seconds(steps, eval_every)
    blocks = math.ceil(len(points) / m)
    total_p = plan.makespan([block] * blocks, pack_workers)
    lines.append(
        f"  a packed block of {m}: {packed.fixed_s:.1f} s fixed + {packed.step_s * 1e3:.2f} ms/step "
        f"+ {packed.eval_s:.2f} s/eval = {block:.0f} s ({block / m:.0f} s a run)"
    )
    lines.append(
        f"  --pack {m}, --workers {pack_workers}: {plan.hms(total_p)} ({total_p:.0f} s; {blocks} blocks; "
        "points that do not share their unpackable keys need blocks of their own)"
    )
    return lines


def dry_run(path: str, workers: int | None, pack: int | None, count: int | None, estimate_steps: int) -> int:
    cfg, task, points, lines = describe_sweep(path, count)
    print("\n".join(lines), flush=True)
    if estimate_steps <= 0:  # 0: list the runs only
        return 0
    if not points:
        print("estimate: only for grid sweeps (random and bayes draw their points while they run)")
        return 0
    from harness.sweep.packed_agent import default_workers

    print(
        "timing the costliest point (a few seconds of real runs, offline, in a temporary directory) ...",
        file=sys.stderr,
        flush=True,
    )
    est = estimate(cfg, task, points, workers or 1, pack, workers or default_workers(), estimate_steps)
    print("\n".join(est), flush=True)
    print("no W&B run or sweep was created", file=sys.stderr)
    return 0
