"""Per-item curves (500 subtasks, 33 Fourier frequencies): recorded at every evaluation and written at
the end of fit as one parquet artifact per run (`curves-<run id>`), never as history keys."""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch

CURVES_TYPE = "curves"


class CurvesRecorder(L.Callback):
    """A run's per-item values of every evaluation (`add`, by its block: harness.members.module), written
    at the end of fit (`write`) as one parquet file per array set in the run directory, logged as the
    artifact `curves-<run_id>` (type `curves`): long format, columns step (int64), item (int64), one
    float64 column per metric. Read back with `harness.runstore.load_curves`. Its state is checkpointed
    (state_dict, under its Lightning Callback state_key)."""

    def __init__(self):
        self.steps: list[int] = []
        self.data: dict[str, dict[str, list[np.ndarray]]] = {}  # name -> column -> one array per step

    def frames(self) -> dict:
        import pandas as pd

        out = {}
        for name, columns in self.data.items():
            n_items = len(next(iter(columns.values()))[0])
            frame = {
                "step": np.repeat(np.asarray(self.steps, np.int64), n_items),
                "item": np.tile(np.arange(n_items, dtype=np.int64), len(self.steps)),
            }
            frame.update({col: np.concatenate(values) for col, values in columns.items()})
            out[name] = pd.DataFrame(frame)
        return out

    def add(self, step: int, arrays: dict) -> None:
        """One evaluation's arrays ({name: {column: values}}, item i at position i) at `step`."""
        if self.steps and self.steps[-1] == step:  # the same evaluation again (e.g. after a resume)
            self.steps.pop()
            for columns in self.data.values():
                for values in columns.values():
                    values.pop()
        self.steps.append(step)
        for name, columns in arrays.items():
            for col, values in columns.items():
                self.data.setdefault(name, {}).setdefault(col, []).append(np.asarray(values, np.float64))

    def write(self, run) -> None:
        """The parquet files and the `curves-<run id>` artifact of `run` (nothing if never evaluated)."""
        if not self.steps:
            return
        from harness.training import tracking

        folder = os.path.join(os.path.dirname(run.dir), CURVES_TYPE)  # beside files/, not uploaded twice
        os.makedirs(folder, exist_ok=True)
        for name, frame in self.frames().items():
            frame.to_parquet(os.path.join(folder, f"{name}.parquet"), index=False)
        tracking.log_artifact(
            run,
            folder,
            f"{CURVES_TYPE}-{run.id}",
            CURVES_TYPE,
            policy="immutable",
            metadata={"evaluations": len(self.steps), "last_step": self.steps[-1]},
        )

    def state_dict(self) -> dict:
        return {
            "steps": torch.tensor(self.steps, dtype=torch.int64),
            "data": {
                name: {col: torch.from_numpy(np.stack(v)) for col, v in cols.items()}
                for name, cols in self.data.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = [int(s) for s in state["steps"]]
        self.data = {name: {col: list(t.numpy()) for col, t in cols.items()} for name, cols in state["data"].items()}
