"""What tasks share for logging from a Lightning run: train losses on the step axis, evaluation
metrics straight to the loggers, per-item curves (a W&B artifact), and the event detectors that write
the run summary (emergence of subtasks, grokking steps and phase; see harness.events).

Every history row carries `trainer/global_step` = optimizer steps completed (harness.train.StepLogger).
Tasks take several optimizer steps per Lightning batch, so nothing here relies on Lightning's own
per-batch logging (`self.log(on_step=True)` + `log_every_n_steps` count batches, not steps).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import lightning as L
import numpy as np
import torch

from harness import events


# ---- writing -------------------------------------------------------------------------------------

def write_summary(trainer: L.Trainer, values: dict) -> None:
    """Put derived values into run.summary (not history): one value per run. Rank 0 only."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "summary"):
            experiment.summary.update(values)


def wandb_run(trainer: L.Trainer):
    """The W&B run behind the trainer's loggers (rank 0), or None (no W&B logger, other ranks)."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        run = getattr(logger, "experiment", None)
        if run is not None and hasattr(run, "log_artifact"):
            return run
    return None


def log_at(module: L.LightningModule, metrics: dict[str, float], step: int) -> None:
    """One history row at `step` (optimizer steps completed) in every logger of the module."""
    for logger in module.loggers:
        explicit = getattr(logger, "log_step", None)  # StepLogger: the step as given
        if explicit is not None:
            explicit(metrics, step)
        else:
            logger.log_metrics(metrics, step=step)


def log_eval(module: L.LightningModule, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """An evaluation's scalar metrics (0-d tensors) -> floats in one device sync, kept in
    `module.eval_metrics` (what `metric()` and the callbacks read) and sent to the loggers as one row
    at the current step. `self.log` would cost ~1 ms a key and report on Lightning's batch counter."""
    keys = list(metrics)
    values = torch.stack([_exact(metrics[k]).reshape(()) for k in keys]).tolist() if keys else []
    module.eval_metrics = dict(zip(keys, values))
    if not module.trainer.sanity_checking:
        log_at(module, module.eval_metrics, module.global_step)
    return module.eval_metrics


def _exact(t: torch.Tensor) -> torch.Tensor:
    # float64 keeps a float64 run's tiny losses exact; MPS has no float64.
    t = t.detach()
    return t.float() if t.device.type == "mps" else t.double()


