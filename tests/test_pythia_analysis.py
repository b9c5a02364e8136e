"""analysis.pythia's figures on synthetic token losses: fits drawn over the fitted models only, step 0
kept off the log axis (and said), legends off the data, nats on every loss axis."""

from __future__ import annotations

import numpy as np
import pandas as pd
from figure_checks import legends_overlapping_axes

from analysis import pythia as ap
from analysis import tokens as tk


def axis_result(scale: list[float], steps: bool = False) -> dict:
    """What analyse_axis returns for 60 tokens over the given scales: 20 monogenic, 20 polygenic, 20 flat."""
    rng = np.random.default_rng(0)
    scale = np.asarray(scale, float)
    m = len(scale)
    mono = np.where(np.arange(m) >= m // 2, 0.1, 7.0)[None, :] + rng.uniform(0, 0.05, (20, m))
    ln = np.log(np.maximum(scale, 1.0))
    poly = (6.0 - 0.8 * (ln - ln[0]))[None, :] + rng.normal(0, 0.01, (20, m))
    flat = np.full((20, m), 2.0) + rng.normal(0, 0.3, (20, m))
    losses = np.vstack([mono, poly, flat])
    usable = scale > 0
    cls = tk.classify(losses[:, usable], scale[usable])
    key = "step" if steps else "params_nonembedding"
    points = [
        {key: float(s), "mean_loss_aligned": float(v), "model": "m", "revision": f"step{int(s)}"}
        for s, v in zip(scale, losses.mean(0))
    ]
    return {
        "points": points,
        "class_fractions": tk.fractions(cls["class"]),
        "_losses": losses,
        "_cls": cls,
        "_scale": scale,
        "_usable": usable,
    }


def test_size_figure_fit_spans_the_models_and_legends_sit_outside(tmp_path):
    res = axis_result([1e4, 3e4, 1e5, 3e5])
    pts = pd.DataFrame(res["points"])
    fit = ap.fit_mean_loss(pts["params_nonembedding"].to_numpy(), pts["mean_loss_aligned"].to_numpy(), bootstrap=20)
    fig = ap.plot_size(res, fit, str(tmp_path))
    assert legends_overlapping_axes(fig) == []
    for line in fig.axes[0].get_lines():  # data, offset fit, plain fit: none beyond the models fitted
        x = np.asarray(line.get_xdata(), float)
        assert x.min() >= 1e4 * (1 - 1e-9) and x.max() <= 3e5 * (1 + 1e-9)
    assert "nats" in fig.axes[0].get_ylabel() and "nats" in fig.axes[1].get_ylabel()
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(lab.startswith("plain log-log fit") for lab in labels) and "mean per-token loss (4 models)" in labels


def test_checkpoint_figure_keeps_step_zero_off_the_log_axis_and_says_so(tmp_path):
    res = axis_result([0, 40, 80, 160], steps=True)
    fig = ap.plot_checkpoints(res, str(tmp_path))
    ax = fig.axes[0]
    assert legends_overlapping_axes(fig) == []
    series = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert len(series) == 1 and list(series[0].get_xdata()) == [40.0, 80.0, 160.0]  # step 0 not moved to 1
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(lab.startswith("step 0 (initialisation)") for lab in labels)
