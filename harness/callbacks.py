"""Lightning callbacks shared by tasks: a final evaluation, and event detectors that write the
run summary (emergence of subtasks, grokking steps and phase)."""
from __future__ import annotations

import math

import lightning as L


# W&B drops None from summaries, so an event that never happened is this string, never a number;
# `pd.to_numeric(col, errors="coerce")` turns it into NaN for analysis.
CENSORED = "censored"


def write_summary(trainer: L.Trainer, values: dict) -> None:
    """Put derived events into run.summary (not history): one value per run."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "summary"):
            experiment.summary.update(values)


def metric(trainer: L.Trainer, key: str) -> float | None:
    """A metric of the last evaluation: from the module's `eval_metrics` dict, where a task that
    sends its metrics straight to the loggers puts them (self.log costs ~1 ms a key), else from
    Lightning's callback_metrics."""
    direct = getattr(trainer.lightning_module, "eval_metrics", None) or {}
    v = direct[key] if key in direct else trainer.callback_metrics.get(key)
    return None if v is None else float(v)


class FinalEval(L.Callback):
    """Evaluate after the last step even when steps is not a multiple of eval_every.

    Lightning validates early when `trainer.should_stop` is set, so stopping at max_steps forces it.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class EmergenceCallback(L.Callback):
    """First evaluated step at which each `prefix + NNNN` metric falls below a threshold.

    Summary: `emergence/step/NNNN` ("censored" when never learned, at `emergence/last_step`),
    `emergence/n_learned`, `emergence/threshold_nats`.
    """

    def __init__(self, prefix: str = "subtask_loss/", threshold_nats: float = 0.1 * math.log(2)):
        self.prefix, self.threshold = prefix, threshold_nats
        self.first: dict[str, int | None] = {}
        self.last_step = 0

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.last_step = trainer.global_step
        for key, value in trainer.callback_metrics.items():
            if not key.startswith(self.prefix):
                continue
            name = key[len(self.prefix):]
            self.first.setdefault(name, None)
            if self.first[name] is None and float(value) < self.threshold:
                self.first[name] = trainer.global_step

    def summary(self) -> dict:
        out = {f"emergence/step/{k}": CENSORED if v is None else v for k, v in sorted(self.first.items())}
        out["emergence/n_learned"] = sum(v is not None for v in self.first.values())
        out["emergence/threshold_nats"] = self.threshold
        out["emergence/last_step"] = self.last_step
        return out

    def on_fit_end(self, trainer, pl_module):
        write_summary(trainer, self.summary())


PHASES = ("comprehension", "grokking", "memorization", "confusion")


def grokking_phase(t_train: int | None, t_val: int | None, max_delay: int) -> str:
    """Liu et al.'s four phases from the steps at which train and val reach the threshold."""
    if t_train is None:
        return "comprehension" if t_val is not None else "confusion"
    if t_val is None:
        return "memorization"
    return "grokking" if t_val - t_train > max_delay else "comprehension"


class GrokkingCallback(L.Callback):
    """Power et al.'s t_train99 / t_val99 (first evaluated step with accuracy >= threshold).

    Summary: `grok/t_train99`, `grok/t_val99`, `grok/delay` ("censored" when never reached, at
    `grok/last_step`) and `grok/phase`: comprehension when validation follows training within
    `max_delay` steps, grokking when later, memorization (train only), confusion (neither).
    """

    def __init__(self, threshold: float = 0.99, max_delay: int = 1000,
                 train_key: str = "train/acc", val_key: str = "val/acc"):
        self.threshold, self.max_delay = threshold, max_delay
        self.train_key, self.val_key = train_key, val_key
        self.t_train: int | None = None
        self.t_val: int | None = None
        self.last_step = 0

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.last_step = trainer.global_step
        train, val = metric(trainer, self.train_key), metric(trainer, self.val_key)
        if self.t_train is None and train is not None and train >= self.threshold:
            self.t_train = trainer.global_step
        if self.t_val is None and val is not None and val >= self.threshold:
            self.t_val = trainer.global_step

    def summary(self) -> dict:
        pct = round(self.threshold * 100)
        delay = None if self.t_train is None or self.t_val is None else self.t_val - self.t_train
        return {
            f"grok/t_train{pct}": CENSORED if self.t_train is None else self.t_train,
            f"grok/t_val{pct}": CENSORED if self.t_val is None else self.t_val,
            "grok/delay": CENSORED if delay is None else delay,
            "grok/phase": grokking_phase(self.t_train, self.t_val, self.max_delay),
            "grok/threshold": self.threshold,
            "grok/last_step": self.last_step,
        }

    def on_fit_end(self, trainer, pl_module):
        write_summary(trainer, self.summary())
