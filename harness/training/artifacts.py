"""A run's weights as W&B artifacts, the way Lightning's `WandbLogger(log_model=...)` logs them.

- `model-<run id>` (type `model`): `model.ckpt`, a Lightning checkpoint (`trainer.save_checkpoint`,
  weights only: the LightningModule's state_dict, Lightning's version and loop state) plus the
  resolved run config under `config`. Aliases as WandbLogger gives them: `latest` on the final
  weights, `best` on the weights of the best evaluation by the sweep's metric (a local sweep passes
  it in HARNESS_SWEEP_METRIC), else `val/loss` (lowest). When the final weights are the best, one
  version holds both aliases; otherwise the best is logged first (alias `best`), then the final.
- `checkpoint-<run id>` (type `checkpoint`, with `trainer.log_checkpoints=true`): every resume point
  `last.ckpt` the run saves (harness.training.checkpoint.StepCheckpoint), so that a preempted run
  can resume on another machine: `trainer.resume_from=RUN_ID` (or an artifact name, or a local
  file or artifact directory) with the same WANDB_RUN_ID.

Where wandb stages the files: harness.training.tracking.stage_under (under the run's wandb directory).
Files are read back with harness.training.checkpoint.load (weights only) only: an artifact is untrusted input.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import asdict

import torch
from lightning.pytorch.callbacks import Checkpoint

from harness.config.run import RunConfig
from harness.errors import ConfigError
from harness.training import checkpoint, logs, tracking

MODEL_FILE = "model.ckpt"
METRIC_ENV = "HARNESS_SWEEP_METRIC"  # "name:goal", set by the local controller from the sweep's metric


def best_metric() -> tuple[str, str]:
    """(metric, goal) that chooses the `best` model: the sweep's, else val/loss, lowest."""
    name, _, goal = os.environ.get(METRIC_ENV, "").rpartition(":")
    return (name, goal) if name and goal in ("minimize", "maximize") else ("val/loss", "minimize")


