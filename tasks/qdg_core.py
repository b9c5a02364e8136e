"""Quanta discovery from gradients (QDG, Michaud et al. 2023), the pure part: no Lightning, no W&B.

    params = select_params(model)                       # names without "layernorm"/"embed"
    source = LMGrads(model, params, docs, samples)      # or MLPGrads(model, params, x, y)
    C = exact_similarity(source, block=256)             # [n, n] cosine similarity, float32
    A = affinity_(C)                                    # 1 - arccos(C)/pi, in place
    labels = cluster(A, [400])                          # {n_clusters: labels [n]}

Per-sample gradients share work. For a language model, one forward per document, truncated after
its last selected token (causal attention: later tokens cannot change earlier losses), with the
unembedding applied only at the selected positions, then one batched backward
(`autograd.grad(..., is_grads_batched=True)`) over that document's selected tokens. For an MLP,
`torch.func.grad` under `vmap`. Every gradient is L2-normalised (no centring) as in the paper.

The similarity matrix is accumulated block by block: gradient rows that fit `max_grad_bytes` stay
resident, later blocks are streamed through one more block buffer and recomputed for each resident
group (the paper recomputed every block pair). Projected mode multiplies each gradient block by a
seeded Gaussian matrix [P, dim] / sqrt(dim), generated chunk by chunk so it is never held whole,
as TRAK projects per-example gradients; its error is measured against exact similarity on a sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from tasks.configs.quanta_discovery import DEFAULT_EXCLUDE
from tasks.lm import embedding_params, split_head

# -- parameters ----------------------------------------------------------------------------------


def select_params(
    model: nn.Module, exclude: Iterable[str] = DEFAULT_EXCLUDE, include: str = "", drop_embeddings: bool = True
) -> dict[str, nn.Parameter]:
    """Parameters whose name contains none of `exclude` (and matches the regex `include`, if set).

    `drop_embeddings` also drops the input and output embedding matrices by identity: the paper's
    name rule ("embed") caught GPT-NeoX's `embed_out`, which transformers >= 5 calls `lm_head`.
    """
    import re

    exclude = [e for e in exclude if e]
    skip = embedding_params(model) if drop_embeddings else {}
    chosen = {
        n: p
        for n, p in model.named_parameters()
        if not any(e in n for e in exclude) and id(p) not in skip and (not include or re.search(include, n))
    }
    if not chosen:
        names = [n for n, _ in model.named_parameters()]
        raise ConfigError(
            f"grad.include={include!r} with grad.exclude={list(exclude)} selects no parameter; "
            f"the model's parameters: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
        )
    return chosen


def n_selected(params: dict[str, nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())


# -- per-sample gradients ------------------------------------------------------------------------


class GradSource:
    """n samples whose L2-normalised gradients come in blocks: `grads(indices) -> [b, P] float32`."""

    n: int
    dim: int
    device: torch.device

    def grads(self, indices: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


def _normalise(g: torch.Tensor) -> torch.Tensor:
    return F.normalize(g.float(), p=2, dim=1)


class MLPGrads(GradSource):
    """Per-sample gradients of cross-entropy for a classifier: `torch.func.grad` under `vmap`."""

    def __init__(
        self, model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor, y: torch.Tensor, chunk: int = 1024
    ):
        from torch.func import functional_call, grad, vmap

        self.model, self.x, self.y, self.chunk = model, x, y, chunk
        self.names = list(params)
        self.sel = {n: p.detach() for n, p in params.items()}
        frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
        self.n, self.dim = len(x), n_selected(params)
        self.device = x.device

        def loss(sel, xi, yi):  # one sample: [d_in], [] -> scalar
            return F.cross_entropy(functional_call(model, {**frozen, **sel}, (xi[None],)), yi[None])

        self._grad = vmap(grad(loss), in_dims=(None, 0, 0))

    def grads(self, indices: np.ndarray) -> torch.Tensor:
        out = []
        for s in range(0, len(indices), self.chunk):
            idx = torch.as_tensor(indices[s : s + self.chunk], device=self.device)
            g = self._grad(self.sel, self.x[idx], self.y[idx])  # {name: [b, *shape]}
            out.append(torch.cat([g[n].flatten(1) for n in self.names], 1))
        return _normalise(torch.cat(out))


class LMGrads(GradSource):
    """Per-token gradients of a causal LM's next-token loss, one forward per document.

    docs: {doc id: token ids [L]}; samples: (doc, pos) pairs, pos = index of the predicted token
    (predicted from ids[:pos]). `batch` bounds the tokens in one batched backward (memory:
    batch x the document's activations).
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        docs: dict[int, torch.Tensor],
        doc: np.ndarray,
        pos: np.ndarray,
        batch: int = 64,
    ):
        self.model, self.docs, self.batch = model, docs, batch
        self.doc, self.pos = np.asarray(doc), np.asarray(pos)
        self.names, self.params = list(params), list(params.values())
        self.n, self.dim = len(self.doc), n_selected(params)
        self.device = self.params[0].device
        self.split = split_head(model)  # logits = head(base(x))? then the head runs on the chosen rows only

    def _logits(self, ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Logits predicting positions `where` of one document: [m, vocab], head only at those rows."""
        if self.split:
            hidden = self.model.base_model(input_ids=ids[None]).last_hidden_state[0]  # [L, d]
            return self.model.get_output_embeddings()(hidden[where - 1])
        return self.model(input_ids=ids[None]).logits[0, where - 1]

    def doc_grads(self, d: int, positions: np.ndarray) -> torch.Tensor:
        """[m, P] raw (unnormalised) gradients of one document's tokens at `positions`."""
        ids = self.docs[d].to(self.device)
        where = torch.as_tensor(positions, device=self.device)
        ids = ids[: int(where.max()) + 1]  # causal: nothing after the last selected token matters
        with torch.enable_grad():
            losses = F.cross_entropy(self._logits(ids, where).float(), ids[where], reduction="none")  # [m]
            rows, eye = [], torch.eye(len(where), device=self.device)  # row k: the gradient of loss k
            for s in range(0, len(where), self.batch):
                last = s + self.batch >= len(where)
                g = torch.autograd.grad(  # grad_outputs: rows s.. of eye
                    losses, self.params, eye[s : s + self.batch], is_grads_batched=True, retain_graph=not last
                )
                rows.append(torch.cat([x.flatten(1) for x in g], 1))
        return torch.cat(rows)

    def grads(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices)
        out = torch.empty(len(indices), self.dim, device=self.device)
        docs = self.doc[indices]
        for d in np.unique(docs):
            rows = np.nonzero(docs == d)[0]
            out[torch.as_tensor(rows, device=self.device)] = self.doc_grads(int(d), self.pos[indices[rows]])
        return _normalise(out)


def paper_token_grad(model: nn.Module, params: dict[str, nn.Parameter], ids: torch.Tensor, pos: int) -> torch.Tensor:
    """The paper's per-token gradient: a forward of the whole document, the loss of every position,
    a backward from the one selected token's loss. [P], unnormalised. For benchmarks and tests."""
    with torch.enable_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1]
        losses = F.cross_entropy(logits.float(), ids[1:], reduction="none")
        g = torch.autograd.grad(losses[pos - 1], list(params.values()))
    return torch.cat([x.flatten() for x in g])


