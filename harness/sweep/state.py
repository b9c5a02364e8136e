"""A local sweep on disk: `<wandb dir>/sweep-<id>/` holds sweep.yaml and state.json (every run's id,
parameters, state, host and agent), written atomically with the previous state kept as state.json.bak;
agents share it under the file lock `state.lock`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading

import yaml

from harness.errors import UserError


def wandb_root(wandb_dir: str | None) -> str:
    """The directory that holds the runs (`.../wandb`), whether given it or its parent; without one,
    as wandb itself: $WANDB_DIR when set, else the current directory (runs go to `<it>/wandb`)."""
    wandb_dir = wandb_dir or os.environ.get("WANDB_DIR") or "."
    return wandb_dir if os.path.basename(os.path.normpath(wandb_dir)) == "wandb" else os.path.join(wandb_dir, "wandb")


def sweep_dir(sweep_id: str, wandb_dir: str | None) -> str:
    root = wandb_root(wandb_dir)
    path = os.path.join(root, f"sweep-{sweep_id}")
    if not os.path.exists(os.path.join(path, "state.json")):
        known = sorted(d[6:] for d in os.listdir(root) if d.startswith("sweep-")) if os.path.isdir(root) else []
        raise UserError(f"sweep {sweep_id!r} not found in {root} (local sweeps there: {', '.join(known) or 'none'})")
    return path


def read_state(path: str) -> dict:
    file = os.path.join(path, "state.json")
    try:
        with open(file) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("runs"), list):
            raise ValueError("no runs list")
        return state
    except ValueError as e:
        bak = file + ".bak"
        fix = (
            f"the state before the last write is in {bak}: `cp {bak} {file}` and run `harness agent` again"
            if os.path.exists(bak)
            else f"remove {path} and create the sweep again (its finished runs stay in {os.path.dirname(path)})"
        )
        raise UserError(f"{file} is corrupt ({str(e).splitlines()[0]}); {fix}") from None


def write_state(path: str, state: dict) -> None:
    """Atomic replace; the previous state (read and parsed under the same lock) is kept as state.json.bak.
    A write that fails (a full disk) leaves the previous state.json and no temporary file."""
    file = os.path.join(path, "state.json")
    tag = f"{os.getpid()}.{threading.get_ident()}"
    try:
        if os.path.exists(file):
            shutil.copyfile(file, f"{file}.bak.{tag}")
            os.replace(f"{file}.bak.{tag}", file + ".bak")
        with open(f"{file}.{tag}", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(f"{file}.{tag}", file)
    except BaseException:
        for tmp in (f"{file}.bak.{tag}", f"{file}.{tag}"):
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise


def create_sweep_dir(root: str, sweep_id: str, cfg: dict, source: str) -> str:
    """`<root>/sweep-<id>/` with sweep.yaml and an empty state.json, whole or not at all: a write that
    fails (a full disk, a read-only directory) removes the directory and is one line."""
    path = os.path.join(root, f"sweep-{sweep_id}")
    created = False
    try:
        os.makedirs(path)  # FileExistsError for an id already taken: never removed below
        created = True
        with open(os.path.join(path, "sweep.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        write_state(path, {"sweep_id": sweep_id, "source": source, "runs": []})
    except OSError as e:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise UserError(
            f"cannot create the sweep in {root} ({type(e).__name__}: {e.strerror or e}); "
            "free space or choose another --wandb-dir / WANDB_DIR"
        ) from None
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(state: dict) -> None:
    """Runs whose agent died (SIGKILL, power loss) are marked killed; their grid points reopen."""
    host = socket.gethostname()
    for r in state["runs"]:
        if r["state"] == "running" and r["host"] == host and not _alive(r["agent_pid"]):
            r["state"] = "killed"
