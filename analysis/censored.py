"""Regression of an event time on a covariate when the times are censored. numpy/scipy only.

`lognormal_aft`: the log-normal accelerated-failure-time model log T = b0 + b1 x + sigma eps,
eps ~ N(0, 1), fitted by maximum likelihood to times known only as intervals (lo, hi]:
- lo < hi, both finite and > 0: interval-censored (the event fell between two evaluations);
- lo <= 0 (or -inf): left-censored (past the threshold at the first evaluation, hi);
- hi = inf: right-censored (not reached by lo, the last evaluation: the budget);
- lo == hi: observed exactly.
The slope's interval is the profile-likelihood interval (likelihood-ratio test, chi2 with 1 degree
of freedom), which does not assume the likelihood is quadratic; the Hessian's standard error is
reported beside it.

Why hand-written: lifelines' `LogNormalAFTFitter.fit_interval_censoring` fits the same model, but
lifelines is not a dependency of this project and brings autograd, autograd-gamma and formulaic with
it; statsmodels has no interval-censored regression and scipy.stats none at all. The likelihood is a
few lines of scipy.stats.norm (logcdf/logsf, stable in both tails) maximised by scipy.optimize, and
tests/test_dynamics.py checks it recovers a known slope from interval-binned, censored times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats
from scipy.special import log_ndtr


@dataclass
class AFTFit:
    slope: float  # b1: d log T / d x
    slope_ci: tuple  # profile-likelihood interval at `level`
    slope_se: float  # from the inverse Hessian of the log-likelihood
    intercept: float  # b0
    sigma: float  # scatter of log T around the line
    loglik: float
    n: int
    n_exact: int
    n_interval: int
    n_left: int
    n_right: int
    level: float
    converged: bool


LOG_SQRT_2PI = 0.5 * np.log(2 * np.pi)


def _logpdf(z):
    return -0.5 * z * z - LOG_SQRT_2PI


def _log_diff_cdf(zl, zh):
    """log(Phi(zh) - Phi(zl)) for zl < zh without cancellation: through the upper tail when the
    interval lies right of 0, through the lower tail otherwise (scipy.special.log_ndtr is stable in
    both tails; scipy.stats.norm's methods compute the same, ~20x slower per call)."""
    with np.errstate(all="ignore"):
        upper = log_ndtr(-zl) + np.log1p(-np.exp(log_ndtr(-zh) - log_ndtr(-zl)))
        lower = log_ndtr(zh) + np.log1p(-np.exp(log_ndtr(zl) - log_ndtr(zh)))
    return np.where(zl > 0, upper, lower)


class _Data:
    def __init__(self, x, lo, hi):
        x, lo, hi = (np.asarray(v, float) for v in (x, lo, hi))
        if not (x.shape == lo.shape == hi.shape) or x.ndim != 1:
            raise ValueError(f"x, lo, hi must be 1-D of one length, got {x.shape}, {lo.shape}, {hi.shape}")
        if np.any(~np.isfinite(x)) or np.any(np.isnan(lo)) or np.any(np.isnan(hi)):
            raise ValueError("x must be finite and lo, hi not NaN (use lo <= 0 for left-, hi = inf for right-censored)")
        if np.any(hi < lo) or np.any(hi <= 0):
            raise ValueError("each time needs 0 < hi and lo <= hi")
        self.x = x
        self.exact = lo == hi
        self.right = np.isinf(hi) & ~self.exact
        self.left = (lo <= 0) & ~self.right & ~self.exact
        self.inter = ~(self.exact | self.right | self.left)
        with np.errstate(divide="ignore"):
            self.llo = np.log(np.where(lo > 0, lo, 1.0))
            self.lhi = np.log(np.where(np.isfinite(hi), hi, 1.0))

    def loglik(self, b0, b1, log_s):
        """The log-likelihood and its gradient in (b0, b1, log sigma)."""
        s = np.exp(log_s)
        mu = b0 + b1 * self.x
        zl, zh = (self.llo - mu) / s, (self.lhi - mu) / s
        ll, d_mu, d_ls = np.zeros_like(mu), np.zeros_like(mu), np.zeros_like(mu)
        e, r, lf, i = self.exact, self.right, self.left, self.inter
        with np.errstate(all="ignore"):
            ll[e] = _logpdf(zh[e]) - log_s - self.lhi[e]  # density of T (the -log t term is a constant)
            d_mu[e], d_ls[e] = zh[e] / s, zh[e] ** 2 - 1
            ll[r] = log_ndtr(-zl[r])
            haz = np.exp(_logpdf(zl[r]) - ll[r])
            d_mu[r], d_ls[r] = haz / s, haz * zl[r]
            ll[lf] = log_ndtr(zh[lf])
            rat = np.exp(_logpdf(zh[lf]) - ll[lf])
            d_mu[lf], d_ls[lf] = -rat / s, -rat * zh[lf]
            ll[i] = _log_diff_cdf(zl[i], zh[i])
            fh, fl = np.exp(_logpdf(zh[i]) - ll[i]), np.exp(_logpdf(zl[i]) - ll[i])
            d_mu[i], d_ls[i] = -(fh - fl) / s, -(fh * zh[i] - fl * zl[i])
        grad = np.array([d_mu.sum(), (d_mu * self.x).sum(), d_ls.sum()])
        return float(ll.sum()), grad

    def start(self):
        """OLS of a representative log time (the interval's geometric middle; the bound where one-sided)."""
        mid = np.where(self.right, self.llo, np.where(self.left, self.lhi, 0.5 * (self.llo + self.lhi)))
        if np.ptp(self.x) > 0:
            b1, b0 = np.polyfit(self.x, mid, 1)
        else:
            b1, b0 = 0.0, mid.mean()
        return np.array([b0, b1, np.log(max(np.std(mid), 0.05))])


def _maximise(f, start):
    """Minimise f (value, gradient) by BFGS; Nelder-Mead on the value alone where BFGS reports no
    convergence (a flat direction, a step into a region where the likelihood underflows)."""
    r = optimize.minimize(f, start, jac=True, method="BFGS", options={"gtol": 1e-6})
    if not r.success:
        nm = optimize.minimize(
            lambda t: f(t)[0], r.x, method="Nelder-Mead", options={"maxiter": 4000, "xatol": 1e-7, "fatol": 1e-9}
        )
        if nm.fun <= r.fun:
            return nm
    return r


def lognormal_aft(x, lo, hi, level: float = 0.95, interval: bool = True) -> AFTFit:
    """Maximum-likelihood fit of log T = b0 + b1 x + sigma eps to interval-, left- and right-censored
    times (see the module docstring for how (lo, hi] encodes each), with a profile-likelihood
    interval for b1 (`interval=False`: the Hessian's standard error only, much cheaper)."""
    d = _Data(x, lo, hi)
    n_obs = int(d.exact.sum() + d.inter.sum() + d.left.sum())
    if n_obs < 3 or len(np.unique(d.x[~d.right])) < 2:
        raise ValueError(
            f"{n_obs} events at {len(np.unique(d.x[~d.right]))} distinct x: need >= 3 events at >= 2 x for a slope"
        )

    def nll(th):
        v, g = d.loglik(*th)
        return (-v, -g) if np.isfinite(v) else (1e300, np.zeros(3))

    fit = _maximise(nll, d.start())
    th = fit.x
    ll_max = -fit.fun
    hess = _hessian(lambda t: nll(t)[1], th)
    with np.errstate(all="ignore"):
        cov = np.linalg.pinv(hess)
    se = float(np.sqrt(cov[1, 1])) if cov[1, 1] > 0 else float("nan")
    bounds = [-np.inf, np.inf]
    if interval:

        def profile(b1):  # max over (b0, log sigma) at fixed slope
            def f(t):
                v, g = nll([t[0], b1, t[1]])
                return v, g[[0, 2]]

            return -_maximise(f, np.array([th[0] + (th[1] - b1) * d.x.mean(), th[2]])).fun

        crit = stats.chi2.ppf(level, 1) / 2
        step = se if np.isfinite(se) and se > 0 else 0.1
        for k, sign in enumerate((-1, 1)):

            def gap(b1):  # < 0 inside the interval
                return ll_max - profile(b1) - crit

            far, n = th[1] + 2 * sign * step, 0
            while gap(far) < 0 and n < 10:  # widen until outside the interval
                far, n = th[1] + sign * step * 2 ** (n + 2), n + 1
            if gap(far) >= 0:
                bounds[k] = optimize.brentq(gap, th[1], far, xtol=1e-3 * step)
    return AFTFit(
        slope=float(th[1]),
        slope_ci=(float(bounds[0]), float(bounds[1])),
        slope_se=se,
        intercept=float(th[0]),
        sigma=float(np.exp(th[2])),
        loglik=float(ll_max),
        n=len(d.x),
        n_exact=int(d.exact.sum()),
        n_interval=int(d.inter.sum()),
        n_left=int(d.left.sum()),
        n_right=int(d.right.sum()),
        level=level,
        converged=bool(fit.success),
    )


def _hessian(grad, th, h: float = 1e-5):
    """Central differences of the analytic gradient (3 parameters: 6 gradient evaluations)."""
    k = len(th)
    H = np.empty((k, k))
    for i in range(k):
        e = np.eye(k)[i] * h
        H[:, i] = (grad(th + e) - grad(th - e)) / (2 * h)
    return 0.5 * (H + H.T)
