"""The one training path of a task that trains members (sparse parity, modular addition, Omnigrok): the
LightningModule that trains a block of M members under Lightning's Trainer (one backward,
harness.members.optim.StackedAdamW) and gives each member's W&B run its training loss and evaluations,
and the data module whose batches are the optimizer steps' indices. A solo run is a block of one
(`solo_job`); a packed process holds several (harness.members.packed)."""

from __future__ import annotations

import time

import lightning as L
import torch

from harness.members.checkpoints import block_checkpoint, load_member, member_checkpoint
from harness.members.optim import block_optimizer, block_step
from harness.members.runs import Member, end_run
from harness.training.checkpoint import load
from harness.training.data import DeviceDataModule
from harness.training.logs import wandb_run
from harness.training.train import Job, NonFiniteLoss, backward, check_finite, optimizer_step


class BlockData(DeviceDataModule):
    """A block's Lightning batches, laid out as its members' solo runs' (trainer.steps_per_batch
    optimizer steps each, so that the loops' state in a checkpoint is a solo run's): each step's batch
    is its index, from which the block draws every member's batch itself. `shard_error` is the block's
    (whether its members' data can be split over DDP ranks)."""

    def __init__(self, steps_per_batch: int, block=None):
        super().__init__()
        self.steps_per_batch, self.block = steps_per_batch, block

    def train_batch(self, index: int, device: torch.device) -> int:
        return index

    def val_batch(self, index: int, device: torch.device) -> int:
        return index

    def shard_error(self) -> str | None:
        return self.block.shard_error() if self.block is not None else None


