"""Grokking of modular arithmetic (Power et al. 2022; the PAIR explorable; Liu et al. 2022).

Data: every pair (a, b) of residues mod p (only a <= b with `data.symmetric`), label (a op b) mod p,
split once into train / validation by `data.train_fraction` (the split follows the run's seed).
Defaults are the PAIR explorable's run: p=67, symmetric pairs, 40% train, full batch, tied 500-d
embedding, 24 ReLU units on h_a + h_b, no biases, AdamW lr 1e-3, wd 1.0, betas (0.9, 0.98), 50k steps,
the notebook's Haiku initialisers and cross-entropy divided by p.
"""
from __future__ import annotations

import functools
import math
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from harness.training.curves import CurvesRecorder, set_eval_arrays
from harness.training.data import DeviceDataModule
from harness.training.detectors import GrokkingCallback
from harness.training.logs import TrainLossLog, log_eval, wandb_run, write_summary
from harness.training.nn import n_params, weight_norm  # noqa: F401  (part of this task's API)
from harness.training.train import Job, train_steps
from tasks.configs.modular_addition import Config
from tasks.fourier import cached_directions, fourier_power, key_frequencies

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "quadratic": torch.square}


# ---------------------------------------------------------------- data

def all_pairs(p: int, symmetric: bool) -> torch.Tensor:
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], 1)  # [p*p, 2]
    return pairs[pairs[:, 0] <= pairs[:, 1]] if symmetric else pairs


