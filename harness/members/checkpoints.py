"""The one checkpoint format, a member's: `last.ckpt` in its run's checkpoint directory, Lightning's
checkpoint with the member's weights (its model of one), its torch AdamW state and its callbacks'
states, cut from its block's checkpoint (`member_checkpoint`): a solo run (a block of one) writes it in place, a packed
block one per member (BlockCheckpoint). Either resumes from its members' `last.ckpt`, written in a
block or by a solo run alike (`load_member`, then `block_checkpoint` for Lightning's own resume:
harness.members.module.BlockModule.on_load_checkpoint)."""

from __future__ import annotations

import os

import torch

from harness.training import checkpoint
from harness.training.checkpoint import StepCheckpoint

PREFIX = "model."  # BlockModule holds the block's model as `self.model` and nothing else persistent


def _adamw_template(model: torch.nn.Module, lr: float, weight_decay: float, betas, eps: float) -> dict:
    """The param_groups torch.optim.AdamW records for a member's model (torch restores a group's settings
    from them): the member format's optimizer state is torch's."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps).state_dict()


def _with_training_state(base: dict, state_dict: dict, optimizer_state: dict, callbacks: dict) -> dict:
    """The Lightning checkpoint `base` (its loops, its step, Lightning's version) holding another
    module's weights, optimizer state and callback states."""
    out = {k: v for k, v in base.items() if k not in ("state_dict", "optimizer_states", "callbacks")}
    return {**out, "state_dict": state_dict, "optimizer_states": [optimizer_state], "callbacks": callbacks}


def _callbacks(module, i: int) -> list:
    """Member i's callbacks whose states its last.ckpt holds, as its solo run's checkpoint does."""
    return [module.members[i].curves, *module.block.member_callbacks(i)]


def member_checkpoint(block_ckpt: dict, module, i: int, keep_callbacks: bool = False) -> dict:
    """Member i's Lightning checkpoint from the block's (`block_ckpt`, which Lightning's dump gave
    BlockModule.on_save_checkpoint): the same loops and step, the member's model state (its model of one:
    keys and shapes), its AdamW state in torch's format, its callbacks' states and what its
    StepCheckpoint records (its run config, its summary aggregates; `keep_callbacks`: the states of the
    block's own callbacks, a solo run's StepCheckpoint among them, are kept instead). A weights-only
    checkpoint (a model artifact) gets the member's weights alone."""
    member, block, opt = module.members[i], module.block, module.opt
    model = block.member_model(i)  # its weights of its own (a copy): saved as they are
    state_dict = {PREFIX + k: v for k, v in model.state_dict().items()}
    if "optimizer_states" not in block_ckpt:
        return {**block_ckpt, "state_dict": state_dict}
    moments = opt.member_state(i)  # per block parameter, in the model's parameter order
    by_name = dict(zip(dict(block.model.named_parameters()), zip(moments["exp_avg"], moments["exp_avg_sq"])))
    adamw = _adamw_template(model, float(block.lr[i]), float(block.weight_decay[i]), block.betas, block.eps)
    if opt.t:  # torch's AdamW has no state before its first step; its index k is the k-th parameter
        for k, (name, p) in enumerate(model.named_parameters()):
            m, v = by_name[name]
            step = torch.tensor(float(opt.t), dtype=torch.float32)
            adamw["state"][k] = {"step": step, "exp_avg": m.reshape(p.shape), "exp_avg_sq": v.reshape(p.shape)}
    callbacks = {cb.state_key: cb.state_dict() for cb in _callbacks(module, i)}
    if keep_callbacks:
        callbacks = {**block_ckpt.get("callbacks", {}), **callbacks}
    else:
        callbacks[StepCheckpoint.__qualname__] = checkpoint.record(member.identity, member.before, member.run)
    return _with_training_state(block_ckpt, state_dict, adamw, callbacks)


def load_member(module, i: int, ckpt: dict) -> None:
    """Member i's weights, AdamW moments (matched by parameter name) and callback states from its
    Lightning checkpoint `ckpt` (a member's or a solo run's) into the block; the summary aggregates
    its StepCheckpoint recorded become the member's `before`."""
    block, opt = module.block, module.opt
    solo_order = [name for name, _ in block.member_model(i).named_parameters()]  # its AdamW's indices
    saved = ckpt["optimizer_states"][0].get("state", {})
    exp_avg, exp_avg_sq = [], []
    for (name, p), axis in zip(block.model.named_parameters(), opt.axes):
        axis.put(p, i, ckpt["state_dict"][PREFIX + name])
        state = saved.get(solo_order.index(name))
        zero = torch.zeros_like(axis.view(p, i))
        exp_avg.append(state["exp_avg"] if state else zero)
        exp_avg_sq.append(state["exp_avg_sq"] if state else zero)
    # AdamW's own step count (a step skipped by 16-mixed loss scaling counts for Lightning, not for it)
    t = int(next(iter(saved.values()))["step"]) if saved else int(ckpt["global_step"])
    opt.load_member_state(i, {"t": t, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq})
    states = ckpt.get("callbacks") or {}
    for cb in _callbacks(module, i):
        if cb.state_key in states:
            cb.load_state_dict(states[cb.state_key])
    module.members[i].before = (states.get(StepCheckpoint.__qualname__) or {}).get("summary") or {}


def block_checkpoint(module, base: dict) -> dict:
    """The block's Lightning checkpoint, once its members are loaded (`load_member`): `base` (a member's
    checkpoint: the loops, the step, which its members share, and its callbacks' states, among them a
    solo run's own) with the block's weights and optimizer."""
    state_dict = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return _with_training_state(base, state_dict, module.opt.state_dict(), base.get("callbacks", {}))


class BlockCheckpoint(StepCheckpoint):
    """StepCheckpoint's cadence and SIGTERM save for a block: Lightning dumps the block's checkpoint
    (into a temporary file, removed again) and every live member gets its own `last.ckpt`, cut from it."""

    def __init__(self, module):
        super().__init__("", module.t)
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
        # Lightning's public way to the block's checkpoint (its loops, its step) writes a file: it goes
        # to a scratch file, removed again; BlockModule.on_save_checkpoint keeps the dict it was made of.
        scratch = os.path.join(os.path.dirname(live[0].ckpt_path), checkpoint.BLOCK_SCRATCH)
        try:
            trainer.save_checkpoint(scratch, weights_only=False)
        finally:
            if os.path.exists(scratch):
                os.remove(scratch)
        block_ckpt = module.saved_checkpoint
        for i, m in enumerate(module.members):
            if not module.alive[i]:  # (also one that failed at the losses read before the dump)
                continue
            torch.save(member_checkpoint(block_ckpt, module, i), m.ckpt_path + ".tmp")
            os.replace(m.ckpt_path + ".tmp", m.ckpt_path)  # a kill mid-write leaves the old one
        module.saved_checkpoint = None
        self.saved_step = trainer.global_step
