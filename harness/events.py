"""Typed events: when something first happened during a run, with censoring (pure: no Lightning).

An event E (`grok/t_val99`, `grok/delay`, ...) is stored in the run summary as two keys, the way
survival analysis stores a time-to-event:

    E          a number: the step at which it happened, or, if it never did, the last evaluated
               step (the time the run was watched for it: a lower bound)
    E/reached  a boolean: whether it happened

so every event column is numeric (sortable and plottable in the W&B UI, a float or int dtype in
pandas) and a censored run is never mistaken for one that got there at its last step.
"""

from __future__ import annotations

import pandas as pd

from harness.errors import UserError

REACHED = "/reached"

# Liu et al.'s phases of grokking, from the steps at which train and validation reach the threshold.
PHASES = ("comprehension", "grokking", "memorization", "confusion")


def event_fields(name: str, step: int | None, last_step: int) -> dict:
    """{name: step, name/reached: True}, or {name: last_step, name/reached: False} if step is None."""
    reached = step is not None
    return {name: int(step if reached else last_step), name + REACHED: reached}


def duration_fields(name: str, start: int | None, end: int | None, last_step: int) -> dict:
    """A duration from event `start` to event `end` (grok/delay = t_val99 - t_train99).

    Reached only when both happened. Otherwise the value is what was watched, a lower bound:
    last_step - start when only the start happened, 0 when the start never happened either.
    """
    if start is not None and end is not None:
        return {name: int(end - start), name + REACHED: True}
    return {name: int(last_step - start) if start is not None else 0, name + REACHED: False}


def read_event(table: pd.DataFrame, name: str, prefix: str = "summary.") -> tuple[pd.Series, pd.Series]:
    """(step, reached) of event `name` for every row of a runs table (`harness.runstore.load_runs`).

    step is float (NaN where a run has no value, e.g. it crashed before writing its summary);
    reached is boolean (False there). A non-numeric value is an error naming the column: the
    strings of the old "censored" format are not guessed at.
    """
    col, flag = prefix + name, prefix + name + REACHED
    if col not in table:
        raise UserError(f"no column {col!r} in the runs table: these runs never logged the event {name!r}")
    step = pd.to_numeric(table[col], errors="coerce")
    bad = table[col].notna() & step.isna()
    if bad.any():
        raise UserError(
            f"column {col!r} holds non-numeric values ({table.loc[bad, col].iloc[0]!r}): "
            "runs logged before events were typed; re-run them"
        )
    if flag not in table:
        raise UserError(f"no column {flag!r} beside {col!r}: cannot tell a reached event from a censored one")
    reached = table[flag].map(lambda v: v is True or v == 1 or str(v).lower() == "true").astype(bool)
    return step.astype(float), reached & step.notna()


def grokking_phase(t_train: int | None, t_val: int | None, max_delay: int) -> str:
    """Liu et al.'s four phases from the steps at which train and val reach the threshold."""
    if t_train is None:
        return "comprehension" if t_val is not None else "confusion"
    if t_val is None:
        return "memorization"
    return "grokking" if t_val - t_train > max_delay else "comprehension"