def apply_op(op: str, a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    if op == "add":
        return (a + b) % p
    if op == "subtract":
        return (a - b) % p
    return (a * b) % p


class ModularData(DeviceDataModule):
    """All tensors are built once; a train step gets the same full-batch tensors (no copy)."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.data
        self.cfg = cfg
        self.steps_per_batch = cfg.trainer.batch_steps()
        pairs = all_pairs(d.p, d.symmetric)
        labels = apply_op(d.operation, pairs[:, 0], pairs[:, 1], d.p)
        seed = cfg.seed if d.split_seed < 0 else d.split_seed
        perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
        n_train = round(d.train_fraction * len(pairs))
        self.split = {"train": (pairs[perm[:n_train]], labels[perm[:n_train]]),
                      "val": (pairs[perm[n_train:]], labels[perm[n_train:]])}
        self._cache: dict = {}

    def tensors(self, device) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """{split: (a [n], b [n], y [n])} on `device`."""
        device = torch.device(device)
        if device not in self._cache:
            self._cache = {device: {k: (x[:, 0].to(device), x[:, 1].to(device), y.to(device))
                                    for k, (x, y) in self.split.items()}}
        return self._cache[device]

    def train_batch(self, index: int, device):
        a, b, y = self.tensors(device)["train"]
        bs = self.cfg.data.batch_size
        if bs == 0 or bs >= len(y):
            return a, b, y
        idx = torch.randint(len(y), (bs,), device=device)
        return a[idx], b[idx], y[idx]

    def shard_error(self) -> str | None:
        bs, n = self.cfg.data.batch_size, len(self.split["train"][1])
        if bs == 0 or bs >= n:
            return f"data.batch_size={bs} is full batch ({n} training pairs)"
        return None

    def val_batch(self, index: int, device):
        return self.tensors(device)


# ---------------------------------------------------------------- models

TRUNC_STD = 0.87962566103423978  # std of a standard normal cut at +-2


def _trunc_normal_(w: torch.Tensor, std: float, rescale: bool) -> torch.Tensor:
    # Haiku cuts at +-2 sigma. VarianceScaling divides sigma by TRUNC_STD so that the result has std
    # `std`; TruncatedNormal (hk.Linear's default) does not, so its result has std 0.88 * `std`.
    sigma = std / TRUNC_STD if rescale else std
    return nn.init.trunc_normal_(w, 0.0, sigma, -2 * sigma, 2 * sigma)


class PairMLP(nn.Module):
    """PAIR's MLP: one embedding E [p, d] for both inputs and the output.

    The linear maps are applied to E once per token ([p, hidden], [hidden, p]) and then gathered,
    which is the same function as embedding first but ~20x fewer flops for a 500-d embedding.
    """

    def __init__(self, p: int, embed_dim: int, hidden: int, activation: str = "relu", bias: bool = False):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(p, embed_dim))  # E, N(0, 1) as nn.Embedding
        self.w_in = nn.Linear(embed_dim, hidden, bias=bias)
        self.w_out = nn.Linear(hidden, embed_dim, bias=bias)
        self.act = ACTIVATIONS[activation]

    def token_inputs(self) -> torch.Tensor:  # [p, hidden]: what each token adds to the hidden layer
        return self.embed @ self.w_in.weight.T

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [n], [n] -> [n, p]
        t = self.token_inputs()
        h = t[a] + t[b]
        h = self.act(h if self.w_in.bias is None else h + self.w_in.bias)  # [n, hidden]
        logits = h @ (self.w_out.weight.T @ self.embed.T)  # [n, p]
        return logits if self.w_out.bias is None else logits + self.w_out.bias @ self.embed.T


class ConcatMLP(nn.Module):
    def __init__(self, p: int, embed_dim: int, hidden: int, activation: str = "relu", bias: bool = False):
        super().__init__()
        self.embed = nn.Embedding(p, embed_dim)
        self.w_in = nn.Linear(2 * embed_dim, hidden, bias=bias)
        self.unembed = nn.Linear(hidden, p, bias=bias)
        self.act = ACTIVATIONS[activation]

    def token_inputs(self) -> torch.Tensor:  # [p, 2 * hidden]: the a-part and the b-part side by side
        d = self.embed.embedding_dim
        w = self.w_in.weight
        e = self.embed.weight
        return torch.cat([e @ w[:, :d].T, e @ w[:, d:].T], 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [n], [n] -> [n, p]
        h = self.act(self.w_in(torch.cat([self.embed(a), self.embed(b)], 1)))
        return self.unembed(h)


def make_model(cfg: Config) -> nn.Module:
    m = cfg.model
    model = (PairMLP if m.name == "pair_mlp" else ConcatMLP)(cfg.data.p, m.embed_dim, m.hidden, m.activation, m.bias)
    with torch.no_grad():
        if m.init == "haiku":
            for name, w in model.named_parameters():
                if name.endswith("bias"):
                    w.zero_()
                elif name.startswith("embed"):  # [p, embed_dim]: Haiku's fan_in is p
                    _trunc_normal_(w, math.sqrt(2 / w.shape[0]), rescale=True)
                else:
                    _trunc_normal_(w, 1 / math.sqrt(w.shape[1]), rescale=False)
        for w in model.parameters():
            w.mul_(m.init_scale)
    return model


# ---------------------------------------------------------------- loss and diagnostics

def loss_fn(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    loss = F.cross_entropy(logits, y)
    return loss / logits.shape[1] if kind == "ce_over_p" else loss


@functools.lru_cache(maxsize=16)
def _grid(p: int, symmetric: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (a, b) of the p x p grid, row a * p + b; with `symmetric` the model was only asked about
    a <= b, so b > a is read through (b, a)."""
    grid = torch.arange(p)
    ga, gb = grid.repeat_interleave(p), grid.repeat(p)
    if symmetric:
        ga, gb = torch.minimum(ga, gb), torch.maximum(ga, gb)
    return ga.to(device), gb.to(device)


@torch.no_grad()
def evaluate(model: nn.Module, tensors: dict, cfg: Config) -> dict[str, torch.Tensor]:
    """Every metric of one evaluation as 0-d tensors; shared by the Lightning module, the packed
    block and the plain-loop benchmark so that all do the same work.

    One forward over the whole (a, b) grid; each split's logits are its rows of it (the same
    per-row products as a forward on the split's pairs)."""
    d, e = cfg.data, cfg.eval
    device = tensors["train"][0].device
    ga, gb = _grid(d.p, d.symmetric, str(device))
    grid_logits = model(ga, gb)  # [p*p, p]
    rows = {split: a * d.p + b for split, (a, b, _) in tensors.items()}
    out: dict[str, torch.Tensor] = {}
    for split, (_, _, y) in tensors.items():
        logits = grid_logits[rows[split]]
        out[f"{split}/loss"] = F.cross_entropy(logits, y)
        out[f"{split}/acc"] = (logits.argmax(1) == y).float().mean()
    out["model/weight_norm"] = weight_norm(model)

    power = fourier_power(model.token_inputs())  # [p // 2]
    keys = key_frequencies(power, e.key_mass, e.max_keys)
    out["fourier/n_keys"] = torch.tensor(float(len(keys)))
    out["fourier/key_power"] = power[[k - 1 for k in keys]].sum()

    if d.operation in ("add", "subtract"):
        sign = 1 if d.operation == "add" else -1
        u = cached_directions(d.p, tuple(keys), sign, str(device))  # [p*p, 1 + 2K]
        x = grid_logits.to(torch.float64)
        coef = u.T @ x  # the projection onto the key directions runs over the whole grid ...
        for split, (_, _, y) in tensors.items():  # ... its parts are only needed at the split's rows
            r = rows[split]
            restricted = u[r] @ coef
            excluded = x[r] - restricted + u[r, :1] @ coef[:1]  # keeps the per-class mean
            out[f"{split}/restricted_loss"] = torch.tensor(float(F.cross_entropy(restricted.float(), y)))
            out[f"{split}/excluded_loss"] = torch.tensor(float(F.cross_entropy(excluded.float(), y)))
    out["_keys"], out["_power"] = keys, power  # not metrics: the caller reports them
    return out


# ---------------------------------------------------------------- Lightning

class ModularModule(L.LightningModule):
    def __init__(self, cfg: Config, model: nn.Module, data: ModularData):
        super().__init__()
        self.cfg, self.model, self.data = cfg, model, data
        self.keys: list[int] = []
        self.power: torch.Tensor | None = None  # [p // 2] of the last evaluation
        self.eval_metrics: dict[str, float] = {}
        self.train_log = TrainLossLog(cfg.trainer.log_every, "train/batch_loss")
        # Manual optimization: one Lightning batch carries trainer.steps_per_batch optimizer steps
        # (and skips the closure machinery, ~0.4 ms a step here).
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        # Full batch: train/loss at each evaluation says it all, so only minibatch runs log it per step.
        train_steps(self, batch, lambda aby: loss_fn(self.model(aby[0], aby[1]), aby[2], self.cfg.optim.loss),
                    log_loss=bool(self.cfg.data.batch_size))

    def validation_step(self, batch, batch_idx):
        metrics = evaluate(self.model, batch, self.cfg)
        self.keys, self.power = metrics.pop("_keys"), metrics.pop("_power")
        if self.cfg.eval.log_spectrum:
            is_key = torch.zeros_like(self.power)
            is_key[[k - 1 for k in self.keys]] = 1.0
            set_eval_arrays(self, "fourier", {"power": self.power, "key": is_key})  # item i: frequency i + 1
        # Straight to the loggers, one row per evaluation: self.log costs ~1 ms a key, and the
        # callbacks read `eval_metrics` instead.
        log_eval(self, metrics)

    def configure_optimizers(self):
        o = self.cfg.optim
        return torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                                 betas=(o.beta1, o.beta2), eps=o.eps)


