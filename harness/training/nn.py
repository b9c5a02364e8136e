"""Small torch pieces more than one task uses: the plain MLP and its member-stacked form, parameter
counts, the weight norm.

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


class _StackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)  # [M, out, in], [M, out]


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
        self.net = nn.ModuleDict({str(2 * k): _StackedLinear(w, b) for k, (w, b) in enumerate(zip(weights, biases))})

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
        h = x
        if x.dim() == 2:  # one member's [batch, d_in]
            if layers[0].weight.shape[0] != 1:
                raise ValueError(f"a [batch, d_in] input needs a model of one member, not {self.members}")
            for k, layer in enumerate(layers):
                # squeeze, not [0]: a view's backward is free, select's fills and copies a zero tensor
                h = F.linear(h, layer.weight.squeeze(0), layer.bias.squeeze(0))
                h = F.relu(h) if k < len(layers) - 1 else h
            return h
        for k, layer in enumerate(layers):
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
