"""Fourier progress measures of modular arithmetic (Nanda et al. 2023, adapted to MLPs): the power of
each frequency in a token embedding, the key frequencies, and logits split into their key-frequency
part and the rest. Pure torch; the modular-addition task computes them at every evaluation and logs
the results (history, curves artifact), which is what analysis.grokking reads. Frequencies are the
integers k = 1 .. p // 2 (k and p - k are the same real frequency); k = 0, the constant, is excluded.
"""

from __future__ import annotations

import functools
import math

import torch


def fourier_basis(p: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal cos/sin columns for k = 1 .. p // 2: ([p, K], [p, K]).

    For even p the Nyquist frequency k = p/2 has no sine; its sine column is all zeros.
    """
    x = torch.arange(p, dtype=dtype)[:, None]
    k = torch.arange(1, p // 2 + 1, dtype=dtype)[None, :]
    angle = 2 * math.pi * x * k / p
    cos, sin = torch.cos(angle), torch.sin(angle)
    cos = cos / cos.norm(dim=0, keepdim=True)
    sin_norm = sin.norm(dim=0, keepdim=True)
    sin = torch.where(sin_norm > 1e-9, sin / sin_norm.clamp_min(1e-12), torch.zeros_like(sin))
    return cos, sin


def fourier_power(embedding: torch.Tensor) -> torch.Tensor:
    """Power of each frequency k = 1 .. p // 2 in a token embedding [p, d], summed over the d
    columns and normalised to sum to 1 over the non-constant frequencies: [p // 2]."""
    e = embedding.detach().to(torch.float64)
    cos, sin = fourier_basis(e.shape[0])
    power = (cos.T @ e).pow(2).sum(1) + (sin.T @ e).pow(2).sum(1)  # [K]
    total = power.sum()
    return power / total if total > 0 else power


def key_frequencies(power: torch.Tensor, mass: float = 0.9, max_keys: int = 8) -> list[int]:
    """The fewest frequencies (largest power first) that hold `mass` of the power, at most
    `max_keys`: a generalising MLP uses a handful, a memorising one spreads over all of them."""
    order = torch.argsort(power, descending=True)
    cum = torch.cumsum(power[order], 0)
    n = int((cum < mass - 1e-12).sum()) + 1
    return [int(k) + 1 for k in order[: min(n, max_keys, len(order))]]


def sum_directions(p: int, keys: list[int], sign: int = 1, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal directions cos(w(a ± b)), sin(w(a ± b)) over the (a, b) grid for each key
    frequency w, plus the constant: [p * p, 1 + 2 * len(keys)] (row a * p + b).

    The logits of a model that computes (a ± b) mod p with frequency w lie in this span
    (Nanda et al.'s trig identity); everything else is what memorisation adds.
    """
    a = torch.arange(p, dtype=dtype).repeat_interleave(p)
    b = torch.arange(p, dtype=dtype).repeat(p)
    s = a + sign * b
    cols = [torch.ones(p * p, dtype=dtype)]
    for w in keys:
        angle = 2 * math.pi * w * s / p
        cols += [torch.cos(angle), torch.sin(angle)]
    u = torch.stack(cols, 1)
    norms = u.norm(dim=0, keepdim=True)
    return torch.where(norms > 1e-9, u / norms.clamp_min(1e-12), torch.zeros_like(u))


def restricted_excluded(
    grid_logits: torch.Tensor, directions: torch.Tensor, rows: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Logits over the full (a, b) grid [p * p, p] split into their key-frequency part (plus the
    per-class mean) and the rest, (restricted, excluded) in float64, at each set of grid rows in `rows`
    (a * p + b). `directions` are the keys' `sum_directions`. Excluded keeps the per-class mean, so that
    removing the key frequencies is all it changes. The projection runs once over the whole grid; its
    parts are only formed at the rows asked for."""
    x = grid_logits.to(torch.float64)
    coef = directions.T @ x  # [1 + 2K, p]
    out = []
    for r in rows:
        restricted = directions[r] @ coef
        out.append((restricted, x[r] - restricted + directions[r, :1] @ coef[:1]))
    return out


@functools.lru_cache(maxsize=64)
def cached_directions(p: int, keys: tuple[int, ...], sign: int, device: str) -> torch.Tensor:
    # The key frequencies of a run change a few times in its life, not at every evaluation.
    return sum_directions(p, list(keys), sign).to(device)
