"""Multitask sparse parity (Michaud et al. 2023, The Quantization Model of Neural Scaling).

Input: `n_tasks` one-hot control bits + `n` uniform random data bits. Subtask t owns a fixed random
k-subset S_t of the data bits (all subsets distinct); the label is the parity of x[S_t]. Subtask t is
drawn with probability p_t proportional to t^-(zipf_alpha + 1), t = 1..n_tasks.

The model is an MLP with a member dimension (harness.training.nn.WidthPackedMLP, built by `make_model`),
trained as a block (SparseParityBlock, under harness.members.module.BlockModule): a solo run is a block of
one member (`build`); a packed block (`build_block`) holds members of different widths, seeds and
optimizer settings side by side in one such model and trains them with the same forward and loss
(`member_losses`), evaluated by the same code (`per_subtask`, `val_metrics`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from harness.members.block import adamw_hypers, host_metrics, placement
from harness.members.module import solo_job
from harness.members.optim import MemberAxis
from harness.quanta_stats import zipf_frequencies
from harness.training.data import BatchStream, DeviceDataModule
from harness.training.detectors import EmergenceCallback
from harness.training.nn import MLP, WidthPackedMLP, n_params
from harness.training.train import Job
from tasks.configs.sparse_parity import Config


def frequencies(n_tasks: int, zipf_alpha: float, offset: float = 0.0) -> torch.Tensor:
    """p_t proportional to (t + offset)^-(zipf_alpha + 1), t = 1..n_tasks: [n_tasks], float64
    (harness.quanta_stats.zipf_frequencies, which the analyses share)."""
    return torch.from_numpy(zipf_frequencies(n_tasks, zipf_alpha, offset))


def random_subsets(n_tasks: int, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Distinct sorted k-subsets of range(n), one per subtask: [n_tasks, k]."""
    seen, out = set(), []
    while len(out) < n_tasks:
        s = tuple(sorted(torch.randperm(n, generator=generator)[:k].tolist()))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return torch.tensor(out, dtype=torch.long)


