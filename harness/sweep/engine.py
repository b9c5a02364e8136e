"""W&B's own sweep engine, run locally: the next parameters for a sweep's state (a grid point is never
run twice), and the argv `wandb agent` would run for them (wandb's own macro expansion)."""

from __future__ import annotations

import json
from typing import Any

from harness.config.run import flatten
from harness.errors import UserError
from harness.sweep.spec import DEFAULT_COMMAND, engine_config, sweeps_package


class RepeatedPoint(UserError):
    """The engine suggested a grid point the sweep already ran: stop rather than run it again."""


def _point(params: dict) -> str:
    """A grid point's identity: its parameters as dotted keys, whichever form they were recorded in."""
    return json.dumps(flatten(params), sort_keys=True, default=str)


def next_params(cfg: dict, state: dict) -> dict | None:
    """The engine's next parameters (dotted keys), or None when the sweep is exhausted.

    A grid point that already has a run (finished, failed, running or preempted) is never started
    again, whatever the engine suggests: that is raised as RepeatedPoint.
    """
    sweeps = sweeps_package()
    engine_cfg = engine_config(cfg)
    runs = [
        sweeps.SweepRun(
            name=r["id"],
            state=_engine_state(r["state"]),
            config={k: {"value": v} for k, v in r["params"].items()},
            summaryMetrics=r.get("summary") or {},
        )
        for r in state["runs"]
        if r["state"] != "killed"
    ]
    suggestion = sweeps.next_run(engine_cfg, runs)
    if suggestion is None:
        return None
    params = {k: v["value"] for k, v in suggestion.config.items()}
    if engine_cfg.get("method", "grid") == "grid":
        point = _point(params)
        r = {_point(r["params"]): r for r in state["runs"] if r["state"] != "killed"}.get(point)
        if r:
            raise RepeatedPoint(
                f"the sweep engine suggested grid point {point} again, which run {r['id']} "
                f"already holds ({r['state']}); stopping instead of running it twice"
            )
    return params


def _engine_state(s: str) -> str:
    # A preempted run is relaunched by the controller itself: to the engine its point is taken.
    if s in ("running", "preempted"):
        return "running"
    return "finished" if s == "finished" else "failed"


def expand_command(cfg: dict, params: dict, args_json_file: str) -> list[str]:
    """The argv `wandb agent` would run for these parameters.

    wandb's helpers do the environment-variable macros and the argument formats; the final
    substitution loop lives inline in wandb's Agent._command_run (not importable), so its few
    lines are mirrored here: ${interpreter} is the literal "python", ${env} is /usr/bin/env.
    """
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(cfg.get("command") or DEFAULT_COMMAND))
    sweep_vars: dict[str, Any] = sweep_utils.create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in params.items()}}
    )
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [cfg["program"]] if cfg.get("program") else []
    sweep_vars["args_json_file"] = [args_json_file]
    sweep_vars["env"] = ["/usr/bin/env"]
    argv: list[str] = []
    for c in command:
        c = str(c)
        if c.startswith("${") and c.endswith("}"):
            argv += sweep_vars.get(c[2:-1]) or []
        else:
            argv.append(c)
    return argv
