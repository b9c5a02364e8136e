"""analysis.dynamics: the step exponent, convergence time against frequency, learned quanta vs N and D."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from analysis import dynamics, scaling
from harness.errors import UserError


def run_rows(n, **extra):
    return [{"id": f"r{i}", "state": "finished", "config.task": "sparse_parity", "config.data.zipf_alpha": 0.4,
             "config.data.n_tasks": 20, "config.data.offset": 0.0, "summary.emergence/threshold_nats": 0.1 * math.log(2),
             **{k: v[i] for k, v in extra.items()}} for i in range(n)]


def test_step_exponent_is_fitted_over_the_tail_of_the_mean_over_seeds():
    steps = np.arange(0, 4001, 100)
    rng = np.random.default_rng(0)
    rows = []
    for rid in ("a", "b"):  # two seeds: the fit is to their mean
        loss = 0.02 + 3.0 * np.maximum(steps, 1) ** -0.5 * np.exp(rng.normal(0, 0.005, len(steps)))
        loss[0] = 0.69  # step 0: the untrained model, far off the power law; below the tail
        rows += [{"run_id": rid, "step": s, "val/loss": v} for s, v in zip(steps, loss)]
    se = dynamics.step_exponent(pd.DataFrame(rows), n_bootstrap=40)
    assert se["n_runs"] == 2 and se["steps"][0] == 0 and se["fit_from_step"] == 400 and se["n_fit"] == 37
    assert se["alpha_S"] == pytest.approx(0.5, abs=0.05)
    lo, hi = se["alpha_S_ci"]
    assert lo < 0.5 < hi and hi - lo < 0.3
    few = dynamics.step_exponent(pd.DataFrame(rows[:4]), n_bootstrap=0)
    assert few["alpha_S"] is None and "need >= 5" in few["note"]


def test_convergence_step_slope_against_frequency_with_censoring():
    p = dynamics.frequencies(pd.Series(run_rows(1)[0]))
    assert p.sum() == pytest.approx(1) and p[0] / p[1] == pytest.approx(2 ** 1.4)
    steps = np.arange(0, 4001, 100)
    rows = []
    for rid, c in (("r0", 60.0), ("r1", 80.0)):
        t_learn = c / p  # steps ~ 1/p_t: slope -1 (rounded up to the evaluation grid)
        for item in range(20):
            for s in steps:
                below = s >= t_learn[item] or (rid == "r0" and item == 5)  # r0's subtask 5: below at step 0
                rows.append({"run_id": rid, "step": s, "item": item, "loss": 0.01 if below else 0.6})
    runs = pd.DataFrame(run_rows(2))
    conv = dynamics.convergence_steps(pd.DataFrame(rows), runs)
    assert len(conv) == 40 and conv["at_start"].sum() == 1
    never = int(conv["step"].isna().sum())
    assert never == sum(int((c / p > 4000).sum()) for c in (60.0, 80.0)) and never > 0  # censored, not dropped silently
    res = dynamics.convergence_slope(conv, n_bootstrap=100)
    assert res["n_at_start"] == 1 and res["n_censored"] == never and res["n_used"] == 40 - 1 - never
    assert res["slope"] == pytest.approx(-1.0, abs=0.08)
    lo, hi = res["slope_ci"]
    assert lo <= res["slope"] <= hi and hi - lo < 0.3
    assert set(res["per_run"]) == {"r0", "r1"} and all(v == pytest.approx(-1, abs=0.1) for v in res["per_run"].values())


def test_learned_quanta_against_N_at_one_data_budget_and_against_D_at_one_width():
    runs = pd.DataFrame(run_rows(
        7, **{"summary.model/params": [100, 400, 1600, 400, 400, 400, 100], "config.model.width": [1, 4, 16, 4, 4, 4, 1],
              "config.data.n_train_samples": [0, 0, 0, 1000, 4000, 16000, 1000],
              "summary.emergence/n_learned": [1, 3, 7, 1, 2, 4, 0], "summary.emergence/n_below_end": [1, 3, 6, 0, 2, 4, 0]}))
    lc = dynamics.learned_counts(runs)
    assert lc["N_at_D"] == "infinite" and [r["params"] for r in lc["vs_N"]] == [100, 400, 1600]
    assert [r["n_learned"] for r in lc["vs_N"]] == [1, 3, 7]
    assert lc["D_at_width"] == 4 and [(r["D"], r["n_below_end"]) for r in lc["vs_D"]] == [(1000, 0), (4000, 2), (16000, 4)]
    assert [r["id"] for r in dynamics.largest_runs(runs).to_dict("records")] == ["r2"]  # most params, then most data


def test_no_sparse_parity_runs_is_a_clear_message():
    with pytest.raises(UserError, match="no sparse-parity runs"):
        dynamics.analyze("src", None, pd.DataFrame(columns=["id", "state"]))
    crashed = pd.DataFrame(run_rows(2, state=["crashed", "failed"], **{"summary.model/params": [1, 2]}))
    with pytest.raises(UserError, match="no finished sparse-parity runs"):
        dynamics.analyze("src", None, crashed)


def test_the_report_runs_the_dynamics_data_and_alpha_studies():
    from analysis import report

    for name in ("analysis.dynamics", "analysis.data_scaling", "analysis.alpha_study"):
        assert name in report.STUDIES
        mod = __import__(name, fromlist=["run"])
        assert callable(mod.applies) and callable(mod.run)


@pytest.mark.slow
def test_dynamics_of_real_runs_from_step_0(offline):
    """Three tiny widths trained for real: history and curves start at step 0, the CLI writes its outputs."""
    from conftest import TINY
    from harness.config.run import load_config
    from harness.training.train import train

    args = [a for a in TINY if not a.startswith("trainer.steps=")] + ["trainer.steps=200", "optim.lr=1e-2"]
    ids = [train(load_config(a := args + [f"model.width={w}"]), a)["_run_id"] for w in (4, 16, 64)]
    out = str(offline / "out")
    result = dynamics.main([str(offline / "wandb"), "--out", out, "--bootstrap", "20"])
    assert result["largest"]["ids"] == [ids[-1]] and result["step_exponent"]["steps"][0] == 0
    assert result["step_exponent"]["steps"][-1] == 200 and len(result["step_exponent"]["steps"]) == 11
    pts = pd.DataFrame(result["convergence"]["points"])
    assert len(pts) == 4 and set(pts["run_id"]) == {ids[-1]}
    assert [r["params"] for r in result["learned"]["vs_N"]] == sorted(r["params"] for r in result["learned"]["vs_N"])
    assert len(result["learned"]["vs_N"]) == 3
    assert json.load(open(os.path.join(out, "dynamics.json")))["largest"]["ids"] == [ids[-1]]
    assert os.path.exists(os.path.join(out, "loss_vs_step.svg")) and os.path.exists(os.path.join(out, "report.md"))


def test_runs_at_several_alphas_are_analysed_at_one():
    runs = pd.DataFrame(run_rows(5, **{"config.data.zipf_alpha": [0.2, 0.4, 0.4, 0.8, 0.8]}))
    kept, alpha, alphas = scaling.one_alpha(runs)
    assert alpha == 0.4 and list(kept["id"]) == ["r1", "r2"] and alphas == [0.2, 0.4, 0.8]  # a tie: the paper's 0.4
    kept, alpha, _ = scaling.one_alpha(runs.iloc[[0, 3, 4]])
    assert alpha == 0.8 and list(kept["id"]) == ["r3", "r4"]
