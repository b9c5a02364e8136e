"""Modular addition's models, with a member dimension (M members stacked [M, ...]; a single run is
M = 1): PAIR's tied-embedding MLP and the concatenated-embedding MLP, and their initial weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tasks.configs.modular_addition import Config

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "quadratic": torch.square}


TRUNC_STD = 0.87962566103423978  # std of a standard normal cut at +-2


def _trunc_normal_(w: torch.Tensor, std: float, rescale: bool) -> torch.Tensor:
    # Haiku cuts at +-2 sigma. VarianceScaling divides sigma by TRUNC_STD so that the result has std
    # `std`; TruncatedNormal (hk.Linear's default) does not, so its result has std 0.88 * `std`.
    sigma = std / TRUNC_STD if rescale else std
    return nn.init.trunc_normal_(w, 0.0, sigma, -2 * sigma, 2 * sigma)


def _pick(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx[m, j] of each member's table [M, rows, k] -> [M, n, k], in one index_select over the
    members' stacked rows: its backward is an index_add, several times cheaper on a CPU than the
    accumulating index_put that `t[a]` costs in backward (the largest single cost of a PAIR step)."""
    m, rows = table.shape[0], table.shape[1]
    offset = (torch.arange(m, device=idx.device) * rows)[:, None]
    return table.reshape(m * rows, -1).index_select(0, (idx + offset).flatten()).view(m, idx.shape[1], -1)


class MemberModel(nn.Module):
    """A model of M members whose parameters are stacked along a leading member dimension (a single
    run is M = 1). forward(a, b): pairs [M, n] -> logits [M, n, p], each member on its own pairs; a
    single run may pass [n] and gets [n, p]. `member(i)` is member i as a model of one whose parameters
    are views of its slices (evaluation: no copy), or with `copy` its own storage (a model artifact,
    a member's last.ckpt: torch.save writes a view's whole storage, every member's weights)."""

    def __init__(self, activation: str, **weights: torch.Tensor | None):
        super().__init__()
        self.activation, self.act = activation, ACTIVATIONS[activation]
        for name, w in weights.items():
            self.register_parameter(name, None if w is None else nn.Parameter(w))

    def member(self, i: int, copy: bool = False) -> MemberModel:
        weights = {n: None if p is None else p.data[i : i + 1] for n, p in self._parameters.items()}
        return type(self)(
            self.activation, **{n: w.clone() if copy and w is not None else w for n, w in weights.items()}
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() == 1:
            return self.logits(a[None], b[None])[0]
        return self.logits(a, b)


class PairMLP(MemberModel):
    """PAIR's MLP: one embedding E for both inputs and the output, per member
    logits = E W_out act(W_in (E[a] + E[b])). Parameters: embed [M, p, d], w_in [M, hidden, d], w_out
    [M, d, hidden], and with model.bias b_in [M, hidden], b_out [M, d].

    The linear maps are applied to E once per token and then gathered (the same function as embedding
    first, ~20x fewer flops for a 500-d embedding), the token inputs and the readout W_out^T E^T in one
    batched product; the token rows are picked with _pick."""

    def token_inputs(self) -> torch.Tensor:  # [M, p, hidden]: what each token adds to the hidden layer
        return self.embed @ self.w_in.transpose(1, 2)

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        hidden = self.w_in.shape[1]
        # token_inputs (transposed) and the readout W_out^T E^T in one product: [M, 2h, d] @ [M, d, p]
        both = torch.bmm(torch.cat([self.w_in, self.w_out.transpose(1, 2)], 1), self.embed.transpose(1, 2))
        t = both[:, :hidden].transpose(1, 2)  # [M, p, hidden]
        h = _pick(t, a) + _pick(t, b)
        h = self.act(h if self.b_in is None else h + self.b_in[:, None])  # [M, n, hidden]
        out = torch.bmm(h, both[:, hidden:])  # [M, n, p]
        return out if self.b_out is None else out + torch.bmm(self.b_out[:, None], self.embed.transpose(1, 2))


class ConcatMLP(MemberModel):
    """logits = U act(W [E[a]; E[b]]), a free unembedding U. Parameters: embed [M, p, d], w_in
    [M, hidden, 2d], unembed [M, p, hidden], and with model.bias b_in [M, hidden], b_out [M, p]."""

    def token_inputs(self) -> torch.Tensor:  # [M, p, 2 * hidden]: the a-part and the b-part side by side
        d = self.embed.shape[2]
        e, w = self.embed, self.w_in
        return torch.cat([e @ w[:, :, :d].transpose(1, 2), e @ w[:, :, d:].transpose(1, 2)], 2)

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([_pick(self.embed, a), _pick(self.embed, b)], 2)  # [M, n, 2d]
        h = torch.bmm(x, self.w_in.transpose(1, 2))
        h = self.act(h if self.b_in is None else h + self.b_in[:, None])
        out = torch.bmm(h, self.unembed.transpose(1, 2))  # [M, n, p]
        return out if self.b_out is None else out + self.b_out[:, None]


def initial_weights(cfg: Config) -> dict[str, torch.Tensor | None]:
    """One member's initial weights, drawn by the same random calls in the same order as the
    single-run modules before issue 20 (nn.Linear's and nn.Embedding's own initialisers), so a run's
    numbers stay what they were; then the Haiku initialisers (model.init) and model.init_scale."""
    m, p = cfg.model, cfg.data.p
    if m.name == "pair_mlp":
        embed = torch.randn(p, m.embed_dim)  # N(0, 1), as nn.Embedding
        lin_in, lin_out = nn.Linear(m.embed_dim, m.hidden, bias=m.bias), nn.Linear(m.hidden, m.embed_dim, bias=m.bias)
        names = ("embed", "w_in", "b_in", "w_out", "b_out")
    else:
        embed = nn.Embedding(p, m.embed_dim).weight
        lin_in, lin_out = nn.Linear(2 * m.embed_dim, m.hidden, bias=m.bias), nn.Linear(m.hidden, p, bias=m.bias)
        names = ("embed", "w_in", "b_in", "unembed", "b_out")
    values = (embed, lin_in.weight, lin_in.bias, lin_out.weight, lin_out.bias)
    weights = {n: None if w is None else w.detach().clone() for n, w in zip(names, values)}
    with torch.no_grad():
        for name, w in weights.items():
            if w is None:
                continue
            if m.init == "haiku":
                if name.startswith("b_"):
                    w.zero_()
                elif name == "embed":  # [p, embed_dim]: Haiku's fan_in is p
                    _trunc_normal_(w, math.sqrt(2 / w.shape[0]), rescale=True)
                else:
                    _trunc_normal_(w, 1 / math.sqrt(w.shape[1]), rescale=False)
            w.mul_(m.init_scale)
    return weights
