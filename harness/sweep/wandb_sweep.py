"""The hand-off to W&B: a validated sweep created on the W&B server, and `wandb agent` run on it."""

from __future__ import annotations

import subprocess
import sys

from harness.errors import UserError
from harness.sweep.spec import load_sweep_yaml, validate_sweep


def create_wandb_sweep(yaml_path: str, project: str | None = None, entity: str | None = None) -> str:
    from harness.wandb_mode import has_credentials

    cfg = load_sweep_yaml(yaml_path)
    validate_sweep(cfg, yaml_path)
    if not has_credentials():
        raise UserError("no W&B credentials (run `wandb login` or set WANDB_API_KEY); add --local to run offline")
    import wandb

    project, entity = project or cfg.get("project"), entity or cfg.get("entity")
    sweep_id = wandb.sweep(cfg, project=project, entity=entity)
    print(f"start agents with: wandb agent {entity or '<entity>'}/{project or '<project>'}/{sweep_id}", file=sys.stderr)
    return sweep_id


def run_wandb_agent(path: str, count: int | None) -> int:
    return subprocess.call(["wandb", "agent", *(["--count", str(count)] if count else []), path])
