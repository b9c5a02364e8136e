import pandas as pd
import pytest

from analysis import data_scaling
from harness.errors import UserError


def synthetic(Ds, alpha_D=0.3, states=None):
    rows = [
        {
            "id": f"r{i}",
            "state": (states or {}).get(i, "finished"),
            "config.data.n_train_samples": D,
            "config.data.zipf_alpha": 0.4,
            "config.model.width": 128,
            "summary.val/loss.min": 0.02 + 5 * max(D, 1) ** -alpha_D,
            "summary.val/loss.last": 0.05 + 5 * max(D, 1) ** -alpha_D,
            "summary.emergence/n_learned": i,
        }
        for i, D in enumerate(Ds)
    ]
    return pd.DataFrame(rows)


def test_alpha_D_from_the_minimum_loss_against_theory(tmp_path):
    runs = synthetic([1e4, 2e4, 4e4, 8e4, 1.6e5, 3.2e5, 0], states={3: "crashed"})
    res = data_scaling.analyze(runs, n_bootstrap=40)
    assert res["alpha_D"] == pytest.approx(0.3, abs=0.01) and len(res["alpha_D_ci"]) == 2
    assert res["theory_alpha_D"] == pytest.approx(0.4 / 1.4) and res["n_runs"] == 5
    assert {r["id"]: r["why"] for r in res["excluded_runs"]} == {
        "r3": "crashed",
        "r6": "infinite data (n_train_samples=0)",
    }
    assert [p["min_loss"] for p in res["points"]][0] == pytest.approx(0.02 + 5 * 1e4**-0.3)
    md = data_scaling.report(res, "src", "s", data_scaling.plot(res, str(tmp_path)))
    assert "measured alpha_D (offset fit E + B D^-alpha) = 0.300" in md and "r3 (crashed)" in md and "0.286" in md
    assert "no history read" in md  # step-bound runs cannot be found without it


def test_too_few_runs_or_no_min_summary_is_a_clear_message():
    with pytest.raises(UserError, match="need >= 3 finished finite-data runs to fit alpha_D, found 2"):
        data_scaling.analyze(synthetic([1e4, 2e4]))
    with pytest.raises(UserError, match="no summary.val/loss.min column"):
        data_scaling.analyze(synthetic([1e4, 2e4, 4e4]).drop(columns=["summary.val/loss.min"]))


def test_step_bound_runs_are_drawn_and_listed_not_fitted_and_the_design_is_predicted(tmp_path):
    import numpy as np

    from analysis.design import design_alpha
    from harness.quanta_stats import zipf_frequencies

    Ds = [8e3, 1.6e4, 3.2e4, 6.4e4, 1.28e5, 2.56e5, 5.12e5]
    runs = synthetic(Ds).assign(
        **{
            "config.data.n_tasks": 100,
            "config.data.offset": 0.0,
            "summary.emergence/n_below_end": [2, 3, 5, 7, 10, 13, 14],
        }
    )
    steps = np.arange(17) * 250
    hist = []
    for i, D in enumerate(Ds):  # the largest D still falls at the end; the others have turned up
        loss = 0.3 * np.exp(-steps / 1000) + 0.05 if D == 5.12e5 else 0.1 + 1e-5 * (steps - 2000) ** 2 / 1e3
        hist.append(pd.DataFrame({"run_id": f"r{i}", "step": steps, "val/loss": loss, "val/n_learned": 3}))
    res = data_scaling.analyze(runs, n_bootstrap=40, history=pd.concat(hist))
    assert res["n_runs"] == 7 and res["n_fitted"] == 6 and [r["id"] for r in res["step_bound"]] == ["r6"]
    assert [p["fitted"] for p in res["points"]] == [True] * 6 + [False]
    assert any("step-bound" in w and "r6 (D=512000)" in w for w in res["warnings"])
    expected = design_alpha(Ds[:6], [2, 3, 5, 7, 10, 13], zipf_frequencies(100, 0.4))
    assert res["alpha_D_design"] == pytest.approx(expected) and len(res["alpha_D_design_ci"]) == 2
    md = data_scaling.report(res, "src", "s", data_scaling.plot(res, str(tmp_path)))
    assert f"design-predicted alpha_D (this design's frequencies, each run's learned count) = {expected:.3f}" in md
    assert "| 512000 | " in md and "no: step-bound |" in md
