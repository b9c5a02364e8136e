"""A packed member's resume point is a solo run's: `last.ckpt` in its checkpoint directory, Lightning's
checkpoint with the member's weights, its torch AdamW state and its callbacks' states, cut from the
block's checkpoint (`member_checkpoint`). A block resumes from its members' `last.ckpt`, written in a
block or by a solo run alike (`load_member`, then `block_checkpoint` for Lightning's own resume)."""

from __future__ import annotations

import os

import torch

from harness.training import checkpoint
from harness.training.checkpoint import StepCheckpoint

PREFIX = "model."  # a task module holds its model as `self.model` and nothing else persistent


def _adamw_template(model: torch.nn.Module, lr: float, weight_decay: float, betas, eps: float) -> dict:
    """The param_groups a solo run's torch.optim.AdamW records (torch restores a group's settings from them)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps).state_dict()


def member_checkpoint(block_ckpt: dict, module, i: int, callbacks: dict) -> dict:
    """Member i's Lightning checkpoint, as its solo run writes it, from the block's (`block_ckpt`, which
    Lightning's dump gave BlockModule.on_save_checkpoint): the same loops and step, the member's model
    state (its solo keys and shapes), its AdamW state in torch's format, and `callbacks`
    ({state_key: state} of its callbacks)."""
    block, opt = module.block, module.opt
    model = block.member_model(i)
    names = list(block.params())
    sd = model.state_dict()
    adamw = _adamw_template(model, float(block.lr[i]), float(block.weight_decay[i]), block.betas, block.eps)
    if opt.t:
        for k, (name, p) in enumerate(model.named_parameters()):
            j = names.index(name)
            adamw["state"][k] = {
                "step": torch.tensor(float(opt.t), dtype=torch.float32),
                "exp_avg": opt.axes[j].take(opt.exp_avg[j], i).reshape(p.shape),
                "exp_avg_sq": opt.axes[j].take(opt.exp_avg_sq[j], i).reshape(p.shape),
            }
    out = {k: v for k, v in block_ckpt.items() if k not in ("state_dict", "optimizer_states", "callbacks")}
    out["state_dict"] = {PREFIX + k: v.detach().clone() for k, v in sd.items()}
    out["optimizer_states"] = [adamw]
    out["callbacks"] = callbacks
    return out


@torch.no_grad()
def load_member(module, i: int, ckpt: dict) -> None:
    """Member i's weights and AdamW moments from its Lightning checkpoint `ckpt` into the block."""
    block, opt = module.block, module.opt
    params = list(block.params().items())
    sd = ckpt["state_dict"]
    moments = ckpt["optimizer_states"][0].get("state", {})
    for k, (name, p) in enumerate(params):
        view = opt.axes[k].view(p, i)
        view.copy_(sd[PREFIX + name].reshape(view.shape))
        if k in moments:
            opt.axes[k].view(opt.exp_avg[k], i).copy_(moments[k]["exp_avg"].reshape(view.shape))
            opt.axes[k].view(opt.exp_avg_sq[k], i).copy_(moments[k]["exp_avg_sq"].reshape(view.shape))
    opt.t = int(ckpt["global_step"])


def block_checkpoint(module, base: dict) -> dict:
    """The block's Lightning checkpoint, once its members are loaded (`load_member`): `base` (a member's
    checkpoint: the loops and the step, which its members share) with the block's weights and optimizer."""
    out = {k: v for k, v in base.items() if k not in ("state_dict", "optimizer_states", "callbacks")}
    out["state_dict"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    out["optimizer_states"] = [module.opt.state_dict()]
    out["callbacks"] = {}
    return out


class BlockCheckpoint(StepCheckpoint):
    """StepCheckpoint's cadence and SIGTERM save for a block: Lightning dumps the block's checkpoint
    (into a temporary file, removed again) and every live member gets its own `last.ckpt`, cut from it,
    with what its solo run's StepCheckpoint records (its run config, its summary aggregates)."""

    def __init__(self, module, every: int, eval_every: int):
        super().__init__("", every, eval_every)
        self.module = module

    def state_dict(self) -> dict:
        return {}

    def save(self, trainer) -> None:
        module = self.module
        live = [m for m, ok in zip(module.members, module.alive) if ok]
        if not live:
            return
        for m in live:
            os.makedirs(os.path.dirname(m.ckpt_path), exist_ok=True)
        scratch = os.path.join(os.path.dirname(live[0].ckpt_path), "block.ckpt.tmp")
        trainer.save_checkpoint(scratch)  # BlockModule.on_save_checkpoint keeps the dict Lightning dumped
        os.remove(scratch)
        block_ckpt = module.saved_checkpoint
        for i, m in enumerate(module.members):
            if not module.alive[i]:  # (also one that failed at the losses read before the dump)
                continue
            states = {cb.state_key: cb.state_dict() for cb in [m.curves, *module.block.member_callbacks(i)]}
            states[StepCheckpoint.__qualname__] = {
                "config": m.identity,
                "summary": checkpoint.merge_summaries(m.before, checkpoint.summaries(m.run)),
            }
            torch.save(member_checkpoint(block_ckpt, module, i, states), m.ckpt_path + ".tmp")
            os.replace(m.ckpt_path + ".tmp", m.ckpt_path)  # a kill mid-write leaves the old one
        module.saved_checkpoint = None
        self.saved_step = trainer.global_step
