"""What a sweep would run, before it runs: its grid points (W&B's own engine, as the local controller
asks it), the varied keys, the costliest point, and the arithmetic of a wall-time estimate.

Light (no torch): the timing itself runs real runs in child processes (harness.dry_run).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from harness.config.run import flatten
from harness.sweep.engine import RepeatedPoint, next_params
from harness.sweep.spec import flat_parameters, varied_keys

MAX_LISTED_POINTS = 10000


def grid_points(cfg: dict) -> list[dict] | None:
    """Every point a grid sweep would run, in the engine's order (dotted keys); None for random/bayes,
    whose points are drawn while the sweep runs."""
    if cfg.get("method", "grid") != "grid":
        return None
    state: dict = {"runs": []}
    points = []
    while len(points) < MAX_LISTED_POINTS:
        try:
            params = next_params(cfg, state)
        except RepeatedPoint:
            break
        if params is None:
            break
        points.append(params)
        state["runs"].append({"id": f"dry{len(points)}", "state": "running", "params": params})
    return points


def fixed_parameters(cfg: dict) -> dict:
    """Parameters with one value across the sweep (dotted keys)."""
    varied = set(varied_keys(cfg))
    return {
        key: spec["value"] if "value" in spec else spec.get("values", [None])[0]
        for key, spec in flat_parameters(cfg.get("parameters") or {}).items()
        if key not in varied
    }


def size_key(key: str, value) -> bool:
    """Keys whose larger values make a step costlier: integers under model., data., eval. (widths,
    depths, data and batch sizes), seeds excluded; floats (rates, fractions, exponents) are not sizes."""
    return (
        key.split(".")[0] in ("model", "data", "eval")
        and "seed" not in key
        and isinstance(value, int)
        and not isinstance(value, bool)
    )


def costliest(points: list[dict]) -> dict:
    """The point with the largest product of its integer model.* / data.* / eval.* values (e.g. the
    widest model): a heuristic, since a step's cost is only known by running it."""
    return max(points, key=lambda p: math.prod(abs(float(v)) for k, v in flatten(p).items() if size_key(k, v) and v))


@dataclass
class Timing:
    """Measured on one point: a fixed cost per process (start-up, wandb, shut-down), a training step,
    an evaluation. For a packed block, the step and evaluation are the whole block's."""

    fixed_s: float
    step_s: float
    eval_s: float

    def run_seconds(self, steps: int, eval_every: int) -> float:
        evals = steps // eval_every + 1 + (1 if steps % eval_every else 0)  # step 0, each eval_every, the end
        return self.fixed_s + steps * self.step_s + evals * self.eval_s


def makespan(durations: list[float], workers: int) -> float:
    """Wall time of independent jobs on `workers` slots, longest first to the idlest slot (the local
    controller hands the next point to whichever worker is free)."""
    slots = [0.0] * max(1, workers)  # a heap of the slots' busy times: slots[0] is the idlest
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(slots, slots[0] + d)
    return max(slots)


def hms(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
