"""Sweeps: validation, the local controller (offline, one machine) and the hand-off to W&B.

The local controller uses W&B's own sweep engine (the `sweeps` package) to pick parameters and
wandb's own code to expand command macros, and sets the environment that `wandb agent` sets
(WANDB_SWEEP_ID, WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH), so a run cannot tell the two apart.
State lives in `<wandb dir>/sweep-<id>/state.json` under a file lock: several agents can share a
sweep, and a sweep killed at any point resumes without re-running a finished grid point.
"""
from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import yaml
from filelock import FileLock

from harness.errors import UserError
from harness.config import ConfigError, check_overrides
from wandb.sdk.lib.runid import generate_id

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
FLOAT_AS_STRING = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
MAX_CHECKED_COMBINATIONS = 2000


# -- validation ---------------------------------------------------------------------------------

def load_sweep_yaml(path: str) -> dict:
    if not os.path.exists(path):
        raise UserError(f"sweep file {path!r} does not exist")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: a sweep file is a mapping with method, parameters and command")
    return cfg


def _values(spec: dict) -> list:
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec[k] for k in ("min", "max") if k in spec]


def validate_sweep(cfg: dict, path: str = "sweep") -> str:
    """W&B's sweep schema, then every parameter against the task's config schema. Returns the task."""
    import jsonschema

    sweeps = _sweeps()

    params = cfg.get("parameters")
    if not isinstance(params, dict) or not params:
        raise UserError(f"{path}: no parameters section (a mapping of dotted config keys)")
    for key, spec in params.items():
        if not isinstance(spec, dict):
            raise UserError(f"{path}: parameter {key!r} must be a mapping like {{values: [...]}}, got {spec!r}")
        for v in _values(spec):
            if isinstance(v, str) and FLOAT_AS_STRING.match(v):
                raise UserError(f"{path}: parameter {key} value {v!r} is a string in YAML; write it as "
                                f"{float(v):.1e} (a float needs a dot before the exponent)")
    try:
        sweeps.SweepConfig(cfg)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "top level"
        raise UserError(f"{path}: {e.message} (at {where}; see W&B's sweep configuration schema)") from None
    command = cfg.get("command", DEFAULT_COMMAND)
    if not any(str(c).startswith("${args") for c in command):
        raise UserError(f"{path}: command {command} passes no parameters; add ${{args_no_hyphens}}")
    task_spec = params.get("task")
    tasks = _values(task_spec) if isinstance(task_spec, dict) else []
    if len(tasks) != 1:
        raise UserError(f"{path}: parameters must fix the task, e.g. task: {{value: sparse_parity}}")
    task = tasks[0]
    choices = {k: _values(spec) for k, spec in params.items() if k != "task"}
    try:
        for key, values in choices.items():
            for v in values:
                check_overrides(task, {key: v}, cross_field=False)
        # Cross-field checks (k <= n, ...) on every combination, up to a bound.
        for combo in itertools.islice(itertools.product(*choices.values()), MAX_CHECKED_COMBINATIONS):
            check_overrides(task, dict(zip(choices, combo)))
    except ConfigError as e:
        raise UserError(f"{path}: {e}") from None
    return task


# -- local sweeps -------------------------------------------------------------------------------

def wandb_root(wandb_dir: str) -> str:
    """The directory that holds the runs (`.../wandb`), whether given it or its parent."""
    return wandb_dir if os.path.basename(os.path.normpath(wandb_dir)) == "wandb" else os.path.join(wandb_dir, "wandb")


def sweep_dir(sweep_id: str, wandb_dir: str) -> str:
    root = wandb_root(wandb_dir)
    path = os.path.join(root, f"sweep-{sweep_id}")
    if not os.path.exists(os.path.join(path, "state.json")):
        known = sorted(d[6:] for d in os.listdir(root) if d.startswith("sweep-")) if os.path.isdir(root) else []
        raise UserError(f"sweep {sweep_id!r} not found in {root} (local sweeps there: {', '.join(known) or 'none'})")
    return path


