"""analysis.omnigrok on synthetic runs: the stand-in split said beside the paper's, thresholds labelled,
the LU landscape as mean and standard error over seeds, legends off the data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from figure_checks import legends_overlapping_axes

from analysis import omnigrok as og

STEPS = np.array([0, 200, 400, 1000, 2000, 5000, 10000, 20000, 40000])


def _run(rid, seed, alpha, fixed, n_train=1000, precision="32-true", split="offline"):
    return {
        "id": rid,
        "name": rid,
        "state": "finished",
        "config.task": "mnist_omnigrok",
        "config.seed": seed,
        "config.model.init_scale": alpha,
        "config.optim.fixed_norm": fixed,
        "config.optim.weight_decay": 0.01,
        "config.trainer.precision": precision,
        "config.data.split": split,
        "summary.data/source": split,
        "summary.data/n_train": n_train,
        "summary.data/n_test": 10000 - n_train if split == "offline" else 10000,
        "summary.loss_units": "mse per output",
    }


def synthetic():
    runs, rows = [], []
    # Grokking runs: train accuracy 1.0 from step 2000; test accuracy crosses 0.8 at `mid`.
    for rid, seed, alpha, mid in (("g8s0", 0, 8.0, 20000), ("g8s1", 1, 8.0, 30000), ("g1s0", 0, 1.0, 200)):
        runs.append(_run(rid, seed, alpha, False))
        for s in STEPS:
            rows.append(
                {
                    "run_id": rid,
                    "step": int(s),
                    "train/acc": 1.0 if s >= 2000 or alpha == 1 else 0.5,
                    "val/acc": 0.85 if s >= mid else 0.2,
                    "train/loss": 0.01,
                    "val/loss": 0.05,
                    "model/weight_norm": 90.0 - s / 1000,
                }
            )
    # Landscape runs: 2 sizes x 3 alphas x 2 seeds; test loss U-shaped in alpha, seeds differ by 10%.
    for n in (200, 1000):
        for alpha in (0.3, 1.0, 3.0):
            for seed in (0, 1):
                rid = f"l{n}a{alpha}s{seed}"
                runs.append(_run(rid, seed, alpha, True, n_train=n))
                val = (0.02 + 0.01 * abs(np.log(alpha))) * (1 + 0.1 * seed)
                for s in STEPS[1:]:
                    rows.append(
                        {
                            "run_id": rid,
                            "step": int(s),
                            "train/acc": 1.0,
                            "val/acc": 0.9 - val,
                            "train/loss": 1e-4 * alpha,
                            "val/loss": val,
                            "model/weight_norm": 10.0,
                        }
                    )
    return pd.DataFrame(runs), pd.DataFrame(rows)


def test_report_says_the_split_is_a_stand_in_and_how_it_differs(tmp_path):
    runs, hist = synthetic()
    result = og.analyse(runs, hist, str(tmp_path))
    note = result["data_note"]
    assert "offline stand-in split" in note and "first 1,000 of the 10,000 MNIST test images" in note
    assert "evaluated on 9,000" in note and "float32" in note
    assert "first 1,000 of the 60,000 MNIST training images" in note and "all 10,000 test images" in note
    assert "float64" in note and "not the paper's" in note
    md = (tmp_path / "report.md").read_text()
    assert note in md and "| seed |" in md and "t_train (acc >= 0.99)" in md and "t_val (acc >= 0.8)" in md
    assert "Liu et al.'s phase diagrams use 0.9" in md


def test_thresholds_move_the_steps_and_phases():
    runs, hist = synthetic()
    g = og.grokking_table(runs[~runs["config.optim.fixed_norm"]], hist, 0.99, 0.8, 1000).set_index("id")
    assert g.loc["g8s0", "t_train"] == 2000 and g.loc["g8s0", "t_val"] == 20000 and g.loc["g8s0", "phase"] == "grokking"
    assert g.loc["g1s0", "phase"] == "comprehension"
    strict = og.grokking_table(runs[~runs["config.optim.fixed_norm"]], hist, 0.99, 0.9, 1000).set_index("id")
    assert strict.loc["g8s0", "t_val"] is None and strict.loc["g8s0", "phase"] == "memorization"


def test_landscape_is_mean_and_standard_error_over_seeds(tmp_path):
    runs, hist = synthetic()
    result = og.analyse(runs, hist, str(tmp_path))
    assert len(result["landscape_runs"]) == 12 and {r["seed"] for r in result["landscape_runs"]} == {0, 1}
    row = next(r for r in result["landscape"] if r["n_train"] == 200 and r["alpha"] == 3.0)
    v = 0.02 + 0.01 * np.log(3.0)
    assert row["n_seeds"] == 2 and row["seeds"] == [0, 1]
    assert row["val_loss"] == pytest.approx(v * 1.05) and row["val_loss_se"] == pytest.approx(v * 0.05)
    fig = og.plot_lu(pd.DataFrame(result["landscape"]), str(tmp_path / "lu2.png"), "MSE")
    assert legends_overlapping_axes(fig) == []
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "test, n_train=200 (mean of 2 seeds)" in labels
    errorbars = [c for c in fig.axes[0].containers]
    assert len(errorbars) == 4 and all(c.has_yerr for c in errorbars)  # train + test per size, with SE bars
    assert "MSE" in fig.axes[0].get_ylabel()


def test_curves_one_line_per_run_legend_outside(tmp_path):
    runs, hist = synthetic()
    result = og.analyse(runs, hist, str(tmp_path))
    fig = og.plot_curves(
        pd.DataFrame(result["grokking"]), hist, str(tmp_path / "c.png"), result["thresholds"], result["data_note"]
    )
    assert legends_overlapping_axes(fig) == []
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert labels[:3] == ["alpha=1, seed 0", "alpha=8, seed 0", "alpha=8, seed 1"]
    assert "train threshold 0.99" in labels and "test threshold 0.8" in labels
    assert "stand-in" in fig._suptitle.get_text()
