"""The architecture of DESIGN.md, checked on every import statement of the project (module level or
inside a function; `from package import module` counts as an import of the module):

- direction: tasks -> harness; analysis -> harness.runstore and the pure helpers (ANALYSIS_MAY_USE) +
  analysis.*; harness imports neither tasks nor analysis;
- rooms: each room of harness/ imports only the rooms below it (HARNESS_ROOMS);
- no import circles among project modules (strongly connected components of the import graph);
- a task never reaches another task: a task is its config module (pyproject's "harness.tasks" entry
  points, tasks/configs/NAME.py) and the training module that config names (TRAINING); either may
  import harness and the helper modules in tasks/ (e.g. tasks.lm), never a module of another task, and
  no task names another task to the registry (`task_module("pythia_eval")`, `config_class("...")`,
  entry points);
- a config module (tasks/configs/) imports only harness.config, the pure helpers and other config
  modules, so that `--cfg`, `harness tasks` and sweep validation load no torch (also run in a subprocess).
"""

import ast
import os
import subprocess
import sys

import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("harness", "tasks", "analysis")
ANALYSIS_MAY_USE = (
    "harness.runstore",
    "harness.events",
    "harness.errors",
    "harness.quanta_stats",
    "harness.wandb_mode",
    "harness.config.resources",
)
# The rooms of harness/ and what each may import (besides itself). The pure helpers sit at the bottom;
# config and runstore import neither torch nor Lightning (test_light_rooms_import_no_torch).
PURE = ("harness.errors", "harness.events", "harness.quanta_stats", "harness.wandb_mode")
HARNESS_ROOMS = {
    "harness.errors": (),
    "harness.events": ("harness.errors",),
    "harness.quanta_stats": (),
    "harness.wandb_mode": ("harness.errors",),
    "harness.config": PURE,
    "harness.runstore": (*PURE, "harness.config"),
    "harness.training": (*PURE, "harness.config"),
    "harness.members": (*PURE, "harness.config", "harness.training"),
    "harness.sweep": (*PURE, "harness.config", "harness.members"),
    # `harness sweep --dry-run`: lists a sweep's runs and times its costliest point in child processes.
    "harness.dry_run": (*PURE, "harness.config", "harness.sweep", "harness.runstore"),
    "harness.cli": (
        *PURE,
        "harness.config",
        "harness.training",
        "harness.members",
        "harness.sweep",
        "harness.runstore",
        "harness.dry_run",
    ),
    "harness.__main__": ("harness.cli",),
}
# None: sparse parity and Omnigrok each had a hand-vectorised `_packed` twin that imported the task and was
# imported by it, until the one-trainer redesign (issue 20) gave every packable task one model with a
# member dimension. The list stays so that an exception has to be written down, with its reason.
ALLOWED_CIRCLES: list[set[str]] = []
REGISTRY_CALLS = ("task_module", "config_class")
CONFIGS = "tasks.configs"
CONFIG_MAY_USE = (*PURE, "harness.config", CONFIGS)
HEAVY = ("torch", "lightning", "transformers")


def training_module(config_path: str) -> str | None:
    """The TRAINING = "module" a config module names (read from its source, nothing imported)."""
    with open(config_path) as f:
        for node in ast.parse(f.read()).body:
            if (
                isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["TRAINING"]
                and isinstance(node.value, ast.Constant)
            ):
                return node.value.value
    return None


def registered_tasks(root: str = REPO) -> dict[str, str]:
    """Module -> task name, for each task's config module (the entry point) and its training module."""
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    owner = {}
    for name, module in project.get("entry-points", {}).get("harness.tasks", {}).items():
        owner[module] = name
        path = os.path.join(root, *module.split(".")) + ".py"
        if os.path.exists(path) and training_module(path):
            owner[training_module(path)] = name
    return owner


