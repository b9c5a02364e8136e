"""The local controller's entry points: create a sweep from its YAML, and run an agent on it (one run a
process, or with `--pack` several grid points trained in one process)."""

from __future__ import annotations

import os

from wandb.sdk.lib.runid import generate_id

from harness.errors import UserError
from harness.sweep.agent import Agent
from harness.sweep.spec import check_stops, load_sweep_yaml, validate_sweep
from harness.sweep.state import create_sweep_dir, wandb_root


def create_local_sweep(
    yaml_path: str,
    wandb_dir: str | None = None,
    count: int | None = None,
    will_run: bool = False,
    project: str | None = None,
    entity: str | None = None,
) -> str:
    """Validate and create a local sweep; with `will_run`, also refuse one that would never stop.
    `project`/`entity` (`--project`/`--entity`) override the YAML's, as for `wandb sweep`: the
    sweep's copy of the YAML holds them, and every run of it logs there (harness.sweep.agent)."""
    cfg = load_sweep_yaml(yaml_path)
    validate_sweep(cfg, yaml_path)
    for key, value in (("project", project), ("entity", entity)):
        if value is not None:
            if not value.strip() or "/" in value:
                raise UserError(f"--{key} {value!r}: a W&B {key} name (no '/', not empty)")
            cfg[key] = value
    if will_run:
        check_stops(cfg, count)  # before the directory exists: a refused sweep leaves nothing behind
    sweep_id = generate_id(8)
    create_sweep_dir(wandb_root(wandb_dir), sweep_id, cfg, os.path.abspath(yaml_path))
    return sweep_id


def run_agent(
    sweep_id: str,
    wandb_dir: str | None = None,
    workers: int | None = None,
    count: int | None = None,
    pack: int | None = None,
) -> int:
    """Run (or join, or resume) a local sweep until its grid is exhausted or `count` runs started.
    `pack`: each worker trains up to that many grid points in one process (harness.sweep.packed_agent).
    `workers` None: 1, or with `pack` harness.sweep.packed_agent.default_workers()."""
    if pack is not None:
        from harness.sweep.packed_agent import PackedAgent, default_workers

        return PackedAgent(sweep_id, wandb_dir, default_workers() if workers is None else workers, count, pack).run()
    return Agent(sweep_id, wandb_dir, 1 if workers is None else workers, count).run()
