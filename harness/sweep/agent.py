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
import shutil
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
from harness.config import ConfigError, check_overrides, flatten
from harness.resources import available_cpus
from wandb.sdk.lib.runid import generate_id

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
FLOAT_AS_STRING = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
MAX_CHECKED_COMBINATIONS = 2000


# -- validation ---------------------------------------------------------------------------------

ARG_MACROS = ("${args}", "${args_no_hyphens}")  # `harness train` reads key=value and --key=value
MAX_PREEMPTIONS = 20  # a point preempted this often is recorded failed instead of relaunched forever


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


def flat_parameters(params: dict, path: str = "sweep", prefix: str = "") -> dict:
    """W&B's nested form (`model: {parameters: {width: {...}}}`) as dotted keys (`model.width: {...}`).

    Validation and the local engine both work on dotted keys, so a typo under a nested block is
    caught like any other, and each grid point has one spelling.
    """
    out = {}
    for key, spec in params.items():
        if not isinstance(spec, dict):
            raise UserError(f"{path}: parameter {prefix}{key!r} must be a mapping like {{values: [...]}}, got {spec!r}")
        if "parameters" in spec:
            if not isinstance(spec["parameters"], dict) or set(spec) != {"parameters"}:
                raise UserError(f"{path}: nested parameter {prefix}{key} must hold only `parameters:` (a mapping)")
            out.update(flat_parameters(spec["parameters"], path, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = spec
    return out


def engine_config(cfg: dict) -> dict:
    """What the `sweeps` engine sees: dotted parameters; run_cap (a W&B server field) removed."""
    out = {k: v for k, v in cfg.items() if k != "run_cap"}
    out["parameters"] = flat_parameters(cfg.get("parameters") or {})
    return out


def varied_keys(cfg: dict) -> list[str]:
    """Dotted keys that take more than one value across the sweep (contract C8: runs are named by them)."""
    return [k for k, spec in flat_parameters(cfg.get("parameters") or {}).items()
            if k != "task" and not ("value" in spec or len(spec.get("values", [0, 0])) == 1)]


def grid_size(cfg: dict) -> int | None:
    """Points in a grid sweep (None when a range is not a list of integers)."""
    n = 1
    for spec in flat_parameters(cfg.get("parameters") or {}).values():
        if "values" in spec:
            n *= len(spec["values"])
        elif "value" not in spec:
            lo, hi = spec.get("min"), spec.get("max")
            if not (isinstance(lo, int) and isinstance(hi, int)):
                return None
            n *= hi - lo + 1
    return n


def _check_command(cfg: dict, path: str) -> None:
    command = [str(c) for c in cfg.get("command", DEFAULT_COMMAND)]
    if "${program}" in command:
        raise UserError(f"{path}: command {command} runs `python ${{program}}`, but the harness is a module: "
                        "write command: [${env}, ${interpreter}, -m, harness, train, ${args_no_hyphens}]")
    macros = [c for c in command if c.startswith("${args")]
    if not macros:
        raise UserError(f"{path}: command {command} passes no parameters; add ${{args_no_hyphens}}")
    wrong = [c for c in macros if c not in ARG_MACROS]
    if wrong or len(macros) > 1:
        raise UserError(f"{path}: command passes parameters as {', '.join(wrong or macros)}; `harness train` reads "
                        f"one of {' or '.join(ARG_MACROS)} (key=value or --key=value)")


def validate_sweep(cfg: dict, path: str = "sweep") -> str:
    """W&B's sweep schema, the command, then every parameter against the task's config schema.

    Everything that would make every run fail, or the engine fail, is refused here, before a sweep
    directory or a run exists. Returns the task.
    """
    import jsonschema

    sweeps = _sweeps()

    raw = cfg.get("parameters")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: no parameters section (a mapping of dotted config keys)")
    params = flat_parameters(raw, path)
    for key, spec in params.items():
        for v in _values(spec):
            if isinstance(v, str) and FLOAT_AS_STRING.match(v):
                raise UserError(f"{path}: parameter {key} value {v!r} is a string in YAML; write it as "
                                f"{float(v):.1e} (a float needs a dot before the exponent)")
    cap = cfg.get("run_cap")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise UserError(f"{path}: run_cap={cap!r}: the number of runs in the whole sweep, an integer >= 1")
    try:
        sweeps.SweepConfig({k: v for k, v in cfg.items() if k != "run_cap"})
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "top level"
        raise UserError(f"{path}: {e.message} (at {where}; see W&B's sweep configuration schema)") from None
    if cfg.get("method") == "bayes" and not (cfg.get("metric") or {}).get("name"):
        raise UserError(f"{path}: method bayes needs a metric to model, e.g. metric: {{name: val/loss, goal: minimize}}")
    if cfg.get("early_terminate") and not (cfg.get("metric") or {}).get("name"):
        raise UserError(f"{path}: early_terminate needs a metric, e.g. metric: {{name: val/loss, goal: minimize}}")
    _check_command(cfg, path)
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
    try:  # the engine's own checks (e.g. a grid over a float range) now, not in a worker thread later
        sweeps.next_run(engine_config(cfg), [])
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: W&B's sweep engine refuses this sweep: {str(e).splitlines()[0]}") from None
    return task


# -- local sweeps -------------------------------------------------------------------------------

def default_wandb_dir() -> str:
    """As wandb itself: $WANDB_DIR when set, else the current directory (runs go to `<it>/wandb`)."""
    return os.environ.get("WANDB_DIR") or "."


def wandb_root(wandb_dir: str | None) -> str:
    """The directory that holds the runs (`.../wandb`), whether given it or its parent."""
    wandb_dir = wandb_dir or default_wandb_dir()
    return wandb_dir if os.path.basename(os.path.normpath(wandb_dir)) == "wandb" else os.path.join(wandb_dir, "wandb")


def sweep_dir(sweep_id: str, wandb_dir: str | None) -> str:
    root = wandb_root(wandb_dir)
    path = os.path.join(root, f"sweep-{sweep_id}")
    if not os.path.exists(os.path.join(path, "state.json")):
        known = sorted(d[6:] for d in os.listdir(root) if d.startswith("sweep-")) if os.path.isdir(root) else []
        raise UserError(f"sweep {sweep_id!r} not found in {root} (local sweeps there: {', '.join(known) or 'none'})")
    return path


def _check_stops(cfg: dict, count: int | None) -> None:
    if cfg.get("method", "grid") != "grid" and count is None and cfg.get("run_cap") is None:
        raise UserError(f"method {cfg.get('method')!r} never runs out of parameters: give --count N or run_cap")


def create_local_sweep(yaml_path: str, wandb_dir: str | None = None, count: int | None = None,
                       will_run: bool = False) -> str:
    """Validate and create a local sweep; with `will_run`, also refuse one that would never stop."""
    cfg = load_sweep_yaml(yaml_path)
    validate_sweep(cfg, yaml_path)
    if will_run:
        _check_stops(cfg, count)  # before the directory exists: a refused sweep leaves nothing behind
    sweep_id = generate_id(8)
    path = os.path.join(wandb_root(wandb_dir), f"sweep-{sweep_id}")
    os.makedirs(path)
    with open(os.path.join(path, "sweep.yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    _write_state(path, {"sweep_id": sweep_id, "source": os.path.abspath(yaml_path), "runs": []})
    return sweep_id


def _read_state(path: str) -> dict:
    file = os.path.join(path, "state.json")
    try:
        with open(file) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("runs"), list):
            raise ValueError("no runs list")
        return state
    except ValueError as e:
        bak = file + ".bak"
        fix = (f"the state before the last write is in {bak}: `cp {bak} {file}` and run `harness agent` again"
               if os.path.exists(bak) else
               f"remove {path} and create the sweep again (its finished runs stay in {os.path.dirname(path)})")
        raise UserError(f"{file} is corrupt ({str(e).splitlines()[0]}); {fix}") from None


def _write_state(path: str, state: dict) -> None:
    """Atomic replace; the previous state (read and parsed under the same lock) is kept as state.json.bak."""
    file = os.path.join(path, "state.json")
    tag = f"{os.getpid()}.{threading.get_ident()}"
    if os.path.exists(file):
        shutil.copyfile(file, f"{file}.bak.{tag}")
        os.replace(f"{file}.bak.{tag}", file + ".bak")
    with open(f"{file}.{tag}", "w") as f:
        json.dump(state, f, indent=1)
    os.replace(f"{file}.{tag}", file)


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
    sweeps = _sweeps()
    engine_cfg = engine_config(cfg)
    runs = [sweeps.SweepRun(name=r["id"], state=_engine_state(r["state"]),
                            config={k: {"value": v} for k, v in r["params"].items()},
                            summaryMetrics=r.get("summary") or {})
            for r in state["runs"] if r["state"] != "killed"]
    suggestion = sweeps.next_run(engine_cfg, runs)
    if suggestion is None:
        return None
    params = {k: v["value"] for k, v in suggestion.config.items()}
    if engine_cfg.get("method", "grid") == "grid":
        done = {_point(r["params"]): r for r in state["runs"] if r["state"] != "killed"}
        if _point(params) in done:
            r = done[_point(params)]
            raise RepeatedPoint(f"the sweep engine suggested grid point {_point(params)} again, which run {r['id']} "
                                f"already holds ({r['state']}); stopping instead of running it twice")
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


def threads_per_run(workers: int) -> int:
    """OpenMP threads for each of `workers` parallel runs: the CPUs this process may use, shared out.

    More threads than CPUs make OpenMP threads spin against each other (a 16 s run took 150-340 s
    on 2 cores that way), so the share is rounded down, at least 1.
    """
    return max(1, available_cpus() // workers)


def _run_env(cfg: dict, sweep_id: str, run_id: str, param_path: str, root: str, workers: int) -> dict:
    env = dict(os.environ)
    env.update(WANDB_SWEEP_ID=sweep_id, WANDB_RUN_ID=run_id, WANDB_SWEEP_PARAM_PATH=param_path,
               WANDB_DIR=os.path.dirname(os.path.abspath(root)), HARNESS_SWEEP_VARIED=",".join(varied_keys(cfg)))
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("OMP_NUM_THREADS", str(threads_per_run(workers)))  # one set by the user wins
    # `python` in the command must be this environment's interpreter, as if it were activated.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _last_json(log_path: str) -> dict:
    try:
        with open(log_path) as f:
            lines = [l for l in f.read().splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def _outcome(code: int) -> str:
    """Exit code -> state (contract C5): 0 finished; 143 or SIGTERM preempted; a signal crashed; else failed."""
    if code == 0:
        return "finished"
    if code in (143, -signal.SIGTERM):
        return "preempted"
    return "crashed" if code < 0 else "failed"


class Agent:
    """One local agent: worker threads that claim grid points under the sweep's file lock and run them.

    SIGTERM to the agent (SLURM preemption, `kill`) is forwarded to its runs; they checkpoint and
    exit 143, are recorded `preempted`, and the agent exits 143. The next agent relaunches each
    preempted point first, with the same run id and parameters, so the run resumes from its checkpoint.
    """

    def __init__(self, sweep_id: str, wandb_dir: str | None, workers: int, count: int | None):
        if workers < 1:
            raise UserError(f"--workers {workers}: the number of runs in parallel, an integer >= 1")
        if count is not None and count < 1:
            raise UserError(f"--count {count}: the number of runs this agent starts, an integer >= 1")
        self.sweep_id, self.workers, self.count = sweep_id, workers, count
        self.path = sweep_dir(sweep_id, wandb_dir)
        self.root = os.path.dirname(self.path)
        with open(os.path.join(self.path, "sweep.yaml")) as f:
            self.cfg = yaml.safe_load(f)
        _check_stops(self.cfg, count)
        _read_state(self.path)  # a corrupt state file: one line with the way back, before any thread starts
        self.run_cap = self.cfg.get("run_cap")
        self.metric = (self.cfg.get("metric") or {}).get("name")
        self.lock = FileLock(os.path.join(self.path, "state.lock"))
        self.started = 0  # runs this agent launched (--count is per agent, as for `wandb agent`)
        self.outcomes: list[str] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.procs: dict[str, subprocess.Popen] = {}
        self.procs_lock = threading.Lock()
        size = grid_size(self.cfg) if self.cfg.get("method", "grid") == "grid" else None
        caps = [n for n in (size, self.run_cap) if n is not None]
        self.planned = min(caps) if caps else None

    def say(self, msg: str) -> None:
        print(f"[sweep {self.sweep_id}] {msg}", file=sys.stderr, flush=True)

    # -- state --

    def claim(self) -> tuple[dict, bool, int] | None:
        """(run record, resumed?, k) for the next run, or None when this agent should stop."""
        with self.lock:
            state = _read_state(self.path)
            _reap(state)
            if self.stopping.is_set() or (self.count is not None and self.started >= self.count):
                return None
            live = [r for r in state["runs"] if r["state"] != "killed"]
            preempted = sorted((r for r in live if r["state"] == "preempted"), key=lambda r: r["started"])
            if preempted:  # contract C5: a preempted point goes first, same id and params
                run, resumed = preempted[0], True
                run["preemptions"] = run.get("preemptions", 0) + 1
            else:
                if self.run_cap is not None and len(live) >= self.run_cap:
                    _write_state(self.path, state)
                    return None  # run_cap counts the whole sweep's runs (state.json), not this agent's
                params = next_params(self.cfg, state)
                if params is None:
                    _write_state(self.path, state)
                    return None
                run, resumed = {"id": generate_id(8), "params": params}, False
                state["runs"].append(run)
            run.update(state="running", host=socket.gethostname(), agent_pid=os.getpid(), started=time.time())
            _write_state(self.path, state)
            self.started += 1
            k = 1 + [r["id"] for r in state["runs"] if r["state"] != "killed"].index(run["id"])
            return run, resumed, k

    def record(self, run_id: str, code: int, seconds: float) -> str:
        summary = _last_json(os.path.join(self.path, f"{run_id}.log"))
        if isinstance(summary.get(self.metric), dict):
            # Declared with summary "min,last" / "max,last" (val/loss, val/acc: contract C2), the
            # metric is {"min": ..., "last": ...}: the engine gets the best value, as W&B's engine
            # takes the extremum of the metric's history.
            goal = (self.cfg.get("metric") or {}).get("goal")
            best = summary[self.metric].get("max" if goal == "maximize" else "min")
            summary[self.metric] = best if best is not None else summary[self.metric].get("last")
        outcome = _outcome(code)
        with self.lock:
            state = _read_state(self.path)
            for r in state["runs"]:
                if r["id"] == run_id:
                    if outcome == "preempted" and r.get("preemptions", 0) >= MAX_PREEMPTIONS:
                        outcome = "failed"  # relaunching forever would loop; the log says why it stopped
                    r.update(state=outcome, exitcode=code, seconds=round(seconds, 1),
                             summary={self.metric: summary[self.metric]} if self.metric in summary else {})
            _write_state(self.path, state)
        value = summary.get(self.metric)
        shown = f" {self.metric}={value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        log = f"{self.path}/{run_id}.log"
        status = {"finished": "finished", "preempted": f"preempted (exit {code}; relaunched first by the next agent)"
                  }.get(outcome, f"FAILED (exit {code}; log {log})")
        self.say(f"run {run_id} {status} in {seconds:.0f}s{shown}")
        return outcome

    # -- runs --

    def launch(self, run: dict) -> int:
        from wandb.sdk.lib import config_util

        run_id, params = run["id"], run["params"]
        param_path = os.path.abspath(os.path.join(self.path, f"config-{run_id}.yaml"))
        config_util.save_config_file_from_dict(param_path, {k: {"value": v} for k, v in params.items()})
        args_json = os.path.abspath(os.path.join(self.path, f"config-{run_id}.json"))
        with open(args_json, "w") as f:
            json.dump(params, f)
        argv = expand_command(self.cfg, params, args_json)
        env = _run_env(self.cfg, self.sweep_id, run_id, param_path, self.root, self.workers)
        with open(os.path.join(self.path, f"{run_id}.log"), "a") as log:
            with self.procs_lock:
                if self.stopping.is_set():  # SIGTERM came between claim and start: never started
                    return 143
                proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)
                self.procs[run_id] = proc
            try:
                return proc.wait()
            finally:
                with self.procs_lock:
                    self.procs.pop(run_id, None)

    def worker(self) -> None:
        try:
            while not self.stopping.is_set():
                claimed = self.claim()
                if claimed is None:
                    return
                run, resumed, k = claimed
                shown = " ".join(f"{key}={v}" for key, v in run["params"].items() if key != "task")
                verb = "resume" if resumed else "start"
                self.say(f"run {run['id']} {k}/{self.planned or '?'} {verb}: {shown}")
                t0 = time.time()
                try:
                    code = self.launch(run)
                except BaseException:
                    self.record(run["id"], 1, time.time() - t0)
                    raise
                self.outcomes.append(self.record(run["id"], code, time.time() - t0))
        except BaseException as e:  # reported and turned into a non-zero exit, never a silent thread death
            self.errors.append(f"{type(e).__name__}: {e}")
            self.stopping.set()

    def terminate(self, signum=None, frame=None) -> None:
        """SIGTERM: no new runs; forward it to the running ones and let them checkpoint."""
        self.say("SIGTERM: forwarding it to the running runs and waiting for them to checkpoint")
        self.stopping.set()
        with self.procs_lock:
            for proc in self.procs.values():
                proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Exit status: 0 every run finished; 143 stopped by SIGTERM; 1 a run failed or a worker crashed."""
        self.say(f"{self.workers} worker(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS') or threads_per_run(self.workers)}"
                 f" per run ({available_cpus()} CPUs available)")
        terminated = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            def on_sigterm(signum, frame):
                terminated.set()
                self.terminate()
            previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(self.workers)]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        for err in self.errors:
            self.say(f"stopped: {err}")
        state = _read_state(self.path)
        names = ("finished", "preempted", "failed", "crashed", "killed", "running")
        n = {s: sum(r["state"] == s for r in state["runs"]) for s in names}
        self.say("sweep: " + (", ".join(f"{v} {k}" for k, v in n.items() if v) or "no runs")
                 + f"; this agent ran {len(self.outcomes)}")
        if terminated.is_set():
            return 143
        if self.errors or any(o in ("failed", "crashed") for o in self.outcomes):
            return 1
        return 0


def run_agent(sweep_id: str, wandb_dir: str | None = None, workers: int | None = None, count: int | None = None,
              pack: int | None = None) -> int:
    """Run (or join, or resume) a local sweep until its grid is exhausted or `count` runs started.
    `pack`: each worker trains up to that many grid points in one process (harness.packed_agent).
    `workers` None: 1, or with `pack` harness.packed_agent.default_workers()."""
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: the number of runs in parallel, an integer >= 1")
    if pack is not None:
        from harness.packed_agent import PackedAgent, default_workers

        return PackedAgent(sweep_id, wandb_dir, workers or default_workers(), count, pack).run()
    return Agent(sweep_id, wandb_dir, workers or 1, count).run()


# -- W&B ----------------------------------------------------------------------------------------

def create_wandb_sweep(yaml_path: str, project: str | None = None, entity: str | None = None) -> str:
    from harness.wandb_mode import has_credentials

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
