"""Scaling-law fits: L = E + sum_i A_i x_i^-alpha_i, Chinchilla approach 3 as Epoch AI replicated it.

The fit is on log L with the log-sum-exp form (log L = LSE(a_i - alpha_i log x_i, e), A_i = exp(a_i),
E = exp(e)), a Huber loss (delta 1e-3), and scipy's L-BFGS-B from a grid of initial values;
intervals come from a bootstrap over data points, or over seeds within each x (`strata`: a cluster
bootstrap that keeps the design's x values and resamples what varies between seeds). Every resample
is fitted from a grid of starting points (`_boot_grid`), never from the full-data optimum: starting
there would pull each resample towards the full-data answer and narrow the interval.

`scipy.optimize.least_squares(loss="huber", f_scale=delta)` minimises the same cost (for |r| <= delta
both are r^2/2, beyond it delta |r| - delta^2/2). It is not used because it builds and factors a
Jacobian at every iteration and has no batched restart: from the grid of starts and over the bootstrap
the closed-form gradient below with L-BFGS-B is several times faster on these small problems.

Also here: the plain log-log linear regression (no offset) that Michaud et al. report, `fit_loglog`.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp

from harness.errors import UserError

ALPHA_BOUNDS = (0.0, 5.0)  # exponents are searched in this box (L-BFGS-B bounds)


class FitError(UserError, ValueError):
    """Input a fit cannot use: one line naming the value and what is valid."""


class FitWarning(UserWarning):
    """A fit that ran but whose numbers should not be trusted as they stand."""


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
    n_bootstrap: int = 0  # resamples actually fitted (degenerate ones are skipped)
    warnings: list[str] = field(default_factory=list)

    # The two-term (Chinchilla) form L = E + A N^-alpha + B D^-beta names its second term B, beta.
    @property
    def B(self) -> float:
        return self._second(self.A, "B")

    @property
    def beta(self) -> float:
        return self._second(self.alpha, "beta")

    @property
    def B_ci(self) -> tuple[float, float] | None:
        return self._second(self.A_ci, "B_ci") if self.A_ci else None

    @property
    def beta_ci(self) -> tuple[float, float] | None:
        return self._second(self.alpha_ci, "beta_ci") if self.alpha_ci else None

    def _second(self, values: list, name: str):
        if len(self.A) != 2:
            raise AttributeError(f"{name} exists for a two-term fit (N and D); this fit has {len(self.A)} term(s)")
        return values[1]

    def params(self) -> dict:
        """Named parameters (and intervals when bootstrapped): E, A, alpha (+ B, beta for two terms)."""
        names = _names(len(self.A))
        out = {"E": self.E, "E_ci": self.E_ci}
        for i, (a, al) in enumerate(names):
            out[a], out[al] = self.A[i], self.alpha[i]
            out[a + "_ci"] = self.A_ci[i] if self.A_ci else None
            out[al + "_ci"] = self.alpha_ci[i] if self.alpha_ci else None
        out["n_points"], out["n_bootstrap"] = self.n, self.n_bootstrap
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, float).T).T
        return self.E + sum(A * X[:, i] ** -a for i, (A, a) in enumerate(zip(self.A, self.alpha)))


def _names(d: int) -> list[tuple[str, str]]:
    """Coefficient and exponent names per term: (A, alpha); (A, alpha), (B, beta); else A0, alpha0, ..."""
    if d <= 2:
        return [("A", "alpha"), ("B", "beta")][:d]
    return [(f"A{i}", f"alpha{i}") for i in range(d)]


def _objective(theta: np.ndarray, logX: np.ndarray, logL: np.ndarray, delta: float):
    """Huber loss of log-space residuals and its exact gradient (numerical ones cost 10x)."""
    d = logX.shape[1]
    a, alpha, e = theta[:d], theta[d : 2 * d], theta[-1]
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


def _boot_grid(d: int, logL: np.ndarray) -> list[np.ndarray]:
    """Starting points of every bootstrap resample: 4 corners of the grid per term (coefficient,
    exponent, offset: small and large exponents, E ~ 0 and E just below the smallest loss) against the
    full grid's 48; tests/test_fits.py checks they reach the full grid's optimum."""
    e_low, e_high = -8.0, float(np.min(logL)) - 0.1
    corners = [(5.0, 0.5, e_low), (10.0, 0.5, e_high), (0.0, 0.1, e_high), (10.0, 1.0, e_low)]
    return [np.array([a] * d + [al] * d + [e]) for a, al, e in corners]


def resample_indices(n: int, strata, rng: np.random.Generator) -> np.ndarray:
    """One bootstrap resample of n points: over all points (strata None), or within each stratum
    (the same number of points from each, drawn with replacement among its own)."""
    if strata is None:
        return rng.integers(0, n, n)
    strata = np.asarray(strata)
    out = []
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        out.append(members[rng.integers(0, len(members), len(members))])
    return np.sort(np.concatenate(out))


def _check_strata(strata, n: int):
    if strata is None:
        return None
    strata = np.asarray(strata)
    if strata.shape != (n,):
        raise FitError(f"strata must label each of the {n} points, got shape {strata.shape}")
    return strata


def _fit_once(logX, logL, delta, inits) -> tuple[np.ndarray, float]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # tiny BLAS calls: threads only add contention
        return _fit_many(logX, logL, delta, inits)


def _fit_many(logX, logL, delta, inits) -> tuple[np.ndarray, float]:
    d = logX.shape[1]
    bounds = [(None, None)] * d + [ALPHA_BOUNDS] * d + [(None, None)]
    best, best_loss = None, np.inf
    for theta0 in inits:
        res = minimize(
            _objective,
            theta0,
            args=(logX, logL, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            # Huber sums here are ~1e-4: scipy's default gtol (1e-5) would stop at the start.
            options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 2000},
        )
        if res.fun < best_loss:
            best, best_loss = res.x, res.fun
    return best, best_loss


def _check_inputs(X, L) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, float)
    X = X[:, None] if X.ndim == 1 else X
    L = np.asarray(L, float)
    if L.ndim != 1 or X.ndim != 2 or len(L) != len(X) or len(L) < 3:
        raise FitError(f"need >= 3 matched points to fit a scaling law, got {L.size} losses and {len(X)} x")
    bad = ~np.isfinite(X).all(1) | ~np.isfinite(L)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FitError(
            f"non-finite input at point {i} (x={X[i].tolist()}, loss={L[i]}): {int(bad.sum())} of "
            f"{len(L)} points are NaN or inf; drop or fix them first"
        )
    if np.any(X <= 0) or np.any(L <= 0):
        raise FitError(
            f"scaling-law fits need positive x and positive losses (min x {X.min():.4g}, min loss {L.min():.4g})"
        )
    return X, L


def _check_inits(inits, d: int) -> list[np.ndarray]:
    arr = np.atleast_2d(np.asarray(inits, float))
    if arr.ndim != 2 or arr.shape[1] != 2 * d + 1 or not len(arr) or not np.isfinite(arr).all():
        raise FitError(
            f"inits must be finite starting points of length 2*d+1 = {2 * d + 1} "
            f"(a_1..a_d, alpha_1..alpha_d, e); got shape {np.shape(inits)}"
        )
    return list(arr)


def fit_scaling_law(
    X, L, delta: float = 1e-3, n_bootstrap: int = 200, ci: float = 0.95, seed: int = 0, inits=None, strata=None
) -> Fit:
    """Fit L = E + sum_i A_i X[:, i]^-alpha_i. X: [n] or [n, d] positive; L: [n] positive.

    `n_bootstrap`: 0 = no intervals, else >= 2 resamples (percentile intervals at level `ci`).
    `inits`: starting points [k, 2d+1] (list or ndarray; default a grid). `strata`: a label per point
    (e.g. its x): resample within each label (seeds within widths) instead of over all points. Problems the numbers hide
    (an exponent on its bound, an interval of zero width, E that vanishes) are warned about
    (`FitWarning`) and listed in `fit.warnings`.
    """
    X, L = _check_inputs(X, L)
    strata = _check_strata(strata, len(L))
    if n_bootstrap and n_bootstrap < 2:
        raise FitError(f"n_bootstrap={n_bootstrap}: an interval needs >= 2 resamples (0 = no intervals)")
    logX, logL = np.log(X), np.log(L)
    d = X.shape[1]
    starts = _grid(d, logL) if inits is None else _check_inits(inits, d)
    theta, loss = _fit_once(logX, logL, delta, starts)
    fit = Fit(
        E=float(np.exp(theta[-1])), A=np.exp(theta[:d]).tolist(), alpha=theta[d : 2 * d].tolist(), loss=loss, n=len(L)
    )
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(n_bootstrap):
            idx = resample_indices(len(L), strata, rng)
            if len(np.unique(idx)) < 3:
                continue
            th, _ = _fit_once(logX[idx], logL[idx], delta, _boot_grid(d, logL[idx]))
            samples.append(th)
        if len(samples) < 2:
            raise FitError(
                f"only {len(samples)} of {n_bootstrap} bootstrap resamples had >= 3 distinct points "
                f"({len(L)} points): too few to form an interval"
            )
        s = np.array(samples)
        lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100

        def pct(v):
            return float(np.percentile(v, lo)), float(np.percentile(v, hi))

        fit.E_ci = pct(np.exp(s[:, -1]))
        fit.A_ci = [pct(np.exp(s[:, i])) for i in range(d)]
        fit.alpha_ci = [pct(s[:, d + i]) for i in range(d)]
        fit.n_bootstrap = len(samples)
    _warn_if_degenerate(fit, L)
    return fit


def _warn_if_degenerate(fit: Fit, L: np.ndarray) -> None:
    names = [al for _, al in _names(len(fit.alpha))]
    for name, a in zip(names, fit.alpha):
        if min(abs(a - b) for b in ALPHA_BOUNDS) < 1e-6:
            fit.warnings.append(f"{name} = {a:.4g} sits on its bound {ALPHA_BOUNDS}: the data do not fix it")
    vanishing_E = fit.E < 1e-6 * float(L.min())
    if vanishing_E:
        fit.warnings.append(f"E = {fit.E:.3g} is ~0: the data show no irreducible loss, the fit is a pure power law")
    if fit.n_bootstrap:
        # A vanishing E has a vanishing interval for another reason (warned above): not checked here.
        cis = ([] if vanishing_E else [("E", fit.E_ci)]) + list(zip(names, fit.alpha_ci))
        flat = [n for n, (lo, hi) in cis if hi - lo <= 1e-9 * max(1.0, abs(hi))]
        if flat:
            fit.warnings.append(
                f"zero-width interval for {', '.join(flat)} ({fit.n} points for "
                f"{1 + 2 * len(fit.A)} parameters): every resample fits exactly; the interval means nothing"
            )
    for w in fit.warnings:
        warnings.warn(w, FitWarning, stacklevel=3)


def fit_power_law(x, y, **kw) -> Fit:
    """One-variable form L = E + A x^-alpha (parameters, data, or compute)."""
    return fit_scaling_law(np.asarray(x, float), y, **kw)


@dataclass
class LogLogFit:
    """log L = c - alpha log x, a least-squares line (no offset): the fit Michaud et al. report."""

    alpha: float
    intercept: float  # c, natural log of the loss in the units given
    alpha_ci: tuple[float, float] | None
    n: int
    n_bootstrap: int


def fit_loglog(x, L, n_bootstrap: int = 200, ci: float = 0.95, seed: int = 0, strata=None) -> LogLogFit:
    """Plain log-log linear regression of L on x (the quantization-model paper's fit, in bits there:
    the unit moves the intercept only, never the slope). Interval: bootstrap over points, or over
    seeds within each stratum (`strata`, e.g. the x of each point)."""
    X, L = _check_inputs(x, L)
    strata = _check_strata(strata, len(L))
    if X.shape[1] != 1:
        raise FitError(f"fit_loglog takes one x variable, got {X.shape[1]}")
    if n_bootstrap and n_bootstrap < 2:
        raise FitError(f"n_bootstrap={n_bootstrap}: an interval needs >= 2 resamples (0 = no intervals)")
    lx, ly = np.log(X[:, 0]), np.log(L)
    slope, c = np.polyfit(lx, ly, 1)
    alpha_ci, used = None, 0
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        slopes = []
        for _ in range(n_bootstrap):
            idx = resample_indices(len(L), strata, rng)
            if len(np.unique(lx[idx])) < 2:
                continue
            slopes.append(-np.polyfit(lx[idx], ly[idx], 1)[0])
        if len(slopes) < 2:
            raise FitError(f"only {len(slopes)} of {n_bootstrap} resamples had two distinct x values")
        q = (1 - ci) / 2 * 100
        alpha_ci, used = (float(np.percentile(slopes, q)), float(np.percentile(slopes, 100 - q))), len(slopes)
    return LogLogFit(alpha=float(-slope), intercept=float(c), alpha_ci=alpha_ci, n=len(L), n_bootstrap=used)
