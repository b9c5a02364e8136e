"""Statistics of quanta found by clustering (Michaud et al. 2023, QDG): rank-frequency curves of
cluster sizes, their envelope over cluster counts and its log-log slope, and agreement with known
labels (adjusted Rand index, purity). Pure numpy/scipy/sklearn: the `quanta_discovery` task writes its
summary with these and `analysis.quanta` recomputes its figures with the same code.
"""

from __future__ import annotations

import numpy as np

REFERENCE_SLOPE = -1.083  # the reference line of the paper's rank-frequency figure


def zipf_frequencies(n_tasks: int, zipf_alpha: float, offset: float = 0.0) -> np.ndarray:
    """Subtask frequencies of multitask sparse parity, p_t proportional to (t + offset)^-(zipf_alpha + 1),
    t = 1..n_tasks: [n_tasks], float64, summing to 1. The one home of the formula: the task draws its
    batches from it, and the analyses (design predictions, convergence times) read it from here."""
    t = np.arange(1, int(n_tasks) + 1, dtype=np.float64) + float(offset)
    p = t ** -(float(zipf_alpha) + 1)
    return p / p.sum()


def sizes(labels) -> np.ndarray:
    """Cluster sizes, largest first (rank 1 = the largest cluster)."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return np.sort(counts)[::-1]


def envelope(size_lists: list[np.ndarray]) -> np.ndarray:
    """Largest size at each rank over several cluster counts (the paper's envelope)."""
    top = max(len(s) for s in size_lists)
    out = np.zeros(top, dtype=np.int64)
    for s in size_lists:
        out[: len(s)] = np.maximum(out[: len(s)], s)
    return out


def fit_slope(freqs: np.ndarray, rank_min: int = 101, rank_max: int = 1000, level: float = 0.95) -> dict:
    """Least-squares line of log(size) on log(rank) over ranks [rank_min, rank_max] (1-based,
    inclusive; rank_max=0: up to the last rank), with a t interval on the slope.

    The paper fits its envelope over ranks 101-1000. Ranks of one curve are not independent
    samples, so the interval measures the scatter about the line, not sampling error.
    """
    from scipy import stats

    freqs = np.asarray(freqs, dtype=float)
    hi = len(freqs) if rank_max <= 0 else min(rank_max, len(freqs))
    ranks = np.arange(1, len(freqs) + 1)
    keep = (ranks >= rank_min) & (ranks <= hi) & (freqs > 0)
    out = {"rank_min": int(rank_min), "rank_max": int(hi), "n_ranks": int(keep.sum())}
    slope = half = intercept = float("nan")  # fewer than three ranks: no line
    if keep.sum() >= 3:
        x, y = np.log(ranks[keep]), np.log(freqs[keep])
        res = stats.linregress(x, y)
        half = stats.t.ppf(0.5 + level / 2, keep.sum() - 2) * res.stderr
        slope, intercept = res.slope, res.intercept
    return {
        **out,
        "slope": float(slope),
        "slope_lo": float(slope - half),
        "slope_hi": float(slope + half),
        "intercept": float(intercept),
    }


def purity(true, pred) -> float:
    """Share of samples whose cluster's most common true label is their own."""
    true, pred = np.asarray(true), np.asarray(pred)
    total = 0
    for c in np.unique(pred):
        _, counts = np.unique(true[pred == c], return_counts=True)
        total += counts.max()
    return total / len(true)


def agreement(true, pred) -> dict:
    from sklearn.metrics import adjusted_rand_score

    return {"ari": float(adjusted_rand_score(true, pred)), "purity": float(purity(true, pred))}


def confusion(true, pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cluster ids by size, true labels, counts [clusters, labels])."""
    true, pred = np.asarray(true), np.asarray(pred)
    clusters = np.unique(pred)
    clusters = clusters[np.argsort([-(pred == c).sum() for c in clusters], kind="stable")]
    labels = np.unique(true)
    table = np.array([[int(((pred == c) & (true == t)).sum()) for t in labels] for c in clusters])
    return clusters, labels, table