def create_local_sweep(yaml_path: str, wandb_dir: str = "wandb") -> str:
    cfg = load_sweep_yaml(yaml_path)
    validate_sweep(cfg, yaml_path)
    sweep_id = generate_id(8)
    path = os.path.join(wandb_root(wandb_dir), f"sweep-{sweep_id}")
    os.makedirs(path)
    with open(os.path.join(path, "sweep.yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    _write_state(path, {"sweep_id": sweep_id, "source": os.path.abspath(yaml_path), "runs": []})
    return sweep_id


def _read_state(path: str) -> dict:
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def _write_state(path: str, state: dict) -> None:
    tmp = os.path.join(path, f"state.json.{os.getpid()}.{threading.get_ident()}")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, os.path.join(path, "state.json"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(state: dict) -> None:
    """Runs whose agent died (SIGKILL, power loss) are marked killed; their grid points reopen."""
    host = socket.gethostname()
    for r in state["runs"]:
        if r["state"] == "running" and r["host"] == host and not _alive(r["agent_pid"]):
            r["state"] = "killed"


def _sweeps():
    import warnings

    with warnings.catch_warnings():  # the sweeps engine still uses pydantic v1 config names
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def next_params(cfg: dict, state: dict) -> dict | None:
    sweeps = _sweeps()

    runs = [sweeps.SweepRun(name=r["id"], state=_engine_state(r["state"]),
                            config={k: {"value": v} for k, v in r["params"].items()},
                            summaryMetrics=r.get("summary") or {})
            for r in state["runs"] if r["state"] != "killed"]
    suggestion = sweeps.next_run(cfg, runs)
    if suggestion is None:
        return None
    return {k: v["value"] for k, v in suggestion.config.items()}


def _engine_state(s: str) -> str:
    return "running" if s == "running" else ("finished" if s == "finished" else "failed")


def expand_command(cfg: dict, params: dict, args_json_file: str) -> list[str]:
    """The argv `wandb agent` would run for these parameters.

    wandb's helpers do the environment-variable macros and the argument formats; the final
    substitution loop lives inline in wandb's Agent._command_run (not importable), so its few
    lines are mirrored here: ${interpreter} is the literal "python", ${env} is /usr/bin/env.
    """
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(cfg.get("command") or DEFAULT_COMMAND))
    sweep_vars: dict[str, Any] = sweep_utils.create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in params.items()}})
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


