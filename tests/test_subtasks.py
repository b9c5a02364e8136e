"""analysis.subtasks on synthetic curves of several seeds: verdicts per subtask, seed-bootstrap jump
intervals along steps and across sizes."""

import math

import numpy as np
import pandas as pd

from analysis import emergence as em
from analysis import subtasks

STEPS = np.r_[0, np.geomspace(100, 10_000, 41).round()]  # 0.05 decade apart: every change resolved
WIDTHS = [8, 11, 16, 23, 32, 45]  # 0.14-0.16 decade apart


def _curves(seeds=3, n_sub=6):
    rows, meta = [], []
    for w in WIDTHS:
        for seed in range(seeds):
            rid = f"w{w}s{seed}"
            rng = np.random.default_rng(seed * 100 + w)
            meta.append({"run_id": rid, "width": w, "params": 10 * w, "seed": seed, "threshold": 0.1 * math.log(2)})
            for k in range(n_sub):
                learned = k < w / 8  # wider models learn more subtasks
                loss = (
                    em.sigmoid(np.maximum(STEPS, 1), 300 * (k + 1), 0.05, math.log(2), 0.001)
                    if learned
                    else np.full(len(STEPS), math.log(2))
                )
                loss = np.abs(loss + rng.normal(0, 0.003, len(STEPS)))
                rows += [{"run_id": rid, "step": s, "item": k, "loss": v} for s, v in zip(STEPS, loss)]
    return pd.DataFrame(rows), pd.DataFrame(meta)


def test_seed_bootstrap_jumps_and_verdicts_across_steps_and_sizes():
    curves, meta = _curves()
    table = subtasks.along_steps(curves, meta)
    moving = table[table["verdict"] != "flat"]
    assert len(moving) and moving["verdict"].isin(["emergent", "metric-dependent"]).all()
    assert (table.loc[~table["learned"], "verdict"] == "flat").all()
    jumps = subtasks.seed_jumps(curves, meta)
    assert set(jumps["seeds"]) == {3} and len(jumps) == len(WIDTHS) * 6
    learned = jumps.merge(meta.groupby("params")["width"].first().reset_index(), on="params")
    learned = learned[learned["item"] < learned["width"] / 8]
    assert (learned["jump_lo"] <= learned["jump"]).all() and (learned["jump"] <= learned["jump_hi"]).all()
    assert (learned["jump"] > 0.5).all()  # a 0.05-decade drop: sudden at 0.1-decade windows
    size = subtasks.across_params(table)
    assert {"jump_lo", "jump_hi", "jump_seeds"} <= set(size.columns) and (size["jump_seeds"] == 3).all()
    # subtasks whose final loss drops between two widths 0.15 decade apart: unresolved, never "sudden"
    moved = size[size["jump_verdict"] != "flat"]
    assert len(moved) and (moved["jump_verdict"] == "unresolved").all()
    assert (size["jump_lo"] <= size["jump_loss"] + 1e-9).all()
