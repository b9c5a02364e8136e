"""The task registry: tasks are the entry points of group "harness.tasks" (name -> the task's config
module), loaded by name; the config module names the training module, imported only when a run starts."""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
from types import ModuleType

from harness.errors import ConfigError

# Tasks register themselves as entry points (group "harness.tasks", name -> module, see pyproject.toml),
# so the harness names no task: a new task, here or in another package, is one line in its own
# pyproject. The entry point is the task's config module, which imports neither torch nor Lightning
# (it holds `Config` and `TRAINING`, the name of the module with build(cfg)): `harness tasks`,
# `--cfg` and sweep validation read configs in a fraction of a second; torch, Lightning and (for
# the language-model tasks) transformers load only when a run starts.
TASK_GROUP = "harness.tasks"


@functools.cache
def tasks() -> dict[str, importlib.metadata.EntryPoint]:
    """Registered tasks, name -> entry point (its value is the task's config module)."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=TASK_GROUP)}
    if not found:
        raise ConfigError(
            f"no tasks registered (entry point group {TASK_GROUP!r}): install the project with `pip install -e .`"
        )
    return dict(sorted(found.items()))


def config_module(name: str) -> ModuleType:
    """The task's config module (light): `Config`, and `TRAINING`, the module that builds its runs."""
    registry = tasks()
    if name not in registry:
        close = difflib.get_close_matches(str(name), registry, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown task {name!r}; {hint}valid tasks: {', '.join(registry)}")
    return registry[name].load()


def config_class(task: str) -> type:
    return config_module(task).Config


def task_module(name: str) -> ModuleType:
    """The task's training module (build(cfg) -> Job; for tasks that train members also build_block, PACKABLE):
    imports torch and Lightning."""
    return importlib.import_module(config_module(name).TRAINING)
