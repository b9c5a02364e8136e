"""Grokking of modular arithmetic (Power et al. 2022; the PAIR explorable; Liu et al. 2022).

Data: every pair (a, b) of residues mod p (only a <= b with `data.symmetric`), label (a op b) mod p,
split once into train / validation by `data.train_fraction` (the split follows the run's seed).
Defaults are the PAIR explorable's run: p=67, symmetric pairs, 40% train, full batch, tied 500-d
embedding, 24 ReLU units on h_a + h_b, no biases, AdamW lr 1e-3, wd 1.0, betas (0.9, 0.98), 50k steps,
the notebook's Haiku initialisers and cross-entropy divided by p.
"""

from __future__ import annotations

import functools

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from harness.members.block import adamw_hypers, host_metrics, placement
from harness.members.losses import member_cross_entropy
from harness.members.module import solo_job
from harness.training.data import BatchStream, DeviceDataModule
from harness.training.detectors import GrokkingCallback
from harness.training.nn import n_params, weight_norm
from harness.training.train import Job
from tasks.configs.modular_addition import Config
from tasks.fourier import cached_directions, fourier_power, key_frequencies, restricted_excluded
from tasks.modular_models import ConcatMLP, MemberModel, PairMLP, initial_weights

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
        self.seed = cfg.seed  # its batches' seed, as harness.training.train sets a run's
        pairs = all_pairs(d.p, d.symmetric)
        labels = apply_op(d.operation, pairs[:, 0], pairs[:, 1], d.p)
        seed = cfg.seed if d.split_seed < 0 else d.split_seed
        perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
        n_train = round(d.train_fraction * len(pairs))
        self.split = {
            "train": (pairs[perm[:n_train]], labels[perm[:n_train]]),
            "val": (pairs[perm[n_train:]], labels[perm[n_train:]]),
        }
        self._cache: dict = {}

    def tensors(self, device) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """{split: (a [n], b [n], y [n])} on `device`."""
        device = torch.device(device)
        if device not in self._cache:
            self._cache = {
                device: {k: (x[:, 0].to(device), x[:, 1].to(device), y.to(device)) for k, (x, y) in self.split.items()}
            }
        return self._cache[device]

    def full_batch(self) -> bool:
        bs = self.cfg.data.batch_size
        return bs == 0 or bs >= len(self.split["train"][1])

    def train_batch(self, index: int, device, generator: torch.Generator | None = None):
        """Training batch `index`: the whole train set, or batch_size pairs drawn from `generator`
        (harness.training.data.BatchStream's, seeded as a run's DeviceDataModule seeds the global RNG)."""
        a, b, y = self.tensors(device)["train"]
        if self.full_batch():
            return a, b, y
        idx = torch.randint(len(y), (self.cfg.data.batch_size,), device=device, generator=generator)
        return a[idx], b[idx], y[idx]

    def shard_error(self) -> str | None:
        bs, n = self.cfg.data.batch_size, len(self.split["train"][1])
        if self.full_batch():
            return f"data.batch_size={bs} is full batch ({n} training pairs)"
        return None


