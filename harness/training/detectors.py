"""Event detectors: each member's block (harness.members.module.BlockModule) feeds them every evaluation
(`observe`) and writes their time-to-event values into the run summary at the end of fit (emergence of
subtasks; grokking steps and phase; see harness.events). Lightning Callbacks for their `state_key`: a
resume point holds their state under it (harness.members.checkpoints)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from harness import events


class EmergenceCallback(L.Callback):
    """When each item's loss (e.g. each subtask's) first falls below a threshold.

    Summary (aggregates only; the per-item curves are in the curves artifact):
    `emergence/n_learned` (items ever below the threshold), `emergence/n_below_end` (below it at the
    last evaluation), `emergence/last_step`, `emergence/threshold_nats`, and the table
    `emergence/items` (item, step, reached, final_loss) for the W&B UI, where step is the first
    evaluated step below the threshold or, if never, the last evaluated step (harness.events).
    """

    def __init__(self, threshold_nats: float):
        self.threshold = threshold_nats
        self.first: np.ndarray | None = None  # [n_items] int64: first step below, -1 = never
        self.final: np.ndarray | None = None  # [n_items] float64: the last evaluation's values
        self.last_step = 0

    def observe(self, step: int, values) -> None:
        """One evaluation's per-item values at `step`."""
        values = np.asarray(values, np.float64)
        if self.first is None:
            self.first = np.full(len(values), -1, np.int64)
        self.last_step, self.final = step, values
        newly = (self.first < 0) & (values < self.threshold)
        self.first[newly] = step

    def summary(self) -> dict:
        first = self.first if self.first is not None else np.zeros(0, np.int64)
        final = self.final if self.final is not None else np.zeros(0)
        return {
            "emergence/n_learned": int((first >= 0).sum()),
            "emergence/n_below_end": int((final < self.threshold).sum()),
            "emergence/last_step": int(self.last_step),
            "emergence/threshold_nats": float(self.threshold),
        }

    def table_rows(self) -> list[list]:
        if self.first is None:
            return []
        return [
            [i, int(s) if s >= 0 else int(self.last_step), bool(s >= 0), float(v)]
            for i, (s, v) in enumerate(zip(self.first, self.final))
        ]

    def final_values(self) -> dict:
        """The run's final summary values: `summary()`, and the `emergence/items` table (for the W&B run
        that shows it) once anything was evaluated (also written for packed members)."""
        values = self.summary()
        if self.first is not None:
            import wandb

            values["emergence/items"] = wandb.Table(
                columns=["item", "step", "reached", "final_loss"], data=self.table_rows()
            )
        return values

    def state_dict(self) -> dict:
        return {
            "first": None if self.first is None else torch.from_numpy(self.first),
            "final": None if self.final is None else torch.from_numpy(self.final),
            "last_step": self.last_step,
        }

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

    def __init__(self, threshold: float, max_delay: int, val_threshold: float | None = None):
        self.threshold, self.max_delay = threshold, max_delay
        self.val_threshold = val_threshold
        self.t_train: int | None = None
        self.t_val: int | None = None
        self.t_val_low: int | None = None
        self.last_step = 0

    def observe(self, step: int, train: float | None, val: float | None) -> None:
        """One evaluation's accuracies at `step`."""
        self.last_step = step
        if self.t_train is None and train is not None and train >= self.threshold:
            self.t_train = step
        if self.t_val is None and val is not None and val >= self.threshold:
            self.t_val = step
        if self.val_threshold is not None and self.t_val_low is None and val is not None and val >= self.val_threshold:
            self.t_val_low = step

    def summary(self) -> dict:
        pct = round(self.threshold * 100)
        last = self.last_step
        out = {
            **events.event_fields(f"grok/t_train{pct}", self.t_train, last),
            **events.event_fields(f"grok/t_val{pct}", self.t_val, last),
        }
        t_val = self.t_val
        if self.val_threshold is not None:
            out.update(events.event_fields(f"grok/t_val{round(self.val_threshold * 100)}", self.t_val_low, last))
            out["grok/val_threshold"] = self.val_threshold
            t_val = self.t_val_low
        return {
            **out,
            **events.duration_fields("grok/delay", self.t_train, t_val, last),
            "grok/phase": events.grokking_phase(self.t_train, t_val, self.max_delay),
            "grok/threshold": self.threshold,
            "grok/last_step": last,
        }

    def state_dict(self) -> dict:
        return {"t_train": self.t_train, "t_val": self.t_val, "t_val_low": self.t_val_low, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.t_train, self.t_val = state["t_train"], state["t_val"]
        self.t_val_low, self.last_step = state["t_val_low"], state["last_step"]
