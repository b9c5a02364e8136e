"""Small torch pieces tasks use: the plain MLP, M MLPs as one model (StackedMLP: parameters stacked
[M, ...]; WidthPackedMLP: any widths, hidden layers side by side), parameter counts, the weight norm.

Pure torch (no Lightning, no config objects), so a task's nn.Module stays a plain module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """`depth` hidden ReLU layers of `width` units: Linear(d_in, width), ReLU, ..., Linear(width, d_out)."""

    def __init__(self, d_in: int, width: int, depth: int, d_out: int):
        super().__init__()
        dims = [d_in] + [width] * depth
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, d_in] -> [batch, d_out]
        return self.net(x)


class _Layer(nn.Module):
    """One layer's weight and bias, applied by the model that holds it (StackedMLP, WidthPackedMLP); the
    names give MLP's state-dict keys (net.0.weight, ...)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)


class StackedMLP(nn.Module):
    """M MLPs of one shape with their parameters stacked along a leading member dimension (a single run
    is M = 1), named and ordered as MLP's: net.0.weight [M, width, d_in], net.0.bias [M, width],
    net.2.weight, ... (the odd positions were MLP's ReLUs).

    forward: [M, batch, d_in] -> [M, batch, d_out], one baddbmm per layer for all members (Linear's
    addmm, batched; as fast as torch.func.vmap of the MLP here, measured). A model of one member may
    take [batch, d_in] and gives [batch, d_out] through F.linear, nn.Linear's own call (as fast as the
    plain MLP). `member(i)` is member i as a model of one whose parameters are views of its slices."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor]):
        super().__init__()
        self.net = nn.ModuleDict({str(2 * k): _Layer(w, b) for k, (w, b) in enumerate(zip(weights, biases))})
        self.register_load_state_dict_pre_hook(_add_member_dimension)

    @classmethod
    def stack(cls, mlps: list[MLP]) -> StackedMLP:
        """The members `mlps` (their current weights, copied) as one model."""
        layers = [[m for m in mlp.net if isinstance(m, nn.Linear)] for mlp in mlps]
        return cls(
            [torch.stack([ls[k].weight.detach() for ls in layers]) for k in range(len(layers[0]))],
            [torch.stack([ls[k].bias.detach() for ls in layers]) for k in range(len(layers[0]))],
        )

    @property
    def weights(self) -> list[nn.Parameter]:
        return [layer.weight for layer in self.net.values()]

    @property
    def biases(self) -> list[nn.Parameter]:
        return [layer.bias for layer in self.net.values()]

    @property
    def members(self) -> int:
        return self.net["0"].weight.shape[0]

    def member(self, i: int, copy: bool = False) -> StackedMLP:
        """Member i as a model of one: views of its slices, or with `copy` its own storage (what a model
        artifact saves: torch.save writes a view's whole storage, every member's weights)."""

        def part(p: torch.Tensor) -> torch.Tensor:
            return p.detach()[i : i + 1].clone() if copy else p.data[i : i + 1]

        return type(self)([part(w) for w in self.weights], [part(b) for b in self.biases])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.net.values())
        one = x.dim() == 2  # one member's [batch, d_in]
        if one and layers[0].weight.shape[0] != 1:
            raise ValueError(f"a [batch, d_in] input needs a model of one member, not {self.members}")
        h = x
        for k, layer in enumerate(layers):
            if one:  # squeeze, not [0]: a view's backward is free, select's fills and copies a zero tensor
                h = F.linear(h, layer.weight.squeeze(0), layer.bias.squeeze(0))
            else:
                h = torch.baddbmm(layer.bias.unsqueeze(1), h, layer.weight.transpose(1, 2))
            h = F.relu(h) if k < len(layers) - 1 else h
        return h


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def weight_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm of all parameters together (weights and biases, as the papers' code computes it)."""
    return torch.sqrt(sum(p.pow(2).sum() for p in model.parameters()))


