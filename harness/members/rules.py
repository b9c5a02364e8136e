"""Packing rules: which grid points may share a block (equal values of every key the task does not
declare packable) and the one-line refusal of members that may not."""

from __future__ import annotations

import json
from dataclasses import asdict

from harness.config.registry import task_module
from harness.config.run import RunConfig, flatten
from harness.errors import ConfigError


def packable_keys(task: str) -> tuple[str, ...] | None:
    """The keys a task lets differ between members, or None if the task does not pack."""
    module = task_module(task)
    return tuple(module.PACKABLE) if hasattr(module, "build_block") and hasattr(module, "PACKABLE") else None


def pack_signature(task: str, params: dict) -> str:
    """Grid points with equal signatures may share a packed process: equal task and equal values of
    every key the task does not declare packable."""
    keys = packable_keys(task) or ()
    fixed = {k: v for k, v in flatten(params).items() if k not in keys}
    return json.dumps(fixed, sort_keys=True, default=str)


def check_members(cfgs: list[RunConfig]) -> None:
    """One line before any run starts when the configs cannot share a packed process."""
    if not cfgs:
        raise ConfigError("a packed block needs at least one member")
    task = cfgs[0].task
    keys = packable_keys(task)
    if keys is None:
        raise ConfigError(f"task {task} does not pack (it declares no PACKABLE keys and no build_block)")
    first = flatten(asdict(cfgs[0]))
    for cfg in cfgs[1:]:
        if cfg.task != task:
            raise ConfigError(f"packed members of different tasks ({task}, {cfg.task}): a block holds one task")
        for k, v in flatten(asdict(cfg)).items():
            if k not in keys and k != "wandb.name" and first.get(k) != v:
                raise ConfigError(
                    f"packed members differ in {k} ({first.get(k)!r} vs {v!r}); task {task} "
                    f"packs only members that differ in {', '.join(keys)}"
                )
    t = cfgs[0].trainer
    if t.devices != 1:
        raise ConfigError(f"trainer.devices={t.devices}: a packed block runs in one process on one device")
