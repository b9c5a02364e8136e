"""The hook a study module offers `analysis.report` (one line in report.STUDIES plugs it in).

A study module (e.g. analysis/scaling.py) defines, beside its own CLI:

    def applies(runs: pd.DataFrame) -> bool        # the runs table of SOURCE (all job types)
    def run(source: str, sweep: str | None, out: str) -> Section

`run` writes its outputs (json, plots, report.md) under `out` (a directory of its own) and returns a
Section: its report.md text, the plots it drew, its fit points as DataFrames, its fitted numbers, and
the ids of the runs it analysed. The report stitches the sections into report.md / report.html and,
with --log, logs each as a W&B run of job_type "analysis". A study that finds nothing to analyse
raises harness.errors.UserError with one line; the report lists it and goes on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Section:
    study: str                      # short name: "scaling", "grokking", ...
    title: str
    markdown: str                   # the study's report.md; links relative to `out`
    out: str                        # the directory the study wrote into
    plots: list[str] = field(default_factory=list)          # PNG paths (SVG twins beside them)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # name -> fit points (a wandb.Table each)
    summary: dict[str, float] = field(default_factory=dict)  # fitted numbers (the analysis run's summary)
    run_ids: list[str] = field(default_factory=list)         # the runs analysed (config + lineage)


def task_runs(runs: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows of `runs` whose config.task is `task` (analysis runs have no task, so never match)."""
    if "config.task" not in runs or not len(runs):
        return runs.iloc[0:0]
    return runs[runs["config.task"] == task]


def has_task(runs: pd.DataFrame, task: str) -> bool:
    return len(task_runs(runs, task)) > 0


def numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) result dict, flattened with '/': what goes in a summary."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(numbers(v, key + "/"))
        elif isinstance(v, bool):
            out[key] = v
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = v
        elif isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
            out[key + "/lo"], out[key + "/hi"] = v
    return out
