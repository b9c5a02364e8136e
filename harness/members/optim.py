"""The optimizer of a packed block: which slices of a packed parameter are whose (MemberAxis), and
torch's AdamW over them with a learning rate and weight decay per member (StackedAdamW)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.optim.adamw import adamw  # torch.optim.AdamW's functional form

# ---- which parts of a parameter are whose ----------------------------------------------------------


@dataclass
class MemberAxis:
    """Along dimension `dim`, position j of a packed parameter belongs to member `owner[j]`.

    Stacked parameters ([M, ...]) have dim 0 and owner arange(M); a hidden layer concatenated over
    members of widths w_1..w_M has owner repeat_interleave(arange(M), widths)."""

    dim: int
    owner: torch.Tensor  # int64 [size of dim]

    @classmethod
    def stacked(cls, n_members: int) -> MemberAxis:
        return cls(0, torch.arange(n_members))

    def view(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Member i's part of x as a view: x[j] when each member owns one position j of dim 0 (the
        stacked layout: the view has the solo parameter's shape), else its positions, which must be
        one contiguous range (a block lays its members out that way)."""
        stacked, start, n = self.spans[i]
        return x.select(0, start) if stacked else x.narrow(self.dim, start, n)

    @functools.cached_property
    def spans(self) -> list[tuple[bool, int, int]]:
        """(stacked layout?, first position, count) per member; once, as the optimizer takes every
        member's views at every step."""
        owner = self.owner.tolist()
        stacked = self.dim == 0 and owner == list(range(len(owner)))
        spans = []
        for i in range(max(owner) + 1):
            pos = [j for j, o in enumerate(owner) if o == i]
            if not pos or pos[-1] - pos[0] + 1 != len(pos):
                raise ValueError(f"member {i}'s positions along dim {self.dim} are not one contiguous range")
            spans.append((stacked, pos[0], len(pos)))
        return spans

    def take(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Member i's part of x (a copy)."""
        return self.view(x.detach(), i).clone()

    @torch.no_grad()
    def put(self, x: torch.Tensor, i: int, part: torch.Tensor) -> None:
        """Copy `part` into member i's part of x (reshaped: a solo run's [1, ...] or [w, w] to the view)."""
        view = self.view(x, i)
        view.copy_(part.reshape(view.shape))


# ---- the optimizer ---------------------------------------------------------------------------------


class StackedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW for parameters packed along a member axis, with a learning rate and weight
    decay per member (float64 tensors [M]) and shared betas and eps.

    The update is torch's own AdamW, its functional form (torch.optim.adamw.adamw) with the fused
    kernel: one pass over parameter, gradient and both moments, ~8x faster on a CPU than the same
    update written as tensor ops over the stacked parameters (10 PAIR members: 0.5 ms vs 4.3 ms a
    step). Members with equal (lr, weight decay) that lie next to each other are updated as one view
    (a seed study: one view per parameter); the moments are stacked tensors like the parameters, so a
    member's state is its slice. Equal to the single-tensor AdamW a solo run uses up to rounding
    (tests/test_packed.py). `step(active)` skips members outside the boolean mask `active`: a failed
    member's parameters and moments stay as they were while the others go on. All members share one
    step count: a block only ever holds members at the same step (harness.members.packed.train_packed).

    A torch Optimizer, so that Lightning's Trainer steps it (its step count is global_step) and
    checkpoints it: `state_dict()` is {"t", "exp_avg", "exp_avg_sq"} with the stacked moments, which
    harness.members.checkpoints slices into each member's torch AdamW state. `active` is read by `step`.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: torch.Tensor,
        weight_decay: torch.Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        axes: list[MemberAxis] | None = None,
    ):
        if lr.dtype != torch.float64 or weight_decay.dtype != torch.float64:
            # 0.1 held in float32 is 0.1000000015: the members would train with another rate than asked
            raise TypeError("StackedAdamW: lr and weight_decay must be float64 tensors (built from Python floats)")
        self.params = list(params)
        super().__init__(self.params, {"lr": float(lr[0]), "weight_decay": float(weight_decay[0])})
        self.active: torch.Tensor | None = None  # the members `step` updates (None: all)
        self.hyper = list(zip(lr.tolist(), weight_decay.tolist()))
        self.axes = axes or [MemberAxis.stacked(len(self.hyper))] * len(self.params)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.t = 0
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self._runs_for: tuple | None = None
        self._runs: list[tuple[tuple[float, float], int, int]] = []

    def _member_runs(self, alive: tuple[bool, ...]) -> list[tuple[tuple[float, float], int, int]]:
        """Maximal runs i..j-1 of neighbouring live members with equal (lr, wd): [(hyper, i, j)]."""
        if alive != self._runs_for:
            runs: list[tuple[tuple[float, float], int, int]] = []
            for i, (h, ok) in enumerate(zip(self.hyper, alive)):
                if ok and runs and runs[-1][0] == h and runs[-1][2] == i and self._adjacent(i):
                    runs[-1] = (h, runs[-1][1], i + 1)
                elif ok:
                    runs.append((h, i, i + 1))
            self._runs, self._runs_for = runs, alive
        return self._runs

    def _adjacent(self, i: int) -> bool:  # member i starts where member i - 1 ends, along every axis
        return all(a.spans[i - 1][1] + a.spans[i - 1][2] == a.spans[i][1] for a in self.axes)

    @staticmethod
    def _span(x: torch.Tensor, axis: MemberAxis, i: int, j: int) -> torch.Tensor:
        first, last = axis.spans[i], axis.spans[j - 1]
        return x.narrow(axis.dim, first[1], last[1] + last[2] - first[1])

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """One AdamW step of the members `self.active` marks (a boolean tensor [M]; None: all). A
        `closure` (torch's Optimizer interface) is called first for the loss, as torch's AdamW does."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        active = self.active
        alive = tuple(active.tolist()) if active is not None else (True,) * len(self.hyper)
        by_hyper: dict[tuple[float, float], list[list[torch.Tensor]]] = {}
        for h, i, j in self._member_runs(alive):
            lists = by_hyper.setdefault(h, [[], [], [], []])
            for p, m, v, axis in zip(self.params, self.exp_avg, self.exp_avg_sq, self.axes):
                if p.grad is None:
                    continue
                for out, x in zip(lists, (p, p.grad, m, v)):
                    out.append(self._span(x, axis, i, j))
        for (lr, wd), (ps, gs, ms, vs) in by_hyper.items():
            # adamw adds 1 to each; float32 as torch's AdamW keeps it (and Lightning's 64-true default dtype is not)
            # (torch.full: a fill on the device, where torch.tensor would copy from the host, a GPU sync)
            steps = [torch.full((), float(self.t), dtype=torch.float32, device=ps[0].device) for _ in ps]
            # torch's fused kernel assumes dense views: on a strided one (a member's columns, dim 1) it
            # updates the wrong elements (measured: 0.03 off after one step), so those take torch's
            # single-tensor AdamW, the one a solo run uses.
            fused = all(x.is_contiguous() for x in ps + gs + ms + vs)
            adamw(
                ps,
                gs,
                ms,
                vs,
                [],
                steps,
                fused=fused,
                foreach=False,
                amsgrad=False,
                beta1=self.betas[0],
                beta2=self.betas[1],
                lr=lr,
                weight_decay=wd,
                eps=self.eps,
                maximize=False,
            )
        self.t += 1

    def state_dict(self) -> dict:
        return {"t": self.t, "exp_avg": list(self.exp_avg), "exp_avg_sq": list(self.exp_avg_sq)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        for own, saved in zip(self.exp_avg + self.exp_avg_sq, list(state["exp_avg"]) + list(state["exp_avg_sq"])):
            own.copy_(saved)

    def member_state(self, i: int) -> dict:
        return {
            "t": self.t,
            "exp_avg": [a.take(m, i) for a, m in zip(self.axes, self.exp_avg)],
            "exp_avg_sq": [a.take(v, i) for a, v in zip(self.axes, self.exp_avg_sq)],
        }

    @torch.no_grad()
    def load_member_state(self, i: int, state: dict) -> None:
        self.t = int(state["t"])
        for a, own, x in zip(self.axes * 2, self.exp_avg + self.exp_avg_sq, [*state["exp_avg"], *state["exp_avg_sq"]]):
            a.put(own, i, x)


def block_optimizer(block) -> StackedAdamW:
    """The block's AdamW: its parameters and member axes, each member's lr and weight decay."""
    params = list(block.model.parameters())
    axes = block.member_axes() if hasattr(block, "member_axes") else None  # None: stacked, one row per member
    if axes is not None and len(axes) != len(params):
        raise ValueError(f"member_axes() gave {len(axes)} axes for {len(params)} parameters")
    return StackedAdamW(params, block.lr, block.weight_decay, block.betas, block.eps, axes)


def block_step(
    block, opt: StackedAdamW, step: int, active: torch.Tensor | None = None, step_optimizer=None, backward=None
) -> torch.Tensor:
    """One optimizer step of every live member; returns the losses [M] at `step`, detached (read them
    back once per log interval: reading each step would sync a GPU every step). Under Lightning,
    `step_optimizer` and `backward` are harness.training.train's optimizer_step (which counts
    global_step) and backward (Lightning's under DDP); default opt.step and Tensor.backward."""
    losses = block.losses(step)
    for p in opt.params:
        p.grad = None
    # members are independent: each slice gets its own member's gradient
    (backward or torch.Tensor.backward)(losses.sum())
    opt.active = active
    (step_optimizer or opt.step)()
    if hasattr(block, "after_step"):
        block.after_step(active)
    return losses.detach()
