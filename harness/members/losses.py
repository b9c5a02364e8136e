"""Per-member cross-entropy for blocks (issue 14; a solo run is a block of one): logits [M, n, C] -> one
loss per member.

F.cross_entropy on the flattened logits is log_softmax + nll_loss, and its backward recomputes
exp(log_softmax): two exponentials of every logit per step, the largest elementwise cost of a packed
PAIR step on a CPU. This autograd Function computes the exponentials once, keeps the probabilities
for the backward ((softmax - onehot) * weight), and folds each member's weighting (its mask and mean)
into the same pass. Equal to F.cross_entropy up to rounding (tests/test_packed.py).

Exponents below log(smallest normal) + 1 are raised to it before exp: a grokking run's logits spread
by hundreds of nats, and torch's CPU exp takes a ~10-40x slower path for arguments whose result is
subnormal (measured: 610k float32 exponentials, 0.64 ms in range, 6-27 ms below -87.34). A
probability below 4.3e-38 (float32; 1.2e-307 in float64) then counts as that, far below the rounding
of any sum it enters.
"""

from __future__ import annotations

import math

import torch


class _WeightedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        shifted = logits - logits.amax(-1, keepdim=True)
        picked = shifted.gather(-1, target[..., None]).squeeze(-1)
        probs = shifted.clamp_min_(math.log(torch.finfo(shifted.dtype).tiny) + 1).exp_()
        total = probs.sum(-1, keepdim=True)
        loss = ((total.squeeze(-1).log() - picked) * weight).sum(-1)
        ctx.save_for_backward(probs.div_(total), target, weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, target, weight = ctx.saved_tensors
        w = (weight * grad_loss[:, None])[..., None]
        grad = probs * w
        grad.scatter_add_(-1, target[..., None], -w)
        return grad, None, None


def member_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j weight[m, j] * CE(logits[m, j], target[m, j]) for each member m: [M].

    With weight = mask / (number of a member's examples), each member's loss is its own mean (padding
    masked out), so its gradient is the one its solo run gets."""
    if logits.dim() != 3 or target.shape != logits.shape[:2] or weight.shape != target.shape:
        raise ValueError(
            f"member_cross_entropy: logits {tuple(logits.shape)}, target {tuple(target.shape)}, "
            f"weight {tuple(weight.shape)}: need [M, n, C], [M, n], [M, n]"
        )
    return _WeightedCrossEntropy.apply(logits, target, weight.to(logits.dtype))
