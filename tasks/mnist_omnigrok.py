"""Omnigrok MNIST (Liu, Michaud, Tegmark 2023): grokking on real data from a large initialisation.

An MLP trained on the first 1000 MNIST training images with every initial weight multiplied by
alpha=8 fits its training set within ~3e3 steps but generalises only after ~1e4-1e5 steps, as weight
decay shrinks the weights back to the "Goldilocks" norm. With `optim.fixed_norm` the total weight norm
is held at alpha times its standard-init value after every step: sweeping alpha draws the LU landscape
(training loss an "L", test loss a "U" against the norm).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.config.run import data_dir
from harness.errors import ConfigError
from harness.training import tracking
from harness.training.data import DeviceDataModule, batch_seed
from harness.training.detectors import GrokkingCallback
from harness.training.logs import TrainLossLog, log_eval
from harness.training.nn import MLP, n_params, weight_norm  # noqa: F401  (part of this task's API)
from harness.training.train import Job, train_steps
from tasks.configs.mnist_omnigrok import Config

MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# MD5 of the official .gz files (as the mirror serves them; a re-compressed copy differs, so only
# downloads are checked against these, and local files by gzip CRC + IDX header instead).
OFFICIAL = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}


# ---- data ------------------------------------------------------------------------------------


def _how_to_get(name: str) -> str:
    return f"get {name}.gz from {MIRROR} (or run with data.download=true on a machine that can reach it)"


def find_idx(folder: str, name: str) -> str | None:
    for candidate in (name + ".gz", name):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped or not) -> uint8 array: images [n, 28, 28], labels [n]."""
    name = os.path.basename(path).removesuffix(".gz")
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()  # gzip checks its CRC here: a truncated or damaged file raises
    except (OSError, EOFError) as e:
        raise ConfigError(f"MNIST file {path} is corrupt ({e}): {_how_to_get(name)}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 3:
        raise ConfigError(f"MNIST file {path} is corrupt (not an IDX uint8 header): {_how_to_get(name)}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise ConfigError(
            f"MNIST file {path} is corrupt ({len(body)} data bytes for shape {shape}): {_how_to_get(name)}"
        )
    arr = np.frombuffer(body, dtype=np.uint8).reshape(shape)
    if ndim == 1 and arr.max(initial=0) > 9:
        raise ConfigError(f"MNIST file {path} is corrupt (label {arr.max()} > 9): {_how_to_get(name)}")
    return arr


def download(folder: str, name: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".gz")
    try:
        with urllib.request.urlopen(MIRROR + name + ".gz", timeout=60) as r:
            blob = r.read()
    except OSError as e:
        raise ConfigError(f"cannot download {MIRROR}{name}.gz ({e}): copy the file to {folder} by hand") from None
    if hashlib.md5(blob).hexdigest() != OFFICIAL[name]:
        raise ConfigError(f"downloaded {name}.gz fails its MD5 check: try again, or copy it to {folder} by hand")
    with open(path, "wb") as f:
        f.write(blob)
    return path


def load_mnist(
    folder: str, split: str = "auto", n_train: int = 1000, n_test: int = 0, allow_download: bool = False
) -> dict:
    """{'x_train' uint8 [n_train, 784], 'y_train' [n_train], 'x_test', 'y_test', 'split'}."""
    files = {name: find_idx(folder, name) for name in OFFICIAL}
    have_train = files["train-images-idx3-ubyte"] and files["train-labels-idx1-ubyte"]
    if split == "auto":
        split = "standard" if have_train or allow_download else "offline"
    needed = list(OFFICIAL) if split == "standard" else [n for n in OFFICIAL if n.startswith("t10k")]
    for name in needed:
        if files[name] is None:
            if not allow_download:
                raise ConfigError(
                    f"MNIST file {os.path.join(folder, name)}.gz is missing (data.split={split}): {_how_to_get(name)}"
                )
            files[name] = download(folder, name)
    x_test = read_idx(files["t10k-images-idx3-ubyte"]).reshape(-1, 784)
    y_test = read_idx(files["t10k-labels-idx1-ubyte"])
    if split == "standard":
        x_train = read_idx(files["train-images-idx3-ubyte"]).reshape(-1, 784)[:n_train]
        y_train = read_idx(files["train-labels-idx1-ubyte"])[:n_train]
    else:
        if n_train >= len(x_test):
            raise ConfigError(
                f"data.n_train={n_train}: the offline split trains on part of the "
                f"{len(x_test)} test images and needs some left to evaluate on"
            )
        x_train, y_train = x_test[:n_train], y_test[:n_train]
        x_test, y_test = x_test[n_train:], y_test[n_train:]
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ConfigError(
            f"MNIST files in {folder} disagree on the number of images and labels: "
            f"{_how_to_get('t10k-images-idx3-ubyte')}"
        )
    if n_test:
        x_test, y_test = x_test[:n_test], y_test[:n_test]
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "split": split}