def _die_with_parent() -> None:
    # A SIGKILLed agent must not leave runs behind that nobody records (Linux only).
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _run_env(sweep_id: str, run_id: str, param_path: str, root: str, workers: int) -> dict:
    env = dict(os.environ)
    env.update(WANDB_SWEEP_ID=sweep_id, WANDB_RUN_ID=run_id, WANDB_SWEEP_PARAM_PATH=param_path,
               WANDB_DIR=os.path.dirname(os.path.abspath(root)))
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    # `python` in the command must be this environment's interpreter, as if it were activated.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def launch(cfg: dict, sweep_id: str, path: str, run_id: str, params: dict, workers: int) -> int:
    from wandb.sdk.lib import config_util

    param_path = os.path.abspath(os.path.join(path, f"config-{run_id}.yaml"))
    config_util.save_config_file_from_dict(param_path, {k: {"value": v} for k, v in params.items()})
    args_json = os.path.abspath(os.path.join(path, f"config-{run_id}.json"))
    with open(args_json, "w") as f:
        json.dump(params, f)
    argv = expand_command(cfg, params, args_json)
    root = os.path.dirname(path)
    with open(os.path.join(path, f"{run_id}.log"), "w") as log:
        proc = subprocess.Popen(argv, env=_run_env(sweep_id, run_id, param_path, root, workers),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        return proc.wait()


def _last_json(log_path: str) -> dict:
    try:
        with open(log_path) as f:
            lines = [l for l in f.read().splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def run_agent(sweep_id: str, wandb_dir: str = "wandb", workers: int = 1, count: int | None = None) -> None:
    """Run (or join, or resume) a local sweep until its grid is exhausted or `count` runs started."""
    path = sweep_dir(sweep_id, wandb_dir)
    with open(os.path.join(path, "sweep.yaml")) as f:
        cfg = yaml.safe_load(f)
    cap = count if count is not None else cfg.get("run_cap")
    if cfg["method"] != "grid" and cap is None:
        raise UserError(f"method {cfg['method']!r} never runs out of parameters: give --count N or run_cap")
    lock = FileLock(os.path.join(path, "state.lock"))
    started = [0]
    metric = (cfg.get("metric") or {}).get("name")

    def claim() -> tuple[str, dict] | None:
        with lock:
            state = _read_state(path)
            _reap(state)
            if cap is not None and started[0] >= cap:
                _write_state(path, state)
                return None
            params = next_params(cfg, state)
            if params is None:
                _write_state(path, state)
                return None
            run_id = generate_id(8)
            state["runs"].append({"id": run_id, "params": params, "state": "running", "host": socket.gethostname(),
                                  "agent_pid": os.getpid(), "started": time.time()})
            _write_state(path, state)
            started[0] += 1
            return run_id, params

    def finish(run_id: str, code: int, seconds: float) -> None:
        summary = _last_json(os.path.join(path, f"{run_id}.log"))
        with lock:
            state = _read_state(path)
            for r in state["runs"]:
                if r["id"] == run_id:
                    r.update(state="finished" if code == 0 else ("crashed" if code < 0 else "failed"),
                             exitcode=code, seconds=round(seconds, 1),
                             summary={metric: summary[metric]} if metric in summary else {})
            _write_state(path, state)
        value = summary.get(metric)
        shown = f" {metric}={value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        status = "finished" if code == 0 else f"FAILED (exit {code}; log {path}/{run_id}.log)"
        print(f"[sweep {sweep_id}] run {run_id} {status} in {seconds:.0f}s{shown}", file=sys.stderr, flush=True)

    def worker() -> None:
        while True:
            claimed = claim()
            if claimed is None:
                return
            run_id, params = claimed
            shown = " ".join(f"{k}={v}" for k, v in params.items() if k != "task")
            print(f"[sweep {sweep_id}] run {run_id} start: {shown}", file=sys.stderr, flush=True)
            t0 = time.time()
            code = launch(cfg, sweep_id, path, run_id, params, workers)
            finish(run_id, code, time.time() - t0)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    state = _read_state(path)
    n = {s: sum(r["state"] == s for r in state["runs"]) for s in ("finished", "failed", "crashed", "killed", "running")}
    print(f"[sweep {sweep_id}] " + ", ".join(f"{v} {k}" for k, v in n.items() if v), file=sys.stderr, flush=True)


# -- W&B ----------------------------------------------------------------------------------------

def create_wandb_sweep(yaml_path: str, project: str | None = None, entity: str | None = None) -> str:
    from harness.tracking import has_credentials

    cfg = load_sweep_yaml(yaml_path)
    validate_sweep(cfg, yaml_path)
    if not has_credentials():
        raise UserError("no W&B credentials (run `wandb login` or set WANDB_API_KEY); add --local to run offline")
    import wandb

    sweep_id = wandb.sweep(cfg, project=project or cfg.get("project"), entity=entity or cfg.get("entity"))
    print(f"start agents with: wandb agent {entity or cfg.get('entity') or '<entity>'}/"
          f"{project or cfg.get('project') or '<project>'}/{sweep_id}", file=sys.stderr)
    return sweep_id


def run_wandb_agent(path: str, count: int | None) -> int:
    argv = ["wandb", "agent", *(["--count", str(count)] if count else []), path]
    return subprocess.call(argv)
