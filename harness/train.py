"""`train(cfg) -> summary`: one Lightning run, logged to W&B."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from harness import tracking
from harness.callbacks import FinalEval
from harness.config import RunConfig, task_module
from harness.progress import StepProgressBar, enabled as progress_enabled


@dataclass
class Job:
    """What a task's `build(cfg)` returns."""

    module: L.LightningModule
    datamodule: L.LightningDataModule
    callbacks: list = field(default_factory=list)
    stage: str = "fit"  # fit | validate
    summary: dict = field(default_factory=dict)  # static facts (parameter counts, data source)


def _plain_steps(module: L.LightningModule) -> bool:
    trainer = module.trainer
    return trainer.world_size == 1 and "16-mixed" not in str(trainer.precision)


def backward(module: L.LightningModule, loss: torch.Tensor) -> None:
    """`manual_backward`, minus its per-step hook dispatch where that does nothing.

    With one process and no loss scaling, Lightning's manual_backward and optimizer step only
    route through hooks (on_before_backward, on_before_optimizer_step, ...) that no harness task
    uses: ~0.3 ms a step, a tenth of a small CPU step. Otherwise (DDP, 16-mixed) Lightning's
    path is needed and taken.
    """
    if _plain_steps(module):
        loss.backward()
    else:
        module.manual_backward(loss)


def optimizer_step(module: L.LightningModule, opt) -> None:
    """`opt.step()` of a LightningOptimizer, keeping its step count (global_step), without hooks."""
    if _plain_steps(module) and hasattr(opt, "_on_before_step") and hasattr(opt, "_on_after_step"):
        opt._on_before_step()
        opt.optimizer.step()
        opt._on_after_step()
    else:
        opt.step()


class _StopOnSigterm(L.Callback):
    """A sweep's early stop (or SLURM preemption) sends SIGTERM: finish the run cleanly."""

    def __init__(self):
        self.requested = False

    def setup(self, trainer, pl_module, stage):
        if hasattr(signal, "SIGTERM") and _is_main_thread():
            signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))

    def on_train_batch_end(self, trainer, *args):
        if self.requested:
            trainer.should_stop = True


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class StepLogger(WandbLogger):
    """Logs `trainer/global_step` as the number of optimizer steps completed.

    Lightning passes a batch counter that lags global_step by one inside the training loop, so a
    validation at step 300 would appear at 299 in history but at 300 in summary events.
    """

    trainer: L.Trainer | None = None

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, self.trainer.global_step if self.trainer is not None else step)


def make_trainer(cfg: RunConfig, logger, callbacks: list) -> L.Trainer:
    t = cfg.trainer
    bar = progress_enabled(t.progress_bar)  # counts optimizer steps (harness/progress.py)
    trainer = L.Trainer(
        max_steps=t.steps,
        max_epochs=-1,
        val_check_interval=t.eval_every // t.batch_steps(),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        logger=logger,
        callbacks=[FinalEval(), _StopOnSigterm(), *callbacks, *([StepProgressBar()] if bar else [])],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bar,
        deterministic=False,
    )
    if isinstance(logger, StepLogger):
        logger.trainer = trainer
    return trainer


def train(cfg: RunConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    job: Job = task_module(cfg.task).build(cfg)
    run = tracking.init_run(cfg, overrides)
    try:
        logger = StepLogger(experiment=run, log_model=False)
        run.summary.update(job.summary)
        trainer = make_trainer(cfg, logger, job.callbacks)
        if job.stage == "fit":
            trainer.fit(job.module, datamodule=job.datamodule)
        else:
            trainer.validate(job.module, datamodule=job.datamodule, verbose=False)
        summary = tracking.summary_dict(run)
        summary["_run_id"], summary["_run_dir"] = run.id, run.dir
        run.finish()
        return summary
    except BaseException:
        run.finish(exit_code=1)
        raise
