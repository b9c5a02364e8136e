"""The docs a newcomer follows: every fenced shell command and YAML snippet in README.md and docs/**/*.md
is executed or parsed, and every relative link points to a file (and heading) that exists.

- YAML: `yaml.safe_load`; a sweep (a mapping with `parameters`) also through the harness's sweep
  validation (W&B's schema, the command, every parameter against the task's config).
- shell: each block through `bash -n`; then each command by its program:
  - executed (cheap, offline): `harness tasks`, `harness train ... --cfg`, `harness runs <local dir>`
    (on a tiny real sweep: `wandb` and SWEEP_ID/ID point at it), `harness sweep FILE --dry-run` (the
    listing, with --estimate-steps 0; tests/test_startup.py checks a timed estimate);
  - parsed: every other `harness` command through the CLI's own argparse parser, a `train` also through
    config validation and a `sweep FILE` through sweep validation; `wandb` subcommands through wandb's
    click parser (nothing run); `python -m MODULE` / `python FILE.py`: the module or file exists and
    each `--flag` appears in its source (or a project module it imports); `make TARGET`: the target
    exists; shell built-ins (`export`, `source`, `cd`) are left to `bash -n`.
- python: `ast.parse` (the notebook recipes are run by their own tests).

`python tests/test_docs.py` prints the counts.
"""

from __future__ import annotations

import ast
import contextlib
import glob
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
SHELL = {"bash", "sh", "shell", "console"}
BUILTINS = {"export", "source", ".", "cd", "mkdir", "ls", "cat", "echo", "set", "unset"}
# Programs outside the project: only `bash -n` checks them (counted as syntax-checked).
EXTERNAL = {
    "git",
    "pip",
    "pip3",
    "sbatch",
    "srun",
    "squeue",
    "scancel",
    "nvidia-smi",
    "curl",
    "wget",
    "tar",
    "cp",
    "mv",
    "rm",
    "head",
    "tail",
    "grep",
    "less",
    "open",
    "xdg-open",
    "jupyter",
    "tee",
    "watch",
    "du",
    "sort",
}
CONTROL = {"|", "||", "&&", ";", "&"}
PLACEHOLDER_SWEEP = {"SWEEP_ID", "ID", "abc123"}
TINY_SWEEP = """name: docs-fixture
method: grid
command:
  - ${env}
  - ${interpreter}
  - -m
  - harness
  - train
  - ${args_no_hyphens}
parameters:
  task: {value: sparse_parity}
  data.n_tasks: {value: 4}
  data.n: {value: 8}
  data.k: {value: 2}
  data.batch_size: {value: 256}
  eval.test_per_task: {value: 200}
  trainer.steps: {value: 20}
  trainer.eval_every: {value: 10}
  model.width: {value: 8}
  model.save: {value: false}
"""


def doc_files() -> list[str]:
    return [os.path.join(REPO, "README.md")] + sorted(
        glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)
    )