class BlockModule(L.LightningModule):
    """The members (harness.members.runs.Member) of `block` trained as one model.

    Packed (`solo=False`): each member has its own W&B run; a member whose loss is not finite fails
    alone (its run ends, exit 1) and the optimizer leaves its slices as they were while the others go on;
    harness.members.checkpoints.BlockCheckpoint cuts each member's last.ckpt from the block's checkpoint.
    Solo (`solo=True`, one member): the member is the run of harness.training.train, whose W&B run it
    logs to (rank 0; none on other DDP ranks), a loss that is not finite fails the run (NonFiniteLoss), and
    the block's checkpoint is written in the member format in place (on_save_checkpoint), so that
    StepCheckpoint, ModelArtifact and Lightning's resume see the member's. Either resumes from its
    members' last.ckpt (on_load_checkpoint).
    Losses are read back once per log or evaluation interval, never each step (a GPU sync)."""

    def __init__(self, block, members: list[Member], solo: bool = False):
        super().__init__()
        self.block, self.members, self.t, self.solo = block, members, members[0].cfg.trainer, solo
        self.model = block.model  # the block's parameters, as Lightning checkpoints and casts them
        self.opt = block_optimizer(block)
        self.alive = [True] * len(members)
        self.active: torch.Tensor | None = None  # None while every member is alive (the optimizer's fast path)
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.saved_checkpoint: dict | None = None
        self.bar_loss: float | None = None
        self.eval_metrics: dict[str, float] = {}  # a solo run's last evaluation (what ModelArtifact reads)
        self.automatic_optimization = False

    def configure_optimizers(self):
        return self.opt

    def fail(self, i: int, error: NonFiniteLoss) -> None:
        if self.solo:
            raise error
        self.alive[i] = False
        self.active = torch.tensor(self.alive, device=self.opt.params[0].device)
        end_run(self.members[i], "failed", str(error))
        if not any(self.alive):
            self.trainer.should_stop = True

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for step in batch if isinstance(batch, list) else [batch]:
            losses = block_step(
                self.block, self.opt, step, self.active, lambda: optimizer_step(self, opt), lambda x: backward(self, x)
            )
            self.pending.append((step, losses))
            done = step + 1
            if done % self.t.log_every == 0 or done % self.t.eval_every == 0 or done == self.t.steps:
                self.sync_losses()
        if self.bar_loss is not None and self.trainer.progress_bar_callback is not None:
            self.log(
                self.block.train_loss_key, self.bar_loss, prog_bar=True, logger=False, on_step=True, on_epoch=False
            )
        self.bar_loss = None

    def sync_losses(self) -> None:
        """The pending steps' losses to the host (one transfer): a member whose loss at any step is not
        finite fails; every log_every-th step's loss goes to the member's run (at the step it was computed)."""
        if not self.pending:
            return
        if self.global_rank != 0:  # rank 0 checks and logs (DDP averages the ranks' gradients into its weights)
            self.pending.clear()
            return
        values = torch.stack([x for _, x in self.pending]).tolist()
        key = self.block.train_loss_key
        for (step, _), row in zip(self.pending, values):
            for i, v in enumerate(row):
                if not self.alive[i]:
                    continue
                try:
                    check_finite({key or "train/loss": v}, step)
                except NonFiniteLoss as e:
                    self.fail(i, e)
                    continue
                if key and step % self.t.log_every == 0 and self.members[i].run is not None:
                    self.members[i].run.log({key: v, "trainer/global_step": step})
        if key and self.solo:
            self.bar_loss = values[-1][0]  # the progress bar shows a solo run's loss (training_step logs it)
        self.pending.clear()

    def validation_step(self, batch, batch_idx):
        self.sync_losses()
        step = self.trainer.global_step
        for i, m in enumerate(self.members):
            if not self.alive[i]:
                continue
            metrics, arrays = self.block.evaluate(i, step)
            try:
                check_finite(metrics, step)
            except NonFiniteLoss as e:
                self.fail(i, e)
                continue
            if self.solo:
                self.eval_metrics = metrics
            if m.run is not None:
                m.run.log({**metrics, "trainer/global_step": step})
            if arrays:
                m.curves.add(step, arrays)

    def on_fit_start(self):  # the perf/* clock starts before the step-0 evaluation (EvalAtStart)
        if self.solo:
            self.members[0].run = wandb_run(self.trainer)  # None on DDP ranks other than 0
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def on_train_start(self):  # after Lightning restored a resumed run's step
        self.step0 = self.trainer.global_step

    def on_train_epoch_end(self):
        # The one epoch ends after the last evaluation and its checkpoint: the clock stops here, before
        # the model artifact is saved (ModelArtifact.on_train_end).
        self.sync_losses()
        self.seconds, self.cpu_seconds = time.perf_counter() - self.t0, time.process_time() - self.cpu0
        self.steps_trained = self.trainer.global_step - self.step0

    def on_fit_end(self):
        """Each live member's final summary (its events, its perf/* figures) and curves artifact."""
        for i, m in enumerate(self.members):
            if self.alive[i] and m.run is not None:
                m.run.summary.update(self.block.final_summary(i, self.seconds, self.cpu_seconds, self.steps_trained))
                m.curves.write(m.run)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.sync_losses()  # a member that failed since the last read gets no resume point
        if self.solo:  # the run's last.ckpt (or model artifact) in the member format, which is a solo run's
            checkpoint.update(member_checkpoint(checkpoint, self, 0, keep_callbacks=True))
        else:
            self.saved_checkpoint = checkpoint  # BlockCheckpoint cuts the members' from it

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Lightning calls this before it loads the weights, callbacks and optimizer, with the checkpoint
        it read: a member's (the solo run's, or a packed block's first member's: a block's members are
        at one step). Every member's last.ckpt is loaded into the block (harness.members.checkpoints) and
        the checkpoint swapped for the block's own."""
        for i, m in enumerate(self.members):
            load_member(self, i, checkpoint if i == 0 else load(m.resume, f"resume point of run {m.run_id}"))
        checkpoint.update(block_checkpoint(self, checkpoint))
        # the members' own callback states are loaded; Lightning restores its callbacks' (it warns of others)
        keys = {cb.state_key for cb in self.trainer.callbacks}
        checkpoint["callbacks"] = {k: v for k, v in checkpoint["callbacks"].items() if k in keys}


def solo_job(block, data=None) -> Job:
    """A task's Job for one run (harness.training.train): its block of one (the task's block built for
    [cfg]) under BlockModule; `data` is the task's data module (Job.data: what QDG reads labels from)."""
    cfg = block.cfgs[0]
    if hasattr(block, "resolve_config"):
        block.resolve_config(0)  # the run config records the values its build resolved
    return Job(
        module=BlockModule(block, [Member(cfg, [])], solo=True),
        datamodule=BlockData(cfg.trainer.batch_steps(), block),
        summary=block.static_summary(0),
        data=data,
    )
