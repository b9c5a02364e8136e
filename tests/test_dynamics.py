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
    return [
        {
            "id": f"r{i}",
            "state": "finished",
            "config.task": "sparse_parity",
            "config.data.zipf_alpha": 0.4,
            "config.data.n_tasks": 20,
            "config.data.offset": 0.0,
            "summary.emergence/threshold_nats": 0.1 * math.log(2),
            **{k: v[i] for k, v in extra.items()},
        }
        for i in range(n)
    ]


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


def test_convergence_steps_are_intervals_with_censoring_and_both_slopes_are_reported():
    p = dynamics.frequencies(pd.Series(run_rows(1)[0]))
    assert p.sum() == pytest.approx(1) and p[0] / p[1] == pytest.approx(2**1.4)
    steps = np.arange(0, 4001, 100)
    rows = []
    for rid, c in (("r0", 60.0), ("r1", 80.0)):
        t_learn = c / p  # steps ~ 1/p_t: slope -1 (seen at the next evaluation)
        for item in range(20):
            for s in steps:
                below = s >= t_learn[item] or (rid == "r0" and item == 5)  # r0's subtask 5: below at step 0
                rows.append({"run_id": rid, "step": s, "item": item, "loss": 0.01 if below else 0.6})
    runs = pd.DataFrame(run_rows(2))
    conv = dynamics.convergence_steps(pd.DataFrame(rows), runs)
    assert len(conv) == 40 and conv["at_start"].sum() == 1
    never = int((~conv["learned"]).sum())
    assert never == sum(int((c / p > 4000).sum()) for c in (60.0, 80.0)) and never > 0
    cens = conv[~conv["learned"]]
    assert (cens["lo"] == 4000).all() and np.isinf(cens["hi"]).all() and cens["step"].isna().all()  # right-censored
    got = conv[conv["learned"] & ~conv["at_start"]]
    assert ((got["hi"] - got["lo"]) == 100).all() and (got["hi"] == got["step"]).all()  # one evaluation gap
    t_true = np.where(got["run_id"] == "r0", 60.0, 80.0) / got["p"]
    assert ((got["lo"] < t_true) & (t_true <= got["hi"])).all()
    res = dynamics.convergence_slope(conv)
    assert res["n_at_start"] == 1 and res["n_censored"] == never and res["n_learned"] == 40 - 1 - never
    cf, of = res["censored_fit"], res["learned_only_fit"]
    assert cf["n_right_censored"] == never and cf["n"] == 39
    assert cf["slope"] == pytest.approx(-1.0, abs=0.05) and cf["slope_ci"][0] < -1 < cf["slope_ci"][1]
    assert of["slope"] == pytest.approx(-1.0, abs=0.08) and of["slope_ci"][0] < of["slope"] < of["slope_ci"][1]
    assert res["reference"] == {"paper_fit": -0.81, "theory": -1.0} and "interval-censored" in res["method"]
    assert set(res["per_run"]) == {"r0", "r1"}
    assert all(v["censored"] == pytest.approx(-1, abs=0.1) for v in res["per_run"].values())


def _censored_draw(seed, sigma=0.6, budget=3000, every=100, seeds=3):
    """Subtasks of 3 seeds with log t = log(3 / p_t) + sigma eps (slope -1 exactly), seen on an
    evaluation grid every `every` steps, never learned past `budget` (right-censored)."""
    rng = np.random.default_rng(seed)
    p = np.tile(dynamics.frequencies(pd.Series({**run_rows(1)[0], "config.data.n_tasks": 100})), seeds)
    t = 3.0 / p * np.exp(rng.normal(0, sigma, p.size))
    grid = np.arange(every, budget + 1, every)
    k = np.searchsorted(grid, t)
    learned = t <= budget
    hi = np.where(learned, grid[np.minimum(k, len(grid) - 1)], np.inf)
    lo = np.where(learned, np.where(k > 0, grid[np.maximum(k - 1, 0)], 0.0), budget)
    return pd.DataFrame(
        {
            "run_id": np.repeat([f"s{i}" for i in range(seeds)], p.size // seeds),
            "item": 0,
            "p": p,
            "step": np.where(learned, hi, np.nan),
            "lo": lo,
            "hi": hi,
            "learned": learned,
            "at_start": False,
        }
    )


def test_censored_fit_recovers_slope_minus_one_where_the_learned_only_fit_is_biased():
    for seed in range(3):
        conv = _censored_draw(seed)
        share = 1 - conv["learned"].mean()
        assert 0.25 < share < 0.4, share  # ~30% never learned within the budget
        res = dynamics.convergence_slope(conv)
        cf, of = res["censored_fit"], res["learned_only_fit"]
        assert abs(cf["slope"] + 1) < 0.1 and abs(cf["slope"] + 1) < 3 * cf["slope_se"], cf
        lo, hi = cf["slope_ci"]
        assert lo < cf["slope"] < hi and 0.1 < hi - lo < 0.25  # profile interval ~ +-2 standard errors
        # dropping the slow (rare) subtasks flattens the learned-only slope, far outside its own interval
        assert of["slope"] > -0.75 and of["slope_ci"][0] > -0.8, of  # measured -0.62 .. -0.67
        assert cf["n_right_censored"] == res["n_censored"] == int((~conv["learned"]).sum())


def test_learned_quanta_against_N_at_one_data_budget_and_against_D_at_one_width():
    runs = pd.DataFrame(
        run_rows(
            7,
            **{
                "summary.model/params": [100, 400, 1600, 400, 400, 400, 100],
                "config.model.width": [1, 4, 16, 4, 4, 4, 1],
                "config.data.n_train_samples": [0, 0, 0, 1000, 4000, 16000, 1000],
                "summary.emergence/n_learned": [1, 3, 7, 1, 2, 4, 0],
                "summary.emergence/n_below_end": [1, 3, 6, 0, 2, 4, 0],
            },
        )
    )
    lc = dynamics.learned_counts(runs)
    assert lc["N_at_D"] == "infinite" and [r["params"] for r in lc["vs_N"]] == [100, 400, 1600]
    assert [r["n_learned"] for r in lc["vs_N"]] == [1, 3, 7]
    assert lc["D_at_width"] == 4 and [(r["D"], r["n_below_end"]) for r in lc["vs_D"]] == [
        (1000, 0),
        (4000, 2),
        (16000, 4),
    ]
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
    with open(os.path.join(out, "dynamics.json")) as f:
        assert json.load(f)["largest"]["ids"] == [ids[-1]]
    assert os.path.exists(os.path.join(out, "loss_vs_step.svg")) and os.path.exists(os.path.join(out, "report.md"))


def test_runs_at_several_alphas_are_analysed_at_one():
    runs = pd.DataFrame(run_rows(5, **{"config.data.zipf_alpha": [0.2, 0.4, 0.4, 0.8, 0.8]}))
    kept, alpha, alphas = scaling.one_alpha(runs)
    assert alpha == 0.4 and list(kept["id"]) == ["r1", "r2"] and alphas == [0.2, 0.4, 0.8]  # a tie: the paper's 0.4
    kept, alpha, _ = scaling.one_alpha(runs.iloc[[0, 3, 4]])
    assert alpha == 0.8 and list(kept["id"]) == ["r3", "r4"]
