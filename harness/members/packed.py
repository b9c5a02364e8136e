"""Packed runs (issue 14): M small runs of one sweep trained as one stacked model in one process,
each still its own W&B run that nobody downstream can tell from a solo run.

A task that trains members declares `PACKABLE` (the keys whose values may differ between members;
every other key must be equal) and `build_block(cfgs) -> block` (its solo `build(cfg)` is
harness.members.module.solo_job of the block of [cfg]), where a block holds the members' parameters
stacked along a leading dimension and offers:

    cfgs -> [RunConfig]                   the members' configs
    model -> nn.Module                    the members' model (the task's make_model with members): its
                                          parameters [M, ...], named as a member's model names them
    lr, weight_decay -> Tensor [M]        float64; betas (b1, b2) and eps are shared floats
    losses(step) -> Tensor [M]            each member's training loss at optimizer step `step`
    train_loss_key -> str | None          history key of the training loss (None: not logged)
    evaluate(i, step) -> (metrics, arrays) member i's evaluation, as its solo run computes it; the
                                          block updates member i's event detectors itself
    static_summary(i), final_summary(i, seconds, cpu, steps) -> dict
    member_model(i) -> nn.Module          member i's weights, copied, as a model of one (model artifact,
                                          C7; its state dict, prefixed `model.`, is its block of one's)
    member_callbacks(i) -> [Callback]     member i's event detectors (their states go into its
                                          last.ckpt under their state keys)
    shard_error() -> str | None           why the members' data cannot be split over DDP ranks (a solo run's)

and optionally:

    member_axes() -> [MemberAxis]         one per model parameter: which slices of a parameter belong to
                                          which member. Default: the leading dimension, one row per
                                          member. A block whose members share a concatenated layer
                                          (sparse parity's width packing) says which rows are whose.
    after_step(active)                    called after every optimizer step (e.g. a fixed-norm projection);
                                          `active` is None (all members) or a boolean mask [M]
    resolve_config(i)                     settle member i's config values its solo build resolves
                                          (Omnigrok's data.split=auto), called with its sweep
                                          parameters in the environment; its run config is logged again

The block trains under Lightning's Trainer, built as a solo run's (harness.training.train.make_trainer:
the step-0 evaluation, the evaluation cadence, SIGTERM, the progress bar), as the LightningModule
harness.members.module.BlockModule. Each member has its W&B run (`reinit="create_new"`, opened through
harness.training.tracking) and gets what `harness train` gives one run: the step axis (C2), typed
events (C3), curves (C4), exit states and resume (C5), model artifact (C7), nested config and name (C8).
Its resume point is a solo run's `last.ckpt` (harness.members.checkpoints), so a member resumes in a
block or alone, and a solo run's resume point resumes in a block. A member whose loss is not finite
fails alone.
"""

import json
import signal
import threading

import lightning as L
import wandb
from lightning.pytorch.utilities.exceptions import SIGTERMException

from harness.config import results
from harness.config.registry import task_module
from harness.config.run import load_config
from harness.errors import UserError
from harness.members.checkpoints import BlockCheckpoint, member_checkpoint
from harness.members.module import BlockData, BlockModule
from harness.members.rules import check_members
from harness.members.runs import Member, as_solo_run, end_run, open_run
from harness.training import artifacts, checkpoint, tracking
from harness.training.train import make_trainer

# ---- the blocks -------------------------------------------------------------------------------------


class _Sigterm:
    """A SIGTERM flag for the whole process, not only inside trainer.fit (where Lightning's handler runs
    too: Lightning keeps a handler it finds and calls both): one that comes while members finish,
    between blocks or while a block is built stops what has not started, instead of killing the
    process (the controller would then record finished members as preempted)."""

    def __init__(self):
        self.set, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def train_packed(members: list[Member]) -> list[Member]:
    """Train the members as one block; every member ends finished, failed or preempted (its W&B run
    finished with exit code 0, 1 or 143). Members resumed at different steps are trained as separate
    blocks, one after the other. Returns the members; wandb has written every run file on return."""
    check_members([m.cfg for m in members])
    for m in members:
        try:  # the checks a solo run gets: a finished id or a foreign resume point is refused; `never` clears
            m.identity, m.resume, step = checkpoint.resume_point(m.cfg, m.run_id)  # (before resolve_config)
            m.start_step = step or 0
        except UserError as e:  # this member's id is refused: it fails alone
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
                end_run(m, "failed", f"{type(e).__name__}: {e}")
        raise
    finally:
        wandb.teardown()  # returns once every run file has its exit record (see harness.training.train.train)


