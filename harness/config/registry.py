"""The task registry: tasks are the entry points of group "harness.tasks" (name -> module), loaded by name."""
from __future__ import annotations

import difflib
import functools
import importlib.metadata

from harness.errors import ConfigError

# Tasks register themselves as entry points (group "harness.tasks", name -> module, see pyproject.toml),
# so the harness names no task: a new task, here or in another package, is one line in its own
# pyproject. Modules are imported lazily: the Pythia task pulls in transformers.
TASK_GROUP = "harness.tasks"


@functools.cache
def tasks() -> dict[str, importlib.metadata.EntryPoint]:
    """Registered tasks, name -> entry point (its value is the task's module)."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=TASK_GROUP)}
    if not found:
        raise ConfigError(f"no tasks registered (entry point group {TASK_GROUP!r}): install the project with "
                          "`pip install -e .`")
    return dict(sorted(found.items()))


def task_module(name: str):
    registry = tasks()
    if name not in registry:
        close = difflib.get_close_matches(str(name), registry, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown task {name!r}; {hint}valid tasks: {', '.join(registry)}")
    return registry[name].load()


def config_class(task: str) -> type:
    return task_module(task).Config