# -- similarity ----------------------------------------------------------------------------------


def _blocks(n: int, block: int) -> list[np.ndarray]:
    return [np.arange(s, min(n, s + block)) for s in range(0, n, block)]


def exact_similarity(
    source: GradSource,
    block: int = 256,
    max_grad_bytes: int = 1 << 30,
    stats: dict | None = None,
) -> np.ndarray:
    """C[i, j] = <g_i, g_j> of the normalised gradients: [n, n] float32.

    Gradient rows up to `max_grad_bytes` (at least one block) stay resident; each later block is
    computed into one more block buffer, multiplied against the resident rows and dropped. Peak
    memory: the n x n matrix + max_grad_bytes + one block of gradients. Gradient passes:
    1 when everything fits, else each resident group streams the blocks after it.
    """
    n, P = source.n, source.dim
    C = np.empty((n, n), dtype=np.float32)
    blocks = _blocks(n, block)
    per_group = max(1, int(max_grad_bytes // (4 * P * block)))
    computed = 0
    for g0 in range(0, len(blocks), per_group):
        group = blocks[g0 : g0 + per_group]
        rows = np.concatenate(group)
        G = torch.empty(len(rows), P, device=source.device)  # [r, P], filled block by block (no 2x copy)
        at = 0
        for b in group:
            G[at : at + len(b)] = source.grads(b)
            at += len(b)
        computed += len(rows)
        C[np.ix_(rows, rows)] = (G @ G.T).cpu().numpy()
        for b in blocks[g0 + per_group :]:
            Gb = source.grads(b)  # [b, P]
            computed += len(b)
            part = (G @ Gb.T).cpu().numpy()
            C[np.ix_(rows, b)] = part
            C[np.ix_(b, rows)] = part.T
            del Gb
        del G
    if stats is not None:
        stats["gradients_computed"] = computed  # n when all rows fit, more when blocks are recomputed
    return C


def project(G: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """[b, P] -> [b, dim]: G times the Gaussian projection [P, dim] / sqrt(dim), made 64 MiB of rows
    at a time, each chunk regenerated from the seed."""
    P, device = G.shape[1], G.device
    out = torch.zeros(len(G), dim, device=device)
    rows = max(1, (64 << 20) // (4 * dim))
    for i, s in enumerate(range(0, P, rows)):
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        r = min(rows, P - s)
        out += G[:, s : s + r] @ (torch.randn(r, dim, generator=g, device=device) / math.sqrt(dim))
    return out


def projected_similarity(source: GradSource, dim: int, block: int = 256, seed: int = 0) -> np.ndarray:
    """[n, n] cosine similarity of the [n, dim] projections of the normalised gradients (cosine is
    estimated after projection, so the projections are renormalised)."""
    feats = torch.empty(source.n, dim, device=source.device)
    for b in _blocks(source.n, block):
        feats[torch.as_tensor(b, device=source.device)] = project(source.grads(b), dim, seed)
    feats = _normalise(feats)
    return (feats @ feats.T).cpu().numpy().astype(np.float32)


class Subset(GradSource):
    def __init__(self, source: GradSource, idx: np.ndarray):
        self.source, self.idx = source, np.asarray(idx)
        self.n, self.dim, self.device = len(self.idx), source.dim, source.device

    def grads(self, indices: np.ndarray) -> torch.Tensor:
        return self.source.grads(self.idx[np.asarray(indices)])


def projection_error(
    source: GradSource, C_proj: np.ndarray, n_check: int, block: int = 256, seed: int = 0, max_grad_bytes: int = 1 << 30
) -> dict:
    """Max and RMS |C_proj - C_exact| over the off-diagonal entries among `n_check` random samples."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(source.n, size=min(n_check, source.n), replace=False))
    exact = exact_similarity(Subset(source, idx), block, max_grad_bytes)
    diff = np.abs(C_proj[np.ix_(idx, idx)] - exact)[~np.eye(len(idx), dtype=bool)]
    return {
        "proj_error_max": float(diff.max()),
        "proj_error_rms": float(np.sqrt((diff**2).mean())),
        "proj_error_samples": int(len(idx)),
    }


def affinity_(C: np.ndarray) -> np.ndarray:
    """1 - arccos(C)/pi in place (C clipped to [-1, 1] first: rounding can leave 1 + 1e-7)."""
    np.clip(C, -1.0, 1.0, out=C)
    np.arccos(C, out=C)
    C *= -1.0 / np.pi
    C += 1.0
    return C


def cluster(A: np.ndarray, counts: Iterable[int], n_init: int = 30, seed: int = 0) -> dict[int, np.ndarray]:
    """Spectral clustering of a precomputed affinity for each cluster count: {k: labels [n]}."""
    from sklearn.cluster import SpectralClustering

    out = {}
    for k in counts:
        sc = SpectralClustering(n_clusters=int(k), affinity="precomputed", n_init=n_init, random_state=seed)
        out[int(k)] = sc.fit_predict(A).astype(np.int64)
    return out


# -- language-model token selection --------------------------------------------------------------


def repeated_trigrams(ids) -> np.ndarray:
    """[L] bool: True at j >= 2 when the trigram ids[j-2:j+1] (ending at j) occurred earlier in the doc."""
    seen, out = set(), np.zeros(len(ids), dtype=bool)
    for j in range(2, len(ids)):
        t = (ids[j - 2], ids[j - 1], ids[j])
        out[j] = t in seen
        seen.add(t)
    return out


def select_tokens(
    docs: Iterable[tuple[int, list[int], np.ndarray]],
    max_loss: float,
    drop_repeated_trigrams: bool,
    stride: int,
    n: int,
) -> tuple[list[tuple[int, int, float]], int]:
    """The paper's token selection, streamed over documents in order.

    docs yields (doc id, ids [L], losses [L-1] of targets 1..L-1). Tokens with loss < max_loss,
    minus those whose trigram appeared earlier in the document; of those every `stride`-th (the
    first, the stride+1-th, ...); the first `n` (0: all). Returns ([(doc, pos, loss)], tokens passing
    the filters before the stride).
    """
    chosen, passing = [], 0
    for d, ids, losses in docs:
        ok = np.asarray(losses) < max_loss  # [L-1] for positions 1..L-1
        if drop_repeated_trigrams:
            ok &= ~repeated_trigrams(ids)[1:]
        for p in np.nonzero(ok)[0] + 1:
            if passing % stride == 0:
                chosen.append((d, int(p), float(losses[p - 1])))
                if n and len(chosen) == n:
                    return chosen, passing + 1
            passing += 1
    return chosen, passing