class ModelArtifact(Checkpoint):
    """Keeps the weights of the best evaluation (in memory, on the CPU) and, when fit ends, logs
    `model-<run id>` (module docstring). A Checkpoint so that Lightning runs it after the callbacks
    that compute metrics; on every DDP rank, since trainer.save_checkpoint is a collective call."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.key, self.goal = best_metric()
        self.best: tuple[float, int, dict] | None = None  # (score, step, state_dict)

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best[0] if self.goal == "minimize" else value > self.best[0]

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        value = logs.metric(trainer, self.key)
        if value is not None and math.isfinite(value) and self._better(value):
            state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
            self.best = (value, trainer.global_step, state)

    def on_train_end(self, trainer, pl_module):
        tmp = tempfile.mkdtemp(prefix="model-") if trainer.is_global_zero else tempfile.gettempdir()
        try:
            final, best = os.path.join(tmp, "final", MODEL_FILE), os.path.join(tmp, "best", MODEL_FILE)
            trainer.save_checkpoint(final, weights_only=True)
            earlier = self.best is not None and self.best[1] != trainer.global_step
            if earlier:  # the best weights, in the same format: loaded into the module, saved, put back
                now = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
                pl_module.load_state_dict(self.best[2])
            trainer.save_checkpoint(best, weights_only=True)  # every rank calls it as often (collective)
            if earlier:
                pl_module.load_state_dict(now)
            run = logs.wandb_run(trainer)
            if run is not None:
                run.summary["model/artifact"] = self.log_versions(
                    run, final, best if earlier else None, trainer.global_step
                )
        finally:
            if trainer.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)

    def log_versions(self, run, final: str, best: str | None, step: int) -> str:
        meta = {"task": self.cfg.task, "metric": self.key, "goal": self.goal}
        if best is not None:
            best_ckpt = checkpoint.load(best, "model checkpoint")
            save_model(run, best_ckpt, self.cfg, ["best"], {**meta, "step": self.best[1], "score": self.best[0]})
        score = self.best[0] if self.best is not None and best is None else None
        return save_model(
            run,
            checkpoint.load(final, "model checkpoint"),
            self.cfg,
            ["latest"] if best is not None else ["latest", "best"],
            {**meta, "step": step, **({"score": score} if score is not None else {})},
        )


def save_model(run, ckpt: dict, cfg: RunConfig, aliases: list[str], metadata: dict) -> str:
    """Weights, `ckpt` (a weights-only Lightning checkpoint: a solo run's, written by trainer.save_checkpoint,
    or a packed member's, cut from its block's by harness.members.checkpoints.member_checkpoint), as a
    version of `model-<run id>` holding `model.ckpt` plus the resolved run config under `config` (what
    rebuilds the task's model). A packed member's has alias `latest` only (no evaluation history was kept
    to pick a best)."""
    name = f"model-{run.id}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        torch.save({**ckpt, "config": asdict(cfg)}, path)
        tracking.log_artifact(run, path, name, "model", metadata, aliases=aliases)
    return name


def read_model(path: str) -> dict:
    """{"state_dict": the task's nn.Module state_dict, "config": the run config} from a model
    artifact file: `model.ckpt` (Lightning layout, keys under `model.`) or the older `model.pt`."""
    blob = checkpoint.load(path, "model artifact")
    if not isinstance(blob, dict) or "state_dict" not in blob or "config" not in blob:
        raise ValueError(f"{path} holds no state_dict and config")
    if "pytorch-lightning_version" in blob:  # model.ckpt (staged files keep no name to go by)
        blob = dict(
            blob, state_dict={k[len("model.") :]: v for k, v in blob["state_dict"].items() if k.startswith("model.")}
        )
    return blob


class CheckpointArtifacts(Checkpoint):
    """`trainer.log_checkpoints`: after `saver` (a StepCheckpoint, which runs before this one) writes
    last.ckpt, log it as `checkpoint-<run id>` (alias latest, metadata step). Rank 0 only."""

    def __init__(self, saver):
        self.saver = saver
        self.logged_step: int | None = None

    def _maybe_log(self, trainer) -> None:
        step = self.saver.saved_step
        run = logs.wandb_run(trainer)
        if run is None or step is None or step == self.logged_step or not os.path.isfile(self.saver.path):
            return
        tracking.log_artifact(
            run, self.saver.path, f"checkpoint-{run.id}", "checkpoint", {"step": step}, aliases=["latest"]
        )
        self.logged_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._maybe_log(trainer)

    def on_validation_end(self, trainer, pl_module):
        self._maybe_log(trainer)

    def on_exception(self, trainer, pl_module, exception):
        self._maybe_log(trainer)  # SIGTERM: the saver wrote last.ckpt in its own on_exception


def local_resume_file(cfg: RunConfig) -> str | None:
    """`trainer.resume_from` as a local file, decided before a W&B run exists: a file, or a directory
    holding last.ckpt (a downloaded artifact); None when unset or (online) a W&B name that
    `download_resume_file` fetches once the run exists. Anything else is a one-line ConfigError."""
    source = cfg.trainer.resume_from
    if not source:
        return None
    if os.path.exists(source):
        path = os.path.join(source, "last.ckpt") if os.path.isdir(source) else source
        if not os.path.isfile(path):
            raise ConfigError(f"trainer.resume_from={source!r}: a directory without last.ckpt; give the file")
        return path
    if tracking.resolve_mode(cfg.wandb.mode) != "online":
        raise ConfigError(
            f"trainer.resume_from={source!r}: no such file or directory, and a W&B artifact "
            "needs online mode (download it, e.g. `wandb artifact get`, and give the path)"
        )
    return None


def download_resume_file(cfg: RunConfig, run, directory: str) -> str:
    """`trainer.resume_from` as a run id or an artifact name on W&B (`checkpoint-<id>:latest` of the
    run's project), downloaded into `directory` through the run (online; W&B records that this run
    used it). Untested here: no W&B server."""
    source = cfg.trainer.resume_from
    name = source if source.startswith("checkpoint-") else f"checkpoint-{source}"
    name = name if ":" in name else f"{name}:latest"
    root = run.use_artifact(name, type="checkpoint").download(root=os.path.join(directory, "artifact"))
    return os.path.join(root, "last.ckpt")
