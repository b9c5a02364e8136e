"""Steps per second of `harness.training.train.train(cfg)` against a plain PyTorch loop, modular addition.

    python benchmarks/bench_modular_addition.py [--steps 3000] [--repeats 5] [key=value ...]

Both sides build the same model (same seed), data, AdamW and evaluation schedule (`evaluate` every
`trainer.eval_every` steps and after the last). The two sides alternate in one process, so machine
load hits both alike; each figure is the median of `--repeats`. "loop" times the training loop only
(first step to last evaluation; the harness side reports it as summary perf/steps_per_s); "end to end"
adds what the harness does once per run (W&B init and finish, Trainer set-up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from harness.config.run import load_config  # noqa: E402
from harness.training.train import train  # noqa: E402
from tasks.modular_addition import ModularData, evaluate, loss_fn, make_model  # noqa: E402


def plain(cfg) -> tuple[float, float, float]:
    """(loop seconds, end-to-end seconds, loop CPU seconds) of the same run without Lightning or W&B."""
    t_start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model, data = make_model(cfg), ModularData(cfg)
    tensors = data.tensors("cpu")
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps
    )
    t0, c0 = time.perf_counter(), time.process_time()
    steps, every = cfg.trainer.steps, cfg.trainer.eval_every
    for step in range(1, steps + 1):
        a, b, y = data.train_batch(step - 1, torch.device("cpu"))
        loss = loss_fn(model(a, b), y, o.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            metrics = evaluate(model, tensors, cfg)
            metrics.pop("_keys")
            _ = metrics.pop("_power").tolist()  # the spectrum the harness keeps for its curves artifact
            _ = {k: float(v) for k, v in metrics.items()}  # what a logger would read
    t1 = time.perf_counter()
    return t1 - t0, t1 - t_start, time.process_time() - c0


def harness(cfg, args: list[str]) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    summary = train(cfg, args)
    return summary["perf/train_seconds"], time.perf_counter() - t0, summary["perf/train_cpu_seconds"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="bench_modadd_"))
    args = [
        "task=modular_addition",
        f"trainer.steps={a.steps}",
        "trainer.threads=1",
        "trainer.progress_bar=false",
        *a.overrides,
    ]
    cfg = load_config(args)
    torch.set_num_threads(cfg.trainer.threads)
    warm = [a for a in args if not a.startswith("trainer.steps=")] + ["trainer.steps=200"]  # a key once
    plain(load_config(warm))  # warm-up: allocator, kernels, imports

    res = {"plain": [], "harness": []}
    for i in range(a.repeats):
        res["plain"].append(plain(cfg))
        res["harness"].append(harness(cfg, args))
        print(
            f"repeat {i + 1}: loop plain {res['plain'][-1][0]:.2f} s, harness {res['harness'][-1][0]:.2f} s; "
            f"CPU plain {res['plain'][-1][2]:.2f} s, harness {res['harness'][-1][2]:.2f} s",
            file=sys.stderr,
            flush=True,
        )

    n = cfg.trainer.steps
    med = {side: [statistics.median(r[j] for r in runs) for j in (0, 1, 2)] for side, runs in res.items()}
    print(
        f"modular addition p={cfg.data.p}, {cfg.model.name}, {n} steps, eval every "
        f"{cfg.trainer.eval_every}, {cfg.trainer.threads} thread(s), median of {a.repeats}"
    )
    print(f"{'':12}{'loop steps/s':>14}{'loop steps/CPU-s':>18}{'end-to-end steps/s':>20}")
    for side in ("plain", "harness"):
        m = med[side]
        print(f"{side:12}{n / m[0]:>14.1f}{n / m[2]:>18.1f}{n / m[1]:>20.1f}")
    # Load from other jobs swings from repeat to repeat: the ratio is the median of the paired ratios.
    r = [statistics.median(h[j] / p[j] for p, h in zip(res["plain"], res["harness"])) for j in (0, 2, 1)]
    print(
        f"{'ratio':12}{r[0]:>13.3f}x{r[1]:>17.3f}x{r[2]:>19.3f}x   (harness time / plain time, median of "
        f"paired repeats; target <= 1.10x)"
    )


if __name__ == "__main__":
    main()
