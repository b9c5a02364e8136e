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
import sys

from harness.config.resources import available_cpus
from harness.config.results import read_results
from harness.errors import ConfigError, UserError
from harness.sweep.agent import Agent, run_env
from harness.sweep.spec import flat_parameters


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
    packed = True

    def __init__(self, sweep_id: str, wandb_dir: str | None, workers: int, count: int | None, pack: int):
        super().__init__(sweep_id, wandb_dir, workers, count)
        self.pack = pack
        self.task = check_pack(self.cfg, pack)
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

    def run_block(self, runs: list[dict]) -> tuple[dict[str, int], dict[str, dict]]:
        """Each member's exit code and summary, from one packed process for those it would accept."""
        codes = self.refuse_invalid(runs)
        summaries: dict[str, dict] = {run_id: {} for run_id in codes}  # never started: no result to read
        runs = [run for run in runs if run["id"] not in codes]
        if not runs:
            return codes, summaries
        tag = runs[0]["id"]
        log = os.path.join(self.path, f"pack-{tag}.log")
        members = [{"run_id": r["id"], "overrides": self._overrides(r), "param_path": self.param_file(r)} for r in runs]
        self.pack_logs.update((run["id"], log) for run in runs)
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
        code = self._spawn(tag, argv, env, log)
        outcome = read_results(results)  # each member's, from the block (harness.members.packed.run_spec)
        for run in runs:
            entry = outcome.get(run["id"])
            codes[run["id"]] = entry["exitcode"] if entry else code
            summaries[run["id"]] = (entry or {}).get("summary") or {}
            if entry:  # a pointer for whoever reads the member's log
                with open(super().log_of(run["id"]), "a") as f:
                    f.write(f"packed in block {tag} (log pack-{tag}.log)\n")
        return codes, summaries
