"""A local agent: worker threads that claim grid points under the sweep's file lock and run each as
`wandb agent` would (its argv, WANDB_RUN_ID, the parameters file), in the sweep's project, grouped and
tagged by the sweep (local_sweep_env); SIGTERM is forwarded, preempted points are relaunched first,
and a sweep killed at any point resumes without re-running a finished grid point.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import yaml
from filelock import FileLock
from wandb.sdk.lib.runid import generate_id

from harness.config.resources import available_cpus
from harness.config.results import RESULT_ENV, read_results, result_path
from harness.errors import UserError
from harness.sweep.engine import expand_command, next_params
from harness.sweep.spec import check_stops, grid_size, varied_keys
from harness.sweep.state import read_state, reap, sweep_dir, write_state

MAX_PREEMPTIONS = 20  # a point preempted this often is recorded failed instead of relaunched forever
MAX_SKIPPED = 10000  # grid points looked past in one claim while filling a block


def die_with_parent() -> None:
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


def local_sweep_env(cfg: dict, sweep_id: str) -> dict[str, str]:
    """What tells a run of a local sweep where it belongs (harness.training.tracking reads it).

    No WANDB_SWEEP_ID: no W&B server knows this sweep, and under one wandb.init ignores the project
    ("Ignoring project ... when running a sweep": the runs landed in "uncategorized") and `wandb sync`
    would send the runs to an unknown sweep. Instead: the YAML's project and entity (W&B's variables,
    which harness.training.tracking lets win over the config, as a sweep's project wins under
    `wandb agent`), group `<sweep name>-<id>` and tag `sweep-<id>` (the run store selects a local
    sweep's runs by that tag), and the parameters file under the harness's own name: under
    WANDB_SWEEP_PARAM_PATH wandb.init would copy every parameter into the config as a flat dotted
    key beside the nested tree (`model.width` twice), which only W&B's server engine needs.
    """
    env = {
        "HARNESS_SWEEP_ID": sweep_id,
        "WANDB_RUN_GROUP": f"{cfg.get('name') or 'sweep'}-{sweep_id}",
        "WANDB_TAGS": ",".join(t for t in (os.environ.get("WANDB_TAGS", ""), f"sweep-{sweep_id}") if t),
        "HARNESS_SWEEP_VARIED": ",".join(varied_keys(cfg)),
    }
    for key, var in (("project", "WANDB_PROJECT"), ("entity", "WANDB_ENTITY")):
        if cfg.get(key):
            env[var] = str(cfg[key])
    metric = cfg.get("metric") or {}
    if metric.get("name"):  # the sweep's metric chooses a run's `best` model (harness.training.artifacts)
        env["HARNESS_SWEEP_METRIC"] = f"{metric['name']}:{metric.get('goal', 'minimize')}"
    return env


def run_env(cfg: dict, sweep_id: str, run_id: str, param_path: str, root: str, workers: int) -> dict:
    env = dict(os.environ)
    for var in ("WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH", "HARNESS_SWEEP_METRIC"):  # never a stale outer sweep's
        env.pop(var, None)
    env.update(local_sweep_env(cfg, sweep_id))
    env.update(
        WANDB_RUN_ID=run_id, HARNESS_SWEEP_PARAM_PATH=param_path, WANDB_DIR=os.path.dirname(os.path.abspath(root))
    )
    if run_id:  # where the run writes its result (a packed block is told its block's file instead)
        env[RESULT_ENV] = result_path(os.path.join(os.path.abspath(root), f"sweep-{sweep_id}"), run_id)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("OMP_NUM_THREADS", str(threads_per_run(workers)))  # one set by the user wins
    # `python` in the command must be this environment's interpreter, as if it were activated.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


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
    A worker claims a block of up to `pack` points and runs it (run_block): here a block is one point,
    run by the sweep's command; PackedAgent trains larger blocks in one process.
    """

    pack = 1
    packed = False  # PackedAgent: each block, even of one, is a `harness train-packed` process and says so

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
        check_stops(self.cfg, count)
        read_state(self.path)  # a corrupt state file: one line with the way back, before any thread starts
        self.run_cap = self.cfg.get("run_cap")
        self.metric = (self.cfg.get("metric") or {}).get("name")
        self.lock = FileLock(os.path.join(self.path, "state.lock"))
        self.started = 0  # runs this agent launched (--count is per agent, as for `wandb agent`)
        self.busy = 0  # workers running a block now (counted from the claim, under busy_lock)
        self.busy_lock = threading.Lock()
        self.outcomes: list[str] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.procs: dict[str, subprocess.Popen] = {}
        self.procs_lock = threading.Lock()
        size = grid_size(self.cfg) if self.cfg.get("method", "grid") == "grid" else None
        self.planned = min((n for n in (size, self.run_cap) if n is not None), default=None)

    def say(self, msg: str) -> None:
        print(f"[sweep {self.sweep_id}] {msg}", file=sys.stderr, flush=True)

    # -- state --

    def _signature(self, params: dict) -> str | None:
        """What a point must share with the others of its block; None: it packs with anything."""
        return None

    def claim_block(self) -> list[tuple[dict, bool, int]] | None:
        """[(run record, resumed?, k)] for up to `pack` compatible points, or None when done.

        Preempted points go first and are not mixed with fresh ones (they resume at a later step).
        In a grid, points that do not pack with the block are looked past and left open for a later
        claim; with random or bayes the first such point ends the block."""
        with self.lock:
            state = read_state(self.path)
            reap(state)
            if self.stopping.is_set() or (self.count is not None and self.started >= self.count):
                return None
            room = self.pack if self.count is None else min(self.pack, self.count - self.started)
            live = [r for r in state["runs"] if r["state"] != "killed"]
            if self.planned and self.workers > 1:
                # Share the points still to start between the idle workers, so that --pack 16 on a grid
                # of 10 with 2 workers trains two blocks of 5 side by side rather than one of 10.
                todo = max(0, self.planned - len(live)) + sum(r["state"] == "preempted" for r in live)
                room = min(room, max(1, -(-todo // max(1, self.workers - self.busy))))
            block: list[tuple[dict, bool]] = []
            signature = None
            # contract C5: preempted points go first, same ids and params
            for r in sorted((r for r in live if r["state"] == "preempted"), key=lambda r: r["started"]):
                s = self._signature(r["params"])
                if len(block) < room and signature in (None, s):
                    signature = s
                    r["preemptions"] = r.get("preemptions", 0) + 1
                    block.append((r, True))
            skipped: list[dict] = []  # points that do not pack with this block, left for a later claim
            while not block or (not block[0][1] and len(block) < room):
                if self.run_cap is not None and len(live) >= self.run_cap:
                    break  # run_cap counts the whole sweep's runs (state.json), not this agent's
                params = next_params(self.cfg, state)
                if params is None:
                    break
                s = self._signature(params)
                if signature not in (None, s):
                    if self.cfg.get("method", "grid") != "grid" or len(skipped) >= MAX_SKIPPED:
                        break
                    # Held as taken for the engine's next suggestion only; removed before state is written.
                    skipped.append({"id": "", "params": params, "state": "running"})
                    state["runs"].append(skipped[-1])
                    continue
                signature = s
                run = {"id": generate_id(8), "params": params, "state": "running"}
                state["runs"].append(run)
                live.append(run)
                block.append((run, False))
            state["runs"] = [r for r in state["runs"] if not any(r is x for x in skipped)]
            if not block:
                write_state(self.path, state)
                return None
            for run, _ in block:
                run.update(state="running", host=socket.gethostname(), agent_pid=os.getpid(), started=time.time())
            write_state(self.path, state)
            self.started += len(block)
            with self.busy_lock:
                self.busy += 1
            order = [r["id"] for r in state["runs"] if r["state"] != "killed"]
            return [(run, resumed, 1 + order.index(run["id"])) for run, resumed in block]

    def record(self, run_id: str, code: int, seconds: float, summary: dict | None = None) -> str:
        """The run's outcome into state.json: its state by exit code, its sweep metric from the result
        file it wrote (harness.config.results), or from `summary` where the caller has read it."""
        if summary is None:
            summary = (read_results(result_path(self.path, run_id)).get(run_id) or {}).get("summary") or {}
        summary = dict(summary)
        if isinstance(summary.get(self.metric), dict):
            # Declared with summary "min,last" / "max,last" (val/loss, val/acc: contract C2), the
            # metric is {"min": ..., "last": ...}: the engine gets the best value, as W&B's engine
            # takes the extremum of the metric's history.
            goal = (self.cfg.get("metric") or {}).get("goal")
            best = summary[self.metric].get("max" if goal == "maximize" else "min")
            summary[self.metric] = best if best is not None else summary[self.metric].get("last")
        outcome = _outcome(code)
        with self.lock:
            state = read_state(self.path)
            for r in state["runs"]:
                if r["id"] == run_id:
                    if outcome == "preempted" and r.get("preemptions", 0) >= MAX_PREEMPTIONS:
                        outcome = "failed"  # relaunching forever would loop; the log says why it stopped
                    r.update(
                        state=outcome,
                        exitcode=code,
                        seconds=round(seconds, 1),
                        summary={self.metric: summary[self.metric]} if self.metric in summary else {},
                    )
            write_state(self.path, state)
        value = summary.get(self.metric)
        shown = f" {self.metric}={value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        status = {
            "finished": "finished",
            "preempted": f"preempted (exit {code}; relaunched first by the next agent)",
        }.get(outcome, f"FAILED (exit {code}; log {self.log_of(run_id)})")
        self.say(f"run {run_id} {status} in {seconds:.0f}s{shown}")
        return outcome

    def log_of(self, run_id: str) -> str:
        """The log that holds what a run printed (a packed agent's members: their block's log)."""
        return os.path.join(self.path, f"{run_id}.log")

    # -- runs --

    def run_block(self, runs: list[dict]) -> tuple[dict[str, int], dict[str, dict]]:
        """Each run's exit code, and the summaries read here ({}: record() reads the run's result file)."""
        (run,) = runs  # each point is its own block
        run_id, params = run["id"], run["params"]
        param_path = self.param_file(run)
        args_json = os.path.abspath(os.path.join(self.path, f"config-{run_id}.json"))
        with open(args_json, "w") as f:
            json.dump(params, f)
        argv = expand_command(self.cfg, params, args_json)
        env = run_env(self.cfg, self.sweep_id, run_id, param_path, self.root, self.workers)
        return {run_id: self._spawn(run_id, argv, env, self.log_of(run_id))}, {}

    def param_file(self, run: dict) -> str:
        """The run's parameters file, as `wandb agent` writes it (wandb's own writer): its path."""
        from wandb.sdk.lib import config_util

        path = os.path.abspath(os.path.join(self.path, f"config-{run['id']}.yaml"))
        config_util.save_config_file_from_dict(path, {k: {"value": v} for k, v in run["params"].items()})
        return path

    def _spawn(self, tag: str, argv: list[str], env: dict, log_path: str) -> int:
        """`argv`'s exit code; its output goes to `log_path`; while it runs, SIGTERM reaches it as procs[`tag`]."""
        with open(log_path, "a") as log:
            with self.procs_lock:
                if self.stopping.is_set():  # SIGTERM came between claim and start: never started
                    return 143
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=die_with_parent if sys.platform == "linux" else None,
                )
                self.procs[tag] = proc
            try:
                return proc.wait()
            finally:
                with self.procs_lock:
                    self.procs.pop(tag, None)

    def worker(self) -> None:
        try:
            while not self.stopping.is_set():
                block = self.claim_block()
                if block is None:
                    return
                where = f" (packed, {len(block)} in block {block[0][0]['id']})" if self.packed else ""
                for run, resumed, k in block:
                    shown = " ".join(f"{key}={v}" for key, v in run["params"].items() if key != "task")
                    verb = "resume" if resumed else "start"
                    self.say(f"run {run['id']} {k}/{self.planned or '?'} {verb}{where}: {shown}")
                runs = [run for run, _, _ in block]
                t0 = time.time()
                try:
                    codes, summaries = self.run_block(runs)
                except BaseException:
                    for run in runs:
                        self.record(run["id"], 1, time.time() - t0)
                    raise
                finally:
                    with self.busy_lock:
                        self.busy -= 1
                for run in runs:
                    code, summary = codes[run["id"]], summaries.get(run["id"])
                    self.outcomes.append(self.record(run["id"], code, time.time() - t0, summary))
        except BaseException as e:  # reported and turned into a non-zero exit, never a silent thread death
            self.errors.append(f"{type(e).__name__}: {e}")
            self.stopping.set()

    def run(self) -> int:
        """Exit status: 0 every run finished; 143 stopped by SIGTERM; 1 a run failed or a worker crashed."""
        self.say(
            f"{self.workers} worker(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS') or threads_per_run(self.workers)}"
            f" per run ({available_cpus()} CPUs available)"
        )
        terminated = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():

            def on_sigterm(signum, frame):  # no new runs; forward it to the running ones to checkpoint
                terminated.set()
                self.say("SIGTERM: forwarding it to the running runs and waiting for them to checkpoint")
                self.stopping.set()
                with self.procs_lock:
                    for proc in self.procs.values():
                        proc.send_signal(signal.SIGTERM)

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
        state = read_state(self.path)
        names = ("finished", "preempted", "failed", "crashed", "killed", "running")
        n = {s: sum(r["state"] == s for r in state["runs"]) for s in names}
        self.say(
            "sweep: "
            + (", ".join(f"{v} {k}" for k, v in n.items() if v) or "no runs")
            + f"; this agent ran {len(self.outcomes)}"
        )
        if terminated.is_set():
            return 143
        if self.errors or any(o in ("failed", "crashed") for o in self.outcomes):
            return 1
        return 0
