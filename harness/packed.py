"""Packed runs (issue 14): M small runs of one sweep trained as one stacked model in one process,
each still its own W&B run that nobody downstream can tell from a solo run.

A task that packs declares `PACKABLE` (the keys whose values may differ between members; every
other key must be equal) and `build_packed(cfgs) -> block`, where a block holds the members'
parameters stacked along a leading dimension and offers:

    params() -> {name: Tensor [M, ...]}   leaves with requires_grad, updated in place
    lr, weight_decay -> Tensor [M]        float64; betas (b1, b2) and eps are shared floats
    losses(step) -> Tensor [M]            each member's training loss at optimizer step `step`
    train_loss_key -> str | None          history key of the training loss (None: not logged)
    evaluate(i, step) -> (metrics, arrays) member i's evaluation, as its solo run computes it; the
                                          block updates member i's event detectors itself
    static_summary(i), final_summary(i, run, seconds, cpu, steps) -> dict
    member_model(i) -> nn.Module          member i's weights as the solo model (model artifact, C7)
    member_state(i) / load_member_state(i, state)   event detectors etc. for checkpoints

and optionally:

    member_axes() -> [MemberAxis]         one per params() entry: which slices of a parameter belong to
                                          which member. Default: the leading dimension, one row per
                                          member. A block whose members share a concatenated layer
                                          (sparse parity's width packing) says which rows are whose.
    after_step(active)                    called after every optimizer step (e.g. a fixed-norm projection);
                                          `active` is None (all members) or a boolean mask [M]
    resolve_config(i)                     settle member i's config values its solo build resolves
                                          (Omnigrok's data.split=auto), called with its sweep
                                          parameters in the environment; its run config is logged again

This module runs the loop (one backward for all members, StackedAdamW), opens one W&B run per
member (`reinit="create_new"`) through harness.tracking, and gives each member what `harness train`
gives one run: the step axis (C2), typed events (C3), curves (C4), exit states and resume (C5),
model artifact (C7), nested config and name (C8). A member whose loss is not finite fails alone.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import wandb

from harness import checkpoint, tracking
from harness.callbacks import CurvesRecorder
from harness.config import ConfigError, RunConfig, flatten, load_config, task_module, to_dict
from harness.train import NonFiniteLoss, check_finite

PACKED_CKPT = "packed.pt"  # a member's resume point, in its checkpoint directory (beside a solo last.ckpt)


# ---- which parts of a parameter are whose ----------------------------------------------------------

@dataclass
class MemberAxis:
    """Along dimension `dim`, position j of a packed parameter belongs to member `owner[j]`.

    Stacked parameters ([M, ...]) have dim 0 and owner arange(M); a hidden layer concatenated over
    members of widths w_1..w_M has owner repeat_interleave(arange(M), widths)."""
    dim: int
    owner: torch.Tensor  # int64 [size of dim]

    @classmethod
    def stacked(cls, n_members: int) -> "MemberAxis":
        return cls(0, torch.arange(n_members))

    def column(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-member values [M] spread along `dim`, broadcastable to `like` (its dtype and device)."""
        shape = [1] * like.dim()
        shape[self.dim] = -1
        return values[self.owner].to(like.dtype).to(like.device).view(shape)

    def positions(self, i: int) -> torch.Tensor:
        return (self.owner == i).nonzero().flatten()

    def take(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Member i's part of x (a copy)."""
        return x.detach().index_select(self.dim, self.positions(i).to(x.device))

    @torch.no_grad()
    def put(self, x: torch.Tensor, i: int, part: torch.Tensor) -> None:
        x.index_copy_(self.dim, self.positions(i).to(x.device), part.to(x.dtype).to(x.device))


def member_axes(block, params: list[torch.Tensor], n_members: int) -> list[MemberAxis]:
    axes = block.member_axes() if hasattr(block, "member_axes") else [MemberAxis.stacked(n_members)] * len(params)
    if len(axes) != len(params):
        raise ValueError(f"member_axes() gave {len(axes)} axes for {len(params)} parameters")
    return axes


# ---- the optimizer ---------------------------------------------------------------------------------

class StackedAdamW:
    """torch.optim.AdamW for parameters stacked along a leading member dimension M, with a learning
    rate and weight decay per member (tensors [M]) and shared betas and eps.

    The update is torch's single-tensor AdamW op for op (decay, lerp of the first moment, addcmul of
    the second, bias corrections in double precision, (step_size * m) / denom); per-member scalars
    are computed in float64 and rounded once to the parameter dtype, as torch rounds its Python
    scalars. `step(active)` leaves members outside the boolean mask `active` untouched (parameters
    and moments): a failed member is frozen while the others go on. All members share one step
    count: a block only ever holds members at the same step (harness.packed.train_packed).
    """

    def __init__(self, params: list[torch.Tensor], lr: torch.Tensor, weight_decay: torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 axes: list[MemberAxis] | None = None):
        self.params = list(params)
        self.axes = axes or [MemberAxis.stacked(len(lr))] * len(self.params)
        if lr.dtype != torch.float64 or weight_decay.dtype != torch.float64:
            # 0.1 held in float32 is 0.1000000015: the members would train with another rate than asked
            raise TypeError("StackedAdamW: lr and weight_decay must be float64 tensors (built from Python floats)")
        self.lr, self.wd = lr.cpu(), weight_decay.cpu()
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.t = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self._decay = self._column(1 - self.lr * self.wd)

    def _column(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-member float64 values spread along each parameter's member axis, in its dtype and device."""
        return [axis.column(values, p) for axis, p in zip(self.axes, self.params)]

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        self.t += 1
        bc1 = 1 - self.beta1 ** self.t
        bc2_sqrt = math.sqrt(1 - self.beta2 ** self.t)
        step_size = self._column(self.lr / bc1)
        for i, (p, m, v) in enumerate(zip(self.params, self.exp_avg, self.exp_avg_sq)):
            g = p.grad
            if active is None:
                p.mul_(self._decay[i])
                m.lerp_(g, 1 - self.beta1)
                v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
                p.sub_(step_size[i] * m / denom)
            else:
                keep = self.axes[i].column(active.cpu(), p).bool()
                m_new = m.lerp(g, 1 - self.beta1)
                v_new = (v * self.beta2).addcmul_(g, g, value=1 - self.beta2)
                denom = (v_new.sqrt() / bc2_sqrt).add_(self.eps)
                p_new = p * self._decay[i] - step_size[i] * m_new / denom
                p.copy_(torch.where(keep, p_new, p))
                m.copy_(torch.where(keep, m_new, m))
                v.copy_(torch.where(keep, v_new, v))

    def member_state(self, i: int) -> dict:
        return {"t": self.t, "exp_avg": [a.take(m, i) for a, m in zip(self.axes, self.exp_avg)],
                "exp_avg_sq": [a.take(v, i) for a, v in zip(self.axes, self.exp_avg_sq)]}

    @torch.no_grad()
    def load_member_state(self, i: int, state: dict) -> None:
        self.t = int(state["t"])
        for a, m, x in zip(self.axes, self.exp_avg, state["exp_avg"]):
            a.put(m, i, x)
        for a, v, x in zip(self.axes, self.exp_avg_sq, state["exp_avg_sq"]):
            a.put(v, i, x)


# ---- packing rules ---------------------------------------------------------------------------------

def packable_keys(task: str) -> tuple[str, ...] | None:
    """The keys a task lets differ between members, or None if the task does not pack."""
    module = task_module(task)
    return tuple(module.PACKABLE) if hasattr(module, "build_packed") and hasattr(module, "PACKABLE") else None


def pack_signature(task: str, params: dict) -> str:
    """Grid points with equal signatures may share a packed process: equal task and equal values of
    every key the task does not declare packable."""
    keys = packable_keys(task) or ()
    fixed = {k: v for k, v in flatten(params).items() if k not in keys}
    return json.dumps(fixed, sort_keys=True, default=str)


# ---- members ---------------------------------------------------------------------------------------

@dataclass
class Member:
    index: int
    cfg: RunConfig
    overrides: list[str]
    run_id: str | None = None
    param_path: str | None = None  # the sweep parameters file (WANDB_SWEEP_PARAM_PATH of a solo run)
    run: Any = None
    state: str = "running"  # running | finished | failed | preempted
    error: str | None = None
    summary: dict = field(default_factory=dict)
    curves: CurvesRecorder = field(default_factory=CurvesRecorder)
    start_step: int = 0
    resume: dict | None = None  # the loaded checkpoint

    @property
    def ckpt_path(self) -> str:
        return os.path.join(checkpoint.ckpt_dir(self.cfg, self.run.id), PACKED_CKPT)


@contextlib.contextmanager
def _as_solo_run(member: "Member"):
    """Open member i's run with the environment a solo run of the sweep has: WANDB_RUN_ID and
    WANDB_SWEEP_PARAM_PATH (read by harness.tracking), and the same two in wandb's process-wide
    settings, which wandb.init reads them from: under a sweep it ignores an `id` argument (the agent's
    WANDB_RUN_ID wins) and puts the sweep parameters file into run.config, as for a `wandb agent` run."""
    from wandb.sdk import wandb_setup

    settings = wandb_setup.singleton().settings
    values = {"WANDB_RUN_ID": ("run_id", member.run_id), "WANDB_SWEEP_PARAM_PATH": ("sweep_param_path", member.param_path)}
    saved = {env: (os.environ.get(env), getattr(settings, attr)) for env, (attr, _) in values.items()}
    for env, (attr, value) in values.items():
        if value:
            os.environ[env] = value
        else:
            os.environ.pop(env, None)
        setattr(settings, attr, value)
    try:
        yield
    finally:
        for env, (attr, _) in values.items():
            before_env, before_setting = saved[env]
            setattr(settings, attr, before_setting)
            if before_env is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = before_env


def _open_run(member: Member) -> None:
    with _as_solo_run(member):
        kwargs: dict[str, Any] = {"reinit": "create_new"}
        if member.run_id:
            kwargs["id"] = member.run_id
        member.run = tracking.init_run(member.cfg, member.overrides, job_type="train", **kwargs)
    tracking.define_metrics(member.run)
    if member.run_id and member.run.id != member.run_id:  # never log a member into another run
        raise RuntimeError(f"wandb opened run {member.run.id} for member run id {member.run_id}")
    member.run_id = member.run.id


def _end(member: Member, state: str, exit_code: int, error: str | None = None) -> None:
    member.state, member.error = state, error
    if error:
        member.run.summary["error"] = error
    if state == "preempted":
        member.run.mark_preempting()
    member.summary = tracking.summary_dict(member.run)
    member.run.finish(exit_code=exit_code)


# ---- the loop --------------------------------------------------------------------------------------

class _Sigterm:
    """SIGTERM sets a flag the loop reads between steps (as Lightning's handler does for a solo run)."""

    def __init__(self):
        self.set = False
        self.previous = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def check_members(cfgs: list[RunConfig]) -> None:
    """One line before any run starts when the configs cannot share a packed process."""
    if not cfgs:
        raise ConfigError("a packed block needs at least one member")
    task = cfgs[0].task
    keys = packable_keys(task)
    if keys is None:
        raise ConfigError(f"task {task} does not pack (it declares no PACKABLE keys and no build_packed)")
    first = flatten(to_dict(cfgs[0]))
    for cfg in cfgs[1:]:
        if cfg.task != task:
            raise ConfigError(f"packed members of different tasks ({task}, {cfg.task}): a block holds one task")
        for k, v in flatten(to_dict(cfg)).items():
            if k not in keys and k != "wandb.name" and first.get(k) != v:
                raise ConfigError(f"packed members differ in {k} ({first.get(k)!r} vs {v!r}); task {task} "
                                  f"packs only members that differ in {', '.join(keys)}")
    t = cfgs[0].trainer
    if t.devices != 1:
        raise ConfigError(f"trainer.devices={t.devices}: a packed block runs in one process on one device")


def train_packed(members: list[Member]) -> list[Member]:
    """Train the members as one block; every member ends finished, failed or preempted (its W&B run
    finished with exit code 0, 1 or 143). Members resumed at different steps are trained as separate
    blocks, one after the other. Returns the members; wandb has written every run file on return."""
    check_members([m.cfg for m in members])
    try:
        for m in members:
            _open_run(m)
            path = m.ckpt_path
            if os.path.isfile(path):
                m.resume = torch.load(path, map_location="cpu", weights_only=False)
                m.start_step = int(m.resume["step"])
                m.run.summary["trainer/resumed_from_step"] = m.start_step
        groups: dict[int, list[Member]] = {}
        for m in members:
            groups.setdefault(m.start_step, []).append(m)
        with _Sigterm() as sigterm:
            for group in groups.values():
                _train_group(group, sigterm)
    except BaseException as e:
        for m in members:
            if m.run is not None and m.state == "running":
                _end(m, "failed", 1, f"{type(e).__name__}: {e}")
        raise
    finally:
        wandb.teardown()  # returns once every run file has its exit record (see harness.train._finish)
    return members


def _train_group(members: list[Member], sigterm: _Sigterm) -> None:
    cfgs = [m.cfg for m in members]
    cfg0, t = cfgs[0], cfgs[0].trainer
    # trainer.threads is one run's share of the CPUs; a block holds many runs, so it takes the threads
    # the controller gives the process (OMP_NUM_THREADS = available CPUs / --workers) instead.
    if sigterm.set:
        for m in members:
            _end(m, "preempted", checkpoint.PREEMPTED_EXIT)
        return
    block = task_module(cfg0.task).build_packed(cfgs)
    if hasattr(block, "resolve_config"):  # a build that resolves config values (Omnigrok's data.split=auto)
        for i, m in enumerate(members):
            with _as_solo_run(m):  # the member's sweep parameters decide, as in its solo run's build
                block.resolve_config(i)
                m.run.config.update(tracking.run_config(m.cfg), allow_val_change=True)
    params = list(block.params().values())
    axes = member_axes(block, params, len(members))
    opt = StackedAdamW(params, block.lr, block.weight_decay, block.betas, block.eps, axes)
    after_step = getattr(block, "after_step", None)
    for i, m in enumerate(members):
        m.run.summary.update(block.static_summary(i))
        if m.resume is not None:
            for p, a, x in zip(params, axes, m.resume["params"]):
                a.put(p, i, x)
            opt.load_member_state(i, m.resume["optimizer"])
            block.load_member_state(i, m.resume["block"])
            m.curves.load_state_dict(m.resume["curves"])
    n = len(members)
    alive = [True] * n
    active: torch.Tensor | None = None  # None while every member is alive (the optimizer's fast path)
    step = members[0].start_step
    pending: list[tuple[int, torch.Tensor]] = []
    t0, cpu0, step0 = time.perf_counter(), time.process_time(), step

    def fail(i: int, message: str) -> None:
        nonlocal active
        alive[i] = False
        active = torch.tensor(alive, device=params[0].device)
        _end(members[i], "failed", 1, message)

    def sync_losses() -> None:
        # One device sync per evaluation or log interval, never one per step.
        if not pending:
            return
        values = torch.stack([x for _, x in pending]).tolist()
        for (s, _), row in zip(pending, values):
            for i, v in enumerate(row):
                if not alive[i]:
                    continue
                if not math.isfinite(v):
                    fail(i, f"train/loss={v} at step {s}: the loss is not finite (learning rate or init "
                            "scale too large, or a precision overflow?)")
                elif block.train_loss_key and s % t.log_every == 0:
                    members[i].run.log({block.train_loss_key: v, "trainer/global_step": s})
        pending.clear()

    def evaluate_members() -> None:
        for i, m in enumerate(members):
            if not alive[i]:
                continue
            metrics, arrays = block.evaluate(i, step)
            try:
                check_finite(metrics, step)
            except NonFiniteLoss as e:
                fail(i, str(e))
                continue
            m.run.log({**metrics, "trainer/global_step": step})
            if arrays:
                m.curves.add(step, arrays)

    def save(i: int, at: int) -> None:
        m = members[i]
        os.makedirs(os.path.dirname(m.ckpt_path), exist_ok=True)
        state = {"step": at, "params": [a.take(p, i) for p, a in zip(params, axes)],
                 "optimizer": opt.member_state(i), "block": block.member_state(i),
                 "curves": m.curves.state_dict(), "task": m.cfg.task}
        torch.save(state, m.ckpt_path + ".tmp")  # renamed into place: a kill mid-write leaves the old one
        os.replace(m.ckpt_path + ".tmp", m.ckpt_path)

    if step == 0:  # the step-0 evaluation, as harness.callbacks.EvalAtStart gives a solo run (not on resume)
        evaluate_members()
    while step < t.steps and any(alive):
        if sigterm.set:
            sync_losses()
            for i, m in enumerate(members):
                if alive[i]:
                    save(i, step)
                    alive[i] = False
                    _end(m, "preempted", checkpoint.PREEMPTED_EXIT)
            return
        losses = block.losses(step)
        for p in params:
            p.grad = None
        losses.sum().backward()  # members are independent: each slice gets its own member's gradient
        opt.step(active)
        if after_step is not None:
            after_step(active)
        pending.append((step, losses.detach()))
        step += 1
        evaluate = step % t.eval_every == 0 or step == t.steps
        if evaluate or step % t.log_every == 0:
            sync_losses()
        if evaluate:
            evaluate_members()
        if t.ckpt_every and step % t.ckpt_every == 0 and step < t.steps:
            for i in range(n):
                if alive[i]:
                    save(i, step)
    sync_losses()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for i, m in enumerate(members):
        if not alive[i]:
            continue
        m.run.summary.update(block.final_summary(i, m.run, seconds, cpu, step - step0))
        m.curves.write(m.run)
        if getattr(getattr(m.cfg, "model", None), "save", False):
            m.run.summary["model/artifact"] = checkpoint.save_model(
                m.run, SimpleNamespace(model=block.member_model(i)), m.cfg, step)
        _end(m, "finished", 0)


# ---- the command -----------------------------------------------------------------------------------

def members_from_spec(spec: dict) -> list[Member]:
    """A block file (written by harness.packed_agent): {"members": [{"overrides": [...], "run_id": ...,
    "param_path": ...}, ...]}; every config is validated before any run starts."""
    members = []
    for i, entry in enumerate(spec["members"]):
        overrides = list(entry["overrides"])
        members.append(Member(i, load_config(tuple(overrides)), overrides, entry.get("run_id"),
                              entry.get("param_path")))
    return members


def run_spec(path: str) -> int:
    """`harness train-packed BLOCK.json`: train the block, write each member's outcome to the block's
    `results` file (JSON: run id -> state, exit code, summary) and print one JSON line per member.
    Exit status: 0 all finished, 143 preempted by SIGTERM, 1 a member failed."""
    with open(path) as f:
        spec = json.load(f)
    members = members_from_spec(spec)
    try:
        train_packed(members)
    finally:
        results = {m.run_id: {"state": m.state, "exitcode": {"finished": 0, "preempted": 143}.get(m.state, 1),
                              "summary": m.summary, "error": m.error} for m in members if m.run_id}
        if spec.get("results"):
            tmp = spec["results"] + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, default=str)
            os.replace(tmp, spec["results"])
    from harness.cli import _json_safe

    for m in members:
        print(json.dumps(_json_safe({"_run_id": m.run_id, "_state": m.state, **m.summary}), default=str,
                         allow_nan=False), flush=True)
    if any(m.state == "preempted" for m in members):
        return checkpoint.PREEMPTED_EXIT
    return 0 if all(m.state == "finished" for m in members) else 1
