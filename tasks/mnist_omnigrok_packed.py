"""Omnigrok MNIST, packed (harness.members.packed, issue 14): M members of one sweep as one stacked MLP.

Members may differ in seed, init scale (alpha), lr, weight decay and fixed norm
(mnist_omnigrok.PACKABLE). Each member's model is built exactly as its solo run builds it (seeded
with its seed, then `make_model`: PyTorch's init times alpha), then its parameters are stacked along
a leading dimension. Each member sees the minibatches of its solo run: the order of an epoch is a
function of (seed, rank 0, epoch) (`epoch_permutation`), so members of one seed share a batch and
members of different seeds gather their own from the one copy of the MNIST tensors. Training: the
MLP in batched matmuls (baddbmm, one per layer for all members); a member's loss is the task's
`loss_fn` averaged over its own batch, so its gradient is its solo run's. With `optim.fixed_norm`
a member's weights are rescaled to its initial norm after every step (`after_step`), as the solo
run's `rescale_`. Evaluation runs the task's own `OmnigrokModule.measure` on a solo MLP whose
parameters are views of the member's slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from harness.training.nn import MLP, n_params
from tasks.mnist_omnigrok import (
    Config,
    MnistData,
    OmnigrokModule,
    epoch_permutation,
    grokking_callback,
    load_data,
    loss_fn,
    make_model,
    resolve_split,
    static_summary,
)

DTYPES = {"32-true": torch.float32, "32": torch.float32, "64-true": torch.float64, "64": torch.float64}


class PackedOmnigrok:
    def __init__(self, cfgs: list[Config]):
        import lightning as L

        self.cfgs = cfgs
        t, d, m = cfgs[0].trainer, cfgs[0].data, cfgs[0].model
        dtype = DTYPES.get(t.precision)
        if dtype is None:
            raise ConfigError(f"trainer.precision={t.precision!r}: packed runs train in {' or '.join(DTYPES)}")
        cuda = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
        self.device, self.dtype = torch.device("cuda" if cuda else "cpu"), dtype
        self.arrays = load_data(cfgs[0])  # data.* is not packable: one copy for every member
        self.models, self.norms = [], []
        for cfg in cfgs:
            L.seed_everything(cfg.seed, workers=True, verbose=False)  # as harness.training.train, before build
            model, standard_norm, init_norm = make_model(cfg)
            # Initialised in float32 as the solo run, then cast as Lightning casts it for 64-true.
            self.models.append(model.to(dtype=dtype, device=self.device))
            self.norms.append((standard_norm, init_norm))
        names = [n for n, _ in self.models[0].named_parameters()]
        self._params = {
            n: torch.stack([dict(x.named_parameters())[n].detach() for x in self.models]).requires_grad_()
            for n in names
        }
        # Each solo model's parameters become views of its member's slice: evaluation and the model
        # artifact see the current weights with no copy.
        for i, model in enumerate(self.models):
            for n, p in model.named_parameters():
                p.data = self._params[n].data[i]
        self.layers = [
            (self._params[f"net.{2 * k}.weight"], self._params[f"net.{2 * k}.bias"]) for k in range(m.depth + 1)
        ]
        self.modules = [
            OmnigrokModule(cfg, model, init_norm) for cfg, model, (_, init_norm) in zip(cfgs, self.models, self.norms)
        ]
        o = [c.optim for c in cfgs]
        self.lr = torch.tensor([x.lr for x in o], dtype=torch.float64)
        self.weight_decay = torch.tensor([x.weight_decay for x in o], dtype=torch.float64)
        self.betas, self.eps = (o[0].beta1, o[0].beta2), 1e-8  # the solo run's AdamW: torch's default eps
        self.loss_kind = o[0].loss
        self.train_loss_key = "train/batch_loss"  # the solo run's TrainLossLog key, logged every log_every
        # Fixed norm: the solo run rescales to its initial norm, a float computed in float32.
        self.fixed = torch.tensor([x.fixed_norm for x in o], device=self.device)
        self.target = torch.tensor([n for _, n in self.norms], dtype=dtype, device=self.device)
        self.data = MnistData(self.arrays, d.batch_size)
        t_ = self.data.tensors(self.device, dtype)
        self.val_batch = (t_["x_train"], t_["y_train"], t_["x_test"], t_["y_test"])  # MnistData.val_batch
        self.full_batch = d.batch_size >= self.data.n_train
        self.seeds = [c.seed for c in cfgs]
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}  # seed -> (epoch, its permutation)
        self.grok = [grokking_callback(c) for c in cfgs]

    def params(self) -> dict[str, torch.Tensor]:
        return self._params

    # ---- training ----------------------------------------------------------------------------------

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, batch, 784], y [M, batch]: each member's training batch of optimizer step `step`, the
        slot of its seed's epoch permutation that MnistData.next_indices gives its solo run."""
        x, y = (
            self.data.tensors(self.device, self.dtype)["x_train"],
            self.data.tensors(self.device, self.dtype)["y_train"],
        )
        n = len(self.seeds)
        if self.full_batch:
            return x.expand(n, *x.shape), y.expand(n, *y.shape)
        bs, n_train = self.data.batch_size, self.data.n_train
        epoch, slot = divmod(step, n_train // bs)
        rows = {}
        for seed in dict.fromkeys(self.seeds):
            cached = self._perms.get(seed)
            if cached is None or cached[0] != epoch:
                cached = self._perms[seed] = (epoch, epoch_permutation(seed, 0, epoch, n_train, self.device))
            rows[seed] = cached[1][slot * bs : (slot + 1) * bs]
        idx = torch.cat([rows[s] for s in self.seeds])  # [M * batch]: one gather for all members
        return x.index_select(0, idx).view(n, bs, -1), y.index_select(0, idx).view(n, bs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """MLP.forward of every member: [M, batch, 784] -> [M, batch, 10], one baddbmm per layer
        (Linear's addmm, batched over members)."""
        h = x
        for k, (w, b) in enumerate(self.layers):
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if k < len(self.layers) - 1:
                h = F.relu(h)
        return h

    def losses(self, step: int) -> torch.Tensor:
        x, y = self.batch(step)
        out = self.forward(x)
        per = loss_fn(self.loss_kind, out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        return per.mean(1)  # each member's mean over its own batch, as loss_fn's "mean"

    @torch.no_grad()
    def after_step(self, active: torch.Tensor | None) -> None:
        """mnist_omnigrok.rescale_ for every member with optim.fixed_norm that is still training."""
        mask = self.fixed if active is None else self.fixed & active.to(self.device)
        if not bool(mask.any()):
            return
        params = list(self._params.values())
        norm = torch.sqrt(sum(p.pow(2).flatten(1).sum(1) for p in params))  # harness.training.nn.weight_norm per member
        factor = torch.where(mask, self.target / norm, 1)
        for p in params:
            p.mul_(factor.view(-1, *[1] * (p.dim() - 1)))

    # ---- per member --------------------------------------------------------------------------------

    def resolve_config(self, i: int) -> None:
        """data.split=auto -> the split used, as the solo build records it (called with member i's sweep
        parameters in the environment; harness.members.packed then logs the config again)."""
        resolve_split(self.cfgs[i], self.arrays["split"])

    def evaluate(self, i: int, step: int) -> tuple[dict[str, float], dict]:
        out = self.modules[i].measure(self.val_batch)
        names = list(out)
        metrics = dict(zip(names, torch.stack([out[k].detach().double().reshape(()) for k in names]).tolist()))
        self.grok[i].observe(step, metrics.get("train/acc"), metrics.get("val/acc"))
        return metrics, {}

    def static_summary(self, i: int) -> dict:
        return static_summary(self.cfgs[i], self.arrays, n_params(self.models[i]), *self.norms[i])

    def final_summary(self, i: int, run, seconds: float, cpu: float, steps: int) -> dict:
        return self.grok[i].summary()

    def member_model(self, i: int):
        """A copy of member i's weights in its own storage: the views of the stacked parameters would
        save every member's weights into its model.pt (torch.save writes a view's whole storage)."""
        m = self.cfgs[i].model
        with torch.device("meta"):
            model = MLP(784, m.width, m.depth, 10)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.load_state_dict(self.models[i].state_dict())
        return model

    def member_state(self, i: int) -> dict:
        return {"grok": self.grok[i].state_dict()}

    def load_member_state(self, i: int, state: dict) -> None:
        self.grok[i].load_state_dict(state["grok"])
