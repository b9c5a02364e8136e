"""Warnings a scaling fit prints, each naming the runs it is about (pure pandas/numpy).

- too few distinct x values (< 5): a power law through 3 or 4 sizes fixes nothing, whatever its interval;
- the offset E of L = E + A x^-alpha on its bound 0: the data show no irreducible loss, the offset model
  is mis-specified, and the plain log-log fit is the one to read;
- a run still learning in the last 10% of its steps: its final loss is not the loss of its size or
  data budget but of its step budget, and the exponent through it is biased low.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MIN_DISTINCT_X = 5
LAST_FRACTION = 0.1  # "the end of a run": its last 10% of steps
MIN_DROP = 0.01  # a loss that fell less than 1% over that window has stopped, whatever its noise


def few_x(x, ids, name: str = "x", minimum: int = MIN_DISTINCT_X) -> str | None:
    """A warning when the fit has fewer than `minimum` distinct x values."""
    distinct = sorted({float(v) for v in x})
    if len(distinct) >= minimum:
        return None
    return (
        f"only {len(distinct)} distinct {name} values ({', '.join(f'{v:.4g}' for v in distinct)}; "
        f"{minimum} or more are needed to tell a power law from a bend) in runs {', '.join(map(str, ids))}"
    )


def offset_on_bound(E: float, losses, ids) -> str | None:
    """A warning when the fitted offset E vanished (its bound, 0): the offset model is mis-specified.
    Vanished: below 0.1% of the smallest loss, where the optimizer stops creeping towards 0 (E = exp(e)
    with e unbounded) and E changes no fitted loss by more than the 1e-3 of the Huber scale."""
    if E >= 1e-3 * float(np.min(losses)):
        return None
    ids = list(map(str, ids))
    runs = ", ".join(ids) if len(ids) <= 8 else f"all {len(ids)} fitted ({', '.join(ids[:3])}, ...)"
    return (
        f"E = {E:.3g} sits on its bound 0 in the fit over runs {runs}: the offset model "
        "L = E + A x^-alpha is mis-specified for these data (no irreducible loss is seen), so the plain "
        "log-log fit is primary and the offset fit's E interval means nothing"
    )


def still_learning(
    hist: pd.DataFrame,
    loss: str = "val/loss",
    count: str | None = "val/n_learned",
    last: float = LAST_FRACTION,
    min_drop: float = MIN_DROP,
) -> list[dict]:
    """Runs whose loss still fell beyond its noise, or whose learned count still rose, in the last
    `last` fraction of their steps. `hist`: run_id, step, `loss`, and `count` if logged.

    The window runs from the last evaluation at or before step (1 - last) * final step to the end.
    Noise: sigma of log loss at one evaluation, from its second differences over the second half of the
    run (std / sqrt(6) for white noise; a smooth trend, falling or flat, has second differences near 0,
    so the trend does not count as noise); the loss counts as still falling when its log fell over the
    window by more than 2.5 sigma sqrt(2) (the difference of two noisy evaluations) and by more than
    `min_drop` of its value.
    Returns [{"id", "steps": (start, end), "loss": (start, end), "n": (start, end) or None, "why"}]."""
    out = []
    for rid, h in hist.dropna(subset=[loss]).groupby("run_id", sort=False):
        h = h.sort_values("step")
        steps, L = h["step"].to_numpy(float), h[loss].to_numpy(float)
        if len(steps) < 3 or np.any(L <= 0):
            continue
        end = steps[-1]
        before = np.flatnonzero(steps <= (1 - last) * end)
        if not len(before):
            continue
        i0 = before[-1]
        logs = np.log(L)
        curvature = np.diff(logs[steps >= end / 2], n=2)
        noise = float(np.std(curvature, ddof=1) / np.sqrt(6)) if len(curvature) >= 3 else 0.0
        drop = logs[i0] - logs[-1]
        falling = drop > max(2.5 * noise * np.sqrt(2), -np.log1p(-min_drop))
        n_pair = None
        rising = False
        if count and count in h and h[count].notna().iloc[[i0, -1]].all():
            n0, n1 = float(h[count].iloc[i0]), float(h[count].iloc[-1])
            n_pair, rising = (n0, n1), n1 > n0
        if falling or rising:
            why = []
            if falling:
                why.append(f"loss {L[i0]:.4g} -> {L[-1]:.4g} ({-np.expm1(-drop):.1%}; noise {noise:.1%})")
            if rising:
                why.append(f"learned {n_pair[0]:g} -> {n_pair[1]:g}")
            out.append(
                {
                    "id": rid,
                    "steps": (int(steps[i0]), int(end)),
                    "loss": (float(L[i0]), float(L[-1])),
                    "n": n_pair,
                    "why": f"steps {int(steps[i0])}-{int(end)}: " + "; ".join(why),
                }
            )
    return out


def still_learning_warning(flagged: list[dict], labels: dict | None = None) -> str | None:
    """One line naming the runs still learning at the end (labels: id -> e.g. 'width 128 seed 1')."""
    if not flagged:
        return None
    labels = labels or {}
    runs = "; ".join(
        f"{labels[r['id']] + ' (' + r['id'] + ')' if r['id'] in labels else r['id']}: {r['why']}" for r in flagged
    )
    return (
        f"{len(flagged)} run(s) still learning in the last {LAST_FRACTION:.0%} of their steps (their final "
        f"loss is bound by the step budget, not by size or data): {runs}"
    )
