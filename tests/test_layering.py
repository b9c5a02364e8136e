"""The dependency direction of DESIGN.md, checked on every import statement (module level or inside a
function): tasks -> harness; analysis -> harness.runstore and the pure helpers (harness.events,
harness.errors, harness.wandb_mode, harness.config.resources) + analysis.*; harness -> nothing above it. A task never imports another task: a
registered task module (pyproject's "harness.tasks" entry points) may import harness and the task's own
helper modules in tasks/ (those not registered), never another registered task."""
import ast
import os
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYSIS_MAY_USE = ("harness.runstore", "harness.events", "harness.errors", "harness.quanta_stats",
                    "harness.wandb_mode", "harness.config.resources")


def registered_tasks() -> set[str]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    return set(project.get("entry-points", {}).get("harness.tasks", {}).values())


def imports(path: str) -> list[tuple[int, str]]:
    """(line, module) for every import in a file, `from a import b` giving a.b as well as a."""
    tree = ast.parse(open(path).read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def allowed(package: str, module_name: str, target: str, tasks: set[str] = frozenset()) -> bool:
    top = target.split(".")[0]
    if top not in ("harness", "tasks", "analysis"):
        return True  # the standard library and third-party packages
    if package == "harness":
        return top == "harness"
    if package == "tasks":
        if top != "tasks":
            return top == "harness"
        if target == "tasks":  # `from tasks import x` also yields tasks.x, checked below
            return True
        imported = ".".join(target.split(".")[:2])  # tasks.module (target may be tasks.module.name)
        return imported == module_name or imported not in tasks or module_name not in tasks
    if package == "analysis":
        return top == "analysis" or target == "harness" or any(
            target == m or target.startswith(m + ".") for m in ANALYSIS_MAY_USE)
    return True


def violations() -> list[str]:
    found, tasks = [], registered_tasks()
    for package in ("harness", "tasks", "analysis"):
        for name in sorted(os.listdir(os.path.join(REPO, package))):
            if not name.endswith(".py"):
                continue
            module_name = f"{package}.{name[:-3]}"
            path = os.path.join(REPO, package, name)
            for line, target in imports(path):
                # `from harness import runstore` yields `harness` (the package, allowed) and `harness.runstore`.
                if not allowed(package, module_name, target, tasks):
                    found.append(f"{package}/{name}:{line} imports {target}")
    return sorted(set(found))


def test_the_checker_catches_each_kind_of_violation():
    assert not allowed("harness", "harness.config.run", "tasks.sparse_parity")
    assert not allowed("harness", "harness.training.train", "analysis.fourier")
    assert not allowed("tasks", "tasks.modular_addition", "analysis.fourier")
    registered = {"tasks.pythia_suite", "tasks.pythia_eval", "tasks.modular_addition"}
    assert not allowed("tasks", "tasks.pythia_suite", "tasks.pythia_eval.Config", registered)
    assert allowed("tasks", "tasks.modular_addition", "tasks.modular_addition_packed.PackedModular", registered)
    assert not allowed("analysis", "analysis.grokking", "harness.callbacks")
    assert not allowed("analysis", "analysis.common", "harness.config.run")
    assert allowed("analysis", "analysis.scaling", "harness.runstore")
    assert allowed("analysis", "analysis.scaling", "harness.errors.UserError")
    assert allowed("tasks", "tasks.sparse_parity", "harness.training.train")
    assert allowed("harness", "harness.cli", "harness.controller")


def test_imports_follow_the_dependency_direction():
    bad = violations()
    assert not bad, "imports against the dependency direction (DESIGN.md):\n" + "\n".join(bad)


if __name__ == "__main__":
    print("\n".join(violations()) or "no violations")

