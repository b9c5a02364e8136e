"""`harness sync`: upload offline runs (a local sweep's, or all of a wandb directory's) with `wandb sync`.

A thin layer: it chooses the run directories (every file of a resumed run) with the run store and
passes the project and entity explicitly; the upload itself is W&B's own command. What the runs
carry (project, entity, group `<sweep name>-<id>`, tag `sweep-<id>`, no W&B sweep id) was recorded
when they ran (harness.sweep.agent.local_sweep_env); `--project`/`--entity` override it, as
`wandb sync -p/-e` do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import yaml

from harness.errors import UserError
from harness.runstore.local import SourceError, _check_sweep, _Local, wandb_dir


@dataclass
class Upload:
    project: str | None
    entity: str | None
    runs: list[dict] = field(default_factory=list)  # id, name, group, tags, dirs

    @property
    def dirs(self) -> list[str]:
        return [d for r in self.runs for d in r["dirs"]]

    def argv(self, wandb_exe: str = "wandb") -> list[str]:
        return [
            wandb_exe,
            "sync",
            *(["--project", self.project] if self.project else []),
            *(["--entity", self.entity] if self.entity else []),
            *self.dirs,
        ]


def _sweep_yaml(root: str, sweep: str) -> dict:
    path = os.path.join(root, f"sweep-{sweep}", "sweep.yaml")
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}  # not a local sweep of this directory (a W&B sweep's runs): the runs' records say


def plan(source: str, sweep: str | None = None, project: str | None = None, entity: str | None = None) -> Upload:
    """The runs `harness sync` would upload and where to. One project: runs recorded in several
    projects need `--project` (a one-line error names them)."""
    if not os.path.isdir(source):
        raise SourceError(f"SOURCE {source!r}: a local wandb directory (its offline-run-* runs are uploaded)")
    local = _Local(source)
    metas = _check_sweep(local.runs(), sweep, source)
    spec = _sweep_yaml(wandb_dir(source), sweep) if sweep else {}
    projects = sorted({m["project"] for m in metas if m["project"]})
    project = project or spec.get("project") or (projects[0] if len(projects) == 1 else None)
    if project is None and len(projects) > 1:
        raise UserError(f"the runs were recorded in projects {', '.join(projects)}: choose one with --project")
    up = Upload(project, entity or spec.get("entity"))
    for m in sorted(metas, key=lambda m: (m.get("group") or "", m["name"] or "", m["id"])):
        up.runs.append(
            {
                "id": m["id"],
                "name": m["name"],
                "group": m.get("group"),
                "tags": m.get("tags") or [],
                "state": m["state"],
                "dirs": sorted({os.path.dirname(p) for p in local.by_id[m["id"]]}),
            }
        )
    if not up.runs:
        raise SourceError(f"no runs to upload in {source}")
    return up


def describe(up: Upload) -> str:
    """What a dry run prints: where the runs go, each run, and the command."""
    lines = [
        f"project: {up.project or '(as recorded in each run)'}",
        f"entity: {up.entity or '(your default entity)'}",
        f"runs: {len(up.runs)} ({len(up.dirs)} run directories)",
    ]
    for r in up.runs:
        lines.append(
            f"  {r['id']}  {r['state']:9s} group={r['group'] or '-'}  tags={','.join(r['tags']) or '-'}  {r['name']}"
        )
        lines += [f"      {d}" for d in r["dirs"]]
    lines.append("command: " + " ".join(up.argv()))
    return "\n".join(lines)


def sync(up: Upload, dry_run: bool = False) -> int:
    if dry_run:
        print(describe(up))
        return 0
    print(describe(up), file=sys.stderr)
    exe = os.path.join(os.path.dirname(sys.executable), "wandb")
    exe = exe if os.path.exists(exe) else "wandb"  # subprocess finds it on PATH
    return subprocess.call(up.argv(exe))
