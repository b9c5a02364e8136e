"""Omnigrok MNIST (Liu, Michaud, Tegmark 2023): grokking on real data from a large initialisation.

An MLP trained on the first 1000 MNIST training images with every initial weight multiplied by
alpha=8 fits its training set within ~3e3 steps but generalises only after ~1e4-1e5 steps, as weight
decay shrinks the weights back to the "Goldilocks" norm. With `optim.fixed_norm` the total weight norm
is held at alpha times its standard-init value after every step: sweeping alpha draws the LU landscape
(training loss an "L", test loss a "U" against the norm).

One model for a single run and for a packed block (harness.members.packed): `make_model` stacks the
members' MLPs along a leading member dimension (harness.training.nn.StackedMLP; a single run is M = 1),
each drawn as its single run draws it. OmnigrokBlock trains it (under harness.members.module.BlockModule,
a solo run being a block of one) with `loss_fn` and `rescale_`, and evaluates each member with `measure`.
The IDX files are read by tasks.mnist.
"""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from harness.config.run import data_dir
from harness.members.block import adamw_hypers, host_metrics, placement
from harness.members.module import solo_job
from harness.training import tracking
from harness.training.data import DeviceDataModule, batch_seed
from harness.training.detectors import GrokkingCallback
from harness.training.nn import MLP, StackedMLP, member_norms, n_params, weight_norm
from harness.training.train import Job
from tasks.configs.mnist_omnigrok import Config
from tasks.mnist import MIRROR, load_mnist, read_idx  # noqa: F401  (part of this task's API)

# ---- data ------------------------------------------------------------------------------------


class MnistData(DeviceDataModule):
    """Images live on the device in the model's dtype; each step takes the next `batch_size` indices
    of a fresh on-device permutation per epoch (the paper's shuffled DataLoader, minus the copy).
    `batch` gives the batches of a block's members at once, each its own seed's. A DeviceDataModule
    for its DDP `rank`."""

    def __init__(self, arrays: dict, batch_size: int):
        super().__init__()
        self.cpu = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k != "split"}  # own, writable copy
        self.batch_size = batch_size
        self.n_train = len(self.cpu["y_train"])
        self._cache: dict = {}
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}  # seed -> (epoch, its permutation)

    def tensors(self, device: torch.device, dtype: torch.dtype) -> dict:
        if (device, dtype) not in self._cache:
            t = {
                k: (v.to(device=device, dtype=dtype) / 255 if k.startswith("x") else v.to(device).long())
                for k, v in self.cpu.items()
            }  # x: [n, 784] in [0, 1]; y: [n]
            self._cache = {(device, dtype): t}
        return self._cache[(device, dtype)]

    def shard_error(self) -> str | None:
        if self.batch_size >= self.n_train:
            return f"data.batch_size={self.batch_size} >= data.n_train={self.n_train} is full batch"
        return None

    def next_indices(self, index: int, device: torch.device, seed: int | None = None) -> torch.Tensor | None:
        """Indices of training step `index` of run `seed` (default: this run's): a slot of its epoch's
        permutation. A function of the step alone (no position state), so a resumed run draws what the
        uninterrupted one would."""
        if self.batch_size >= self.n_train:
            return None
        seed = self.seed if seed is None else seed
        per_epoch = self.n_train // self.batch_size  # an epoch's tail that does not fill a batch is skipped
        epoch, slot = divmod(index, per_epoch)
        cached = self._perms.get(seed)
        if cached is None or cached[0] != epoch:  # the order of the images in `epoch` of run `seed` on this rank
            g = torch.Generator(device=device).manual_seed(batch_seed(seed, self.rank, -1 - epoch))
            cached = self._perms[seed] = (epoch, torch.randperm(self.n_train, device=device, generator=g))
        return cached[1][slot * self.batch_size : (slot + 1) * self.batch_size]

    def batch(self, index: int, device, dtype: torch.dtype, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, batch, 784], y [M, batch]: training step `index` of the runs with `seeds`, each the batch
        its single run draws; one gather from the one copy of the images."""
        t = self.tensors(device, dtype)
        x, y, n = t["x_train"], t["y_train"], len(seeds)
        if self.batch_size >= self.n_train:
            return x.expand(n, *x.shape), y.expand(n, *y.shape)
        rows = {s: self.next_indices(index, device, s) for s in dict.fromkeys(seeds)}
        idx = torch.cat([rows[s] for s in seeds]) if n > 1 else rows[seeds[0]]
        # index_select: ~4x faster than x[idx] on CPU for a [200, 784] gather.
        return x.index_select(0, idx).view(n, -1, x.shape[1]), y.index_select(0, idx).view(n, -1)


def load_data(cfg: Config) -> dict:
    d = cfg.data
    return load_mnist(os.path.join(data_dir(cfg), d.folder), d.split, d.n_train, d.n_test, allow_download=d.download)


# ---- model, loss, fixed norm -------------------------------------------------------------------


def make_model(cfg: Config, members: list[Config] | None = None) -> tuple[StackedMLP, list[float], list[float]]:
    """(model, standard-init norms, initial norms) of `members` (default: the single run `cfg`), one
    norm per member. Each member is MLP(784, width, depth, 10) with PyTorch's default init times
    model.init_scale; `members` (the block's runs) are each seeded here with their own seed before
    their draws, as harness.training.train seeds a run; `cfg` alone (the default) draws from the global
    RNG as the caller seeded it (a plain-loop reference). float32, as Lightning casts it later."""
    mlps, standard, initial = [], [], []
    for c in [cfg] if members is None else members:
        if members is not None:
            L.seed_everything(c.seed, workers=True, verbose=False)  # as harness.training.train, before build
        mlp = MLP(784, c.model.width, c.model.depth, 10)
        standard.append(float(weight_norm(mlp)))
        for p in mlp.parameters():
            p.data.mul_(c.model.init_scale)
        initial.append(float(weight_norm(mlp)))
        mlps.append(mlp)
    return StackedMLP.stack(mlps), standard, initial


def loss_fn(kind: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """out [..., batch, 10], y [..., batch] -> the mean over the batch: a scalar for one run's
    [batch, 10], each member's loss [M] for [M, batch, 10]; reduction="none": per sample."""
    if kind == "ce":
        if out.dim() == 2:
            return F.cross_entropy(out, y, reduction=reduction)
        per = F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)
    else:
        # nn.MSELoss: mean over samples and the 10 outputs; per-sample values average the outputs.
        per = (out - F.one_hot(y, out.shape[-1]).to(out.dtype)).pow(2).mean(-1)
    return per.mean(-1) if reduction == "mean" else per