def blocks(path: str) -> list[tuple[str, str, int]]:
    """(language, text, line) of each fenced block."""
    with open(path) as f:
        text = f.read()
    return [(m.group(1).lower(), m.group(2), text[: m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comment lines dropped."""
    out, pending = [], ""
    for line in block.splitlines():
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def words(command: str) -> list[list[str]]:
    """argv of each simple command of a line (split at | || && ; &): a trailing comment and leading
    VAR=value assignments dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out, argv = [], []
    for token in list(lexer) + [";"]:
        if token in CONTROL:
            while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
                argv = argv[1:]
            if argv:
                out.append(argv)
            argv = []
        else:
            argv.append(token)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    with open(path) as f:
        text = FENCE.sub("", f.read())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


@dataclass
class Counts:
    executed: list[str] = field(default_factory=list)
    parsed: list[str] = field(default_factory=list)
    syntax_only: list[str] = field(default_factory=list)
    yaml: int = 0
    sweeps_validated: int = 0
    python: int = 0
    links: int = 0
    shell_blocks: int = 0
    problems: list[str] = field(default_factory=list)


# ---- the harness command -----------------------------------------------------------------------


def run_harness(argv: list[str]) -> tuple[int, str]:
    from harness.cli import main

    out, here = io.StringIO(), os.getcwd()
    os.chdir(REPO)  # the docs' paths (sweeps/...) are relative to the repository root
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
    return code, out.getvalue()


def check_harness(argv: list[str], fixture: dict, tmp: str, where: str, counts: Counts) -> None:
    from harness.cli import _hyphenated_overrides, parser

    text = " ".join(argv)
    sub = argv[1] if len(argv) > 1 else ""
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            args = parser().parse_args(_hyphenated_overrides(argv[1:]))
    except SystemExit:
        counts.problems.append(f"{where}: `{text}`: the harness CLI refuses it: {err.getvalue().strip()[-300:]}")
        return
    if sub == "tasks" or (sub == "train" and args.cfg):
        code, out = run_harness(argv[1:])
        counts.executed.append(text)
        if code != 0:
            counts.problems.append(f"{where}: `{text}` exited {code}: {out.strip()[-300:]}")
        return
    if sub == "runs" and "/" not in args.source:  # a local wandb directory: run it on the fixture
        real = [
            fixture["dir"]
            if a == args.source
            else fixture["sweep"]
            if a in PLACEHOLDER_SWEEP
            else os.path.join(tmp, os.path.basename(a))
            if a == args.output
            else a
            for a in argv[1:]
        ]
        code, out = run_harness(real)
        counts.executed.append(text)
        if code != 0:
            counts.problems.append(f"{where}: `{text}` (on a one-run fixture) exited {code}: {out.strip()[-300:]}")
        return
    if sub == "sweep" and args.dry_run:  # the listing; tests/test_startup.py times an estimate
        code, out = run_harness([*argv[1:], "--estimate-steps", "0"])
        counts.executed.append(text)
        if code != 0:
            counts.problems.append(f"{where}: `{text}` exited {code}: {out.strip()[-300:]}")
        return
    try:
        if sub == "train":
            from harness.config.run import load_config

            load_config(args.overrides)
        elif sub == "sweep":
            from harness.sweep.spec import load_sweep_yaml, validate_sweep

            validate_sweep(load_sweep_yaml(os.path.join(REPO, args.yaml)), args.yaml)
    except Exception as e:  # noqa: BLE001  (every refusal is the finding)
        counts.problems.append(f"{where}: `{text}`: {e}")
        return
    counts.parsed.append(text)


# ---- other programs ----------------------------------------------------------------------------


def project_sources(module_path: str) -> str:
    """A module's source and the sources of the project modules it imports (their flags may live there)."""
    with open(module_path) as f:
        text = f.read()
    sources = [text]
    for node in ast.walk(ast.parse(text)):
        names = (
            [node.module]
            if isinstance(node, ast.ImportFrom) and node.module
            else [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        for name in names:
            path = os.path.join(REPO, *name.split(".")) + ".py"
            if name.split(".")[0] in ("harness", "analysis", "tasks", "benchmarks") and os.path.exists(path):
                with open(path) as f:
                    sources.append(f.read())
    return "\n".join(sources)


def check_flags(path: str, argv: list[str]) -> list[str]:
    source = project_sources(path)
    return [a.split("=")[0] for a in argv if a.startswith("--") and f'"{a.split("=")[0]}"' not in source]


def check_python(argv: list[str], where: str, counts: Counts) -> None:
    text = " ".join(argv)
    if argv[1:2] == ["-m"] and len(argv) > 2:
        if argv[2] == "harness":
            return check_harness(["harness", *argv[3:]], {}, "", where, counts)
        path = os.path.join(REPO, *argv[2].split("."))
        path = path + ".py" if os.path.exists(path + ".py") else os.path.join(path, "__main__.py")
        rest = argv[3:]
    else:
        path, rest = os.path.join(REPO, argv[1]), argv[2:]
    if not os.path.exists(path):
        counts.problems.append(f"{where}: `{text}`: no such module or file ({os.path.relpath(path, REPO)})")
        return
    unknown = check_flags(path, rest)
    if unknown:
        counts.problems.append(f"{where}: `{text}`: {os.path.relpath(path, REPO)} defines no {', '.join(unknown)}")
        return
    counts.parsed.append(text)


def check_wandb(argv: list[str], where: str, counts: Counts) -> None:
    import click
    from wandb.cli.cli import cli

    text = " ".join(argv)
    command = cli.commands.get(argv[1]) if len(argv) > 1 else None
    if command is None:
        counts.problems.append(f"{where}: `{text}`: wandb has no subcommand {argv[1:2]}")
        return
    try:
        command.make_context(argv[1], list(argv[2:]))  # parses the options; runs nothing
    except click.exceptions.ClickException as e:
        counts.problems.append(f"{where}: `{text}`: wandb refuses it: {e.format_message()}")
        return
    counts.parsed.append(text)


def check_make(argv: list[str], where: str, counts: Counts) -> None:
    with open(os.path.join(REPO, "Makefile")) as f:
        targets = set(re.findall(r"^([\w.-]+):", f.read(), re.M))
    missing = [t for t in argv[1:] if "=" not in t and not t.startswith("-") and t not in targets]
    if missing:
        counts.problems.append(f"{where}: `{' '.join(argv)}`: the Makefile has no target {', '.join(missing)}")
    else:
        counts.parsed.append(" ".join(argv))


def check_shell_block(block: str, fixture: dict, tmp: str, where: str, counts: Counts) -> None:
    counts.shell_blocks += 1
    syntax = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    if syntax.returncode != 0:
        counts.problems.append(f"{where}: not valid shell: {syntax.stderr.strip()}")
        return
    for argv in (argv for command in commands(block) for argv in words(command)):
        program = os.path.basename(argv[0])
        if program in BUILTINS or program in EXTERNAL:
            counts.syntax_only.append(" ".join(argv))
        elif program == "harness":
            check_harness(argv, fixture, tmp, where, counts)
        elif program.startswith("python"):
            check_python(argv, where, counts)
        elif program == "wandb":
            check_wandb(argv, where, counts)
        elif program == "make":
            check_make(argv, where, counts)
        else:
            counts.problems.append(
                f"{where}: `{' '.join(argv)}`: no check for program {program!r} "
                "(add it to EXTERNAL or a check to tests/test_docs.py)"
            )


def check_yaml(block: str, where: str, counts: Counts) -> None:
    from harness.sweep.spec import validate_sweep

    try:
        doc = yaml.safe_load(block)
    except yaml.YAMLError as e:
        counts.problems.append(f"{where}: not valid YAML: {str(e).splitlines()[0]}")
        return
    counts.yaml += 1
    if isinstance(doc, dict) and "parameters" in doc:
        try:
            validate_sweep(doc, where)
        except Exception as e:  # noqa: BLE001
            counts.problems.append(f"{where}: the sweep is refused: {e}")
            return
        counts.sweeps_validated += 1


def check_links(path: str, counts: Counts, base: str | None = None) -> None:
    """Every relative link of a page (resolved against `base`, by default the page's folder)."""
    with open(path) as f:
        text = FENCE.sub("", f.read())
    where = os.path.relpath(path, REPO)
    base = base or os.path.dirname(path)
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        counts.links += 1
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(base, file)) if file else path
        if not os.path.exists(dest):
            counts.problems.append(f"{where}: link {target} -> {os.path.relpath(dest, REPO)} does not exist")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            counts.problems.append(f"{where}: link {target}: no heading #{anchor} in {os.path.relpath(dest, REPO)}")


def check_docs(fixture: dict, tmp: str) -> Counts:
    counts = Counts()
    for path in doc_files():
        rel = os.path.relpath(path, REPO)
        for lang, block, line in blocks(path):
            where = f"{rel}:{line}"
            if lang in SHELL:
                check_shell_block(block, fixture, tmp, where, counts)
            elif lang in ("yaml", "yml"):
                check_yaml(block, where, counts)
            elif lang == "python":
                try:
                    ast.parse(block)
                    counts.python += 1
                except SyntaxError as e:
                    counts.problems.append(f"{where}: not valid Python: {e}")
        check_links(path, counts)
    return counts


def make_fixture(tmp: str) -> dict:
    """A local sweep of one tiny real run: `harness runs` in the docs runs on it."""
    path = os.path.join(tmp, "fixture.yaml")
    with open(path, "w") as f:
        f.write(TINY_SWEEP)
    root = os.path.join(tmp, "wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run(
        [sys.executable, "-m", "harness", "sweep", path, "--local", "--wandb-dir", root],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return {"dir": root, "sweep": out.stdout.split()[-1]}


def report(c: Counts) -> str:
    return (
        f"commands executed {len(c.executed)}, commands parsed {len(c.parsed)}, commands only syntax-checked "
        f"{len(c.syntax_only)}, shell blocks {c.shell_blocks}, "
        f"YAML snippets parsed {c.yaml} (sweeps validated {c.sweeps_validated}), python blocks parsed {c.python}, "
        f"links checked {c.links}"
    )


def test_every_command_snippet_and_link_in_the_docs(tmp_path):
    counts = check_docs(make_fixture(str(tmp_path)), str(tmp_path))
    print(report(counts))
    assert not counts.problems, "\n".join(counts.problems)
    assert counts.executed and counts.parsed and counts.yaml and counts.links


@pytest.mark.parametrize(
    "snippet, finds",
    [
        ("```yaml\ncommand: [${env}, ${interpreter}, -m, harness]\n```\n", "not valid YAML"),
        ("```bash\nharness train task=sparse_parity model.widht=8\n```\n", "did you mean model.width"),
        ("```bash\nharness sweep x.yaml --lcoal\n```\n", "refuses it"),
        ("```bash\nharness train task=sparse_parity --cfg model.width=0\n```\n", "exited 2"),
        ("```bash\npython -m analysis.scaling wandb --otu out\n```\n", "defines no --otu"),
        ("```bash\nwandb agent --cuont 1 a/b/c\n```\n", "wandb refuses it"),
        ("```bash\nmake runn\n```\n", "no target runn"),
        ("```bash\nharness tasks | harnes runs wandb\n```\n", "no check for program 'harnes'"),
        ("```bash\nfor x in; do\n```\n", "not valid shell"),
        ("[a page](docs/nope.md) and [a heading](docs/runs.md#no-such-heading)\n", "does not exist"),
        ("[a heading](docs/runs.md#no-such-heading)\n", "no heading #no-such-heading"),
    ],
)
def test_the_checker_finds_each_kind_of_mistake(tmp_path, snippet, finds):
    page = tmp_path / "page.md"
    page.write_text(snippet)
    counts = Counts()
    for lang, block, _line in blocks(str(page)):
        if lang in SHELL:
            check_shell_block(block, {}, str(tmp_path), "page.md", counts)
        elif lang == "yaml":
            check_yaml(block, "page.md", counts)
    check_links(str(page), counts, base=REPO)  # the page links as if it were the README
    assert any(finds in p for p in counts.problems), counts.problems


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        c = check_docs(make_fixture(tmp), tmp)
    print("\n".join(c.problems) or "no problems")
    print(report(c))
