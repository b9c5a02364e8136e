"""Scaling-law fits: L = E + sum_i A_i x_i^-alpha_i, Chinchilla approach 3 as Epoch AI replicated it.

The fit is on log L with the log-sum-exp form (log L = LSE(a_i - alpha_i log x_i, e), A_i = exp(a_i),
E = exp(e)), a Huber loss (delta 1e-3), and scipy's L-BFGS-B from a grid of initial values;
intervals come from a bootstrap over data points. No library ships this objective, hence by hand.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp


@dataclass
class Fit:
    E: float
    A: list[float]
    alpha: list[float]
    loss: float
    n: int
    E_ci: tuple[float, float] | None = None
    A_ci: list[tuple[float, float]] = field(default_factory=list)
    alpha_ci: list[tuple[float, float]] = field(default_factory=list)

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, float).T).T
        return self.E + sum(A * X[:, i] ** -a for i, (A, a) in enumerate(zip(self.A, self.alpha)))


def _objective(theta: np.ndarray, logX: np.ndarray, logL: np.ndarray, delta: float):
    """Huber loss of log-space residuals and its exact gradient (numerical ones cost 10x)."""
    d = logX.shape[1]
    a, alpha, e = theta[:d], theta[d:2 * d], theta[-1]
    terms = np.concatenate([a[None, :] - alpha[None, :] * logX, np.full((len(logL), 1), e)], axis=1)
    lse = logsumexp(terms, axis=1)  # [n]
    r = lse - logL
    dr = np.clip(r, -delta, delta)  # huber'(r)
    w = np.exp(terms - lse[:, None]) * dr[:, None]  # [n, d + 1]: d loss / d term
    grad = np.concatenate([w[:, :d].sum(0), -(w[:, :d] * logX).sum(0), [w[:, d].sum()]])
    return float(np.sum(huber(delta, r))), grad


def _grid(d: int, logL: np.ndarray) -> list[np.ndarray]:
    a0 = [0.0, 5.0, 10.0, 20.0]
    alpha0 = [0.1, 0.5, 1.0]
    e0 = [-1.0, 0.0, 1.0, float(np.min(logL)) - 1.0]
    per_term = list(itertools.product(a0, alpha0))
    out = []
    for combo in itertools.product(per_term, repeat=d):
        for e in e0:
            out.append(np.array([c[0] for c in combo] + [c[1] for c in combo] + [e]))
    return out


def _fit_once(logX, logL, delta, inits) -> tuple[np.ndarray, float]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # tiny BLAS calls: threads only add contention
        return _fit_many(logX, logL, delta, inits)


def _fit_many(logX, logL, delta, inits) -> tuple[np.ndarray, float]:
    d = logX.shape[1]
    bounds = [(None, None)] * d + [(0.0, 5.0)] * d + [(None, None)]
    best, best_loss = None, np.inf
    for theta0 in inits:
        res = minimize(_objective, theta0, args=(logX, logL, delta), jac=True, method="L-BFGS-B", bounds=bounds,
                       # Huber sums here are ~1e-4: scipy's default gtol (1e-5) would stop at the start.
                       options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 2000})
        if res.fun < best_loss:
            best, best_loss = res.x, res.fun
    return best, best_loss


def fit_scaling_law(X, L, delta: float = 1e-3, n_bootstrap: int = 200, ci: float = 0.95,
                    seed: int = 0, inits: list[np.ndarray] | None = None) -> Fit:
    """Fit L = E + sum_i A_i X[:, i]^-alpha_i. X: [n] or [n, d] positive; L: [n] positive."""
    X = np.asarray(X, float)
    X = X[:, None] if X.ndim == 1 else X
    L = np.asarray(L, float)
    if len(L) != len(X) or len(L) < 3:
        raise ValueError(f"need >= 3 matched points to fit a scaling law, got {len(L)} losses and {len(X)} x")
    if np.any(X <= 0) or np.any(L <= 0):
        raise ValueError("scaling-law fits need positive x and positive losses")
    logX, logL = np.log(X), np.log(L)
    d = X.shape[1]
    theta, loss = _fit_once(logX, logL, delta, inits or _grid(d, logL))
    fit = Fit(E=float(np.exp(theta[-1])), A=np.exp(theta[:d]).tolist(), alpha=theta[d:2 * d].tolist(),
              loss=loss, n=len(L))
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(n_bootstrap):
            idx = rng.integers(0, len(L), len(L))
            if len(np.unique(idx)) < 3:
                continue
            # Start from the full-data optimum: a whole grid per resample costs 100x and moves nothing.
            th, _ = _fit_once(logX[idx], logL[idx], delta, [theta])
            samples.append(th)
        s = np.array(samples)
        lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
        pct = lambda v: (float(np.percentile(v, lo)), float(np.percentile(v, hi)))
        fit.E_ci = pct(np.exp(s[:, -1]))
        fit.A_ci = [pct(np.exp(s[:, i])) for i in range(d)]
        fit.alpha_ci = [pct(s[:, d + i]) for i in range(d)]
    return fit


def fit_power_law(x, y, **kw) -> Fit:
    """One-variable form L = E + A x^-alpha (parameters, data, or compute)."""
    return fit_scaling_law(np.asarray(x, float), y, **kw)
