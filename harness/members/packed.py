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
member (`reinit="create_new"`) through harness.training.tracking, and gives each member what `harness train`
gives one run: the step axis (C2), typed events (C3), curves (C4), exit states and resume (C5),
model artifact (C7), nested config and name (C8). A member whose loss is not finite fails alone.
"""

from __future__ import annotations

import contextlib
import functools
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
from torch.optim.adamw import adamw  # torch.optim.AdamW's functional form

from harness.config import results
from harness.config.registry import task_module
from harness.config.run import RunConfig, flatten, load_config, to_dict
from harness.errors import ConfigError, UserError
from harness.training import artifacts, checkpoint, tracking
from harness.training.curves import CurvesRecorder
from harness.training.train import NonFiniteLoss, check_finite

PACKED_CKPT = checkpoint.PACKED  # a member's resume point, in its checkpoint directory


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
        self.view(x, i).copy_(part)


# ---- the optimizer ---------------------------------------------------------------------------------


class StackedAdamW:
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
    def step(self, active: torch.Tensor | None = None) -> None:
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
            steps = [torch.tensor(float(self.t), device=ps[0].device) for _ in ps]  # adamw adds 1 to each
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

    def member_state(self, i: int) -> dict:
        return {
            "t": self.t,
            "exp_avg": [a.take(m, i) for a, m in zip(self.axes, self.exp_avg)],
            "exp_avg_sq": [a.take(v, i) for a, v in zip(self.axes, self.exp_avg_sq)],
        }

    @torch.no_grad()
    def load_member_state(self, i: int, state: dict) -> None:
        self.t = int(state["t"])
        for a, m, x in zip(self.axes, self.exp_avg, state["exp_avg"]):
            a.put(m, i, x)
        for a, v, x in zip(self.axes, self.exp_avg_sq, state["exp_avg_sq"]):
            a.put(v, i, x)


def block_optimizer(block) -> StackedAdamW:
    """The block's AdamW: its parameters and member axes, each member's lr and weight decay."""
    params = list(block.params().values())
    axes = block.member_axes() if hasattr(block, "member_axes") else None  # None: stacked, one row per member
    if axes is not None and len(axes) != len(params):
        raise ValueError(f"member_axes() gave {len(axes)} axes for {len(params)} parameters")
    return StackedAdamW(params, block.lr, block.weight_decay, block.betas, block.eps, axes)


def block_step(block, opt: StackedAdamW, step: int, active: torch.Tensor | None = None) -> torch.Tensor:
    """One optimizer step of every live member; returns the losses [M] at `step`, detached (read them
    back once per log interval: reading each step would sync a GPU every step)."""
    losses = block.losses(step)
    for p in opt.params:
        p.grad = None
    losses.sum().backward()  # members are independent: each slice gets its own member's gradient
    opt.step(active)
    if hasattr(block, "after_step"):
        block.after_step(active)
    return losses.detach()


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
    param_path: str | None = None  # the sweep parameters file (HARNESS_SWEEP_PARAM_PATH of a solo run)
    run: Any = None
    state: str = "running"  # running | finished | failed | preempted
    error: str | None = None
    summary: dict = field(default_factory=dict)
    curves: CurvesRecorder = field(default_factory=CurvesRecorder)
    start_step: int = 0
    resume: dict | None = None  # the loaded packed.pt, matched to this member's config
    before: dict = field(default_factory=dict)  # summary aggregates of the run's part before its resume point

    @property
    def ckpt_path(self) -> str:
        return os.path.join(checkpoint.ckpt_dir(self.cfg, self.run.id), PACKED_CKPT)


@contextlib.contextmanager
def _as_solo_run(member: Member):
    """Open member i's run with the environment a solo run of a local sweep has: WANDB_RUN_ID (also in
    wandb's process-wide settings, which wandb.init reads it from) and HARNESS_SWEEP_PARAM_PATH (read
    by harness.training.tracking; not WANDB_SWEEP_PARAM_PATH, which would put every parameter into
    the config a second time as a flat key: harness.sweep.agent.local_sweep_env)."""
    from wandb.sdk import wandb_setup

    settings = wandb_setup.singleton().settings
    values = {"WANDB_RUN_ID": ("run_id", member.run_id), "HARNESS_SWEEP_PARAM_PATH": (None, member.param_path)}
    saved = {env: (os.environ.get(env), getattr(settings, attr) if attr else None) for env, (attr, _) in values.items()}
    for env, (attr, value) in values.items():
        if value:
            os.environ[env] = value
        else:
            os.environ.pop(env, None)
        if attr:
            setattr(settings, attr, value)
    try:
        yield
    finally:
        for env, (attr, _) in values.items():
            before_env, before_setting = saved[env]
            if attr:
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
                raise ConfigError(
                    f"packed members differ in {k} ({first.get(k)!r} vs {v!r}); task {task} "
                    f"packs only members that differ in {', '.join(keys)}"
                )
    t = cfgs[0].trainer
    if t.devices != 1:
        raise ConfigError(f"trainer.devices={t.devices}: a packed block runs in one process on one device")


def solo_resume_point(cfg: RunConfig, run_id: str | None) -> str | None:
    """A member's `last.ckpt` when it was preempted as a solo run (and has no packed.pt since)."""
    if not run_id:
        return None
    directory = checkpoint.ckpt_dir(cfg, run_id)
    if os.path.isfile(os.path.join(directory, PACKED_CKPT)):
        return None
    return checkpoint.resume_path(directory)


