import math

import pandas as pd
import pytest

from analysis import data_scaling
from harness.errors import UserError


def synthetic(Ds, alpha_D=0.3, states=None):
    rows = [{"id": f"r{i}", "state": (states or {}).get(i, "finished"), "config.data.n_train_samples": D,
             "config.data.zipf_alpha": 0.4, "config.model.width": 128,
             "summary.val/loss.min": 0.02 + 5 * max(D, 1) ** -alpha_D, "summary.val/loss.last": 0.05 + 5 * max(D, 1) ** -alpha_D,
             "summary.emergence/n_learned": i} for i, D in enumerate(Ds)]
    return pd.DataFrame(rows)


def test_alpha_D_from_the_minimum_loss_against_theory(tmp_path):
    runs = synthetic([1e4, 2e4, 4e4, 8e4, 1.6e5, 3.2e5, 0], states={3: "crashed"})
    res = data_scaling.analyze(runs, n_bootstrap=40)
    assert res["alpha_D"] == pytest.approx(0.3, abs=0.01) and len(res["alpha_D_ci"]) == 2
    assert res["theory_alpha_D"] == pytest.approx(0.4 / 1.4) and res["n_runs"] == 5
    assert {r["id"]: r["why"] for r in res["excluded_runs"]} == {"r3": "crashed", "r6": "infinite data (n_train_samples=0)"}
    assert [p["min_loss"] for p in res["points"]][0] == pytest.approx(0.02 + 5 * 1e4 ** -0.3)
    md = data_scaling.report(res, "src", "s", data_scaling.plot(res, str(tmp_path)))
    assert "alpha_D = **0.30" in md and "r3 (crashed)" in md and "0.286" in md


def test_too_few_runs_or_no_min_summary_is_a_clear_message():
    with pytest.raises(UserError, match="need >= 3 finished finite-data runs to fit alpha_D, found 2"):
        data_scaling.analyze(synthetic([1e4, 2e4]))
    with pytest.raises(UserError, match="no summary.val/loss.min column"):
        data_scaling.analyze(synthetic([1e4, 2e4, 4e4]).drop(columns=["summary.val/loss.min"]))