class SparseParityData(DeviceDataModule):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.data
        self.cfg = cfg
        self.steps_per_batch = cfg.trainer.batch_steps()
        g = torch.Generator().manual_seed(d.task_seed if d.task_seed >= 0 else cfg.seed)
        self.subsets = random_subsets(d.n_tasks, d.n, d.k, g)  # [n_tasks, k]
        self.p = frequencies(d.n_tasks, d.zipf_alpha, d.offset)  # [n_tasks]
        self.cdf = torch.cumsum(self.p, 0).float()
        # Test sets, stored compactly (task index + bits) and expanded to one-hot chunk by chunk.
        m = cfg.eval.test_per_task
        self.test_tasks = torch.arange(d.n_tasks).repeat_interleave(m)  # [n_tasks * m]
        self.test_bits = torch.randint(0, 2, (d.n_tasks * m, d.n), generator=g, dtype=torch.uint8)
        self.finite = None
        self.seed = cfg.seed  # the run's seed; the batches follow `seed` (the property below)
        if d.n_train_samples:
            # Finite-data mode: D samples drawn once, reshuffled every epoch. With data.stream_seed=-1 they
            # come from the global RNG right after the model's init (as they always have: they then depend
            # on the width); a fixed stream seed draws them from their own generator, the same for every width.
            gen = torch.Generator().manual_seed(d.stream_seed) if d.stream_seed >= 0 else None
            tasks = self._draw_tasks(d.n_train_samples, torch.device("cpu"), gen)
            self.finite = (tasks, torch.randint(0, 2, (d.n_train_samples, d.n), dtype=torch.uint8, generator=gen))
        self._on_device: dict = {}
        self._epoch_order: tuple[int, torch.Tensor] | None = None

    @property
    def seed(self) -> int:
        """The seed of the training batches (DeviceDataModule seeds batch i from it): data.stream_seed if
        set, else the run's seed."""
        return self.cfg.data.stream_seed if self.cfg.data.stream_seed >= 0 else self._run_seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._run_seed = value

    def _draw_tasks(self, size: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        # Inverse-CDF sampling of subtasks, vectorised on the device.
        # float32 whatever the default dtype (Lightning's 64-true sets float64 around training_step)
        u = torch.rand(size, device=device, generator=generator, dtype=torch.float32)
        cdf = self.cdf if torch.device(device).type == "cpu" else self._tensors(device)["cdf"]
        return torch.searchsorted(cdf, u).clamp_(max=self.cfg.data.n_tasks - 1)

    def _tensors(self, device: torch.device) -> dict:
        if device not in self._on_device:
            # cdf too: a host-to-device copy per batch would wait for the GPU at every step
            t = {
                "subsets": self.subsets.to(device),
                "cdf": self.cdf.to(device),
                "test_tasks": self.test_tasks.to(device),
                "test_bits": self.test_bits.to(device),
            }
            if self.finite is not None:
                t["train_tasks"], t["train_bits"] = (x.to(device) for x in self.finite)
            self._on_device = {device: t}
        return self._on_device[device]

    def encode(self, tasks: torch.Tensor, bits: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(task index [b], data bits [b, n]) -> (input [b, n_tasks + n], parity label [b])."""
        subsets = self._tensors(device)["subsets"]
        y = bits.gather(1, subsets[tasks]).sum(1).remainder(2).long()  # [b]
        x = torch.cat([F.one_hot(tasks, self.cfg.data.n_tasks).float(), bits.float()], dim=1)
        return x, y

    def train_batch(self, index: int, device, generator: torch.Generator | None = None):
        """Training batch `index`, drawn from `generator` (a block's BatchStream, seeded as DeviceDataModule
        seeds torch's global RNG per Lightning batch, which is the default)."""
        d = self.cfg.data
        if self.finite is None:
            tasks = self._draw_tasks(d.batch_size, device, generator)
            bits = torch.randint(0, 2, (d.batch_size, d.n), device=device, dtype=torch.uint8, generator=generator)
        else:
            t = self._tensors(device)
            idx = self.finite_batch_indices(index)
            idx = slice(None) if idx is None else idx.to(device)
            tasks, bits = t["train_tasks"][idx], t["train_bits"][idx]
        return self.encode(tasks, bits, device)

    def finite_batch_indices(self, index: int) -> torch.Tensor | None:
        """Sample indices of training batch `index` in finite-data mode; None = all D (batch >= D).

        Epoch e = index // ceil(D / batch) sees all D samples once in its own random order (seeded
        by the run seed and e, so a resumed run replays the same batches); the last batch of an
        epoch holds the remainder, as in the paper's loader (shuffle=True, a smaller last batch).
        """
        d = self.cfg.data
        D, B = d.n_train_samples, d.batch_size
        if B >= D:
            return None
        per_epoch = -(-D // B)
        epoch, j = divmod(index, per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch_order = (epoch, torch.randperm(D, generator=g))
        return self._epoch_order[1][j * B : (j + 1) * B]

    def shard_error(self) -> str | None:
        if self.cfg.data.n_train_samples:  # one process owns the epoch order of the D samples
            return f"data.n_train_samples={self.cfg.data.n_train_samples} shuffles one epoch order for all D samples"
        return None

    def val_batch(self, index: int, device):
        t = self._tensors(device)
        return t["test_tasks"], t["test_bits"]


def make_model(cfg: Config, members: list[Config] | None = None, data: list | None = None) -> WidthPackedMLP:
    """The task's model for `members` (the block's runs), each member's weights drawn by MLP's nn.Linear
    initialisers after seeding with its own seed, as harness.training.train seeds a run; `cfg` alone
    (the default, M = 1) draws from the global RNG as the caller seeded it (a plain-loop reference).
    With `data` (a list), each member's SparseParityData is appended right after its init
    (finite-data samples with data.stream_seed=-1 come from the global RNG there)."""
    mlps = []
    for c in [cfg] if members is None else members:
        if members is not None:
            L.seed_everything(c.seed, workers=True, verbose=False)  # as harness.training.train, before build
        mlps.append(MLP(c.data.n_tasks + c.data.n, c.model.width, c.model.depth, 2))
        if data is not None:
            data.append(SparseParityData(c))
    return WidthPackedMLP.concat(mlps)


def member_losses(model: WidthPackedMLP, x: torch.Tensor, y: torch.Tensor, subset: dict | None = None) -> torch.Tensor:
    """Each member's mean cross-entropy on the shared batch (x, y): [m] (the members of `subset`, else
    all). The training loss of a single run (M = 1: F.cross_entropy of its logits) and of a block."""
    logits = model.logits(x, subset)  # [m, B, 2]
    m = logits.shape[0]
    if m == 1:
        return F.cross_entropy(logits[0], y)[None]
    return F.cross_entropy(logits.flatten(0, 1), y.repeat(m), reduction="none").view(m, -1).mean(1)


@torch.no_grad()
def per_subtask(cfg: Config, model: nn.Module, data: SparseParityData, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss (nats) and accuracy of every subtask on the test sets, in one batched pass: [n_tasks] each."""
    n_tasks, chunk = cfg.data.n_tasks, cfg.eval.chunk
    dtype = next(model.parameters()).dtype
    tasks, bits = data.val_batch(0, device)
    losses, correct = [], []
    for s in range(0, len(tasks), chunk):
        x, y = data.encode(tasks[s : s + chunk], bits[s : s + chunk], device)
        logits = model(x.to(dtype))
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        correct.append((logits.argmax(1) == y).float())
    loss = torch.cat(losses).view(n_tasks, -1).mean(1)
    acc = torch.cat(correct).view(n_tasks, -1).mean(1)
    return loss, acc


def val_metrics(cfg: Config, p: torch.Tensor, loss: torch.Tensor, acc: torch.Tensor) -> dict[str, torch.Tensor]:
    """The history row of an evaluation from its per-subtask loss and accuracy (0-d tensors); p the
    subtask frequencies. Per-subtask curves go to the curves artifact, history keeps aggregates:
    val/n_learned = subtasks below the threshold at this evaluation."""
    return {
        "val/loss": (p * loss).sum(),
        "val/acc": (p * acc).sum(),
        "val/loss_uniform": loss.mean(),
        "val/n_learned": (loss < cfg.eval.threshold_bits * math.log(2)).sum(),
    }


# ---------------------------------------------------------------- the block: one run or many

# Packed runs (harness.members.packed, issue 14): keys whose values may differ between the members of one
# packed process; every other key must be equal.
PACKABLE = ("seed", "data.task_seed", "data.stream_seed", "optim.lr", "optim.weight_decay", "model.width")


class Group(NamedTuple):
    """Members of a block that share their training batches."""

    members: list[int]
    subset: dict | None  # WidthPackedMLP.subset of the members (None: all of the block's)
    stream: BatchStream


class SparseParityBlock:
    """M members in the task's model (make_model with members: their hidden layers concatenated, whatever
    their widths), for harness.members.module.BlockModule (Lightning's Trainer): a solo run is a block of
    one (`build`), a packed process holds several of one sweep (`build_block`). Each member's weights and
    data are its solo run's.

    Batches: members whose training batches are the same (same stream seed and task seed; the stream
    seed follows the run seed unless data.stream_seed is set) form a group that draws ONE batch per step
    (a BatchStream, seeded as a single run's DeviceDataModule) and runs the model on its members only
    (one matmul for all their first hidden layers). Members of different streams are separate groups:
    exact, only slower. In finite-data mode with data.stream_seed=-1 a member's D samples depend on its
    init (SparseParityData), so each such member is a group. Evaluation runs `per_subtask` and
    `val_metrics` on `model.member(i)`, whose parameters are views of member i's slices."""

    def __init__(self, cfgs: list[Config]):
        self.cfgs = cfgs
        self.device, self.dtype = placement(cfgs[0].trainer)
        self.data: list[SparseParityData] = []
        # Initialised in float32 as the single run, then cast as Lightning casts it for 64-true.
        self.model = make_model(cfgs[0], cfgs, self.data).to(dtype=self.dtype, device=self.device)
        self.views = [self.model.member(i) for i in range(len(cfgs))]
        self.p = [d.p.float().to(dtype=self.dtype, device=self.device) for d in self.data]  # as a float32 buffer cast
        self.emergence = [EmergenceCallback(c.eval.threshold_bits * math.log(2)) for c in cfgs]
        self.lr, self.weight_decay, self.betas, self.eps = adamw_hypers(cfgs)
        self.train_loss_key = "train/loss"
        streams: dict = {}
        for i, c in enumerate(cfgs):
            d = c.data
            own = d.n_train_samples and d.stream_seed < 0  # D samples drawn after this member's init
            key = ("member", i) if own else (self.data[i].seed, d.task_seed if d.task_seed >= 0 else c.seed)
            streams.setdefault(key, []).append(i)
        self.groups = [
            Group(g, None if len(g) == len(cfgs) else self.model.subset(g), BatchStream(self.data[g[0]], self.device))
            for g in streams.values()
        ]
        order = torch.tensor([i for g in streams.values() for i in g])
        self._inverse = None if len(self.groups) == 1 else torch.argsort(order).to(self.device)

    def member_axes(self) -> list[MemberAxis]:
        return [MemberAxis(dim, owner) for dim, owner in self.model.owners()]

    def losses(self, step: int) -> torch.Tensor:
        out = []
        for g in self.groups:
            x, y = g.stream.batch(step)
            out.append(member_losses(self.model, x.to(self.dtype), y, g.subset))
        losses = out[0] if len(out) == 1 else torch.cat(out)
        return losses if self._inverse is None else losses[self._inverse]

    def shard_error(self) -> str | None:
        return self.data[0].shard_error()

    def evaluate(self, i: int, step: int) -> tuple[dict[str, float], dict]:
        cfg = self.cfgs[i]
        loss, acc = per_subtask(cfg, self.views[i], self.data[i], self.device)
        metrics = host_metrics(val_metrics(cfg, self.p[i], loss, acc))
        arrays = {"subtask": {"loss": loss.cpu().double().numpy(), "acc": acc.cpu().double().numpy()}}
        self.emergence[i].observe(step, arrays["subtask"]["loss"])
        return metrics, arrays

    def static_summary(self, i: int) -> dict:
        return {"model/params": n_params(self.views[i]), "loss_units": "nats"}

    def final_summary(self, i: int, seconds: float, cpu: float, steps: int) -> dict:
        return self.emergence[i].final_values()  # a member always has its W&B run

    def member_model(self, i: int) -> WidthPackedMLP:
        return self.model.member(i, copy=True)  # weights of its own: views would save the whole block

    def member_callbacks(self, i: int) -> list:
        return [self.emergence[i]]


build_block = SparseParityBlock  # build_block(cfgs) -> the block of a packed process


def build(cfg: Config) -> Job:
    block = SparseParityBlock([cfg])
    return solo_job(block, data=block.data[0])
