"""What a Lightning run logs, on the step axis: train losses (TrainLossLog, for tasks with a
LightningModule of their own), and derived values into the W&B run summary.

Every history row carries `trainer/global_step` = optimizer steps completed (harness.training.train.StepLogger).
Tasks take several optimizer steps per Lightning batch, so nothing here relies on Lightning's own
per-batch logging (`self.log(on_step=True)` + `log_every_n_steps` count batches, not steps).
"""

from __future__ import annotations

import lightning as L
import torch


def write_summary(trainer: L.Trainer, values: dict) -> None:
    """Put derived values into run.summary (not history): one value per run. Rank 0 only."""
    run = wandb_run(trainer)
    if run is not None:
        run.summary.update(values)


def wandb_run(trainer: L.Trainer):
    """The W&B run behind the trainer's loggers (rank 0), or None (no W&B logger, other ranks)."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        run = getattr(logger, "experiment", None)
        if run is not None and hasattr(run, "log_artifact"):
            return run
    return None


def metric(trainer: L.Trainer, key: str) -> float | None:
    """A metric of the last evaluation: from the module's `eval_metrics` dict (BlockModule's), else from
    Lightning's callback_metrics (self.log)."""
    direct = getattr(trainer.lightning_module, "eval_metrics", None) or {}
    v = direct[key] if key in direct else trainer.callback_metrics.get(key)
    return None if v is None else float(v)


class TrainLossLog:
    """`train/loss` every `every` optimizer steps, at the step it was computed on.

    The loss of optimizer step s (computed on the weights after s steps) is logged at
    trainer/global_step = s when s % every == 0, the convention of validation rows (an evaluation
    after s steps sits at s). The losses stay on the device until `flush` (end of a Lightning
    batch): one device sync per batch that logged something, never one per step.
    """

    def __init__(self, every: int, key: str = "train/loss"):
        self.every, self.key = every, key
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        if step % self.every == 0:
            self.steps.append(step)
            self.values.append(loss.detach())

    def flush(self, module: L.LightningModule) -> None:
        if not self.steps:
            return
        values = torch.stack(self.values).tolist()
        for step, v in zip(self.steps, values):
            for logger in module.loggers:  # one history row at `step`: the StepLogger's (none on other DDP ranks)
                logger.log_step({self.key: v}, step)
        if module.trainer.progress_bar_callback is not None:
            module.log(self.key, values[-1], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self.steps, self.values = [], []
