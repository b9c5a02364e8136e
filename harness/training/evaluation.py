"""Lightning callbacks of the training loop: an evaluation before the first step and after the last."""

from __future__ import annotations

import lightning as L


class FinalEval(L.Callback):
    """Evaluate after the last step even when steps is not a multiple of eval_every.

    Lightning validates early when `trainer.should_stop` is set, so stopping at max_steps forces it.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class EvalAtStart(L.Callback):
    """Evaluate once before the first optimizer step: the step-0 point of every curve (the paper's
    scripts evaluate at step 0 too), logged at trainer/global_step 0 and recorded by the curves and
    event callbacks like any other evaluation.

    Lightning has no such switch: its sanity check (num_sanity_val_steps) runs the same loop but
    flagged `sanity_checking`, with whatever it logs discarded. So this runs the fit's own
    validation loop from on_train_start, as the training epoch loop does between batches. A run
    resumed from a checkpoint starts at its checkpoint's step (> 0: StepCheckpoint never saves step
    0, and SIGTERM is acted on only at the end of a batch), so step 0 is never evaluated twice.
    """

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step != 0 or trainer.ckpt_path or not trainer.enable_validation:
            return
        connector = trainer._logger_connector
        first_loop_iter = connector._first_loop_iter  # what Lightning saves around an in-fit evaluation
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        connector._first_loop_iter = first_loop_iter