def packed_resume_point(cfg: RunConfig, run_id: str | None) -> str | None:
    """A run's `packed.pt` when it was preempted inside a block and has no solo `last.ckpt` since:
    `harness train` then resumes it as a block of one (issue 18 point 7)."""
    if not run_id:
        return None
    directory = checkpoint.ckpt_dir(cfg, run_id)
    path = os.path.join(directory, PACKED_CKPT)
    return path if os.path.isfile(path) and checkpoint.resume_path(directory) is None else None


def packed_resume(cfg: RunConfig, run_id: str | None) -> dict | None:
    """The packed.pt state this member resumes from, or None for a fresh start, after the checks a
    solo run gets (harness.training.checkpoint.resume_point): a finished run id, or a resume point of
    another run config, is ResumeRefused (one line, before any W&B run); trainer.resume=never starts
    the id again from step 0, removing what it left."""
    checkpoint.resume_point(cfg, run_id)  # refuses a finished id or a foreign last.ckpt; `never` clears
    path = packed_resume_point(cfg, run_id)
    if path is None:
        return None
    state = checkpoint.load(path, f"packed resume point of run {run_id}")
    checkpoint.check_config(state.get("config"), cfg, run_id, path)
    return state


def _train_solo(member: Member) -> None:
    """A member whose resume point is a solo run's last.ckpt continues as that solo run (Lightning's
    resume), with the environment a solo run of the sweep has; its outcome is recorded as a member's."""
    from harness.training.train import train

    with _as_solo_run(member):
        try:
            member.summary = train(member.cfg, member.overrides) or {}
            member.state = "finished"
        except checkpoint.Preempted:
            member.state = "preempted"
        except (NonFiniteLoss, UserError) as e:  # a refused resume point fails this member alone
            member.state, member.error = "failed", str(e)


def train_packed(members: list[Member]) -> list[Member]:
    """Train the members as one block; every member ends finished, failed or preempted (its W&B run
    finished with exit code 0, 1 or 143). Members resumed at different steps are trained as separate
    blocks, one after the other; a member whose resume point is a solo run's last.ckpt resumes as
    that solo run. Returns the members; wandb has written every run file on return."""
    check_members([m.cfg for m in members])
    for m in members:
        if solo_resume_point(m.cfg, m.run_id):
            _train_solo(m)
            continue
        try:
            m.resume = packed_resume(m.cfg, m.run_id)
        except UserError as e:  # this member's id is refused (finished, another config): it fails alone
            m.state, m.error = "failed", str(e)
    members_left = [m for m in members if m.state == "running"]
    if members_left:
        _train_blocks(members_left)
    return members