def project_modules(root: str = REPO) -> dict[str, str]:
    """Module name -> file, for every .py file of the project's packages (a package is its __init__)."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    parts = os.path.relpath(path, root)[:-3].split(os.sep)
                    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(source: str, module: str, is_package: bool, known) -> list[tuple[int, str]]:
    """(line, module) for every import in a file's source. `from a import b` gives a.b when that is a
    module (in `known`), else a; relative imports are resolved against `module`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((node.lineno, full if full in known else base))
    return out


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (the nearest known module of each import)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        with open(path) as f:
            found = imports(f.read(), name, path.endswith("__init__.py"), modules)
        for _, target in found:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(start):
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def room(module: str) -> str:
    """The room of a harness module: its subpackage (harness.sweep.agent -> harness.sweep), or itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def allowed(package: str, module_name: str, target: str, tasks: dict[str, str] | None = None) -> bool:
    tasks = tasks or {}
    top = target.split(".")[0]
    if module_name.startswith(CONFIGS + "."):  # a task's config: light, and only configs of its own
        if top not in PACKAGES:
            return top not in HEAVY
        if not any(target == m or target.startswith(m + ".") for m in CONFIG_MAY_USE) and target != "tasks":
            return False
    if top not in PACKAGES:
        return True  # the standard library and third-party packages
    if package == "harness":
        if top != "harness":
            return False
        here, there = room(module_name), room(target)
        return target == "harness" or here == there or there in HARNESS_ROOMS.get(here, ())
    if package == "tasks":
        if top != "tasks":
            return top == "harness"
        if target == "tasks":  # `from tasks import x` also yields tasks.x, checked below
            return True
        depth = 3 if target.startswith(CONFIGS + ".") else 2  # tasks.module or tasks.configs.module
        imported = ".".join(target.split(".")[:depth])  # (target may be tasks.module.name)
        return imported not in tasks or module_name not in tasks or tasks[imported] == tasks[module_name]
    if package == "analysis":
        return (
            top == "analysis"
            or target == "harness"
            or any(target == m or target.startswith(m + ".") for m in ANALYSIS_MAY_USE)
        )
    return True


def registry_reaches(source: str) -> list[tuple[int, str]]:
    """(line, call) where a task names another task to the registry or reads the entry points itself."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            literal = any(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args)
            if (name in REGISTRY_CALLS and literal) or name == "entry_points":
                found.append((node.lineno, ast.unparse(node)))
    return found


def violations(root: str = REPO) -> list[str]:
    found, tasks, modules = [], registered_tasks(), project_modules(root)
    for name, path in sorted(modules.items()):
        package = name.split(".")[0]
        rel = os.path.relpath(path, root)
        with open(path) as f:
            source = f.read()
        for line, target in imports(source, name, path.endswith("__init__.py"), modules):
            if not allowed(package, name, target, tasks):
                found.append(f"{rel}:{line} imports {target}")
        if package == "tasks":
            found += [
                f"{rel}:{line} reaches another task through the registry: {call}"
                for line, call in registry_reaches(source)
            ]
    for component in circles(import_graph(modules)):
        if component not in ALLOWED_CIRCLES:
            found.append("import circle: " + " <-> ".join(sorted(component)))
    return sorted(set(found))