def make_model(cfg: Config, members: list[Config] | None = None) -> MemberModel:
    """The task's model for `members` (the block's runs; default: `cfg` alone, drawn from the global RNG
    as the caller seeded it, e.g. a plain-loop reference), each member seeded here with its own seed
    before its draws, as harness.training.train seeds a run."""
    per_member = []
    for c in [cfg] if members is None else members:
        if members is not None:
            L.seed_everything(c.seed, workers=True, verbose=False)  # as harness.training.train, before build
        per_member.append(initial_weights(c))
    stacked = {n: None if per_member[0][n] is None else torch.stack([w[n] for w in per_member]) for n in per_member[0]}
    return (PairMLP if cfg.model.name == "pair_mlp" else ConcatMLP)(cfg.model.activation, **stacked)


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
    """Every metric of one evaluation of a model of one member as 0-d tensors; shared by the block (a solo
    run's too) and the plain-loop benchmark so that both do the same work.

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

    power = fourier_power(model.token_inputs()[0])  # [p // 2] (a model of one member)
    keys = key_frequencies(power, e.key_mass, e.max_keys)
    out["fourier/n_keys"] = torch.tensor(float(len(keys)))
    out["fourier/key_power"] = power[[k - 1 for k in keys]].sum()

    if d.operation in ("add", "subtract"):
        sign = 1 if d.operation == "add" else -1
        u = cached_directions(d.p, tuple(keys), sign, str(device))  # [p*p, 1 + 2K]
        parts = restricted_excluded(grid_logits, u, [rows[split] for split in tensors])
        for (split, (_, _, y)), (restricted, excluded) in zip(tensors.items(), parts):
            out[f"{split}/restricted_loss"] = torch.tensor(float(F.cross_entropy(restricted.float(), y)))
            out[f"{split}/excluded_loss"] = torch.tensor(float(F.cross_entropy(excluded.float(), y)))
    out["_keys"], out["_power"] = keys, power  # not metrics: the caller reports them
    return out


# ---------------------------------------------------------------- the block: one run or many

# Packed runs (harness.members.packed, issue 14): keys whose values may differ between the members of one
# packed process; every other key must be equal.
PACKABLE = ("seed", "data.train_fraction", "data.split_seed", "optim.lr", "optim.weight_decay", "model.init_scale")


class ModularBlock:
    """M members in the task's model (make_model with a member dimension), for
    harness.members.module.BlockModule (Lightning's Trainer): a solo run is a block of one (`build`), a
    packed process holds several of one sweep (`build_block`). Each member's weights are its solo run's,
    and so are its training pairs: full batch, its whole train set; minibatch, the pairs its solo run
    draws (a BatchStream per member). The model runs on each member's pairs padded to the longest, a
    member's loss the mean over its own pairs (padding masked), so its gradient is its solo run's.
    Evaluation runs the task's `evaluate` on `model.member(i)`, whose parameters are views of the
    member's slices."""

    def __init__(self, cfgs: list[Config]):
        self.cfgs = cfgs
        self.device, dtype = placement(cfgs[0].trainer)
        # Initialised in float32 as the single run, then cast as Lightning casts it for 64-true.
        self.model = make_model(cfgs[0], members=cfgs).to(dtype=dtype, device=self.device)
        self.views = [self.model.member(i) for i in range(len(cfgs))]
        self.data = [ModularData(cfg) for cfg in cfgs]
        self.lr, self.weight_decay, self.betas, self.eps = adamw_hypers(cfgs)
        # As a solo run always did: full batch logs no training loss (train/loss at each evaluation says it all).
        self.train_loss_key = "train/batch_loss" if cfgs[0].data.batch_size else None
        # Each member's pairs per step, padded to the longest: its whole train set, or data.batch_size
        # pairs (the same sizes every step, so the weights are made once: no host copy in the step).
        sizes = [len(d.split["train"][1]) if d.full_batch() else d.cfg.data.batch_size for d in self.data]
        self.n_max = max(sizes)
        # In the training dtype, as a plain loop's mean and ce_over_p's division by p round (the float32
        # exactness test measures the difference against such a loop)
        n = torch.tensor(sizes, dtype=dtype)[:, None]
        weight = (torch.arange(self.n_max)[None, :] < n) / n  # a member's loss is its own mean over its pairs
        if cfgs[0].optim.loss == "ce_over_p":
            weight = weight / cfgs[0].data.p
        self.weight = weight.to(self.device)
        if all(d.full_batch() for d in self.data):
            self.streams, self.full = None, self._padded([d.tensors(self.device)["train"] for d in self.data])
        else:
            self.streams = [BatchStream(d, self.device) for d in self.data]
        self.grok = [GrokkingCallback(c.eval.threshold, c.eval.max_delay) for c in cfgs]
        self.keys: list[list[int]] = [[] for _ in cfgs]
        self.power: list[torch.Tensor | None] = [None] * len(cfgs)

    def _padded(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple:
        """a, b, y [M, n_max] of the members' (a, b, y); padding points at pair (0, 0), weight 0."""
        return tuple(torch.stack([F.pad(x[k], (0, self.n_max - len(x[k]))) for x in batches]) for k in range(3))

    def shard_error(self) -> str | None:
        return self.data[0].shard_error()

    def losses(self, step: int) -> torch.Tensor:
        a, b, y = self.full if self.streams is None else self._padded([s.batch(step) for s in self.streams])
        return member_cross_entropy(self.model(a, b), y, self.weight)

    def evaluate(self, i: int, step: int) -> tuple[dict[str, float], dict]:
        cfg = self.cfgs[i]
        out = evaluate(self.views[i], self.data[i].tensors(self.device), cfg)
        self.keys[i], self.power[i] = out.pop("_keys"), out.pop("_power")
        arrays = {}
        if cfg.eval.log_spectrum:
            is_key = torch.zeros_like(self.power[i])
            is_key[[k - 1 for k in self.keys[i]]] = 1.0
            arrays["fourier"] = {"power": self.power[i].cpu().double().numpy(), "key": is_key.cpu().double().numpy()}
        metrics = host_metrics(out)
        self.grok[i].observe(step, metrics.get("train/acc"), metrics.get("val/acc"))
        return metrics, arrays

    def static_summary(self, i: int) -> dict:
        d = self.data[i]
        return {
            "model/params": n_params(self.views[i]),
            "data/n_train": len(d.split["train"][1]),
            "data/n_val": len(d.split["val"][1]),
            "loss_units": "nats",
        }

    def final_summary(self, i: int, seconds: float, cpu: float, steps: int) -> dict:
        """Member i's grok/* values, its final key frequencies (`fourier/key_freqs`, a label such as
        "4,11,31"), the final spectrum as a table for the W&B UI (`fourier/spectrum`: k, power, key), and
        throughput of the training loop (`perf/*`, from the step-0 evaluation to the end of the last
        evaluation)."""
        keys, power = self.keys[i], self.power[i]
        values = {
            **self.grok[i].summary(),
            "fourier/key_freqs": ",".join(str(k) for k in sorted(keys)),
            "perf/train_seconds": seconds,
            "perf/train_cpu_seconds": cpu,  # this process only: robust to other jobs on the machine
            "perf/steps_per_s": steps / seconds if seconds > 0 else 0.0,
        }
        if power is not None:
            import wandb

            key_set = set(keys)
            values["fourier/spectrum"] = wandb.Table(
                columns=["k", "power", "key"],
                data=[[k + 1, float(v), k + 1 in key_set] for k, v in enumerate(power.tolist())],
            )
        return values

    def member_model(self, i: int):
        return self.model.member(i, copy=True)

    def member_callbacks(self, i: int) -> list:
        # keys and power come from the last evaluation, as in the solo run (a run always evaluates at its end)
        return [self.grok[i]]


build_block = ModularBlock  # build_block(cfgs) -> the block of a packed process


def build(cfg: Config) -> Job:
    block = ModularBlock([cfg])
    return solo_job(block, data=block.data[0])