def metric(trainer: L.Trainer, key: str) -> float | None:
    """A metric of the last evaluation: from the module's `eval_metrics` dict (log_eval), else from
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
            log_at(module, {self.key: v}, step)
        if module.trainer.progress_bar_callback is not None:
            module.log(self.key, values[-1], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self.steps, self.values = [], []


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


# ---- per-item curves -------------------------------------------------------------------------------

CURVES_TYPE = "curves"


def set_eval_arrays(module: L.LightningModule, name: str, columns: dict[str, torch.Tensor]) -> None:
    """Per-item values of this evaluation (e.g. name "subtask": {"loss": [n_tasks], "acc": [n_tasks]}),
    item i at position i, for the curves artifact and the event callbacks (CurvesRecorder,
    EmergenceCallback). Never history keys: 500 subtasks would be 500 W&B columns and panels."""
    arrays = getattr(module, "eval_arrays", None)
    if arrays is None:
        arrays = module.eval_arrays = {}
    arrays[name] = {k: v.detach().cpu().double().numpy() for k, v in columns.items()}


class CurvesRecorder(L.Callback):
    """Collects `pl_module.eval_arrays` at every evaluation; at the end of fit writes one parquet file
    per array set into the run directory and logs them as the artifact `curves-<run_id>` (type
    `curves`): long format, columns step (int64), item (int64), one float64 column per metric.
    Read back with `harness.runstore.load_curves`. Its state is checkpointed (state_dict)."""

    def __init__(self):
        self.steps: list[int] = []
        self.data: dict[str, dict[str, list[np.ndarray]]] = {}  # name -> column -> one array per step

    def on_validation_end(self, trainer, pl_module):
        arrays = getattr(pl_module, "eval_arrays", None)
        if trainer.sanity_checking or not arrays:
            return
        self.add(trainer.global_step, arrays)

    def _pop(self) -> None:
        self.steps.pop()
        for columns in self.data.values():
            for values in columns.values():
                values.pop()

    def frames(self) -> dict:
        import pandas as pd

        out = {}
        for name, columns in self.data.items():
            n_items = len(next(iter(columns.values()))[0])
            frame = {"step": np.repeat(np.asarray(self.steps, np.int64), n_items),
                     "item": np.tile(np.arange(n_items, dtype=np.int64), len(self.steps))}
            frame.update({col: np.concatenate(values) for col, values in columns.items()})
            out[name] = pd.DataFrame(frame)
        return out

    def on_fit_end(self, trainer, pl_module):
        run = wandb_run(trainer)
        if run is not None:
            self.write(run)

    def add(self, step: int, arrays: dict) -> None:
        """One evaluation's arrays ({name: {column: values}}) at `step` (also without a trainer: harness.packed)."""
        if self.steps and self.steps[-1] == step:  # the same evaluation again (e.g. after a resume)
            self._pop()
        self.steps.append(step)
        for name, columns in arrays.items():
            for col, values in columns.items():
                self.data.setdefault(name, {}).setdefault(col, []).append(np.asarray(values, np.float64))

    def write(self, run) -> None:
        """The parquet files and the `curves-<run id>` artifact of `run` (nothing if never evaluated)."""
        if not self.steps:
            return
        from harness import tracking

        folder = os.path.join(os.path.dirname(run.dir), CURVES_TYPE)  # beside files/, not uploaded twice
        os.makedirs(folder, exist_ok=True)
        for name, frame in self.frames().items():
            frame.to_parquet(os.path.join(folder, f"{name}.parquet"), index=False)
        tracking.log_artifact(run, folder, f"{CURVES_TYPE}-{run.id}", CURVES_TYPE, policy="immutable",
                              metadata={"evaluations": len(self.steps), "last_step": self.steps[-1]})

    def state_dict(self) -> dict:
        return {"steps": torch.tensor(self.steps, dtype=torch.int64),
                "data": {name: {col: torch.from_numpy(np.stack(v)) for col, v in cols.items()}
                         for name, cols in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = [int(s) for s in state["steps"]]
        self.data = {name: {col: list(t.numpy()) for col, t in cols.items()} for name, cols in state["data"].items()}


# ---- events ----------------------------------------------------------------------------------------

class EmergenceCallback(L.Callback):
    """When each item of a curve (e.g. each subtask's loss) first falls below a threshold.

    Summary (aggregates only; the per-item curves are in the curves artifact):
    `emergence/n_learned` (items ever below the threshold), `emergence/n_below_end` (below it at the
    last evaluation), `emergence/last_step`, `emergence/threshold_nats`, and the table
    `emergence/items` (item, step, reached, final value) for the W&B UI, where step is the first
    evaluated step below the threshold or, if never, the last evaluated step (harness.events).
    """

    def __init__(self, threshold_nats: float = 0.1 * math.log(2), curve: str = "subtask", column: str = "loss"):
        self.threshold, self.curve, self.column = threshold_nats, curve, column
        self.first: Optional[np.ndarray] = None  # [n_items] int64: first step below, -1 = never
        self.final: Optional[np.ndarray] = None  # [n_items] float64: the last evaluation's values
        self.last_step = 0

    def on_validation_end(self, trainer, pl_module):
        arrays = getattr(pl_module, "eval_arrays", None) or {}
        if trainer.sanity_checking or self.curve not in arrays:
            return
        self.observe(trainer.global_step, arrays[self.curve][self.column])

    def observe(self, step: int, values) -> None:
        """One evaluation's per-item values at `step` (also without a trainer: harness.packed blocks)."""
        values = np.asarray(values, np.float64)
        if self.first is None:
            self.first = np.full(len(values), -1, np.int64)
        self.last_step, self.final = step, values
        newly = (self.first < 0) & (values < self.threshold)
        self.first[newly] = step

    def summary(self) -> dict:
        first = self.first if self.first is not None else np.zeros(0, np.int64)
        final = self.final if self.final is not None else np.zeros(0)
        return {"emergence/n_learned": int((first >= 0).sum()),
                "emergence/n_below_end": int((final < self.threshold).sum()),
                "emergence/last_step": int(self.last_step),
                "emergence/threshold_nats": float(self.threshold)}

    def table_rows(self) -> list[list]:
        if self.first is None:
            return []
        return [[i, int(s) if s >= 0 else int(self.last_step), bool(s >= 0), float(v)]
                for i, (s, v) in enumerate(zip(self.first, self.final))]

    def on_fit_end(self, trainer, pl_module):
        values = self.summary()
        if wandb_run(trainer) is not None and self.first is not None:
            import wandb

            values["emergence/items"] = wandb.Table(columns=["item", "step", "reached", f"final_{self.column}"],
                                                    data=self.table_rows())
        write_summary(trainer, values)

    def state_dict(self) -> dict:
        return {"first": None if self.first is None else torch.from_numpy(self.first),
                "final": None if self.final is None else torch.from_numpy(self.final),
                "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.first = None if state["first"] is None else state["first"].numpy().copy()
        self.final = None if state["final"] is None else state["final"].numpy().copy()
        self.last_step = int(state["last_step"])


class GrokkingCallback(L.Callback):
    """Power et al.'s t_train99 / t_val99: the first evaluated step with accuracy >= threshold.

    Summary, as typed events (harness.events): `grok/t_train99`, `grok/t_val99` (+ `/reached`),
    `grok/delay` = t_val99 - t_train99 (+ `/reached`; a lower bound when not reached),
    `grok/phase` (comprehension when validation follows training within `max_delay` steps,
    grokking when later, memorization: train only, confusion: neither), `grok/threshold`,
    `grok/last_step`. `val_threshold` adds `grok/t_valNN` at a second validation threshold and
    measures delay and phase against it (MNIST tops out below 0.99).
    """

    def __init__(self, threshold: float = 0.99, max_delay: int = 1000, train_key: str = "train/acc",
                 val_key: str = "val/acc", val_threshold: Optional[float] = None):
        self.threshold, self.max_delay = threshold, max_delay
        self.train_key, self.val_key = train_key, val_key
        self.val_threshold = val_threshold
        self.t_train: Optional[int] = None
        self.t_val: Optional[int] = None
        self.t_val_low: Optional[int] = None
        self.last_step = 0

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.observe(trainer.global_step, metric(trainer, self.train_key), metric(trainer, self.val_key))

    def observe(self, step: int, train: Optional[float], val: Optional[float]) -> None:
        """One evaluation's accuracies at `step` (also called without a trainer, by harness.packed)."""
        self.last_step = step
        if self.t_train is None and train is not None and train >= self.threshold:
            self.t_train = step
        if self.t_val is None and val is not None and val >= self.threshold:
            self.t_val = step
        if (self.val_threshold is not None and self.t_val_low is None and val is not None
                and val >= self.val_threshold):
            self.t_val_low = step

    def summary(self) -> dict:
        pct = round(self.threshold * 100)
        last = self.last_step
        out = {**events.event_fields(f"grok/t_train{pct}", self.t_train, last),
               **events.event_fields(f"grok/t_val{pct}", self.t_val, last)}
        t_val = self.t_val
        if self.val_threshold is not None:
            out.update(events.event_fields(f"grok/t_val{round(self.val_threshold * 100)}", self.t_val_low, last))
            out["grok/val_threshold"] = self.val_threshold
            t_val = self.t_val_low
        out.update(events.duration_fields("grok/delay", self.t_train, t_val, last))
        out.update({"grok/phase": events.grokking_phase(self.t_train, t_val, self.max_delay),
                    "grok/threshold": self.threshold, "grok/last_step": last})
        return out

    def on_fit_end(self, trainer, pl_module):
        write_summary(trainer, self.summary())

    def state_dict(self) -> dict:
        return {"t_train": self.t_train, "t_val": self.t_val, "t_val_low": self.t_val_low,
                "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.t_train, self.t_val = state["t_train"], state["t_val"]
        self.t_val_low, self.last_step = state["t_val_low"], state["last_step"]
