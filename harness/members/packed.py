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

This module runs the loop (one backward for all members, harness.members.optim.StackedAdamW), opens one W&B run per
member (`reinit="create_new"`) through harness.training.tracking, and gives each member what `harness train`
gives one run: the step axis (C2), typed events (C3), curves (C4), exit states and resume (C5),
model artifact (C7), nested config and name (C8). A member whose loss is not finite fails alone.
"""

import json
import math
import os
import signal
import time
from types import SimpleNamespace

import torch
import wandb

from harness.config import results
from harness.config.registry import task_module
from harness.config.run import RunConfig, load_config
from harness.errors import UserError
from harness.members.optim import block_optimizer, block_step
from harness.members.rules import check_members
from harness.members.runs import PACKED_CKPT, Member, as_solo_run, end_run, open_run, restore_summaries
from harness.training import artifacts, checkpoint, tracking
from harness.training.train import NonFiniteLoss, check_finite

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

    with as_solo_run(member):
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
            open_run(m)
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
                end_run(m, "failed", 1, f"{type(e).__name__}: {e}")
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
            end_run(m, "preempted", checkpoint.PREEMPTED_EXIT)
        return
    block = task_module(cfg0.task).build_packed(cfgs)
    if hasattr(block, "resolve_config"):  # a build that resolves config values (Omnigrok's data.split=auto)
        for i, m in enumerate(members):
            with as_solo_run(m):  # the member's sweep parameters decide, as in its solo run's build
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
        end_run(members[i], "failed", 1, message)

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
                    restore_summaries(m)
                    end_run(m, "preempted", checkpoint.PREEMPTED_EXIT)
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
        restore_summaries(m)
        end_run(m, "finished", 0)
        checkpoint.mark_finished(m.cfg, m.run_id, step)


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