def test_the_checker_catches_each_kind_of_violation():
    assert not allowed("harness", "harness.config.run", "tasks.sparse_parity")
    assert not allowed("harness", "harness.training.train", "analysis.fourier")
    assert not allowed("tasks", "tasks.modular_addition", "analysis.fourier")
    registered = {
        "tasks.pythia_suite": "pythia_suite",
        "tasks.pythia_eval": "pythia_eval",
        "tasks.configs.pythia_eval": "pythia_eval",
        "tasks.modular_addition": "modular_addition",
    }
    assert not allowed("tasks", "tasks.pythia_suite", "tasks.pythia_eval.Config", registered)
    assert not allowed("tasks", "tasks.pythia_suite", "tasks.configs.pythia_eval.Config", registered)
    assert allowed("tasks", "tasks.pythia_eval", "tasks.configs.pythia_eval.Config", registered)
    assert allowed("tasks", "tasks.pythia_eval", "tasks.lm", registered)
    assert allowed("tasks", "tasks.configs.pythia_eval", "tasks.configs.lm", registered)
    assert allowed("tasks", "tasks.configs.pythia_eval", "harness.config.run", registered)
    assert not allowed("tasks", "tasks.configs.pythia_eval", "tasks.lm", registered)  # torch, through a helper
    assert not allowed("tasks", "tasks.configs.sparse_parity", "harness.training.nn", registered)
    assert not allowed("tasks", "tasks.configs.sparse_parity", "torch.nn", registered)
    registered["tasks.configs.pythia_suite"] = "pythia_suite"
    assert not allowed("tasks", "tasks.configs.pythia_suite", "tasks.configs.pythia_eval", registered)
    assert allowed("tasks", "tasks.modular_addition", "tasks.fourier.key_frequencies", registered)
    assert not allowed("analysis", "analysis.grokking", "harness.training.detectors")
    assert not allowed("analysis", "analysis.common", "harness.config.run")
    assert allowed("analysis", "analysis.pythia", "harness.config.resources")
    assert allowed("analysis", "analysis.scaling", "harness.runstore")
    assert allowed("analysis", "analysis.scaling", "harness.errors.UserError")
    assert allowed("tasks", "tasks.sparse_parity", "harness.training.train")
    assert allowed("harness", "harness.cli", "harness.sweep.local")
    assert not allowed("harness", "harness.runstore.local", "harness.training.train")  # a light room
    assert not allowed("harness", "harness.config.run", "harness.sweep.spec")
    assert not allowed("harness", "harness.training.train", "harness.cli")
    assert registry_reaches('pe = task_module("pythia_eval")\ncls = config_class("sparse_parity")') != []
    assert registry_reaches("import importlib.metadata\nimportlib.metadata.entry_points(group='harness.tasks')")
    assert registry_reaches("job = task_module(inner.task).build(inner)") == []  # a config's task: the C7 contract


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}, "g": set()}
    assert sorted(map(sorted, circles(graph))) == [["a", "b", "c"], ["d", "e"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_in_functions_and_from_package_import_module(tmp_path):
    for rel, text in {
        "harness/__init__.py": "",
        "harness/cli.py": "def f():\n    from harness import packed\n",
        "harness/packed.py": "from harness.cli import g\n",
        "harness/sub/__init__.py": "",
        "harness/sub/a.py": "from . import b\n",
        "harness/sub/b.py": "from .a import x\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(project_modules(str(tmp_path)))
    assert graph["harness.cli"] == {"harness.packed"} and graph["harness.sub.a"] == {"harness.sub.b"}
    assert sorted(map(sorted, circles(graph))) == [
        ["harness.cli", "harness.packed"],
        ["harness.sub.a", "harness.sub.b"],
    ]


def test_imports_follow_the_architecture():
    bad = violations()
    assert not bad, "imports against the architecture (DESIGN.md):\n" + "\n".join(bad)


def test_every_task_names_its_training_module():
    owner = registered_tasks()
    configs = [m for m in owner if m.startswith(CONFIGS + ".")]
    assert configs and len(owner) == 2 * len(configs), owner  # each config names a training module


def test_light_rooms_import_no_torch():
    # `harness tasks`, `harness runs`, sweep validation and notebooks that load runs stay light; so do
    # the task configs (`--cfg`), each loaded and validated through the registry.
    code = (
        "import sys, harness.cli, harness.config.run, harness.config.registry, harness.runstore, "
        "harness.sweep.spec, harness.sweep.local\n"
        "from harness.config.registry import tasks\n"
        "from harness.config.run import load_config\n"
        "[load_config([f'task={t}']) for t in tasks()]\n"
        f"print(' '.join(m for m in {HEAVY} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == ""


if __name__ == "__main__":
    print("\n".join(violations()) or "no violations")