def _preempt(members: list[Member], alive: list[bool]) -> None:
    for m, ok in zip(members, alive):
        if ok:
            end_run(m, "preempted")


def _train_group(members: list[Member], sigterm: _Sigterm) -> None:
    """Train one block of members at the same step. After a SIGTERM (here or in an earlier block) its
    members end preempted, with the resume points they have."""
    if sigterm.set:
        return _preempt(members, [True] * len(members))
    cfgs = [m.cfg for m in members]
    cfg0, t = cfgs[0], cfgs[0].trainer
    # trainer.threads is one run's share of the CPUs; a block holds many runs, so it takes the threads
    # the controller gives the process (OMP_NUM_THREADS = available CPUs / --workers) instead.
    block = task_module(cfg0.task).build_block(cfgs)
    if hasattr(block, "resolve_config"):  # a build that resolves config values (Omnigrok's data.split=auto)
        for i, m in enumerate(members):
            with as_solo_run(m):  # the member's sweep parameters decide, as in its solo run's build
                block.resolve_config(i)
                m.run.config.update(tracking.run_config(m.cfg), allow_val_change=True)
    for i, m in enumerate(members):
        m.run.summary.update(block.static_summary(i))
    module = BlockModule(block, members)
    if sigterm.set:  # (one that came while the block was built)
        return _preempt(members, module.alive)
    try:
        trainer = make_trainer(cfg0, False, [BlockCheckpoint(module)])
        # Lightning reads the first member's last.ckpt; BlockModule.on_load_checkpoint loads every member's
        trainer.fit(module, datamodule=BlockData(t.batch_steps()), ckpt_path=members[0].resume, weights_only=True)
    except SIGTERMException:  # BlockCheckpoint has written each live member's last.ckpt
        return _preempt(members, module.alive)
    # A SIGTERM from here on is too late to stop this block: its members finish (exit 0).
    step = trainer.global_step
    for i, m in enumerate(members):
        if not module.alive[i]:
            continue  # (BlockModule.on_fit_end has written its final summary and curves)
        if getattr(getattr(m.cfg, "model", None), "save", False):
            final = {"epoch": 0, "global_step": step, "pytorch-lightning_version": L.__version__}
            ckpt, meta = member_checkpoint(final, module, i), {"task": m.cfg.task, "step": step}
            m.run.summary["model/artifact"] = artifacts.save_model(m.run, ckpt, m.cfg, ["latest"], meta)
        end_run(m, "finished")
        checkpoint.mark_finished(m.cfg, m.run_id, step)


# ---- the command -----------------------------------------------------------------------------------


def run_spec(path: str) -> int:
    """`harness train-packed BLOCK.json`, a block file written by harness.sweep.packed_agent: {"members":
    [{"overrides": [...], "run_id": ..., "param_path": ...}, ...], "results": path}. Every config is
    validated before any run starts; the block is trained, each member's outcome written to the `results`
    file (JSON: run id -> state, exit code, summary) and printed as one JSON line.
    Exit status: 0 all finished, 143 preempted by SIGTERM, 1 a member failed."""
    with open(path) as f:
        spec = json.load(f)
    members = [
        Member(load_config(tuple(e["overrides"])), list(e["overrides"]), e.get("run_id"), e.get("param_path"))
        for e in spec["members"]
    ]
    try:
        train_packed(members)
    finally:
        results.write_results(
            spec.get("results"), {m.run_id: results.entry(m.state, m.summary, m.error) for m in members if m.run_id}
        )
    for m in members:
        print(tracking.result_line({"_run_id": m.run_id, "_state": m.state, **m.summary}), flush=True)
    if any(m.state == "preempted" for m in members):
        return checkpoint.PREEMPTED_EXIT
    return 0 if all(m.state == "finished" for m in members) else 1
