"""Data that lives on the training device.

Per-sample `Dataset` + `DataLoader` costs ~2.5x a full-batch step on these models (DESIGN.md), so
loaders here yield only step counters; the DataModule turns each counter into a whole batch of
tensors already on the device, in `on_after_batch_transfer`.

Resumable and shardable by construction: training batch i (counted in Lightning batches from the
start of the run) is drawn after seeding torch's RNG from (run seed, rank, i). A run resumed at
step s (harness/training/checkpoint.py) starts its counter at s / steps_per_batch and so draws exactly the
batches the uninterrupted run would have drawn, with no RNG state in the checkpoint; DDP ranks draw
different batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset


class _Counter(IterableDataset):
    """(tag, i) for i in [start(), n); `start` is read when iteration begins, after a resume has
    restored the trainer's step count."""

    def __init__(self, n: int, tag: str, start: Callable[[], int] = lambda: 0):
        self.n, self.tag, self.start = n, tag, start

    def __iter__(self):
        for i in range(self.start(), self.n):
            yield (self.tag, i)


def step_loader(n: int, tag: str, start: Callable[[], int] = lambda: 0) -> DataLoader:
    # batch_size=None: no collation, the (tag, index) tuple reaches the module as it is.
    return DataLoader(_Counter(n, tag, start), batch_size=None, num_workers=0)


def batch_seed(seed: int, rank: int, index: int) -> int:
    """A 63-bit seed for training batch `index` of process `rank` (hashed: nearby inputs give
    unrelated streams)."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_rng(device: torch.device, seed: int) -> None:
    """Seed the CPU generator and `device`'s. torch.manual_seed does this for every backend and
    costs ~0.5 ms on a CPU-only build (availability checks); the generators themselves ~5 us."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device: Lightning sets it to this rank's
    elif device.type != "cpu":
        torch.manual_seed(seed)


class DeviceDataModule(L.LightningDataModule):
    """Subclasses implement `train_batch(index, device)` and `val_batch(index, device)`.

    With `steps_per_batch` K > 1 each training batch is a list of K batches, one per optimizer
    step (the module then optimizes manually); K = 1 hands over the batch itself. `train_batch`
    draws from torch's global RNG, which is seeded per Lightning batch (see the module docstring);
    `seed` is the run's seed (set by harness.training.train).
    """

    n_val_batches = 1
    steps_per_batch = 1
    seed = 0

    def train_batch(self, index: int, device: torch.device) -> Any:
        raise NotImplementedError

    def val_batch(self, index: int, device: torch.device) -> Any:
        raise NotImplementedError

    @property
    def rank(self) -> int:
        """This process's DDP rank: its trainer's, else Lightning's from the environment (a block's data
        modules have no trainer, and each DDP rank of a run is a process of its own)."""
        return self.trainer.global_rank if self.trainer is not None else rank_zero_only.rank

    def shard_error(self) -> str | None:
        """Why each DDP rank would see the same data (e.g. full batch), or None if they do not."""
        return None

    def train_dataloader(self) -> DataLoader:
        k = self.steps_per_batch
        return step_loader(max(self.trainer.max_steps // k, 1), "train", lambda: self.trainer.global_step // k)

    def val_dataloader(self) -> DataLoader:
        return step_loader(self.n_val_batches, "val")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        tag, index = batch
        device = self.trainer.strategy.root_device
        if tag != "train":
            return self.val_batch(index, device)
        seed_rng(device, batch_seed(self.seed, self.rank, index))
        k = self.steps_per_batch
        if k == 1:
            return self.train_batch(index, device)
        return [self.train_batch(index * k + j, device) for j in range(k)]


class BatchStream:
    """The training batches of a DeviceDataModule drawn from a generator of its own, exactly as a run
    of that data module draws them (seeded per Lightning batch from batch_seed(data.seed, data.rank, i),
    then its steps_per_batch steps' batches in order): a block's members get their solo runs' batches.
    The data module's `train_batch(index, device, generator)` takes the generator."""

    def __init__(self, data: DeviceDataModule, device: torch.device):
        self.data, self.device, self.k = data, device, data.steps_per_batch
        self.gen = torch.Generator(device=device)
        self.next: int | None = None  # the step the generator is positioned to draw next

    def batch(self, step: int) -> Any:
        """The batch of optimizer step `step`."""
        if step % self.k == 0 or step != self.next:
            # A new Lightning batch (or a resume inside one): seed as on_after_batch_transfer does, then
            # replay the draws of the steps of this Lightning batch before `step`.
            start = step - step % self.k
            self.gen.manual_seed(batch_seed(self.data.seed, self.data.rank, start // self.k))
            for s in range(start, step):
                self.data.train_batch(s, self.device, self.gen)
        self.next = step + 1
        return self.data.train_batch(step, self.device, self.gen)
