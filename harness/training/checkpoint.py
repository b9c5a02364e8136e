"""Resume points and preemption (contract C5); the final weights: harness.training.artifacts.

A run's resume point is `last.ckpt` in its checkpoint directory. It is written every
`trainer.ckpt_every` optimizer steps and when SIGTERM stops training; a run started again with the
same WANDB_RUN_ID finds it and continues (`trainer.fit(ckpt_path=...)`), into the same W&B run.
"""
from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from harness.config.run import RunConfig

LAST = "last.ckpt"
PREEMPTED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended
RESUME_ENV = "HARNESS_RESUME_FROM"  # rank 0's decision, inherited by the DDP ranks it launches


class Preempted(Exception):
    """SIGTERM stopped run `run_id` after `step` optimizer steps; `path` holds the resume point."""

    exit_code = PREEMPTED_EXIT

    def __init__(self, step: int, path: str | None, run_id: str):
        self.step, self.path, self.run_id = step, path, run_id
        where = f"; resume point {path}; to resume, run it again with WANDB_RUN_ID={run_id}" if path else ""
        super().__init__(f"run {run_id} preempted (SIGTERM) at step {step}{where}")


def wandb_root(cfg: RunConfig) -> str:
    """`$WANDB_DIR/wandb`, else `<wandb.dir>/wandb`, else `./wandb`: where wandb puts run directories."""
    base = os.environ.get("WANDB_DIR") or cfg.wandb.dir
    return os.path.join(base, "wandb") if base else "wandb"


def ckpt_dir(cfg: RunConfig, run_id: str) -> str:
    """`<trainer.ckpt_dir>/<run id>/`, by default `<wandb root>/checkpoints/<run id>/`: one directory
    per run, so that the runs of a sweep sharing one ckpt_dir never resume from each other."""
    return os.path.join(cfg.trainer.ckpt_dir or os.path.join(wandb_root(cfg), "checkpoints"), run_id)


def resume_path(directory: str) -> str | None:
    path = os.path.join(directory, LAST)
    return path if os.path.isfile(path) else None


class StepCheckpoint(Checkpoint):
    """Writes `<dir>/last.ckpt` after every `every`-th optimizer step and when SIGTERM stops fit.

    Not Lightning's ModelCheckpoint: that one saves in on_train_batch_end, before the validation of
    the same step, and Lightning skips that validation when it resumes from such a checkpoint (and
    the event callbacks' state in it misses that evaluation). Here a step that is evaluated is saved
    after its evaluation (on_validation_end, where this callback runs last: Lightning orders
    Checkpoint callbacks after the others), any other step at its batch end. The SIGTERM save happens
    when Lightning raises SIGTERMException, at the end of a batch and its evaluation, on every rank
    at the same batch (Lightning broadcasts the signal). Writes go to a temporary file renamed into
    place, so a kill mid-write never leaves a broken resume point.
    """

    def __init__(self, directory: str, every: int, eval_every: int):
        self.directory, self.every, self.eval_every = directory, every, eval_every
        self.path = os.path.join(directory, LAST)
        self.saved_step: int | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        return bool(self.every) and step % self.every == 0 and 0 < step < trainer.max_steps

    def save(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            os.makedirs(self.directory, exist_ok=True)
        tmp = self.path + ".tmp"
        trainer.save_checkpoint(tmp)  # written by rank 0, then a barrier for all ranks
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._due(trainer) and trainer.global_step % self.eval_every != 0:
            self.save(trainer)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn == "fit" and self._due(trainer) \
                and self.saved_step != trainer.global_step:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        # The one epoch ends at trainer.steps. Lightning would still raise SIGTERMException after
        # this hook for a SIGTERM that came during the last batch or evaluation, skipping on_fit_end
        # (the event summaries) of a run that is complete: let it finish instead (exit 0).
        if trainer.global_step >= trainer.max_steps:
            trainer._signal_connector.received_sigterm = False

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self.save(trainer)

