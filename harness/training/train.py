"""`train(cfg) -> summary`: one Lightning run, logged to W&B."""

from __future__ import annotations

import contextlib
import math
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import wandb
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from harness.config.registry import task_module
from harness.config.run import RunConfig
from harness.errors import ConfigError
from harness.training import artifacts, checkpoint, tracking
from harness.training.data import DeviceDataModule
from harness.training.evaluation import EvalAtStart, FinalEval
from harness.training.progress import StepProgressBar
from harness.training.progress import enabled as progress_enabled


@dataclass
class Job:
    """What a task's `build(cfg)` returns."""

    module: L.LightningModule
    datamodule: L.LightningDataModule
    callbacks: list = field(default_factory=list)
    stage: str = "fit"  # fit | validate
    summary: dict = field(default_factory=dict)  # static facts (parameter counts, data source)
    data: Any = None  # the task's data (its labelled sets), where not the datamodule (a block's)


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
    """`opt.step()` of a LightningOptimizer, keeping its step count (global_step), without hooks.

    `_on_before_step`/`_on_after_step` are Lightning's private step counters (what LightningOptimizer.step
    calls around the strategy's step): pyproject.toml pins lightning below the next minor release and
    tests/test_lightning_private.py fails when they move. Without them only the slower public step."""
    if _plain_steps(module) and hasattr(opt, "_on_before_step") and hasattr(opt, "_on_after_step"):
        opt._on_before_step()
        opt.optimizer.step()
        opt._on_after_step()
    else:
        opt.step()


class NonFiniteLoss(RuntimeError):
    """A logged loss is NaN or infinite: the run fails (exit 1) instead of finishing with NaN."""


def check_finite(metrics: dict, step) -> None:
    """Raise NonFiniteLoss if a loss among `metrics` is not finite. Called where metrics reach the
    loggers, as host numbers already, so the check costs no device sync of its own."""
    for key, value in metrics.items():
        if key.rsplit("/", 1)[-1] in ("loss", "batch_loss") and not math.isfinite(float(value)):
            raise NonFiniteLoss(
                f"{key}={float(value)} at step {step}: the loss is not finite "
                "(learning rate or init scale too large, or a precision overflow?)"
            )


class StepLogger(WandbLogger):
    """Logs `trainer/global_step` as the number of optimizer steps completed (contract C2).

    Lightning passes its batch counter as the step: it lags global_step by one inside the training
    loop and counts batches, not optimizer steps (tasks take several per batch), so Lightning's own
    calls are put at trainer.global_step, and harness code that knows the step uses `log_step`.
    Given a run (`experiment=`), WandbLogger skips its define_metric calls: the axis is declared when
    the run is opened (tracking.init_run).
    """

    trainer: L.Trainer | None = None

    def log_metrics(self, metrics, step=None):
        step = self.trainer.global_step if self.trainer is not None else step
        check_finite(metrics, step)
        super().log_metrics(metrics, step)

    @rank_zero_only
    def log_step(self, metrics, step: int) -> None:
        check_finite(metrics, step)
        self.experiment.log({**metrics, "trainer/global_step": int(step)})


