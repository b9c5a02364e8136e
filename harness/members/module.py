"""A packed block under Lightning's Trainer: the LightningModule that trains a task's block of M members
(one backward, harness.members.optim.StackedAdamW) and gives each member's W&B run its training loss
and evaluations; the data module whose batches are the optimizer steps' indices."""

from __future__ import annotations

import time

import lightning as L
import torch

from harness.members.optim import block_optimizer, block_step
from harness.members.runs import end_run
from harness.training.data import DeviceDataModule
from harness.training.train import NonFiniteLoss, check_finite, optimizer_step


class BlockData(DeviceDataModule):
    """A block's Lightning batches, laid out as its members' solo runs' (trainer.steps_per_batch
    optimizer steps each, so that the loops' state in a checkpoint is a solo run's): each step's batch
    is its index, from which the block draws every member's batch itself (task.build_packed)."""

    def __init__(self, steps_per_batch: int):
        super().__init__()
        self.steps_per_batch = steps_per_batch

    def train_batch(self, index: int, device: torch.device) -> int:
        return index

    def val_batch(self, index: int, device: torch.device) -> int:
        return index


class BlockModule(L.LightningModule):
    """The members (harness.members.runs.Member, each with its open W&B run) of `block` trained as one
    model. A member whose loss is not finite fails alone: its run ends (exit 1) and the optimizer
    leaves its slices as they were while the others go on. Losses are read back once per log or
    evaluation interval, never each step (a GPU sync)."""

    def __init__(self, block, members: list, trainer_cfg):
        super().__init__()
        self.block, self.members, self.t = block, members, trainer_cfg
        self.model = block.model  # the block's parameters, as Lightning checkpoints and casts them
        self.opt = block_optimizer(block)
        self.alive = [True] * len(members)
        self.active: torch.Tensor | None = None  # None while every member is alive (the optimizer's fast path)
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.saved_checkpoint: dict | None = None
        self.automatic_optimization = False

    def configure_optimizers(self):
        return self.opt

    def fail(self, i: int, message: str) -> None:
        self.alive[i] = False
        self.active = torch.tensor(self.alive, device=self.opt.params[0].device)
        end_run(self.members[i], "failed", 1, message)
        if not any(self.alive):
            self.trainer.should_stop = True

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for step in batch if isinstance(batch, list) else [batch]:
            losses = block_step(self.block, self.opt, step, self.active, lambda: optimizer_step(self, opt))
            self.pending.append((step, losses))
            done = step + 1
            if done % self.t.log_every == 0 or done % self.t.eval_every == 0 or done == self.t.steps:
                self.sync_losses()

    def sync_losses(self) -> None:
        """The pending steps' losses to the host (one transfer): a member whose loss is not finite
        fails; every log_every-th step's loss goes to the member's run (at the step it was computed)."""
        if not self.pending:
            return
        values = torch.stack([x for _, x in self.pending]).tolist()
        key = self.block.train_loss_key
        for (step, _), row in zip(self.pending, values):
            for i, v in enumerate(row):
                if not self.alive[i]:
                    continue
                try:
                    check_finite({"train/loss": v}, step)
                except NonFiniteLoss as e:
                    self.fail(i, str(e))
                    continue
                if key and step % self.t.log_every == 0:
                    self.members[i].run.log({key: v, "trainer/global_step": step})
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
                self.fail(i, str(e))
                continue
            m.run.log({**metrics, "trainer/global_step": step})
            if arrays:
                m.curves.add(step, arrays)

    def on_fit_start(self):  # before the step-0 evaluation, as a solo run's perf/* clock (FinalFourier)
        self.t0, self.cpu0, self.step0 = time.perf_counter(), time.process_time(), self.trainer.global_step

    def on_train_end(self):
        self.sync_losses()
        self.seconds, self.cpu_seconds = time.perf_counter() - self.t0, time.process_time() - self.cpu0
        self.steps_trained = self.trainer.global_step - self.step0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.sync_losses()  # a member that failed since the last read gets no resume point
        self.saved_checkpoint = checkpoint  # harness.members.checkpoints.BlockCheckpoint cuts the members' from it
