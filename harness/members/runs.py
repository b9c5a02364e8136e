"""A packed member and its W&B run: opened as a solo run of the sweep would be (the same run id,
sweep parameters and config), ended with its state and exit code."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from harness.config.results import EXIT_CODES
from harness.config.run import RunConfig
from harness.training import checkpoint, tracking
from harness.training.curves import CurvesRecorder
from harness.training.train import environ


@dataclass
class Member:
    cfg: RunConfig
    overrides: list[str]
    run_id: str | None = None
    param_path: str | None = None  # the sweep parameters file (HARNESS_SWEEP_PARAM_PATH of a solo run)
    run: Any = None
    state: str = "running"  # running | finished | failed | preempted
    error: str | None = None
    summary: dict = field(default_factory=dict)
    curves: CurvesRecorder = field(default_factory=CurvesRecorder)
    start_step: int = 0
    resume: str | None = None  # its last.ckpt (matched to this member's config), or None: a fresh start
    before: dict = field(default_factory=dict)  # summary aggregates of the run's part before its resume point
    # its config as given (checkpoint.identity), before the build resolves it: what its last.ckpt records
    identity: dict = field(default_factory=dict)

    @property
    def ckpt_path(self) -> str:
        return os.path.join(checkpoint.ckpt_dir(self.cfg, self.run.id), checkpoint.LAST)


@contextlib.contextmanager
def as_solo_run(member: Member):
    """Open member i's run with the environment a solo run of a local sweep has: WANDB_RUN_ID (also in
    wandb's process-wide settings, which wandb.init reads it from) and HARNESS_SWEEP_PARAM_PATH (read
    by harness.training.tracking; not WANDB_SWEEP_PARAM_PATH, which would put every parameter into
    the config a second time as a flat key: harness.sweep.agent.local_sweep_env)."""
    from wandb.sdk import wandb_setup

    settings = wandb_setup.singleton().settings
    saved = settings.run_id
    settings.run_id = member.run_id
    try:
        with environ({"WANDB_RUN_ID": member.run_id or None, tracking.PARAM_ENV: member.param_path or None}):
            yield
    finally:
        settings.run_id = saved


def open_run(member: Member) -> None:
    with as_solo_run(member):
        member.run = tracking.init_run(member.cfg, member.overrides, reinit="create_new", id=member.run_id or None)
    if member.run_id and member.run.id != member.run_id:  # never log a member into another run
        raise RuntimeError(f"wandb opened run {member.run.id} for member run id {member.run_id}")
    member.run_id = member.run.id


def end_run(member: Member, state: str, error: str | None = None) -> None:
    member.state, member.error = state, error
    member.summary = checkpoint.finish_run(member.run, EXIT_CODES.get(state, 1), member.before, error)
