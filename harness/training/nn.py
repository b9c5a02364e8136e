"""Small torch pieces more than one task uses: the plain MLP, parameter counts, the weight norm.

Pure torch (no Lightning, no config objects), so a task's nn.Module stays a plain module.
"""

from __future__ import annotations

import torch
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


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def weight_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm of all parameters together (weights and biases, as the papers' code computes it)."""
    return torch.sqrt(sum(p.pow(2).sum() for p in model.parameters()))
