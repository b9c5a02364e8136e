"""Data that lives on the training device.

Per-sample `Dataset` + `DataLoader` costs ~2.5x a full-batch step on these models (DESIGN.md), so
loaders here yield only step counters; the DataModule turns each counter into a whole batch of
tensors already on the device, in `on_after_batch_transfer`.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset


class _Counter(IterableDataset):
    def __init__(self, n: int, tag: str):
        self.n, self.tag = n, tag

    def __iter__(self):
        for i in range(self.n):
            yield (self.tag, i)


def step_loader(n: int, tag: str) -> DataLoader:
    # batch_size=None: no collation, the (tag, index) tuple reaches the module as it is.
    return DataLoader(_Counter(n, tag), batch_size=None, num_workers=0)


class DeviceDataModule(L.LightningDataModule):
    """Subclasses implement `train_batch(index, device)` and `val_batch(index, device)`.

    With `steps_per_batch` K > 1 each training batch is a list of K batches, one per optimizer
    step (the module then optimizes manually); K = 1 hands over the batch itself.
    """

    n_val_batches = 1
    steps_per_batch = 1

    def train_batch(self, index: int, device: torch.device) -> Any:
        raise NotImplementedError

    def val_batch(self, index: int, device: torch.device) -> Any:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return step_loader(max(self.trainer.max_steps // self.steps_per_batch, 1), "train")

    def val_dataloader(self) -> DataLoader:
        return step_loader(self.n_val_batches, "val")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        tag, index = batch
        device = self.trainer.strategy.root_device
        if tag != "train":
            return self.val_batch(index, device)
        k = self.steps_per_batch
        if k == 1:
            return self.train_batch(index, device)
        return [self.train_batch(index * k + j, device) for j in range(k)]
