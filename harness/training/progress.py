"""A progress bar that counts optimizer steps, not Lightning batches.

Lightning's own bar counts batches against an epoch length: a task that takes 10 optimizer steps per
batch showed `20/200` for 200 steps, and an infinite-data task `Epoch 0/-2`. This bar's total is
`trainer.max_steps` and its position `trainer.global_step` (optimizer steps completed, contract C2),
so it is right whatever a batch holds, and starts where a resumed run left off.
"""

from __future__ import annotations

import math
import os
import sys

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from tqdm import tqdm


def enabled(setting: bool | None) -> bool:
    """`trainer.progress_bar`: None means on for an interactive terminal and off under a sweep.

    Under a sweep (WANDB_SWEEP_ID, set by `wandb agent`; HARNESS_SWEEP_ID, by the local controller) a run's output
    is a log file: a bar there is thousands of carriage returns.
    """
    if setting is not None:
        return setting
    return sys.stderr.isatty() and not ({"WANDB_SWEEP_ID", "HARNESS_SWEEP_ID"} & set(os.environ))


class StepProgressBar(ProgressBar):
    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self.bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _open(self, total: int | None, initial: int, desc: str) -> None:
        self._close()
        if self._enabled:
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.2,
                smoothing=0.1,
            )

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._open(trainer.max_steps if trainer.max_steps > 0 else None, trainer.global_step, "train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is not None and trainer.global_step != self.bar.n:
            self.bar.update(trainer.global_step - self.bar.n)  # a batch may carry several steps
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self.bar.set_postfix_str(f"train/loss={float(loss):.4g}", refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_validation_start(self, trainer, pl_module) -> None:
        if _evaluating(trainer):  # an evaluation-only run (stage validate): count its batches
            total = sum(trainer.num_val_batches) if trainer.num_val_batches else None
            self._open(int(total) if total is not None and math.isfinite(total) else None, 0, "eval")
            if self.bar is not None:
                self.bar.unit = "batch"

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if _evaluating(trainer) and self.bar is not None:
            self.bar.update(1)

    def on_validation_end(self, trainer, pl_module) -> None:
        if _evaluating(trainer):
            self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

    def print(self, *args, **kwargs) -> None:
        (self.bar.write if self.bar is not None else print)(" ".join(map(str, args)), file=sys.stderr)


def _evaluating(trainer) -> bool:
    # trainer.state.fn is the entry point (fit / validate); during fit's evaluations it stays "fit".
    return trainer.state.fn == "validate"
