"""How much does one float32 ulp move a PAIR run's grokking step? (docs/packing.md)

    python benchmarks/grok_step_rounding.py SEED [SEED ...]

For each seed: the PAIR run (task defaults, a plain loop: the task's model, data, loss and torch's
AdamW, one thread) as built, and the same with every initial weight multiplied by (1 + 2^-23), up to
50k steps; prints the first step (every 100) at which validation accuracy reaches 0.99. Measured:
seed 7 at 35.6k and 49.8k, seed 4 at 21.5k and 37.0k. Packed and solo runs round differently, so
their grokking steps differ by as much over a long run.
"""

from __future__ import annotations

import sys

import torch


def grok_step(seed: int, nudge: float, steps: int = 50000) -> int | None:
    from harness.config.run import load_config
    from tasks.modular_addition import ModularData, loss_fn, make_model

    cfg = load_config(("task=modular_addition", f"seed={seed}"))
    torch.manual_seed(seed)
    model = make_model(cfg)
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(1 + nudge)
    t = ModularData(cfg).tensors("cpu")
    (a, b, y), (va, vb, vy) = t["train"], t["val"]
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps
    )
    for step in range(1, steps + 1):
        loss = loss_fn(model(a, b), y, o.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                if float((model(va, vb).argmax(1) == vy).float().mean()) >= 0.99:
                    return step
    return None


def main() -> None:
    torch.set_num_threads(1)
    for seed in [int(s) for s in sys.argv[1:]] or [7]:
        print(
            f"seed {seed}: val acc 0.99 at {grok_step(seed, 0.0)} as built, at {grok_step(seed, 2.0**-23)} "
            "with every initial weight moved by one ulp (None: not by 50k)",
            flush=True,
        )


if __name__ == "__main__":
    main()
