"""How fast can a packed PAIR step be on this CPU? The packed step, the solo step and the floor set by
the packed step's matrix products, side by side in one run (issue 14's 0.25x target).

    python benchmarks/bench_packed_floor.py [--members 10] [--steps 300] [--warmup 1500]

All three are timed in CPU time of one thread (robust to other jobs on the machine; an unpacked sweep
with --workers W and a packed block on W threads both use every core, so their wall-time ratio is this
CPU-time ratio, up to start-up and thread scaling), late in training (after --warmup steps, when the
logits are hundreds of nats apart, as for most of a 50k-step run):

  solo      the solo run's step in a plain loop: the task's model, loss and torch's AdamW (a lower
            bound of `harness train`, which adds ~6%: benchmarks/bench_modular_addition.py)
  packed    one step of a block (harness.members.optim.block_step, what BlockModule takes) for all members (tasks.modular_addition.ModularBlock)
  floor     the packed step's six matrix products alone (forward and backward, same shapes): no
            implementation that computes the members' gradients exactly can do less arithmetic

Prints each per member-step and the ratios packed / solo and floor / solo.
"""

from __future__ import annotations

import argparse
import time

import torch


def cpu_ms(fn, steps: int) -> float:
    t0 = time.process_time()
    for s in range(steps):
        fn(s)
    return (time.process_time() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=1500)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from harness.config.run import load_config
    from harness.members.optim import block_optimizer, block_step
    from tasks.modular_addition import ModularBlock, ModularData, loss_fn, make_model

    cfgs = [load_config(("task=modular_addition", f"seed={s}")) for s in range(args.members)]

    # solo: the plain loop of one member
    cfg = cfgs[0]
    torch.manual_seed(cfg.seed)
    model = make_model(cfg)
    a, b, y = ModularData(cfg).tensors("cpu")["train"]
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps
    )

    def solo_step(_):
        loss = loss_fn(model(a, b), y, o.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()

    cpu_ms(solo_step, args.warmup)
    solo = cpu_ms(solo_step, args.steps)

    # packed: the block's step
    block = ModularBlock(cfgs)
    popt = block_optimizer(block)

    def packed_step(s):
        block_step(block, popt, s)

    cpu_ms(packed_step, args.warmup)
    packed = cpu_ms(packed_step, args.steps) / args.members

    # floor: the same six products as the packed step, on tensors of its shapes
    m, p = args.members, cfg.data.p
    d, h, n = cfg.model.embed_dim, cfg.model.hidden, int(block.a.shape[1])
    g = torch.Generator().manual_seed(0)
    w2, e = torch.randn(m, 2 * h, d, generator=g), torch.randn(m, d, p, generator=g)  # [W_in; W_out^T], E^T
    hid, ro = torch.randn(m, n, h, generator=g), torch.randn(m, h, p, generator=g)  # hidden, readout
    grad_logits, grad_both = torch.randn(m, n, p, generator=g), torch.randn(m, 2 * h, p, generator=g)

    def products(_):
        torch.bmm(w2, e)  # token inputs and readout
        torch.bmm(hid, ro)  # logits
        torch.bmm(grad_logits, ro.transpose(1, 2))  # d hidden
        torch.bmm(hid.transpose(1, 2), grad_logits)  # d readout
        torch.bmm(grad_both, e.transpose(1, 2))  # d [W_in; W_out^T]
        torch.bmm(w2.transpose(1, 2), grad_both)  # d E^T

    cpu_ms(products, 20)
    floor = cpu_ms(products, args.steps) / args.members
    print(
        f"PAIR step, CPU time of one thread per member-step, after {args.warmup} steps: solo {solo:.3f} ms, "
        f"packed ({args.members} members) {packed:.3f} ms, floor (the packed step's matrix products) {floor:.3f} ms",
        flush=True,
    )
    print(
        f"packed / solo = {packed / solo:.2f}x; floor / solo = {floor / solo:.2f}x "
        f"(the best a packed seed study can do against the unpacked one on these cores, start-up aside)",
        flush=True,
    )


if __name__ == "__main__":
    main()
