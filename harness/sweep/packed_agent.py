"""The local controller with `--pack M` (issue 14): each worker claims up to M open grid points that
the task can pack together and trains them in one `harness train-packed` process.

Everything else is harness.sweep.agent's Agent: the same state.json under the same lock, the same
run ids, parameter files and environment per run, preempted points first (a block of preempted
points is relaunched together, same ids, and resumes from each member's last.ckpt), SIGTERM
forwarded, killed agents reaped. Each member is recorded in state.json by its own outcome, read
from the block's results file (written by harness.members.packed.run_spec); a block process that died
without one (SIGKILL) records every member by the process's exit code, as a solo run would be.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from wandb.sdk.lib.runid import generate_id

from harness.config.resources import available_cpus
from harness.config.results import read_results
from harness.errors import ConfigError, UserError
from harness.sweep.agent import Agent, die_with_parent, run_env
from harness.sweep.engine import next_params
from harness.sweep.spec import flat_parameters
from harness.sweep.state import read_state, reap, write_state

MAX_SKIPPED = 10000  # grid points looked past in one claim while filling a block


def default_workers() -> int:
    """Packed processes in parallel when `--workers` is not given: one per CPU core without a GPU (each
    on one thread, the grid shared out between them), one with a GPU (one process drives the device).

    One process per core rather than one process with a thread per core: a packed step is a few
    hundred small ops, and OpenMP threads wait for each other at the end of every op. On a 2-core
    machine that also ran other jobs, 2 Omnigrok members trained 400 steps in 6.5 s on one thread and
    in 83 s on two (the waiting thread spins while the other is descheduled)."""
    import torch

    return 1 if torch.cuda.is_available() else available_cpus()


def sweep_task(cfg: dict) -> str:
    spec = flat_parameters(cfg.get("parameters") or {}).get("task") or {}
    return spec.get("value", (spec.get("values") or ["?"])[0])


def check_pack(cfg: dict, pack: int) -> str:
    """One line before anything starts: --pack needs M >= 1 and a task that packs. Returns the task."""
    from harness.members.rules import packable_keys

    if pack < 1:
        raise UserError(f"--pack {pack}: the number of grid points trained together, an integer >= 1")
    task = sweep_task(cfg)
    if packable_keys(task) is None:
        raise UserError(f"--pack {pack}: task {task} does not pack (no PACKABLE keys); run it without --pack")
    return task


class PackedAgent(Agent):
    def __init__(self, sweep_id: str, wandb_dir: str | None, workers: int, count: int | None, pack: int):
        super().__init__(sweep_id, wandb_dir, workers, count)
        self.pack = pack
        self.task = check_pack(self.cfg, pack)
        self.busy = 0  # workers training a block now (counted from the claim, under busy_lock)
        self.busy_lock = threading.Lock()
        self.pack_logs: dict[str, str] = {}  # run id -> the log of the block it was trained in

    def _signature(self, params: dict) -> str:
        from harness.members.rules import pack_signature

        # A member's run name may differ within a block (the packed process opens each member's run
        # with its own name; harness.members.rules.check_members lets wandb.name differ too).
        return pack_signature(self.task, {k: v for k, v in params.items() if k != "wandb.name"})

    def log_of(self, run_id: str) -> str:
        return self.pack_logs.get(run_id) or super().log_of(run_id)

    @staticmethod
    def _overrides(run: dict) -> list[str]:
        """The key=value arguments wandb would put on a solo run's command line (${args_no_hyphens})."""
        from wandb.sdk.launch.sweeps import utils as sweep_utils

        return sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in run["params"].items()}})[
            "args_no_hyphens"
        ]

    def refuse_invalid(self, runs: list[dict]) -> dict[str, int]:
        """Members whose config the packed process would refuse (a sweep created before a check
        existed, or its sweep.yaml edited): each fails alone, exit 2 and its one-line error in its
        log, as a solo run would, instead of failing every member of the block."""
        from harness.config.run import load_config

        refused = {}
        for run in runs:
            try:
                load_config(self._overrides(run))
            except ConfigError as e:
                with open(super().log_of(run["id"]), "a") as f:
                    f.write(f"harness: error: {e}\n")
                refused[run["id"]] = 2
        return refused

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
            for r in sorted((r for r in live if r["state"] == "preempted"), key=lambda r: r["started"]):
                s = self._signature(r["params"])
                if len(block) < room and signature in (None, s):
                    signature = s
                    r["preemptions"] = r.get("preemptions", 0) + 1
                    r["state"] = "running"
                    block.append((r, True))
            skipped: list[dict] = []  # points that do not pack with this block, left for a later claim
            while not block or (not block[0][1] and len(block) < room):
                if self.run_cap is not None and len(live) >= self.run_cap:
                    break
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

    def launch_block(self, runs: list[dict]) -> tuple[dict[str, int], dict[str, dict]]:
        """Run one packed process for `runs`; return each member's exit code (0, 1 or 143) and summary."""
        from wandb.sdk.lib import config_util

        tag = runs[0]["id"]
        members = []
        for run in runs:
            param_path = os.path.abspath(os.path.join(self.path, f"config-{run['id']}.yaml"))
            config_util.save_config_file_from_dict(param_path, {k: {"value": v} for k, v in run["params"].items()})
            members.append({"run_id": run["id"], "overrides": self._overrides(run), "param_path": param_path})
            self.pack_logs[run["id"]] = os.path.join(self.path, f"pack-{tag}.log")
        results = os.path.abspath(os.path.join(self.path, f"pack-{tag}.results.json"))
        if os.path.exists(results):
            os.remove(results)
        spec_path = os.path.abspath(os.path.join(self.path, f"pack-{tag}.json"))
        with open(spec_path, "w") as f:
            json.dump({"members": members, "results": results}, f, indent=1)
        env = run_env(self.cfg, self.sweep_id, "", "", self.root, self.workers)
        for key in ("WANDB_RUN_ID", "HARNESS_SWEEP_PARAM_PATH"):  # per member, set by the packed process
            env.pop(key, None)
        argv = [sys.executable, "-m", "harness", "train-packed", spec_path]
        with open(os.path.join(self.path, f"pack-{tag}.log"), "a") as log:
            with self.procs_lock:
                if self.stopping.is_set():
                    return {r["id"]: 143 for r in runs}, {}
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
                code = proc.wait()
            finally:
                with self.procs_lock:
                    self.procs.pop(tag, None)
        outcome = read_results(results)  # each member's, from the block (harness.members.packed.run_members)
        codes, summaries = {}, {}
        for run in runs:
            entry = outcome.get(run["id"])
            codes[run["id"]] = entry["exitcode"] if entry else code
            summaries[run["id"]] = (entry or {}).get("summary") or {}
            if entry:  # a pointer for whoever reads the member's log
                with open(os.path.join(self.path, f"{run['id']}.log"), "a") as f:
                    f.write(f"packed in block {tag} (log pack-{tag}.log)\n")
        return codes, summaries

    def worker(self) -> None:
        try:
            while not self.stopping.is_set():
                block = self.claim_block()
                if block is None:
                    return
                for run, resumed, k in block:
                    shown = " ".join(f"{key}={v}" for key, v in run["params"].items() if key != "task")
                    self.say(
                        f"run {run['id']} {k}/{self.planned or '?'} {'resume' if resumed else 'start'} "
                        f"(packed, {len(block)} in block {block[0][0]['id']}): {shown}"
                    )
                runs = [run for run, _, _ in block]
                t0 = time.time()
                try:
                    codes, summaries = self.refuse_invalid(runs), {}
                    healthy = [run for run in runs if run["id"] not in codes]
                    if healthy:
                        launched, summaries = self.launch_block(healthy)
                        codes.update(launched)
                except BaseException:
                    for run in runs:
                        self.record(run["id"], 1, time.time() - t0)
                    raise
                finally:
                    with self.busy_lock:
                        self.busy -= 1
                for run in runs:
                    self.outcomes.append(
                        self.record(run["id"], codes[run["id"]], time.time() - t0, summaries.get(run["id"], {}))
                    )
        except BaseException as e:
            self.errors.append(f"{type(e).__name__}: {e}")
            self.stopping.set()
