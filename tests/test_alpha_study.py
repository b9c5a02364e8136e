import pandas as pd
import pytest

from analysis import alpha_study
from harness.errors import UserError


def runs_for(alpha, kind, values, start=0):
    rows = []
    for i, v in enumerate(values):
        params = 603 * (v if kind == "N" else 128) + 2
        D = v if kind == "D" else 0
        rows.append(
            {
                "id": f"{kind}{alpha}-{i}",
                "state": "finished",
                "config.data.zipf_alpha": alpha,
                "config.data.n_train_samples": D,
                "summary.model/params": params,
                "summary.val/loss.last": 0.01 + 20 * params**-alpha if kind == "N" else 0.3,
                "summary.val/loss.min": 0.01 + 5 * max(D, 1) ** -(alpha / (alpha + 1)),
            }
        )
    return rows


def test_exponents_per_alpha_against_theory(tmp_path):
    rows = (
        runs_for(0.4, "N", [10, 20, 40, 80, 160])
        + runs_for(0.4, "D", [1e4, 3e4, 1e5, 3e5])
        + runs_for(0.8, "N", [10, 20, 40, 80])
    )
    res = alpha_study.analyze(pd.DataFrame(rows), n_bootstrap=30)
    g = {r["zipf_alpha"]: r for r in res["groups"]}
    assert g[0.4]["alpha_N"]["alpha"] == pytest.approx(0.4, abs=0.02)
    assert g[0.4]["alpha_D"]["alpha"] == pytest.approx(0.4 / 1.4, abs=0.02)
    assert g[0.8]["alpha_N"]["alpha"] == pytest.approx(0.8, abs=0.03)
    assert g[0.8]["alpha_D"] == {"error": "no finite-data runs"}
    md = alpha_study.report(res, "src", None, alpha_study.plot(res, str(tmp_path)))
    assert "(no finite-data runs)" in md and "| 0.4 | measured plain 0." in md and "offset 0.400" in md


def test_each_alpha_gets_its_design_prediction():
    from analysis.design import design_alpha
    from harness.quanta_stats import zipf_frequencies

    rows = runs_for(0.4, "N", [10, 20, 40, 80, 160]) + runs_for(0.8, "N", [10, 20, 40, 80, 160])
    runs = pd.DataFrame(rows).assign(
        **{"config.data.n_tasks": 50, "summary.emergence/n_below_end": [1, 2, 4, 7, 11] * 2}
    )
    res = alpha_study.analyze(runs, n_bootstrap=30)
    g = {r["zipf_alpha"]: r for r in res["groups"]}
    params = [603 * w + 2 for w in (10, 20, 40, 80, 160)]
    for a in (0.4, 0.8):  # the same counts, each exponent's own frequencies
        assert g[a]["alpha_N_design"] == pytest.approx(design_alpha(params, [1, 2, 4, 7, 11], zipf_frequencies(50, a)))
    assert g[0.8]["alpha_N_design"] > g[0.4]["alpha_N_design"]
    assert "design-predicted" in alpha_study.report(res, "src", None, [])


def test_no_group_with_three_runs_is_a_clear_message():
    with pytest.raises(UserError, match="no alpha group has >= 3 usable runs"):
        alpha_study.analyze(pd.DataFrame(runs_for(0.4, "N", [10, 20])))
