"""How sudden a change is, and whether a sudden thresholded metric is a mirage. numpy only.

A family is one shared x grid and a matrix Y [curves, x] (NaN: not evaluated), as in
analysis.emergence. Windows are measured in decades of x (log10).

- `sharpness`: the largest share of each curve's total change (max - min) inside one window of
  `window` decades, where that window lies, and whether it is resolved. Where two neighbouring
  evaluations are further apart than `window`, a window spans that gap; if the largest change is
  such a gap, the data cannot tell a step from a gradual change between the two points: the change
  is "unresolved" (a sweep of widths 0.15 decade apart judged at a 0.1-decade window makes every
  drop between neighbours look like a step).
- `jump_fraction`: the share alone (1 = a step; a power law over 3 decades ~ window/3 in log y).
- `jump_fraction_ci`: a bootstrap interval for it over test samples or seeds.
- `mirage_check`: Schaeffer et al. 2023. Does the continuous metric (loss) change where the
  thresholded metric (accuracy, exact match) jumps? Judged on the loss and on its log; a verdict that
  differs between the two is "metric-dependent".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUDDEN = 0.5  # jump fraction at or above this: half the change or more inside one window
WINDOW = 0.1  # decades of x


def curve_family(x, Y) -> tuple[np.ndarray, np.ndarray, bool]:
    """(x, Y as [curves, len(x)], whether one curve was given), checked: x 1-d and strictly
    increasing, one value of each curve per x (also analysis.emergence's input check)."""
    x = np.asarray(x, float)
    Y = np.asarray(Y, float)
    single = Y.ndim == 1
    Y = np.atleast_2d(Y)
    if x.ndim != 1 or Y.shape[1] != len(x):
        raise ValueError(f"x has shape {x.shape} and Y {Y.shape}: Y must be [curves, len(x)]")
    if len(x) > 1 and np.any(np.diff(x) <= 0):
        raise ValueError("x must be strictly increasing")
    return x, Y, single


def _family(x, Y):
    x, Y, single = curve_family(x, Y)
    if np.any(x <= 0):
        raise ValueError(f"x must be > 0 for windows in log x (smallest: {x.min()}); drop x = 0 (e.g. step 0) first")
    return np.log10(x), Y, single


def _windows(u: np.ndarray, window: float):
    """Candidate windows (t0, t1) in log10 x, each starting or ending at an evaluation: `window` wide,
    or one gap wide where that gap is wider (`wide`). For a curve linear between evaluations the
    largest change over a fixed width is found on one of these."""
    t0, t1, wide = [], [], []
    for i in range(len(u)):
        if i < len(u) - 1:
            g = u[i + 1] - u[i]
            t0.append(u[i]), t1.append(u[i] + max(window, g)), wide.append(g > window * (1 + 1e-9))
        if i > 0:
            g = u[i] - u[i - 1]
            t0.append(u[i] - max(window, g)), t1.append(u[i]), wide.append(g > window * (1 + 1e-9))
    return np.array(t0), np.array(t1), np.array(wide, bool)


def _changes(u: np.ndarray, Y: np.ndarray, t0: np.ndarray, t1: np.ndarray) -> np.ndarray:
    """[curves, windows]: max - min of each curve inside each window, the curve taken as linear in
    log x between evaluations (NaN points skipped by the max and min)."""
    n = len(u)

    def at(t):
        k = int(np.clip(np.searchsorted(u, t, side="right") - 1, 0, n - 2))
        a = np.clip((t - u[k]) / (u[k + 1] - u[k]), 0.0, 1.0)
        return Y[:, k] + (Y[:, k + 1] - Y[:, k]) * a

    out = np.zeros((len(Y), len(t0)))
    with np.errstate(all="ignore"):
        for w, (a, b) in enumerate(zip(t0, t1)):
            i, j = int(np.searchsorted(u, a - 1e-12, side="left")), int(np.searchsorted(u, b + 1e-12, side="right"))
            seg = np.column_stack([at(a), Y[:, i:j], at(b)])
            out[:, w] = np.nanmax(seg, 1) - np.nanmin(seg, 1)
    return np.nan_to_num(out, nan=0.0)


@dataclass
class Sharpness:
    fraction: np.ndarray  # largest share of the total change inside one window
    start: np.ndarray  # x where that window starts
    end: np.ndarray  # x where it ends
    resolved: np.ndarray  # False: the largest change is one gap between evaluations wider than the window


def _range(Y):
    with np.errstate(all="ignore"):
        return np.nanmax(Y, 1) - np.nanmin(Y, 1) if Y.size else np.zeros(0)


def _sharp(u, Y, window):
    """(fraction, best window index, resolved, windows, changes) for a family in log x."""
    t0, t1, wide = _windows(u, window)
    ch = _changes(u, Y, t0, t1)
    rng = _range(Y)
    with np.errstate(all="ignore"):
        share = np.where(rng[:, None] > 0, ch / rng[:, None], 0.0)
    best = np.argmax(share, 1)
    frac = share[np.arange(len(Y)), best]
    narrow = np.where(~wide[None, :], share, -1.0).max(1) if (~wide).any() else np.full(len(Y), -1.0)
    resolved = narrow >= frac - 1e-9  # a window no wider than `window` holds the largest change
    return frac, best, resolved, (t0, t1), share


def sharpness(x, Y, window: float = WINDOW) -> Sharpness:
    u, Y, single = _family(x, Y)
    if len(u) < 2:
        raise ValueError(f"need >= 2 evaluations for a change, got {len(u)}")
    frac, best, resolved, (t0, t1), _ = _sharp(u, Y, window)
    vals = (frac, 10 ** t0[best], 10 ** t1[best], resolved)
    return Sharpness(*(v[0] if single else v for v in vals))


def jump_fraction(x, Y, window: float = WINDOW):
    """Largest share of each curve's total change inside one window of `window` decades of x (see
    `sharpness`, which also says where and whether it is resolved)."""
    return sharpness(x, Y, window).fraction


def jump_fraction_ci(
    x,
    samples,
    window: float = WINDOW,
    n_boot: int = 200,
    level: float = 0.95,
    paired: bool = True,
    method: str = "percentile",
    seed: int = 0,
):
    """Jump fraction of the mean curve over samples, with a percentile bootstrap interval.

    samples [curves, n, x]: n replicates of each curve (test samples, or seeds). `paired`: one
    replicate is one unit across x (a seed's run over steps: resample whole replicates); unpaired:
    the replicates at each x are independent (runs of different sizes: resample at each x).
    Returns (fraction, lo, hi), each [curves] (or scalars for samples [n, x])."""
    S = np.asarray(samples, float)
    single = S.ndim == 2
    S = S[None] if single else S
    if S.ndim != 3 or S.shape[1] < 2:
        raise ValueError(f"samples must be [curves, n >= 2, x] (or [n >= 2, x]), got {np.shape(samples)}")
    c, n, m = S.shape
    if np.isnan(S).any():
        raise ValueError("samples must not hold NaN (evaluate every replicate at every x)")
    point = np.atleast_1d(jump_fraction(x, S.mean(1), window))
    rng = np.random.default_rng(seed)
    # a resample's mean curve = its replicate counts (multinomial) . samples / n: a matrix product
    # instead of gathering [curves, boot, n, x] copies
    if paired:
        W = rng.multinomial(n, np.full(n, 1 / n), n_boot).astype(float)  # [boot, n]
        B = np.einsum("bn,cnx->cbx", W, S) / n
    else:
        W = rng.multinomial(n, np.full(n, 1 / n), (n_boot, m)).astype(float)  # [boot, x, n]
        B = np.einsum("bxn,cnx->cbx", W, S) / n
    jb = np.atleast_1d(jump_fraction(x, B.reshape(c * n_boot, m), window)).reshape(c, n_boot)
    q_lo, q_hi = np.percentile(jb, [(1 - level) / 2 * 100, (1 + level) / 2 * 100], axis=1)
    # the basic (reverse-percentile) interval: the jump fraction of a noisy mean curve is biased up
    # (noise adds to the largest change and to the range), and so are its resamples; reflecting
    # about the estimate removes that bias to first order, where the percentile interval doubles it
    if method == "basic":
        lo, hi = np.clip(2 * point - q_hi, 0, 1), np.clip(2 * point - q_lo, 0, 1)
    elif method == "percentile":
        lo, hi = q_lo, q_hi
    else:
        raise ValueError(f"method={method!r}: use 'percentile' or 'basic'")
    return (point[0], lo[0], hi[0]) if single else (point, lo, hi)


@dataclass
class Mirage:
    verdict: np.ndarray  # see mirage_check
    verdict_loss: np.ndarray  # judged on the continuous metric as given
    verdict_log: np.ndarray  # judged on its log ("" where it has values <= 0)
    sharp_continuous: np.ndarray  # jump fraction of the continuous metric (anywhere)
    sharp_thresholded: np.ndarray  # jump fraction of the thresholded metric
    resolved: np.ndarray  # the thresholded metric's largest change is resolved by the sampling
    share_at_jump: np.ndarray  # share of the continuous metric's change inside the thresholded jump's window
    share_at_jump_log: np.ndarray  # the same for its log (NaN where undefined)
    change_thresholded: np.ndarray  # total change of the thresholded metric (its units)


def mirage_check(
    x,
    continuous,
    thresholded,
    window: float = WINDOW,
    sudden: float = SUDDEN,
    min_change: float = 0.2,
    log_floor: float = 0.0,
) -> Mirage:
    """Schaeffer et al. 2023: is a jump in a thresholded metric also a jump in the continuous metric
    it is computed from, at the same place? Per curve:
    - flat: the thresholded metric changes by less than `min_change` (nothing to explain);
    - gradual: it changes, but less than `sudden` of it inside any window;
    - unresolved: its largest change is one gap between evaluations wider than the window;
    - emergent: the continuous metric also makes >= `sudden` of its total change inside a window where
      the thresholded metric jumps (one holding at least half of its largest window change);
    - mirage: it does not (the jump is the threshold's doing);
    - metric-dependent: emergent judged on the loss and mirage on the log-loss, or the reverse.
    Judging the continuous metric where the thresholded one jumps, rather than anywhere, keeps a
    power-law loss (its largest linear change always at the smallest x) from counting as a jump.
    `log_floor` > 0 floors the log-loss at that share of the curve's largest value (off by default:
    exact match over L tokens turns on where the per-token loss is ~1/L, far below its start). Where
    a loss estimate is noise near zero, its log swings by decades after the jump and the verdict
    reads metric-dependent: that is the log-loss saying the data do not settle it."""
    u, C, single = _family(x, continuous)
    _, T, _ = _family(x, thresholded)
    if C.shape != T.shape:
        raise ValueError(f"continuous {C.shape} and thresholded {T.shape} metrics must have the same shape")
    if len(u) < 2:
        raise ValueError(f"need >= 2 evaluations, got {len(u)}")
    jt, _, resolved, (t0, t1), t_share = _sharp(u, T, window)
    jc = _sharp(u, C, window)[0]
    # the windows where the thresholded metric jumps: at least half its largest window change (a step
    # sharper than the sampling is split between neighbouring windows, each holding part of it)
    at_jump = t_share >= 0.5 * jt[:, None]

    def located(M):
        rng = _range(M)
        with np.errstate(all="ignore"):
            share = np.where(rng[:, None] > 0, _changes(u, M, t0, t1) / rng[:, None], 0.0)
        return np.where(at_jump, share, 0.0).max(1)

    share = located(C)
    pos = np.all(np.isfinite(C) <= (C > 0), 1)  # every evaluated value > 0: the log is defined
    with np.errstate(all="ignore"):
        floor = log_floor * np.nanmax(np.where(C > 0, C, np.nan), 1, keepdims=True)
        share_log = np.where(pos, located(np.log(np.maximum(np.where(C > 0, C, np.nan), floor))), np.nan)
    change = np.nan_to_num(_range(T), nan=0.0)

    def verdict(s):
        return np.where(
            change < min_change,
            "flat",
            np.where(
                jt < sudden, "gradual", np.where(~resolved, "unresolved", np.where(s >= sudden, "emergent", "mirage"))
            ),
        )

    v_loss = verdict(share)
    v_log = np.where(pos, verdict(np.nan_to_num(share_log)), "")
    v = np.where(pos & (v_loss != v_log), "metric-dependent", v_loss).astype(object)
    vals = (v, v_loss, v_log, jc, jt, resolved, share, share_log, change)
    return Mirage(*(np.asarray(a)[0] if single else np.asarray(a) for a in vals))
