"""What every task's block shares: the device and dtype it trains in (where Lightning would put
and cast the solo run), each member's AdamW hyperparameters as StackedAdamW takes them, and an
evaluation's metrics as host numbers."""

from __future__ import annotations

import os

import torch

from harness.errors import ConfigError

# The dtype of a block's parameters under each trainer.precision, as Lightning holds a module's: mixed
# precision keeps float32 parameters and autocasts the step (Lightning's, around training_step).
DTYPES = {
    "64-true": torch.float64,
    "64": torch.float64,
    "32-true": torch.float32,
    "32": torch.float32,
    "16-mixed": torch.float32,
    "16": torch.float32,
    "bf16-mixed": torch.float32,
    "bf16": torch.float32,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
}


def placement(trainer) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a block whose members share the trainer config `trainer`; a precision a block
    cannot train in is one line naming the ones it can. The device is named as Lightning names it
    (cuda:N): the tasks' data cache their tensors under one device name."""
    dtype = DTYPES.get(trainer.precision)
    if dtype is None:
        raise ConfigError(f"trainer.precision={trainer.precision!r}: a block trains in {', '.join(DTYPES)}")
    a = trainer.accelerator
    cuda = a == "cuda" or (a in ("gpu", "auto") and torch.cuda.is_available())
    if not cuda:
        mps = a == "mps" or (a in ("auto", "gpu") and torch.backends.mps.is_available())
        return torch.device("mps" if mps else "cpu"), dtype
    # A block is built before Lightning sets each DDP rank's device: rank r of a run on one node trains
    # on Lightning's cuda:LOCAL_RANK.
    index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())) if trainer.devices > 1 else None
    return torch.device("cuda", torch.cuda.current_device() if index is None else index), dtype


def adamw_hypers(cfgs: list) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float], float]:
    """(lr [M], weight decay [M], betas, eps) of the members' `optim` configs: lr and weight decay per
    member in float64 (as StackedAdamW requires), betas and eps shared (not packable keys; a config
    without `eps` uses torch's AdamW default, as its solo run does)."""
    o = [c.optim for c in cfgs]
    lr = torch.tensor([x.lr for x in o], dtype=torch.float64)
    weight_decay = torch.tensor([x.weight_decay for x in o], dtype=torch.float64)
    return lr, weight_decay, (o[0].beta1, o[0].beta2), getattr(o[0], "eps", 1e-8)


def host_metrics(out: dict[str, torch.Tensor]) -> dict[str, float]:
    """An evaluation's 0-d tensors as floats, copied to the host in one transfer (one device sync for
    all, not one per metric)."""
    names = list(out)
    values = [out[k].detach().reshape(()) for k in names]
    # float64 keeps a float64 run's tiny losses exact; MPS has no float64
    values = [v.float() if v.device.type == "mps" else v.double() for v in values]
    return dict(zip(names, torch.stack(values).tolist()))
