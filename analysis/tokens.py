"""Token-level scaling (Michaud et al. 2023): align per-token losses across models, classify each
token's loss curve as monogenic (one sharp drop at some scale) or polygenic (smooth decline in ln N),
and find the scale at which each token is learned. Pure functions on arrays and parquet files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

POS_BITS = 24  # (doc, pos) -> one int64 key; positions stay far below 2**24
CLASSES = ("monogenic", "polygenic", "other")


@dataclass
class Thresholds:
    mono_high: float = 5.0  # monogenic: loss above this for every model below the drop ...
    mono_low: float = 0.3  # ... and below this for the drop's model and every larger one
    poly_slope: float = -0.3  # polygenic: slope of loss against ln N below this ...
    poly_r2: float = 0.98  # ... with a linear fit this good


def read_losses(paths: list[str]) -> pd.DataFrame:
    """The rows of one model's per-token artifact (all its shards): doc, pos, token, loss."""
    if not paths:
        raise ValueError("no per-token loss files")
    return pd.concat(
        [pq.read_table(p, columns=["doc", "pos", "token", "loss"]).to_pandas() for p in paths], ignore_index=True
    )


def keys(doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return (doc.astype(np.int64) << POS_BITS) | pos.astype(np.int64)


def align(frames: list[pd.DataFrame]) -> tuple[pd.DataFrame, np.ndarray]:
    """Tokens present in every frame: (index with doc, pos, token; losses [n_tokens, n_models]).

    Tokens line up only when the models share a tokenizer: differing token ids at the same (doc,
    pos) raise.
    """
    sorted_frames = []
    for f in frames:
        k = keys(f["doc"].to_numpy(), f["pos"].to_numpy())
        order = np.argsort(k, kind="stable")
        sorted_frames.append((k[order], f["token"].to_numpy()[order], f["loss"].to_numpy()[order]))
    common = sorted_frames[0][0]
    for k, _, _ in sorted_frames[1:]:
        common = np.intersect1d(common, k, assume_unique=True)
    losses = np.empty((len(common), len(frames)), dtype=np.float64)
    token = None
    for j, (k, tok, loss) in enumerate(sorted_frames):
        at = np.searchsorted(k, common)
        if token is None:
            token = tok[at]
        elif not np.array_equal(token, tok[at]):
            raise ValueError(
                f"model {j} has different token ids at the same (doc, pos): the models do not share a tokenizer"
            )
        losses[:, j] = loss[at]
    index = pd.DataFrame(
        {
            "doc": common >> POS_BITS,
            "pos": common & ((1 << POS_BITS) - 1),
            "token": token if token is not None else np.zeros(0, np.int64),
        }
    )
    return index, losses


def line_fit(x: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and R^2 of every row of losses [n, m] against x [m]."""
    xc = x - x.mean()
    yc = losses - losses.mean(1, keepdims=True)
    slope = yc @ xc / (xc @ xc)
    ss_tot = (yc**2).sum(1)
    ss_res = ((yc - slope[:, None] * xc[None, :]) ** 2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_tot > 0, 1 - ss_res / ss_tot, 0.0)
    return slope, r2


def drop_index(losses: np.ndarray, high: float, low: float) -> np.ndarray:
    """Per token, the first model k >= 1 with every model before k above `high` and every model
    from k on below `low`; -1 when there is no such k. losses: [n, m], models in increasing order."""
    n, m = losses.shape
    above_prefix = np.cumprod(losses > high, axis=1).astype(bool)  # [n, m]: models 0..j all high
    below_suffix = np.flip(np.cumprod(np.flip(losses < low, 1), axis=1), 1).astype(bool)  # j..m-1 all low
    out = np.full(n, -1, dtype=np.int64)
    for k in range(m - 1, 0, -1):
        out[above_prefix[:, k - 1] & below_suffix[:, k]] = k
    return out


def learned_index(losses: np.ndarray, low: float) -> np.ndarray:
    """Per token, the first model from which the loss stays below `low` (-1: never)."""
    below_suffix = np.flip(np.cumprod(np.flip(losses < low, 1), axis=1), 1).astype(bool)
    return np.where(below_suffix.any(1), below_suffix.argmax(1), -1)


def classify(losses: np.ndarray, scale: np.ndarray, t: Thresholds = Thresholds()) -> pd.DataFrame:
    """One row per token: class, drop (model index of a monogenic drop, -1), slope and R^2 vs ln scale.

    losses: [n_tokens, n_models] in nats; scale: [n_models], increasing (parameters, or training steps).
    """
    scale = np.asarray(scale, dtype=np.float64)
    if np.any(np.diff(scale) <= 0) or np.any(scale <= 0):
        raise ValueError(f"scales must be positive and increasing, got {scale.tolist()}")
    drop = drop_index(losses, t.mono_high, t.mono_low)
    slope, r2 = line_fit(np.log(scale), losses)
    poly = (drop < 0) & (slope < t.poly_slope) & (r2 > t.poly_r2)
    cls = np.where(drop >= 0, "monogenic", np.where(poly, "polygenic", "other"))
    return pd.DataFrame(
        {"class": cls, "drop": drop, "slope": slope, "r2": r2, "learned": learned_index(losses, t.mono_low)}
    )


def fractions(classes: pd.Series) -> dict[str, float]:
    n = max(len(classes), 1)
    return {c: float((classes == c).sum()) / n for c in CLASSES}


def emergence_histogram(index: np.ndarray, scale: np.ndarray) -> list[dict]:
    """How many tokens are first learned (or drop) at each model: [{scale, count}], plus never."""
    out = [{"scale": float(s), "count": int((index == k).sum())} for k, s in enumerate(scale)]
    return out + [{"scale": None, "count": int((index < 0).sum())}]


def context(index: pd.DataFrame, row: int, decode, width: int = 24) -> dict:
    """The token at `row` with the `width` tokens before it in its document (position 0, never
    predicted, is not in the artifacts: a context that reaches it starts with '…')."""
    doc, pos = int(index["doc"].iat[row]), int(index["pos"].iat[row])
    same = index[(index["doc"] == doc) & (index["pos"] < pos) & (index["pos"] >= pos - width)].sort_values("pos")
    prefix = decode(same["token"].tolist())
    lead = "…" if pos - width <= 0 or len(same) < min(width, pos - 1) else ""
    return {
        "doc": doc,
        "pos": pos,
        "token_id": int(index["token"].iat[row]),
        "token": decode([int(index["token"].iat[row])]),
        "context": lead + prefix,
    }