def epoch_permutation(seed: int, rank: int, epoch: int, n_train: int, device: torch.device) -> torch.Tensor:
    """The order of the training images in `epoch` of run `seed` on DDP rank `rank` (also drawn by the
    packed block, tasks/mnist_omnigrok_packed.py, for each member's seed)."""
    g = torch.Generator(device=device).manual_seed(batch_seed(seed, rank, -1 - epoch))
    return torch.randperm(n_train, device=device, generator=g)


class MnistData(DeviceDataModule):
    """Images live on the device in the model's dtype; each step takes the next `batch_size` indices
    of a fresh on-device permutation per epoch (the paper's shuffled DataLoader, minus the copy)."""

    def __init__(self, arrays: dict, batch_size: int, steps_per_batch: int = 1):
        super().__init__()
        self.steps_per_batch = steps_per_batch
        self.cpu = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k != "split"}  # own, writable copy
        self.batch_size = batch_size
        self.n_train = len(self.cpu["y_train"])
        self._cache: dict = {}
        self._perm: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)

    def tensors(self, device: torch.device, dtype: torch.dtype) -> dict:
        if (device, dtype) not in self._cache:
            t = {
                k: (v.to(device=device, dtype=dtype) / 255 if k.startswith("x") else v.to(device).long())
                for k, v in self.cpu.items()
            }  # x: [n, 784] in [0, 1]; y: [n]
            self._cache = {(device, dtype): t}
        return self._cache[(device, dtype)]

    def _dtype(self) -> torch.dtype:
        return self.trainer.lightning_module.dtype

    def shard_error(self) -> str | None:
        if self.batch_size >= self.n_train:
            return f"data.batch_size={self.batch_size} >= data.n_train={self.n_train} is full batch"
        return None

    def next_indices(self, index: int, device: torch.device) -> torch.Tensor | None:
        """Indices of training step `index`: a slot of its epoch's permutation. A function of the
        step alone (no position state), so a resumed run draws what the uninterrupted one would."""
        if self.batch_size >= self.n_train:
            return None
        per_epoch = self.n_train // self.batch_size  # an epoch's tail that does not fill a batch is skipped
        epoch, slot = divmod(index, per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.seed, self.rank, epoch, self.n_train, device))
        return self._perm[1][slot * self.batch_size : (slot + 1) * self.batch_size]

    def train_batch(self, index: int, device):
        t = self.tensors(device, self._dtype())
        idx = self.next_indices(index, device)
        if idx is None:
            return t["x_train"], t["y_train"]
        # index_select: ~4x faster than x[idx] on CPU for a [200, 784] gather.
        return t["x_train"].index_select(0, idx), t["y_train"].index_select(0, idx)  # [batch, 784], [batch]

    def val_batch(self, index: int, device):
        t = self.tensors(device, self._dtype())
        return t["x_train"], t["y_train"], t["x_test"], t["y_test"]


# ---- model -----------------------------------------------------------------------------------


@torch.no_grad()
def rescale_(model: nn.Module, target_norm: float) -> None:
    factor = target_norm / weight_norm(model)
    for p in model.parameters():
        p.mul_(factor)