class FinalFourier(L.Callback):
    """Summary: the final key frequencies (`fourier/key_freqs`, a label such as "4,11,31"), the
    final spectrum as a table for the W&B UI (`fourier/spectrum`: k, power, key), and throughput
    of the training loop (`perf/*`, measured from the first step to the end of the last evaluation)."""

    def on_train_start(self, trainer, pl_module):
        self.t0, self.cpu0, self.step0 = time.perf_counter(), time.process_time(), trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.seconds, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.cpu0

    def on_fit_end(self, trainer, pl_module):
        write_summary(trainer, final_fourier_values(pl_module.keys, pl_module.power, self.seconds, self.cpu,
                                                    trainer.global_step - self.step0,
                                                    table=wandb_run(trainer) is not None))


def final_fourier_values(keys: list[int], power: torch.Tensor | None, seconds: float, cpu: float, steps: int,
                         table: bool) -> dict:
    """FinalFourier's summary values (also written by the packed path, tasks/modular_addition_packed.py)."""
    values = {
        "fourier/key_freqs": ",".join(str(k) for k in sorted(keys)),
        "perf/train_seconds": seconds,
        "perf/train_cpu_seconds": cpu,  # this process only: robust to other jobs on the machine
        "perf/steps_per_s": steps / seconds if seconds > 0 else 0.0,
    }
    if power is not None and table:
        import wandb

        key_set = set(keys)
        values["fourier/spectrum"] = wandb.Table(
            columns=["k", "power", "key"],
            data=[[k + 1, float(v), k + 1 in key_set] for k, v in enumerate(power.tolist())])
    return values


# Packed runs (harness.members.packed, issue 14): keys whose values may differ between the members of one
# packed process; every other key must be equal. The stacked model is in tasks/modular_addition_packed.py.
PACKABLE = ("seed", "data.train_fraction", "data.split_seed", "optim.lr", "optim.weight_decay", "model.init_scale")


def build_packed(cfgs: list[Config]):
    from tasks.modular_addition_packed import PackedModular

    return PackedModular(cfgs)


def build(cfg: Config) -> Job:
    model = make_model(cfg)
    data = ModularData(cfg)
    return Job(
        module=ModularModule(cfg, model, data),
        datamodule=data,
        callbacks=[GrokkingCallback(cfg.eval.threshold, cfg.eval.max_delay), FinalFourier(), CurvesRecorder()],
        summary={"model/params": n_params(model), "data/n_train": len(data.split["train"][1]),
                 "data/n_val": len(data.split["val"][1]), "loss_units": "nats"},
    )
