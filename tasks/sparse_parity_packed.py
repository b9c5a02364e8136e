"""Multitask sparse parity, packed (harness.members.packed, issue 14): M members of one sweep as one model.

Members may differ in seed, data.task_seed, data.stream_seed, lr, weight decay and width
(sparse_parity.PACKABLE). Each member is built by the task's own `build` after seeding with its seed,
as harness.training.train builds a solo run, so its initial weights and data are its solo run's; then

- the hidden layers of all members are concatenated into one layer, W1 [sum_w, d_in] and b1 [sum_w]
  (MemberAxis dim 0: rows o_i..o_i+w_i are member i's), so one matmul computes every member's hidden
  units from a shared batch;
- the output layers are concatenated too, held transposed as W2^T [sum_w, 2] (MemberAxis dim 0, so
  every member's part is one contiguous block of rows, as torch's fused AdamW in StackedAdamW needs)
  with b2 [M, 2] stacked, and applied member by member (torch.split of the hidden units: one small
  matmul each, whose backward is one concatenation), which is exactly each solo output layer. Not one
  block-diagonal matmul: its zeros would turn one member's inf into NaN in every other member's logits
  (0 * inf), and a member must fail alone.

Batches: members whose training batches are the same (same stream seed and task seed; the stream seed
follows the run seed unless data.stream_seed is set) form a group that draws ONE batch per step, from
its own generator seeded as DeviceDataModule seeds a solo run's (batch_seed(stream seed, rank 0, i)
per Lightning batch i, then its K steps' batches in order), so each member sees exactly its solo run's
batches. Members of different streams are separate groups: each group draws its own batch and runs its
own matmul over its members' rows (exact, only slower). In finite-data mode with data.stream_seed=-1 a
member's D samples depend on its init (sparse_parity.SparseParityData), so each such member is a group.

Depth > 1: each hidden-to-hidden layer is held as the members' weights flattened and concatenated
([sum of w_i^2], each member one contiguous block) with biases [sum_w], and applied member by member.

Evaluation is the task's own: SparseParityModule.per_subtask and val_metrics on member i's solo
module, whose parameters are views of its slices, and its solo run's EmergenceCallback.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from harness.members.optim import MemberAxis
from harness.training.data import batch_seed
from harness.training.detectors import EmergenceCallback
from tasks.sparse_parity import Config, build

DTYPES = {"32-true": torch.float32, "32": torch.float32, "64-true": torch.float64, "64": torch.float64}


class _Stream:
    """One group's training batches: batch of optimizer step s exactly as a solo run of `data` draws it."""

    def __init__(self, data, device: torch.device, steps_per_batch: int, dtype: torch.dtype):
        self.data, self.device, self.k, self.dtype = data, device, steps_per_batch, dtype
        self.gen = torch.Generator(device=device)
        self.next = None  # the step the generator is positioned to draw next

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data.finite is None and (step % self.k == 0 or step != self.next):
            # A new Lightning batch (or a resume inside one): seed as DeviceDataModule does, then replay
            # the draws of the steps of this Lightning batch before `step`.
            start = step - step % self.k
            self.gen.manual_seed(batch_seed(self.data.seed, 0, start // self.k))
            for s in range(start, step):
                self.data.train_batch(s, self.device, self.gen)
        self.next = step + 1
        x, y = self.data.train_batch(step, self.device, self.gen)
        return x.to(self.dtype), y


class PackedSparseParity:
    def __init__(self, cfgs: list[Config]):
        self.cfgs = cfgs
        t, m0 = cfgs[0].trainer, cfgs[0].model
        dtype = DTYPES.get(t.precision)
        if dtype is None:
            raise ConfigError(f"trainer.precision={t.precision!r}: packed runs train in {' or '.join(DTYPES)}")
        widths = [c.model.width for c in cfgs]
        self.depth = m0.depth
        cuda = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
        # cuda:N as Lightning names it (the data caches its tensors under one device name)
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.modules, self.emergence, self.summaries = [], [], []
        for cfg in cfgs:
            L.seed_everything(cfg.seed, workers=True, verbose=False)  # as harness.training.train, before build
            job = build(cfg)
            job.datamodule.seed = cfg.seed  # as harness.training.train
            # Initialised in float32 as the solo run, then cast as Lightning casts it for 64-true.
            self.modules.append(job.module.to(dtype=dtype, device=self.device))
            self.emergence.append(next(c for c in job.callbacks if isinstance(c, EmergenceCallback)))
            self.summaries.append(job.summary)
        M = len(cfgs)
        self.widths = widths
        self.offsets = [sum(widths[:i]) for i in range(M)]
        owner = torch.repeat_interleave(torch.arange(M), torch.tensor(widths))
        nets = [m.model.net for m in self.modules]
        last = 2 * self.depth  # index of the output Linear in MLP.net
        P = {
            "net.0.weight": torch.cat([n[0].weight.detach() for n in nets]),
            "net.0.bias": torch.cat([n[0].bias.detach() for n in nets]),
        }
        axes = [MemberAxis(0, owner), MemberAxis(0, owner)]
        square_owner = torch.repeat_interleave(torch.arange(M), torch.tensor(widths) ** 2)
        for j in range(2, last, 2):  # depth > 1: hidden-to-hidden layers, [w_i, w_i] each, flattened
            P[f"net.{j}.weight"] = torch.cat([n[j].weight.detach().flatten() for n in nets])
            P[f"net.{j}.bias"] = torch.cat([n[j].bias.detach() for n in nets])
            axes += [MemberAxis(0, square_owner), MemberAxis(0, owner)]
        P[f"net.{last}.weight_t"] = torch.cat([n[last].weight.detach().t() for n in nets])
        P[f"net.{last}.bias"] = torch.stack([n[last].bias.detach() for n in nets])
        axes += [MemberAxis(0, owner), MemberAxis.stacked(M)]
        self._params = {k: v.clone().requires_grad_() for k, v in P.items()}
        self._axes = axes
        # Each solo model's parameters become views of its member's slices: evaluation and the model
        # artifact see the current weights with no copy.
        D = {k: v.data for k, v in self._params.items()}
        for i, net in enumerate(nets):
            rows = slice(self.offsets[i], self.offsets[i] + widths[i])
            net[0].weight.data, net[0].bias.data = D["net.0.weight"][rows], D["net.0.bias"][rows]
            squares = slice(sum(w * w for w in widths[:i]), sum(w * w for w in widths[: i + 1]))
            for j in range(2, last, 2):
                net[j].weight.data = D[f"net.{j}.weight"][squares].view(widths[i], widths[i])
                net[j].bias.data = D[f"net.{j}.bias"][rows]
            net[last].weight.data, net[last].bias.data = D[f"net.{last}.weight_t"][rows].t(), D[f"net.{last}.bias"][i]
        o = [c.optim for c in cfgs]
        self.lr = torch.tensor([x.lr for x in o], dtype=torch.float64)
        self.weight_decay = torch.tensor([x.weight_decay for x in o], dtype=torch.float64)
        self.betas, self.eps = (o[0].beta1, o[0].beta2), 1e-8  # sparse parity's AdamW: torch's default eps
        self.train_loss_key = "train/loss"
        self._groups(t.batch_steps(), dtype)

    def _groups(self, steps_per_batch: int, dtype: torch.dtype) -> None:
        """Members with the same training batches share one stream; per group the index tensors (on the
        device, built once: no host-to-device copy per step) of its members' rows, and their widths."""
        keys: dict = {}
        for i, (cfg, module) in enumerate(zip(self.cfgs, self.modules)):
            d = cfg.data
            task_seed = d.task_seed if d.task_seed >= 0 else cfg.seed
            own = d.n_train_samples and d.stream_seed < 0  # D samples drawn after this member's init
            keys.setdefault(("member", i) if own else (module.data.seed, task_seed), []).append(i)
        self.groups = []
        M = len(self.cfgs)
        for members in keys.values():
            idx = torch.tensor(members)
            rows = torch.cat([torch.arange(self.offsets[i], self.offsets[i] + self.widths[i]) for i in members])
            square_offsets = [sum(w * w for w in self.widths[:i]) for i in members]
            squares = torch.cat([torch.arange(o, o + self.widths[i] ** 2) for o, i in zip(square_offsets, members)])
            subset = len(members) < M
            self.groups.append(
                {
                    "members": members,
                    "stream": _Stream(self.modules[members[0]].data, self.device, steps_per_batch, dtype),
                    "rows": rows.to(self.device) if subset else None,
                    "idx": idx.to(self.device) if subset else None,
                    "squares": squares.to(self.device) if subset else None,
                    "widths": [self.widths[i] for i in members],
                }
            )
        order = torch.tensor([i for g in self.groups for i in g["members"]])
        self._inverse = None if len(self.groups) == 1 else torch.argsort(order).to(self.device)

    def params(self) -> dict[str, torch.Tensor]:
        return self._params

    def member_axes(self) -> list[MemberAxis]:
        return self._axes

    def losses(self, step: int) -> torch.Tensor:
        P, last = self._params, 2 * self.depth
        out = []
        for g in self.groups:
            x, y = g["stream"].batch(step)
            rows, idx = g["rows"], g["idx"]
            w1, b1 = P["net.0.weight"], P["net.0.bias"]
            w2t, b2 = P[f"net.{last}.weight_t"], P[f"net.{last}.bias"]
            if rows is not None:
                w1, b1, w2t, b2 = (w.index_select(0, ix) for w, ix in ((w1, rows), (b1, rows), (w2t, rows), (b2, idx)))
            widths = g["widths"]
            m = len(widths)
            h = F.relu(F.linear(x, w1, b1))  # [B, sum of the group's widths]: one matmul for all its members
            hs = h.split(widths, 1)
            for j in range(2, last, 2):  # depth > 1: member by member
                wf, b = P[f"net.{j}.weight"], P[f"net.{j}.bias"]
                if rows is not None:
                    wf, b = wf.index_select(0, g["squares"]), b.index_select(0, rows)
                hs = [
                    F.relu(F.linear(hk, wk.view(w, w), bk))
                    for hk, wk, bk, w in zip(hs, wf.split([w * w for w in widths]), b.split(widths), widths)
                ]
            # Each member's output layer on its own hidden units (see the module docstring).
            logits = torch.stack(
                [torch.addmm(b, hk, wk) for hk, wk, b in zip(hs, w2t.split(widths, 0), b2.unbind(0))]
            )  # [m, B, 2]
            ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(m), reduction="none")
            out.append(ce.view(m, -1).mean(1))
        losses = out[0] if len(out) == 1 else torch.cat(out)
        return losses if self._inverse is None else losses[self._inverse]

    def evaluate(self, i: int, step: int) -> tuple[dict[str, float], dict]:
        module = self.modules[i]
        loss, acc = module.per_subtask(*module.data.val_batch(0, self.device))
        out = module.val_metrics(loss, acc)
        names = list(out)
        metrics = dict(zip(names, torch.stack([out[k].detach().double().reshape(()) for k in names]).tolist()))
        arrays = {"subtask": {"loss": loss.cpu().double().numpy(), "acc": acc.cpu().double().numpy()}}
        self.emergence[i].observe(step, arrays["subtask"]["loss"])
        return metrics, arrays

    def static_summary(self, i: int) -> dict:
        return dict(self.summaries[i])

    def final_summary(self, i: int, run, seconds: float, cpu: float, steps: int) -> dict:
        em = self.emergence[i]
        values = em.summary()
        if em.first is not None:  # as EmergenceCallback.on_fit_end gives a solo run
            import wandb

            values["emergence/items"] = wandb.Table(
                columns=["item", "step", "reached", f"final_{em.column}"], data=em.table_rows()
            )
        return values

    def member_model(self, i: int):
        """Member i's model with weights of its own (its parameters here are views of the packed tensors:
        saved as they are, every member's model.pt would hold all members' storage)."""
        model = copy.deepcopy(self.modules[i].model)
        for p in model.parameters():
            p.data = p.data.contiguous()
        return model

    def member_state(self, i: int) -> dict:
        return {"emergence": self.emergence[i].state_dict()}

    def load_member_state(self, i: int, state: dict) -> None:
        self.emergence[i].load_state_dict(state["emergence"])
