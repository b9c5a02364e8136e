"""The quantization model's prediction for the runs' own design (multitask sparse parity).

The asymptotic theory (alpha_N = alpha, alpha_D = alpha/(alpha+1)) assumes infinitely many subtasks.
A run of a finite design learns n of n_tasks subtasks and keeps, on each unlearned one, the loss of a
fair coin (1 bit), so the quantization model predicts its mean loss from n alone:

    L_pred(n) = ln 2 * sum_{k > n} p_k     (nats; p_k the task's own frequencies, k = 1..n_tasks)

and the predicted exponent is the negated slope of the same plain log-log least-squares line of
L_pred(n_r) against x_r (parameters N or samples D) that gives the measured plain exponent. A finite
tail (100 subtasks) makes the loss fall faster than the infinite Zipf law as n approaches n_tasks:
that is why this prediction sits above alpha. Pure numpy; the frequencies come from
harness.quanta_stats (the task draws its batches from the same function).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.fits import FitError, resample_indices
from harness.quanta_stats import zipf_frequencies

LN2 = math.log(2)
N_KEY = "summary.emergence/n_below_end"  # the subtasks below the threshold at the end of a run


def run_frequencies(run: pd.Series | dict) -> np.ndarray | None:
    """p_t of one run's design from its config (n_tasks, zipf_alpha, offset); None if not logged."""
    get = run.get
    n, a, off = get("config.data.n_tasks"), get("config.data.zipf_alpha"), get("config.data.offset", 0.0)
    if n is None or a is None or pd.isna(n) or pd.isna(a):
        return None
    off = 0.0 if off is None or pd.isna(off) else float(off)
    return zipf_frequencies(int(n), float(a), off)


def design_frequencies(runs: pd.DataFrame) -> np.ndarray:
    """The one design of a set of runs; a one-line error if they differ or do not say."""
    keys = ["config.data.n_tasks", "config.data.zipf_alpha"]
    missing = [k for k in keys if k not in runs]
    if missing or not len(runs):
        raise FitError(f"no design to predict from: missing {', '.join(missing) or 'runs'}")
    off = runs["config.data.offset"] if "config.data.offset" in runs else pd.Series(0.0, index=runs.index)
    designs = {
        (int(n), float(a), float(0.0 if pd.isna(o) else o)) for n, a, o in zip(runs[keys[0]], runs[keys[1]], off)
    }
    if len(designs) != 1:
        raise FitError(
            f"runs of {len(designs)} designs (n_tasks, zipf_alpha, offset): {sorted(designs)}; "
            "predict each design separately"
        )
    return zipf_frequencies(*designs.pop())


def predicted_loss(n_learned, p: np.ndarray) -> np.ndarray:
    """L_pred(n) in nats for each count n (the n most frequent subtasks learned, the rest 1 bit each)."""
    n = np.asarray(n_learned, float)
    if np.any(~np.isfinite(n)) or np.any(n < 0) or np.any(n > len(p)) or np.any(n != np.round(n)):
        raise FitError(f"learned counts must be integers in 0..{len(p)}, got {np.unique(n).tolist()[:8]}")
    tail = np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])  # tail[n] = sum_{k > n} p_k (1-based k)
    return LN2 * tail[n.astype(int)]


def design_alpha(x, n_learned, p: np.ndarray) -> float:
    """Negated slope of log L_pred(n_r) against log x_r (least squares): the predicted exponent."""
    x, L = np.asarray(x, float), predicted_loss(n_learned, p)
    if np.any(L <= 0):
        raise FitError(
            f"{int(np.sum(L <= 0))} run(s) learned every one of the {len(p)} subtasks: the predicted "
            "loss is 0 and has no logarithm"
        )
    if len(np.unique(x)) < 2:
        raise FitError(f"need >= 2 distinct x values for a slope, got {len(np.unique(x))}")
    return float(-np.polyfit(np.log(x), np.log(L), 1)[0])


def design_alpha_ci(
    x, n_learned, p: np.ndarray, strata=None, n_bootstrap: int = 200, ci: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile interval of design_alpha over the same resamples as fits.fit_loglog with the same
    `strata` and `seed` (seeds within each x when strata = x): the scatter the counts bring."""
    if not n_bootstrap:
        return None
    x, n = np.asarray(x, float), np.asarray(n_learned, float)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_bootstrap):
        idx = resample_indices(len(x), strata, rng)
        if len(np.unique(x[idx])) < 2:
            continue
        try:
            vals.append(design_alpha(x[idx], n[idx], p))
        except FitError:
            continue
    if len(vals) < 2:
        return None
    q = (1 - ci) / 2 * 100
    return float(np.percentile(vals, q)), float(np.percentile(vals, 100 - q))


def design_prediction(runs: pd.DataFrame, x: np.ndarray, n_bootstrap: int, strata=None) -> dict:
    """The exponent predicted for these runs' own design from the subtasks each learned
    (emergence/n_below_end), its interval over the same resamples as the measured fit (`strata`:
    analysis.fits.resample_indices), and each run's predicted loss; or a note saying why there is none."""
    if N_KEY not in runs or runs[N_KEY].isna().any():
        return {"note": f"no {N_KEY} on every run: no design prediction"}
    try:
        p = design_frequencies(runs)
        n = runs[N_KEY].astype(float).to_numpy()
        return {
            "alpha": design_alpha(x, n, p),
            "ci": design_alpha_ci(x, n, p, strata, n_bootstrap),
            "predicted": predicted_loss(n, p).tolist(),
        }
    except FitError as e:
        return {"note": f"no design prediction: {e}"}
