"""What a run hands back to the controller that launched it: a small JSON file the run writes at its end.

The local controller (harness.sweep.agent) names the file in the run's environment (RESULT_ENV); `harness
train` and a packed block (harness.members.packed) write {run id: {"state", "exitcode", "summary",
"error"}} there, renamed into place, and the controller reads the sweep metric from the summary, instead
of parsing the last JSON line of the run's log. Pure JSON, no torch.
"""

from __future__ import annotations

import json
import os

RESULT_ENV = "HARNESS_RESULT_FILE"
EXIT_CODES = {"finished": 0, "preempted": 143}  # any other state: 1


def result_path(sweep_path: str, run_id: str) -> str:
    """Where the controller asks a run (or a packed block, by its tag) to write its result."""
    return os.path.join(sweep_path, f"{run_id}.result.json")


def entry(state: str, summary: dict | None = None, error: str | None = None) -> dict:
    return {"state": state, "exitcode": EXIT_CODES.get(state, 1), "summary": summary or {}, "error": error}


def write_results(path: str | None, results: dict[str, dict]) -> None:
    """Write {run id: entry} to `path` (a temporary file renamed into place: a reader never sees half)."""
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, default=str)
    os.replace(tmp, path)


def read_results(path: str) -> dict[str, dict]:
    """{run id: entry}; {} when the run wrote none (killed, or a command that is not `harness train`)."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}
