"""Multitask sparse parity (Michaud et al. 2023, The Quantization Model of Neural Scaling).

Input: `n_tasks` one-hot control bits + `n` uniform random data bits. Subtask t owns a fixed random
k-subset S_t of the data bits (all subsets distinct); the label is the parity of x[S_t]. Subtask t is
drawn with probability p_t proportional to t^-(zipf_alpha + 1), t = 1..n_tasks.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from harness.quanta_stats import zipf_frequencies
from harness.training.curves import CurvesRecorder, set_eval_arrays
from harness.training.data import DeviceDataModule
from harness.training.detectors import EmergenceCallback
from harness.training.logs import TrainLossLog, log_eval
from harness.training.nn import MLP, n_params  # noqa: F401  (MLP and n_params are part of this task's API)
from harness.training.train import Job, train_steps
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
        self.seed = cfg.seed  # harness.training.train sets it again; the batches follow `seed` (the property below)
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
        set, else the run's seed, which harness.training.train assigns here."""
        return self.cfg.data.stream_seed if self.cfg.data.stream_seed >= 0 else self._run_seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._run_seed = value

    def _draw_tasks(self, size: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        # Inverse-CDF sampling of subtasks, vectorised on the device.
        u = torch.rand(size, device=device, generator=generator)
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
        """Training batch `index`, drawn from `generator` (default: torch's global RNG, which
        DeviceDataModule seeds per Lightning batch; a packed block passes its own, seeded alike)."""
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


class SparseParityModule(L.LightningModule):
    def __init__(self, cfg: Config, model: nn.Module, data: SparseParityData):
        super().__init__()
        self.cfg, self.model, self.data = cfg, model, data
        self.register_buffer("p", data.p.float(), persistent=False)
        self.threshold_nats = cfg.eval.threshold_bits * math.log(2)
        self.train_log = TrainLossLog(cfg.trainer.log_every)

        # Manual optimization: one Lightning batch may carry several optimizer steps.
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        train_steps(self, batch, lambda xy: F.cross_entropy(self.model(xy[0]), xy[1]))

    @torch.no_grad()
    def per_subtask(self, tasks: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss (nats) and accuracy of every subtask in one batched pass: [n_tasks] each."""
        n_tasks, chunk = self.cfg.data.n_tasks, self.cfg.eval.chunk
        losses, correct = [], []
        for s in range(0, len(tasks), chunk):
            x, y = self.data.encode(tasks[s : s + chunk], bits[s : s + chunk], self.device)
            logits = self.model(x)
            losses.append(F.cross_entropy(logits, y, reduction="none"))
            correct.append((logits.argmax(1) == y).float())
        loss = torch.cat(losses).view(n_tasks, -1).mean(1)
        acc = torch.cat(correct).view(n_tasks, -1).mean(1)
        return loss, acc

    def validation_step(self, batch, batch_idx):
        loss, acc = self.per_subtask(*batch)
        # Per-subtask curves go to the curves artifact (CurvesRecorder), history keeps aggregates:
        # val/n_learned = subtasks below the threshold at this evaluation.
        set_eval_arrays(self, "subtask", {"loss": loss, "acc": acc})
        log_eval(self, self.val_metrics(loss, acc))

    def val_metrics(self, loss: torch.Tensor, acc: torch.Tensor) -> dict[str, torch.Tensor]:
        """The history row of an evaluation from its per-subtask loss and accuracy (0-d tensors)."""
        return {
            "val/loss": (self.p * loss).sum(),
            "val/acc": (self.p * acc).sum(),
            "val/loss_uniform": loss.mean(),
            "val/n_learned": (loss < self.threshold_nats).sum(),
        }

    def configure_optimizers(self):
        o = self.cfg.optim
        return torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2)
        )


# Packed runs (harness.members.packed, issue 14): members may differ in these keys (tasks/sparse_parity_packed.py).
PACKABLE = ("seed", "data.task_seed", "data.stream_seed", "optim.lr", "optim.weight_decay", "model.width")


def build_packed(cfgs: list[Config]):
    from tasks.sparse_parity_packed import PackedSparseParity

    return PackedSparseParity(cfgs)


def build(cfg: Config) -> Job:
    d = cfg.data
    model = MLP(d.n_tasks + d.n, cfg.model.width, cfg.model.depth, 2)
    data = SparseParityData(cfg)
    return Job(
        module=SparseParityModule(cfg, model, data),
        datamodule=data,
        callbacks=[CurvesRecorder(), EmergenceCallback(cfg.eval.threshold_bits * math.log(2), "subtask", "loss")],
        summary={"model/params": n_params(model), "loss_units": "nats"},
    )