def _train_blocks(members: list[Member]) -> None:
    try:
        for m in members:
            _open_run(m)
            if m.resume is not None:
                m.start_step = int(m.resume["step"])
                m.before = m.resume.get("summary") or {}
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
        wandb.teardown()  # returns once every run file has its exit record (see harness.training.train._finish)


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
    opt = block_optimizer(block)
    params, axes = opt.params, opt.axes
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
                    fail(
                        i,
                        f"train/loss={v} at step {s}: the loss is not finite (learning rate or init "
                        "scale too large, or a precision overflow?)",
                    )
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
        state = {
            "step": at,
            "params": [a.take(p, i) for p, a in zip(params, axes)],
            "optimizer": opt.member_state(i),
            "block": block.member_state(i),
            "curves": m.curves.state_dict(),
            "task": m.cfg.task,
            "config": checkpoint.identity(m.cfg),  # whose resume point this is (packed_resume checks it)
            "summary": checkpoint.merge_summaries(m.before, checkpoint.summaries(m.run)),  # best values so far
        }
        torch.save(state, m.ckpt_path + ".tmp")  # renamed into place: a kill mid-write leaves the old one
        os.replace(m.ckpt_path + ".tmp", m.ckpt_path)

    if step == 0:  # the step-0 evaluation, as harness.training.evaluation.EvalAtStart gives a solo run (not on resume)
        evaluate_members()
    while step < t.steps and any(alive):
        if sigterm.set:
            sync_losses()
            for i, m in enumerate(members):
                if alive[i]:
                    save(i, step)
                    alive[i] = False
                    _restore_summaries(m)
                    _end(m, "preempted", checkpoint.PREEMPTED_EXIT)
            return
        pending.append((step, block_step(block, opt, step, active)))
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
            m.run.summary["model/artifact"] = artifacts.save_model(
                m.run, SimpleNamespace(model=block.member_model(i)), m.cfg, step
            )
        _restore_summaries(m)
        _end(m, "finished", 0)
        checkpoint.mark_finished(m.cfg, m.run_id, step)


def _restore_summaries(m: Member) -> None:
    """W&B computes a resumed run's aggregates (val/loss min, ...) over its new part only: merge the
    earlier part's, carried in packed.pt, as harness.training.checkpoint.StepCheckpoint does for a solo run."""
    if m.before:
        m.run.summary.update(checkpoint.merge_summaries(m.before, checkpoint.summaries(m.run)))


# ---- the command -----------------------------------------------------------------------------------


def members_from_spec(spec: dict) -> list[Member]:
    """A block file (written by harness.sweep.packed_agent): {"members": [{"overrides": [...], "run_id": ...,
    "param_path": ...}, ...]}; every config is validated before any run starts."""
    members = []
    for i, entry in enumerate(spec["members"]):
        overrides = list(entry["overrides"])
        members.append(
            Member(i, load_config(tuple(overrides)), overrides, entry.get("run_id"), entry.get("param_path"))
        )
    return members


def run_spec(path: str) -> int:
    """`harness train-packed BLOCK.json`: train the block, write each member's outcome to the block's
    `results` file (JSON: run id -> state, exit code, summary) and print one JSON line per member.
    Exit status: 0 all finished, 143 preempted by SIGTERM, 1 a member failed."""
    with open(path) as f:
        spec = json.load(f)
    return run_members(members_from_spec(spec), spec.get("results"))


def run_members(members: list[Member], results_path: str | None = None) -> int:
    """Train the members, write their outcomes to `results_path` (if given), print one JSON line per
    member; the exit status of run_spec."""
    try:
        train_packed(members)
    finally:
        results.write_results(
            results_path, {m.run_id: results.entry(m.state, m.summary, m.error) for m in members if m.run_id}
        )
    for m in members:
        print(tracking.result_line({"_run_id": m.run_id, "_state": m.state, **m.summary}), flush=True)
    if any(m.state == "preempted" for m in members):
        return checkpoint.PREEMPTED_EXIT
    return 0 if all(m.state == "finished" for m in members) else 1