@torch.no_grad()
def member_norms(model: nn.Module) -> torch.Tensor:
    """[M]: weight_norm of each member of a model whose parameters are stacked [M, ...]."""
    return torch.sqrt(sum(p.pow(2).flatten(1).sum(1) for p in model.parameters()))


class WidthPackedMLP(nn.Module):
    """M MLPs (`depth` hidden ReLU layers, a width per member) as one model whose hidden layers hold
    every member's hidden units side by side: one matmul computes the first hidden layer of all
    members from a shared batch (width packing; padding members to the widest would cost a width
    sweep 3-4x the FLOPs). A single run is M = 1 and runs MLP's ops (linear, relu, linear), no more.

    Parameters, named as MLP.net's (layer 0, the depth - 1 hidden-to-hidden layers 2, 4, ..., the
    output layer L = 2 * depth), member i owning units o_i .. o_i + w_i of every hidden layer:
      net.0.weight [sum_w, d_in], net.0.bias [sum_w]       rows o_i.. (dim 0)
      net.{j}.weight [sum of w_i^2], net.{j}.bias [sum_w]   member i's [w_i, w_i] flattened (dim 0)
      net.{L}.weight [d_out, sum_w]                         columns o_i.. (dim 1: MLP's layout)
      net.{L}.bias [M * d_out]                              d_out entries per member (dim 0)
    For depth 1 and M = 1 this is MLP's state dict; a hidden-to-hidden weight is flat here, and an
    MLP's [w, w] loads into it too. Layers after the first run member by member on the member's own
    units (one small matmul each), never one block-diagonal matmul: its zeros would turn one member's
    inf into NaN in every other member's outputs (0 * inf), and a member must fail alone.
    """

    def __init__(self, widths: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.widths, self.depth = list(widths), len(layers) - 1
        self.d_out = layers[-1][0].shape[0]
        self.offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self.squares = [sum(w * w for w in widths[:i]) for i in range(len(widths) + 1)]
        self.net = nn.ModuleDict({str(2 * j): _Layer(w, b) for j, (w, b) in enumerate(layers)})
        self.register_load_state_dict_pre_hook(_flatten_square_weights)

    @classmethod
    def concat(cls, mlps: list[MLP]) -> WidthPackedMLP:
        """The members' MLPs (their weights as MLP's initialisers drew them), laid out as one model."""
        linears = [[m for m in mlp.net if isinstance(m, nn.Linear)] for mlp in mlps]
        depth = len(linears[0]) - 1
        layers = []
        for j in range(depth + 1):
            ws, bs = [ls[j].weight.detach() for ls in linears], [ls[j].bias.detach() for ls in linears]
            w = torch.cat(ws, 1) if j == depth else torch.cat(ws if j == 0 else [x.flatten() for x in ws])
            layers.append((w, torch.cat(bs)))
        return cls([ls[0].out_features for ls in linears], layers)

    @property
    def members(self) -> int:
        return len(self.widths)

    def owners(self) -> list[tuple[int, torch.Tensor]]:
        """Per parameter (in parameters() order): the dimension along which members own positions, and
        the owner of each position."""
        m, widths = torch.arange(self.members), torch.tensor(self.widths)
        units = (0, torch.repeat_interleave(m, widths))
        out = [units, units]
        for _ in range(1, self.depth):
            out += [(0, torch.repeat_interleave(m, widths**2)), units]
        return out + [(1, units[1]), (0, torch.repeat_interleave(m, self.d_out))]

    def _part(self, j: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Member i's weight and bias of layer j (0..depth): views, shaped as MLP's but a hidden weight flat."""
        layer, w, o = self.net[str(2 * j)], self.widths[i], self.offsets[i]
        if j == self.depth:
            return layer.weight.narrow(1, o, w), layer.bias.narrow(0, i * self.d_out, self.d_out)
        weight = layer.weight.narrow(0, o, w) if j == 0 else layer.weight.narrow(0, self.squares[i], w * w)
        return weight, layer.bias.narrow(0, o, w)

    def member(self, i: int, copy: bool = False) -> WidthPackedMLP:
        """Member i as a model of one: its parameters are views of member i's slices (evaluation sees
        the current weights, no copy), or with `copy` weights of its own (a model artifact: views
        would save every member's storage)."""
        with torch.no_grad():
            parts = [self._part(j, i) for j in range(self.depth + 1)]
            if copy:
                parts = [(w.clone(memory_format=torch.contiguous_format), b.clone()) for w, b in parts]
        return type(self)([self.widths[i]], [(w.detach(), b.detach()) for w, b in parts])

    def subset(self, members: list[int]) -> dict[str, torch.Tensor | list[int]]:
        """Index tensors (on the parameters' device, built once) that `logits` takes to run `members` only."""
        device = self.net["0"].weight.device

        def ranges(starts: list[int], sizes: list[int]) -> torch.Tensor:
            return torch.cat([torch.arange(s, s + n) for s, n in zip(starts, sizes)]).to(device)

        widths = [self.widths[i] for i in members]
        return {
            "widths": widths,
            "units": ranges([self.offsets[i] for i in members], widths),
            "squares": ranges([self.squares[i] for i in members], [w * w for w in widths]),
            "out": ranges([i * self.d_out for i in members], [self.d_out] * len(members)),
        }

    def logits(self, x: torch.Tensor, subset: dict | None = None) -> torch.Tensor:
        """[B, d_in] -> [m, B, d_out]: every member's outputs on the shared batch x (m = M), or those of
        `subset`'s members (m of them, in its order)."""
        net, last = self.net, str(2 * self.depth)

        def pick(p: torch.Tensor, key: str, dim: int = 0) -> torch.Tensor:
            return p if subset is None else p.index_select(dim, subset[key])

        widths = self.widths if subset is None else subset["widths"]
        h = F.relu(F.linear(x, pick(net["0"].weight, "units"), pick(net["0"].bias, "units")))
        w2, b2 = pick(net[last].weight, "units", 1), pick(net[last].bias, "out")
        if len(widths) == 1:  # one member: MLP's ops
            w = widths[0]
            for j in range(1, self.depth):
                layer = net[str(2 * j)]
                h = F.relu(F.linear(h, pick(layer.weight, "squares").view(w, w), pick(layer.bias, "units")))
            return F.linear(h, w2, b2)[None]
        hs = h.split(widths, 1)
        for j in range(1, self.depth):
            layer = net[str(2 * j)]
            ws = pick(layer.weight, "squares").split([w * w for w in widths])
            bs = pick(layer.bias, "units").split(widths)
            hs = [F.relu(F.linear(hk, wk.view(w, w), bk)) for hk, wk, bk, w in zip(hs, ws, bs, widths)]
        parts = zip(hs, w2.split(widths, 1), b2.split(self.d_out))
        return torch.stack([F.linear(hk, wk, bk) for hk, wk, bk in parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, d_in] -> [M, B, d_out]; a model of one member (a single run, `member(i)`) gives
        [B, d_out], as MLP."""
        out = self.logits(x)
        return out[0] if self.members == 1 else out


def _flatten_square_weights(module: WidthPackedMLP, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict: an MLP's hidden-to-hidden weight [w, w] (a state dict written before issue 20)
    is the flat [w * w] of a WidthPackedMLP of one member."""
    for j in range(1, module.depth):
        key = f"{prefix}net.{2 * j}.weight"
        if key in state_dict and state_dict[key].dim() == 2:
            state_dict[key] = state_dict[key].flatten()


def _add_member_dimension(module: StackedMLP, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict: an MLP's weight [out, in] or bias [out] (a state dict written before issue 20, a
    plain MLP's) is the [1, out, in] or [1, out] of a StackedMLP of one member."""
    for name, p in module.named_parameters():
        key = prefix + name
        if key in state_dict and state_dict[key].dim() == p.dim() - 1 and module.members == 1:
            state_dict[key] = state_dict[key].unsqueeze(0)