def make_trainer(cfg: RunConfig, logger, callbacks: list) -> L.Trainer:
    t = cfg.trainer
    bar = progress_enabled(t.progress_bar)  # counts optimizer steps (harness/training/progress.py)
    trainer = L.Trainer(
        max_steps=t.steps,
        max_epochs=-1,
        val_check_interval=t.eval_every // t.batch_steps(),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every,
        accelerator=t.accelerator,
        devices=t.devices,
        # "ddp" re-runs `harness train` for each extra rank (train() keeps W&B on rank 0).
        strategy="ddp" if t.devices > 1 and t.strategy == "auto" else t.strategy,
        precision=t.precision,
        logger=logger,
        # EvalAtStart last (before Checkpoint callbacks, which Lightning moves to the end): the
        # progress bar has started when the step-0 evaluation runs.
        callbacks=[FinalEval(), *callbacks, *([StepProgressBar()] if bar else []), EvalAtStart()],
        # On SLURM, Lightning's auto-requeue (SIGUSR1 -> hpc checkpoint + scontrol requeue) would be a
        # second resume mechanism beside harness/training/checkpoint.py; SIGTERM + `#SBATCH --requeue` is ours.
        plugins=[SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None,
        # True only so that harness.training.checkpoint.StepCheckpoint (a Checkpoint) is allowed; Lightning
        # adds no ModelCheckpoint of its own when one is present.
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        enable_model_summary=False,
        enable_progress_bar=bar,
        deterministic=False,
    )
    if isinstance(logger, StepLogger):
        logger.trainer = trainer
    return trainer


def train(cfg: RunConfig, overrides: list[str] | None = None) -> dict[str, Any] | None:
    """Fit (or evaluate) one run; return its summary, or None on a DDP rank other than 0.

    Raises harness.training.checkpoint.Preempted when SIGTERM stopped training (the run is finished with
    exit code 143, last.ckpt written), NonFiniteLoss when a loss became NaN/inf (exit code 1).
    Returns only once wandb has written the run file's exit record.
    """
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    # Rank 0 decides (another rank, given no run id, resumes nothing: it takes rank 0's decision), before
    # anything is written: a refused run id leaves no trace.
    run_id = os.environ.get("WANDB_RUN_ID") if rank_zero_only.rank == 0 else None
    ident, ckpt_path, resumed_step = checkpoint.resume_point(cfg, run_id)
    local = None if ckpt_path or rank_zero_only.rank != 0 else artifacts.local_resume_file(cfg)
    if local:  # trainer.resume_from, checked against this run config as the run's own last.ckpt is
        ckpt_path, resumed_step = local, checkpoint.matched_step(run_id, local, "trainer.resume_from:", ident)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    job: Job = task_module(cfg.task).build(cfg)
    if job.stage == "fit" and getattr(getattr(cfg, "model", None), "save", False):  # every rank: it saves collectively
        job.callbacks.append(artifacts.ModelArtifact(cfg))
    _check_shardable(cfg, job)
    if isinstance(job.datamodule, DeviceDataModule):
        job.datamodule.seed = cfg.seed
    if rank_zero_only.rank != 0:
        _train_other_rank(cfg, job, ident)
        return None
    run = tracking.init_run(cfg, overrides, job_type="train" if job.stage == "fit" else "eval")
    step, saver = 0, None
    try:
        if job.stage != "fit" or run.id != os.environ.get("WANDB_RUN_ID", run.id):
            ckpt_path = None  # nothing to resume (evaluation), or not the id resume_point checked
        if job.stage == "fit":
            directory = checkpoint.ckpt_dir(cfg, run.id)
            if not ckpt_path and cfg.trainer.resume_from:  # online: a run id or artifact name on W&B
                ckpt_path = artifacts.download_resume_file(cfg, run, directory)
                resumed_step = checkpoint.matched_step(run.id, ckpt_path, "trainer.resume_from:", ident)
            if ckpt_path:
                run.summary["trainer/resumed_from_step"] = resumed_step
            saver = checkpoint.StepCheckpoint(directory, cfg.trainer, ident, run)
            job.callbacks += [saver, *([artifacts.CheckpointArtifacts(saver)] if cfg.trainer.log_checkpoints else [])]
        run.summary.update(job.summary)
        trainer = make_trainer(cfg, StepLogger(experiment=run, log_model=False), job.callbacks)
        # The DDP ranks Lightning launches re-run `harness train` with this process's environment:
        # they need the run id (checkpoint directory) and the resume decision taken here.
        ranks = {"WANDB_RUN_ID": run.id, checkpoint.RESUME_ENV: ckpt_path or ""}
        with environ(ranks) if cfg.trainer.devices > 1 else contextlib.nullcontext():
            try:
                if job.stage == "fit":
                    # weights_only: resume_point has matched the file to this run, but not its bytes.
                    trainer.fit(job.module, datamodule=job.datamodule, ckpt_path=ckpt_path, weights_only=True)
                else:
                    trainer.validate(job.module, datamodule=job.datamodule, verbose=False)
            except BaseException:
                _end_other_ranks(trainer)
                raise
            finally:
                step = trainer.global_step
        checkpoint.mark_finished(cfg, run.id, step)
        summary = checkpoint.finish_run(run, 0, saver.before if saver else None)
        summary["_run_id"], summary["_run_dir"] = run.id, run.dir
        return summary
    except SIGTERMException:
        # SLURM preemption, a sweep's early stop, the local controller: StepCheckpoint has saved
        # last.ckpt (fit); W&B is told the run is being preempted, not that it failed.
        checkpoint.finish_run(run, checkpoint.PREEMPTED_EXIT, saver.before if saver else None)
        raise checkpoint.Preempted(step, saver.path if saver else None, run.id) from None
    except BaseException as e:  # failed (exit 1); a NonFiniteLoss's message goes into the summary
        checkpoint.finish_run(run, 1, error=str(e) if isinstance(e, NonFiniteLoss) else None)
        raise
    finally:
        # Return only once the run file is complete. run.finish() returns when wandb-core has accepted
        # the exit record, not when the writer has written it: read straight after, the file lacked it
        # in 5 of 10 runs here. wandb.teardown() waits for wandb-core to exit, which closes every run
        # file; the next wandb.init starts it again.
        wandb.teardown()


def _train_other_rank(cfg: RunConfig, job: Job, ident: dict) -> None:
    """DDP rank > 0: the same fit without a W&B run (rank 0 logs); it checkpoints with rank 0
    (trainer.save_checkpoint synchronises all ranks) and resumes from rank 0's decision."""
    run_id = os.environ.get("WANDB_RUN_ID") or f"rank{rank_zero_only.rank}"
    saver = checkpoint.StepCheckpoint(checkpoint.ckpt_dir(cfg, run_id), cfg.trainer, ident)
    trainer = make_trainer(cfg, False, [*job.callbacks, saver])
    try:
        trainer.fit(
            job.module,
            datamodule=job.datamodule,
            ckpt_path=os.environ.get(checkpoint.RESUME_ENV) or None,
            weights_only=True,
        )
    except SIGTERMException:
        raise checkpoint.Preempted(trainer.global_step, None, run_id) from None


def _end_other_ranks(trainer: L.Trainer) -> None:
    """Rank 0 leaves fit by an exception (SIGTERM after the checkpoint all ranks wrote, a failure):
    the ranks Lightning launched have nothing left to do, and one caught in a collective would wait
    for rank 0 forever (seen here after SIGTERM: Lightning broadcasts from its signal handler). End
    them, as Lightning itself does on Ctrl-C."""
    launcher = trainer.strategy.launcher  # None in one process; kill() is every launcher's interface
    if launcher is not None:
        launcher.kill(signal.SIGKILL)


def _check_shardable(cfg: RunConfig, job: Job) -> None:
    n = cfg.trainer.devices
    if n <= 1:
        return
    dm = job.datamodule
    reason = (
        dm.shard_error()
        if isinstance(dm, DeviceDataModule)
        else f"task {cfg.task} has no per-rank data stream ({type(dm).__name__})"
    )
    if job.stage != "fit":
        reason = f"task {cfg.task} evaluates (stage {job.stage}) in one process"
    if reason:
        raise ConfigError(
            f"trainer.devices={n}: {reason}, so every rank would see the same data; use trainer.devices=1"
        )


@contextlib.contextmanager
def environ(values: dict[str, str | None]):
    """Set environment variables (None: unset) for the duration, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    _set_environ(values)
    try:
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
