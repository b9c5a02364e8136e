"""Modular addition, packed (harness.members.packed, issue 14): M members of one sweep as one stacked model.

Members may differ in seed (initial weights and train/val split), train fraction, split seed, lr,
weight decay and init scale (modular_addition.PACKABLE). Each member's model is built exactly as its
solo run builds it (`make_model` after seeding with its seed), then its parameters are stacked along
a leading dimension. Training: `torch.func.vmap` of the solo model's own forward over the members,
on each member's train pairs padded to the largest train set; a member's loss is the mean over its
own pairs (padding masked), so its gradient is its solo run's. Evaluation runs the task's own
`evaluate` on a solo model whose parameters are views of the member's slice.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from harness.errors import ConfigError
from harness.members.packed_loss import member_cross_entropy
from harness.training.detectors import GrokkingCallback
from tasks.modular_addition import (ACTIVATIONS, Config, ModularData, evaluate, final_fourier_values, make_model, n_params)


DTYPES = {"32-true": torch.float32, "32": torch.float32, "64-true": torch.float64, "64": torch.float64}


class PackedModular:

    def __init__(self, cfgs: list[Config]):
        import lightning as L

        self.cfgs = cfgs
        t = cfgs[0].trainer
        dtype = DTYPES.get(t.precision)
        if dtype is None:
            raise ConfigError(f"trainer.precision={t.precision!r}: packed runs train in {' or '.join(DTYPES)}")
        cuda = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if cuda else "cpu")
        self.models, self.data = [], []
        for cfg in cfgs:
            L.seed_everything(cfg.seed, workers=True, verbose=False)  # as harness.training.train, before build
            # Initialised in float32 as the solo run, then cast as Lightning casts it for 64-true.
            self.models.append(make_model(cfg).to(dtype=dtype, device=self.device))
            self.data.append(ModularData(cfg))
        names = [n for n, _ in self.models[0].named_parameters()]
        self._params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in self.models]).requires_grad_()
                        for n in names}
        # Each solo model's parameters become views of its member's slice: evaluation and the model
        # artifact see the current weights with no copy.
        for i, model in enumerate(self.models):
            for n, p in model.named_parameters():
                p.data = self._params[n].data[i]
        self.base = self.models[0]
        o = [c.optim for c in cfgs]
        self.lr = torch.tensor([x.lr for x in o], dtype=torch.float64)
        self.weight_decay = torch.tensor([x.weight_decay for x in o], dtype=torch.float64)
        self.betas, self.eps = (o[0].beta1, o[0].beta2), o[0].eps
        self.loss_kind, self.p = cfgs[0].optim.loss, cfgs[0].data.p
        self.batch_size = cfgs[0].data.batch_size
        # As the solo run: full batch logs no training loss (train/loss at each evaluation says it all).
        self.train_loss_key = "train/batch_loss" if self.batch_size else None
        train = [d.tensors(self.device)["train"] for d in self.data]
        self.n_train = torch.tensor([len(y) for _, _, y in train])
        n_max = int(self.n_train.max())

        def pad(x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, (0, n_max - len(x)))

        self.a = torch.stack([pad(a) for a, _, _ in train])  # [M, n_max]; padding points at pair (0, 0)
        self.b = torch.stack([pad(b) for _, b, _ in train])
        self.y = torch.stack([pad(y) for _, _, y in train])
        self.mask = (torch.arange(n_max)[None, :] < self.n_train[:, None]).to(self.device)
        self.n_train = self.n_train.to(self.device)
        self.grok = [GrokkingCallback(c.eval.threshold, c.eval.max_delay) for c in cfgs]
        self.keys: list[list[int]] = [[] for _ in cfgs]
        self.power: list[torch.Tensor | None] = [None] * len(cfgs)
        m0 = cfgs[0].model
        # Hand-batched PairMLP (the PAIR setting); any other model through vmap of its own forward.
        self.fast = m0.name == "pair_mlp" and not m0.bias
        self.act = ACTIVATIONS[m0.activation]
        self._forward = vmap(lambda params, a, b: functional_call(self.base, params, (a, b)))
        if self.batch_size:
            self._gen = torch.Generator().manual_seed(cfgs[0].seed)

    def params(self) -> dict[str, torch.Tensor]:
        return self._params

    def losses(self, step: int) -> torch.Tensor:
        a, b, y, mask, n = self.a, self.b, self.y, self.mask, self.n_train
        if self.batch_size and self.batch_size < int(n.min()):
            # Sampled batches: each member draws from its own train set (the solo runs' draws differ
            # anyway; exactness is claimed for full batch, the PAIR setting).
            idx = (torch.rand(len(n), self.batch_size, generator=self._gen).to(self.device) * n[:, None]).long()
            a, b, y = a.gather(1, idx), b.gather(1, idx), y.gather(1, idx)
            mask, n = torch.ones_like(idx, dtype=torch.bool), torch.full_like(n, self.batch_size)
        logits = self._pair_logits(a, b) if self.fast else self._forward(self._params, a, b)  # [M, n, p]
        weight = mask / n[:, None]  # each member's own mean over its own pairs
        loss = member_cross_entropy(logits, y, weight / self.p if self.loss_kind == "ce_over_p" else weight)
        return loss

    def _pair_logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """PairMLP.forward for every member in batched matmuls (the same products in the same order).

        The token rows are picked with one index_select over the members' stacked [M * p, hidden]
        rows: its backward is an index_add, several times cheaper on a CPU than the accumulating
        index_put that `t[a]` costs in backward (the largest single cost of a solo step here)."""
        P = self._params
        e, w_in, w_out = P["embed"], P["w_in.weight"], P["w_out.weight"]  # [M,p,d], [M,h,d], [M,d,h]
        m, p, hidden = e.shape[0], e.shape[1], w_in.shape[1]
        # token_inputs and the readout W_out^T E^T in one product: [M, 2h, d] @ [M, d, p]
        both = torch.bmm(torch.cat([w_in, w_out.transpose(1, 2)], 1), e.transpose(1, 2))
        t = both[:, :hidden].transpose(1, 2).reshape(m * p, hidden)  # token_inputs, stacked
        offset = (torch.arange(m, device=a.device) * p)[:, None]
        rows = torch.cat([(a + offset).flatten(), (b + offset).flatten()])
        picked = t.index_select(0, rows).view(2, m, a.shape[1], hidden)
        h = self.act(picked[0] + picked[1])  # [M, n, hidden]
        return torch.bmm(h, both[:, hidden:])  # [M, n, p]

    def evaluate(self, i: int, step: int) -> tuple[dict[str, float], dict]:
        cfg = self.cfgs[i]
        out = evaluate(self.models[i], self.data[i].tensors(self.device), cfg)
        self.keys[i], self.power[i] = out.pop("_keys"), out.pop("_power")
        arrays = {}
        if cfg.eval.log_spectrum:
            is_key = torch.zeros_like(self.power[i])
            is_key[[k - 1 for k in self.keys[i]]] = 1.0
            arrays["fourier"] = {"power": self.power[i].cpu().double().numpy(), "key": is_key.cpu().double().numpy()}
        names = list(out)
        metrics = dict(zip(names, torch.stack([out[k].detach().double().reshape(()) for k in names]).tolist()))
        self.grok[i].observe(step, metrics.get("train/acc"), metrics.get("val/acc"))
        return metrics, arrays

    def static_summary(self, i: int) -> dict:
        d = self.data[i]
        return {"model/params": n_params(self.models[i]), "data/n_train": len(d.split["train"][1]),
                "data/n_val": len(d.split["val"][1]), "loss_units": "nats"}

    def final_summary(self, i: int, run, seconds: float, cpu: float, steps: int) -> dict:
        return {**self.grok[i].summary(),
                **final_fourier_values(self.keys[i], self.power[i], seconds, cpu, steps, table=True)}

    def member_model(self, i: int):
        return self.models[i]

    def member_state(self, i: int) -> dict:
        return {"grok": self.grok[i].state_dict(), "keys": self.keys[i], "power": self.power[i]}

    def load_member_state(self, i: int, state: dict) -> None:
        self.grok[i].load_state_dict(state["grok"])
        self.keys[i], self.power[i] = state["keys"], state["power"]
