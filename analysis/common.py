"""What every `python -m analysis.<study> SOURCE [--sweep ID] --out DIR` shares."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

import numpy as np


def md_row(cells) -> str:
    """One markdown table row. A cell may hold a run name or a config value (untrusted: anyone who
    can name a run in a shared project): a `|` in it would split the cell and shift the row, a newline
    would end the table, so both are escaped."""
    return "| " + " | ".join(str(c).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def parse_args(study: str, argv: list[str] | None = None, extra: Callable | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m analysis.{study}")
    p.add_argument("source", help="W&B path entity/project, or a local wandb directory")
    p.add_argument("--sweep", default=None, help="sweep id to select runs from")
    p.add_argument("--out", default=f"out/{study}", help="output directory")
    if extra:
        extra(p)
    return p.parse_args(argv)


def final_metric_column(runs, metric: str) -> str:
    """The runs-table column of a metric's last logged value.

    Metrics declared with summary "min,last" / "max,last" (val/loss, val/acc: contract C2) keep it
    under `summary.<metric>.last`; runs logged before that declaration, under `summary.<metric>`.
    """
    for col in (f"summary.{metric}.last", f"summary.{metric}"):
        if col in runs:
            return col
    return f"summary.{metric}.last"


def to_jsonable(x):
    """NaN/inf -> None, numpy scalars/arrays -> Python, recursively (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_outputs(out_dir: str, study: str, result: dict, report_md: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{study}.json"), "w") as f:
        json.dump(to_jsonable(result), f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_md)
    print(f"wrote {out_dir}/{study}.json, {out_dir}/report.md and plots in {out_dir}/", file=sys.stderr)


def main_guard(fn: Callable[[], None]) -> None:
    """Run an analysis CLI; bad input exits 2 with one line, as `harness` does."""
    from harness.errors import UserError  # ConfigError is a UserError

    try:
        fn()
    except UserError as e:
        print(f"analysis: error: {e}", file=sys.stderr)
        sys.exit(2)