def loss_fn(kind: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(out, y, reduction=reduction)
    target = F.one_hot(y, out.shape[1]).to(out.dtype)
    # nn.MSELoss: mean over samples and the 10 outputs; per-sample values average the outputs.
    per = (out - target).pow(2).mean(1)
    return per.mean() if reduction == "mean" else per


class OmnigrokModule(L.LightningModule):
    def __init__(self, cfg: Config, model: nn.Module, target_norm: float):
        super().__init__()
        self.cfg, self.model, self.target_norm = cfg, model, target_norm
        self.train_log = TrainLossLog(cfg.trainer.log_every, "train/batch_loss")
        # Manual optimization: one Lightning batch carries trainer.steps_per_batch optimizer steps.
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        train_steps(
            self,
            batch,
            lambda xy: loss_fn(self.cfg.optim.loss, self.model(xy[0]), xy[1]),
            after_step=(lambda: rescale_(self.model, self.target_norm)) if self.cfg.optim.fixed_norm else None,
        )

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and accuracy over a whole set, `eval.chunk` images per forward pass."""
        loss_sum, correct = x.new_zeros(()), x.new_zeros(())
        for s in range(0, len(y), self.cfg.eval.chunk):
            out = self.model(x[s : s + self.cfg.eval.chunk])
            yy = y[s : s + self.cfg.eval.chunk]
            loss_sum += loss_fn(self.cfg.optim.loss, out, yy, reduction="none").sum()
            correct += (out.argmax(1) == yy).sum()
        return loss_sum / len(y), correct / len(y)

    def measure(self, batch) -> dict[str, torch.Tensor]:
        """One evaluation's metrics (0-d tensors); also what a packed member logs (mnist_omnigrok_packed)."""
        x_tr, y_tr, x_te, y_te = batch
        train_loss, train_acc = self.evaluate(x_tr, y_tr)
        val_loss, val_acc = self.evaluate(x_te, y_te)
        return {
            "train/loss": train_loss,
            "train/acc": train_acc,
            "val/loss": val_loss,
            "val/acc": val_acc,
            "model/weight_norm": weight_norm(self.model),
        }

    def validation_step(self, batch, batch_idx):
        log_eval(self, self.measure(batch))

    def configure_optimizers(self):
        o = self.cfg.optim
        return torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2)
        )


def load_data(cfg: Config) -> dict:
    d = cfg.data
    return load_mnist(os.path.join(data_dir(cfg), d.folder), d.split, d.n_train, d.n_test, allow_download=d.download)


def resolve_split(cfg: Config, split: str) -> None:
    """Record the split actually used in the run config, unless a sweep set data.split itself (then
    W&B already holds that value and a different one would be rejected as inconsistent)."""
    if cfg.data.split == "auto" and "data.split" not in tracking.sweep_parameters():
        cfg.data.split = split


def make_model(cfg: Config) -> tuple[MLP, float, float]:
    """(model, standard-init norm, initial norm): PyTorch's default init (from torch's global RNG, seeded
    by the caller) with every parameter times model.init_scale; float32, as Lightning casts it later."""
    m = cfg.model
    model = MLP(784, m.width, m.depth, 10)
    standard_norm = float(weight_norm(model))
    for p in model.parameters():
        p.data.mul_(m.init_scale)
    return model, standard_norm, float(weight_norm(model))


# Keys that may differ between the members of a packed block (harness.members.packed, issue 14).
PACKABLE = ("seed", "model.init_scale", "optim.lr", "optim.weight_decay", "optim.fixed_norm")


def build_packed(cfgs: list[Config]):
    from tasks.mnist_omnigrok_packed import PackedOmnigrok

    return PackedOmnigrok(cfgs)


def static_summary(cfg: Config, arrays: dict, n: int, standard_norm: float, init_norm: float) -> dict:
    return {
        "data/source": arrays["split"],
        "data/n_train": len(arrays["y_train"]),
        "data/n_test": len(arrays["y_test"]),
        "model/params": n,
        "model/standard_norm": standard_norm,
        "model/init_norm": init_norm,
        "loss_units": "mse per output" if cfg.optim.loss == "mse" else "nats",
    }


def grokking_callback(cfg: Config) -> GrokkingCallback:
    # grok/t_train99 and grok/t_val99 (Power et al.) plus grok/t_val80: MNIST test accuracy stays
    # below 0.99, so grok/delay and grok/phase are measured against eval.val_threshold.
    return GrokkingCallback(cfg.eval.threshold, cfg.eval.max_delay, val_threshold=cfg.eval.val_threshold)


def build(cfg: Config) -> Job:
    arrays = load_data(cfg)
    resolve_split(cfg, arrays["split"])
    model, standard_norm, init_norm = make_model(cfg)
    return Job(
        module=OmnigrokModule(cfg, model, target_norm=init_norm),
        datamodule=MnistData(arrays, cfg.data.batch_size, cfg.trainer.batch_steps()),
        callbacks=[grokking_callback(cfg)],
        summary=static_summary(cfg, arrays, n_params(model), standard_norm, init_norm),
    )