@torch.no_grad()
def rescale_(model: StackedMLP, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """optim.fixed_norm: each member's parameters (weights and biases) times target / its weight norm,
    target [M]; with `mask` [M] (bool) only the members it marks."""
    factor = target / member_norms(model)
    if mask is not None:
        factor = torch.where(mask, factor, 1)
    for p in model.parameters():
        p.mul_(factor.view(-1, *[1] * (p.dim() - 1)))


# ---- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(cfg: Config, model: StackedMLP, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and accuracy of a model of one member over a whole set, `eval.chunk` images per forward pass."""
    loss_sum, correct = x.new_zeros(()), x.new_zeros(())
    for s in range(0, len(y), cfg.eval.chunk):
        out = model(x[s : s + cfg.eval.chunk])
        yy = y[s : s + cfg.eval.chunk]
        loss_sum += loss_fn(cfg.optim.loss, out, yy, reduction="none").sum()
        correct += (out.argmax(1) == yy).sum()
    return loss_sum / len(y), correct / len(y)


def measure(cfg: Config, model: StackedMLP, batch) -> dict[str, torch.Tensor]:
    """One evaluation's metrics (0-d tensors) of a model of one member on (train images, labels, test
    images, labels)."""
    x_tr, y_tr, x_te, y_te = batch
    train_loss, train_acc = evaluate(cfg, model, x_tr, y_tr)
    val_loss, val_acc = evaluate(cfg, model, x_te, y_te)
    return {
        "train/loss": train_loss,
        "train/acc": train_acc,
        "val/loss": val_loss,
        "val/acc": val_acc,
        "model/weight_norm": weight_norm(model),
    }


# ---- the block: one run or many ---------------------------------------------------------------

# Packed runs (harness.members.packed, issue 14): keys that may differ between the members of a block.
PACKABLE = ("seed", "model.init_scale", "optim.lr", "optim.weight_decay", "optim.fixed_norm")


class OmnigrokBlock:
    """M members in the task's model (make_model with a member dimension), for
    harness.members.module.BlockModule (Lightning's Trainer): a solo run is a block of one (`build`), a
    packed process holds several of one sweep (`build_block`). Each member's weights are its solo run's, and so are its
    minibatches (MnistData.batch: members of one seed share a batch, others gather their own from the
    one copy of the images); a member's loss is `loss_fn` over its own batch, so its gradient is its
    single run's. With optim.fixed_norm a member is rescaled after every step by `rescale_`, as its
    single run. Evaluation runs `measure` on `model.member(i)`, whose parameters are views of the
    member's slices."""

    def __init__(self, cfgs: list[Config]):
        self.cfgs = cfgs
        self.device, self.dtype = placement(cfgs[0].trainer)
        self.arrays = load_data(cfgs[0])  # data.* is not packable: one copy for every member
        model, standard, initial = make_model(cfgs[0], members=cfgs)
        # Initialised in float32 as the single run, then cast as Lightning casts it for 64-true.
        self.model = model.to(dtype=self.dtype, device=self.device)
        self.standard_norms, self.init_norms = standard, initial
        self.views = [self.model.member(i) for i in range(len(cfgs))]
        o = [c.optim for c in cfgs]
        self.lr, self.weight_decay, self.betas, self.eps = adamw_hypers(cfgs)
        self.train_loss_key = "train/batch_loss"  # each step's minibatch loss, logged every log_every
        self.fixed = torch.tensor([x.fixed_norm for x in o], device=self.device)
        self.any_fixed = any(x.fixed_norm for x in o)
        # The fixed norms, floats computed in float32, cast to the training dtype (as a solo run always had them)
        self.target = torch.tensor(initial).to(dtype=self.dtype, device=self.device)
        self.data = MnistData(self.arrays, cfgs[0].data.batch_size)
        t = self.data.tensors(self.device, self.dtype)
        self.val_batch = (t["x_train"], t["y_train"], t["x_test"], t["y_test"])  # what `measure` takes
        self.seeds = [c.seed for c in cfgs]
        # grok/t_train99 and grok/t_val99 (Power et al.) plus grok/t_val80: MNIST test accuracy stays
        # below 0.99, so grok/delay and grok/phase are measured against eval.val_threshold.
        self.grok = [
            GrokkingCallback(c.eval.threshold, c.eval.max_delay, val_threshold=c.eval.val_threshold) for c in cfgs
        ]

    def losses(self, step: int) -> torch.Tensor:
        x, y = self.data.batch(step, self.device, self.dtype, self.seeds)
        return loss_fn(self.cfgs[0].optim.loss, self.model(x), y)

    def after_step(self, active: torch.Tensor | None) -> None:
        if self.any_fixed:  # (a host bool: reading the mask back would sync a GPU every step)
            rescale_(self.model, self.target, self.fixed if active is None else self.fixed & active.to(self.device))

    def resolve_config(self, i: int) -> None:
        """data.split=auto -> the split used, as the single build records it (called with member i's
        sweep parameters in the environment; harness.members.packed then logs the config again), unless a
        sweep set data.split itself (then W&B already holds that value and would reject a different one
        as inconsistent)."""
        if self.cfgs[i].data.split == "auto" and "data.split" not in tracking.sweep_parameters():
            self.cfgs[i].data.split = self.arrays["split"]

    def evaluate(self, i: int, step: int) -> tuple[dict[str, float], dict]:
        out = measure(self.cfgs[i], self.views[i], self.val_batch)
        metrics = host_metrics(out)
        self.grok[i].observe(step, metrics.get("train/acc"), metrics.get("val/acc"))
        return metrics, {}

    def static_summary(self, i: int) -> dict:
        return {
            "data/source": self.arrays["split"],
            "data/n_train": len(self.arrays["y_train"]),
            "data/n_test": len(self.arrays["y_test"]),
            "model/params": n_params(self.views[i]),
            "model/standard_norm": self.standard_norms[i],
            "model/init_norm": self.init_norms[i],
            "loss_units": "mse per output" if self.cfgs[i].optim.loss == "mse" else "nats",
        }

    def final_summary(self, i: int, seconds: float, cpu: float, steps: int) -> dict:
        return self.grok[i].summary()

    def member_model(self, i: int) -> StackedMLP:
        return self.model.member(i, copy=True)  # its own storage: the model artifact holds member i alone

    def member_callbacks(self, i: int) -> list:
        return [self.grok[i]]

    def shard_error(self) -> str | None:
        return self.data.shard_error()


build_block = OmnigrokBlock  # build_block(cfgs) -> the block of a packed process


def build(cfg: Config) -> Job:
    block = OmnigrokBlock([cfg])
    return solo_job(block, data=block.data)
