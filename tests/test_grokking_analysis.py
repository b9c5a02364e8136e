"""analysis.grokking on synthetic runs: the threshold convention (Power et al.'s 0.99 beside Liu et
al.'s 0.9) labelled everywhere, and figures that keep seeds apart with legends off the data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from figure_checks import legends_overlapping_axes

from analysis import grokking as ga

STEPS = np.array([0, 50, 100, 200, 400, 800, 1600, 3200, 6400])


def sigmoid_acc(step_mid: float) -> np.ndarray:
    """Accuracy that rises from 0.01 to 1.0 around `step_mid` (in log step); 0.01 throughout if inf."""
    x = np.log10(np.maximum(STEPS, 1))
    return (
        0.01 + 0.99 / (1 + np.exp(-(x - np.log10(step_mid)) * 12)) if np.isfinite(step_mid) else np.full(len(x), 0.01)
    )


def synthetic(val_mids: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs keyed by (weight decay, seed) -> the step at which validation accuracy rises; training
    accuracy rises at step 100 in every run."""
    runs, rows = [], []
    for i, ((wd, seed), mid) in enumerate(val_mids.items()):
        rid = f"r{i}"
        runs.append(
            {
                "id": rid,
                "name": f"wd{wd}-s{seed}",
                "state": "finished",
                "config.task": "modular_addition",
                "config.seed": seed,
                "config.optim.weight_decay": wd,
                "config.data.train_fraction": 0.5,
            }
        )
        for s, tr, va in zip(STEPS, sigmoid_acc(100), sigmoid_acc(mid)):
            rows.append(
                {
                    "run_id": rid,
                    "step": int(s),
                    "train/acc": tr,
                    "val/acc": va,
                    "model/weight_norm": 50.0 - s / 500,
                    "val/restricted_loss": 1 + 1 / (1 + s),
                    "train/excluded_loss": 2 + s / 1000,
                }
            )
    return pd.DataFrame(runs), pd.DataFrame(rows)


RUNS = {(1.0, 0): 3000, (1.0, 1): 2000, (1.0, 2): 5000, (0.0, 0): np.inf, (0.0, 1): np.inf, (0.0, 2): np.inf}


def test_threshold_convention_is_named_in_json_and_report():
    runs, hist = synthetic(RUNS)
    power = ga.analyse(runs, hist)  # default: Power et al.'s 0.99
    assert power["threshold"] == 0.99 and "Liu et al.'s phase diagrams use 0.9" in power["threshold_note"]
    liu = ga.analyse(runs, hist, threshold=ga.LIU_THRESHOLD)
    assert (
        "Liu et al.'s phase diagrams" in liu["threshold_note"]
        and "Power et al.'s t_99 uses 0.99" in liu["threshold_note"]
    )
    # The lower threshold is reached no later, and can change the verdict: seed 0 of wd 1 ends at 0.981
    # validation accuracy, memorisation at 0.99 and grokking at 0.9.
    for p, lo in zip(power["runs"], liu["runs"]):
        assert p["t_val"] is None or lo["t_val"] <= p["t_val"]
    assert any(lo["t_val"] < p["t_val"] for p, lo in zip(power["runs"], liu["runs"]) if p["t_val"] is not None)
    assert power["phase_counts"] == {"memorization": 5, "grokking": 1}
    assert liu["phase_counts"] == {"memorization": 4, "grokking": 2}
    md = ga.report(liu)
    assert "t_val (acc >= 0.9)" in md and "| seed |" in md.replace("| weight_decay | seed |", "| seed |")
    assert "never (censored at 6400)" in md  # no weight decay: memorised, t_val censored at the last step
    assert {r["seed"] for r in liu["runs"]} == {0, 1, 2}


def test_cli_flag_and_bad_threshold(tmp_path, monkeypatch):
    from harness.errors import UserError

    with pytest.raises(UserError, match="Liu et al. 0.9"):
        ga.main(["nowhere", "--out", str(tmp_path), "--threshold", "90"])


def test_curves_one_panel_per_configuration_one_line_per_seed_legend_off_the_data(tmp_path):
    runs, hist = synthetic(RUNS)
    result = ga.analyse(runs, hist, threshold=0.9)
    fig = ga.plot_curves(result, hist, str(tmp_path / "curves.png"))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2  # wd 0 and wd 1; seeds are lines within a panel, never averaged
    for ax in panels:
        assert "(n=3 seeds)" in ax.get_title()
        data_lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1 and ln.get_linestyle() in ("-", "--")]
        assert len(data_lines) == 6  # train + val for each of 3 seeds
        for ln in data_lines:  # each line is one run: its steps strictly increase (no zig-zag across seeds)
            assert np.all(np.diff(np.asarray(ln.get_xdata(), float)) > 0)
    assert "0.9" in fig._suptitle.get_text() and "Liu et al." in fig._suptitle.get_text()
    assert legends_overlapping_axes(fig) == []
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_progress_spectrum_phase_legends_sit_outside(tmp_path):
    runs, hist = synthetic(RUNS)
    result = ga.analyse(runs, hist)
    fig = ga.plot_progress(result, hist, str(tmp_path / "progress.png"))
    assert legends_overlapping_axes(fig) == []
    labels = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert sorted(labels) == ["weight_decay=0.0 (n=3 seeds)", "weight_decay=1.0 (n=3 seeds)"]
    assert "nats" in fig.axes[1].get_ylabel()
    curves = pd.DataFrame(
        {"run_id": "r0", "step": 6400, "item": np.arange(5), "power": np.full(5, 0.2), "key": [1, 0, 0, 0, 0]}
    )
    fig = ga.plot_spectrum(result, curves, str(tmp_path / "spectrum.png"))
    assert legends_overlapping_axes(fig) == []
    for r in result["runs"]:  # the phase diagram needs a train fraction (not varied here)
        r["data.train_fraction"] = 0.5
    fig = ga.plot_phase(result, str(tmp_path / "phase.png"))
    assert legends_overlapping_axes(fig) == [] and "0.99" in fig._suptitle.get_text()
    squares = [c for c in fig.axes[0].collections]
    assert len(squares) == 6  # one square per seed


def test_json_written_by_the_cli_path_holds_the_threshold(tmp_path):
    runs, hist = synthetic(RUNS)
    result = ga.analyse(runs, hist, threshold=0.9, max_delay=500)
    from analysis.common import write_outputs

    write_outputs(str(tmp_path), ga.STUDY, result, ga.report(result))
    back = json.loads((tmp_path / "grokking.json").read_text())
    assert back["threshold"] == 0.9 and back["max_delay"] == 500 and "t_val" in back["runs"][0]


def test_run_emergence_table_names_each_runs_seed():
    from analysis.study import emergence_markdown, run_emergence

    runs, hist = synthetic(RUNS)
    hist = hist.assign(**{"val/loss": 5.0 - 4.0 * hist["val/acc"]})
    table = run_emergence(hist, "val/loss", "val/acc", 0.9)
    table.insert(1, "seed", table["run_id"].map(dict(zip(runs["id"], runs["config.seed"]))))
    md = emergence_markdown(table, "val/loss", "val/acc", 0.9)
    assert "| run | seed | first step >= 0.9 |" in md
    assert "| r1 | 1 | 3200 |" in md  # wd 1, seed 1 crosses 0.9 at step 3200
