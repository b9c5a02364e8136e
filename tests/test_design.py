"""The design prediction (analysis.design) and the fit warnings (analysis.fit_checks)."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import design, fit_checks
from analysis.fits import FitError
from harness.quanta_stats import zipf_frequencies


def test_frequencies_by_hand():
    # p_t ~ t^-2 over 3 subtasks: 1, 1/4, 1/9 of 49/36.
    assert zipf_frequencies(3, 1.0) == pytest.approx([36 / 49, 9 / 49, 4 / 49])
    # offset 1: (t + 1)^-2 over 2 subtasks: 1/4, 1/9 of 13/36.
    assert zipf_frequencies(2, 1.0, offset=1.0) == pytest.approx([9 / 13, 4 / 13])


def test_the_task_draws_from_the_same_frequencies():
    from tasks.sparse_parity import frequencies

    assert frequencies(100, 0.4, 2.5).numpy() == pytest.approx(zipf_frequencies(100, 0.4, 2.5), rel=1e-15)


def test_predicted_loss_and_exponent_by_hand():
    p = zipf_frequencies(3, 1.0)
    # An unlearned subtask costs 1 bit (ln 2 nats): L_pred(n) = ln 2 * sum_{k>n} p_k.
    assert design.predicted_loss([0, 1, 2, 3], p) == pytest.approx(
        [math.log(2), math.log(2) * 13 / 49, math.log(2) * 4 / 49, 0.0]
    )
    # Two runs at x = 1 and x = e learning 1 and 2 subtasks: slope ln(4/13) per unit of ln x.
    assert design.design_alpha([1.0, math.e], [1, 2], p) == pytest.approx(math.log(13 / 4))
    with pytest.raises(FitError, match="every one of the 3 subtasks"):
        design.design_alpha([1.0, 2.0], [1, 3], p)
    with pytest.raises(FitError, match="integers in 0..3"):
        design.predicted_loss([1.5], p)


def test_the_make_run_design_predicts_about_0_54_not_0_4():
    # Issue 19: 100 subtasks, Zipf 0.4, one seed per width learning these counts: 0.537.
    widths = np.array([8, 11, 16, 23, 32, 45, 64, 91, 128, 181])
    params = 115 * widths + 2  # 112 inputs -> width -> 2 logits
    n = [0, 1, 1, 3, 5, 4, 6, 9, 10, 17]
    assert design.design_alpha(params, n, zipf_frequencies(100, 0.4)) == pytest.approx(0.537, abs=0.005)


def test_design_of_runs_is_one_design_read_from_their_config():
    runs = pd.DataFrame({"config.data.n_tasks": [3, 3], "config.data.zipf_alpha": [1.0, 1.0]})
    assert design.design_frequencies(runs) == pytest.approx([36 / 49, 9 / 49, 4 / 49])
    with pytest.raises(FitError, match="2 designs"):
        design.design_frequencies(runs.assign(**{"config.data.zipf_alpha": [1.0, 0.4]}))


def test_design_interval_resamples_seeds_within_each_x():
    p = zipf_frequencies(100, 0.4)
    x = np.repeat([1e3, 2e3, 4e3, 8e3, 16e3], 3)
    n = np.array([1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14])
    lo, hi = design.design_alpha_ci(x, n, p, strata=x, n_bootstrap=200)
    assert lo < design.design_alpha(x, n, p) < hi
    same = np.repeat([1, 2, 4, 7, 12], 3)  # no scatter between seeds: a zero-width interval
    lo, hi = design.design_alpha_ci(x, same, p, strata=x, n_bootstrap=50)
    assert hi - lo == pytest.approx(0, abs=1e-12)


def test_few_distinct_x_values_is_a_warning_naming_the_runs():
    w = fit_checks.few_x([1, 1, 2, 3, 4], ["a", "b", "c", "d", "e"], "parameter counts")
    assert "only 4 distinct parameter counts" in w and "a, b, c, d, e" in w
    assert fit_checks.few_x([1, 2, 3, 4, 5], list("abcde")) is None


def test_offset_on_its_bound_is_a_warning_that_the_model_is_mis_specified():
    w = fit_checks.offset_on_bound(2.4e-13, [0.1, 0.05], ["r1", "r2"])
    assert "bound 0" in w and "mis-specified" in w and "r1, r2" in w
    assert fit_checks.offset_on_bound(0.01, [0.1, 0.05], ["r1", "r2"]) is None


def history(rid, losses, counts=None, every=250):
    steps = np.arange(len(losses)) * every
    h = pd.DataFrame({"run_id": rid, "step": steps, "val/loss": losses})
    if counts is not None:
        h["val/n_learned"] = counts
    return h


def test_still_learning_flags_falling_loss_and_rising_counts_not_a_noisy_plateau():
    rng = np.random.default_rng(0)
    plateau = 0.3 * np.exp(rng.normal(0, 0.02, 17))  # 17 evaluations, 0..4000, flat with noise
    falling = 0.6 * np.exp(-np.arange(17) / 8)  # still falling steadily at the end
    counts_rise = np.r_[np.zeros(16), 1]  # a subtask learned at the last evaluation
    hist = pd.concat(
        [
            history("flat", plateau, np.full(17, 3)),
            history("fall", falling),
            history("jump", np.full(17, 0.3), counts_rise),
        ]
    )
    flagged = {r["id"]: r for r in fit_checks.still_learning(hist)}
    assert set(flagged) == {"fall", "jump"}
    assert flagged["fall"]["steps"] == (3500, 4000)  # the last evaluation at or before 90% of 4000, to the end
    assert flagged["jump"]["n"] == (0.0, 1.0) and "learned 0 -> 1" in flagged["jump"]["why"]
    w = fit_checks.still_learning_warning(list(flagged.values()), {"fall": "width 128 seed 1"})
    assert "2 run(s) still learning" in w and "width 128 seed 1 (fall)" in w and "jump" in w
    assert fit_checks.still_learning_warning([]) is None


def test_a_plateau_over_many_noise_draws_is_rarely_flagged():
    rng = np.random.default_rng(1)
    hist = pd.concat([history(f"r{i}", 0.3 * np.exp(rng.normal(0, 0.03, 17))) for i in range(200)])
    assert len(fit_checks.still_learning(hist)) <= 10  # ~2% one-sided at 2 sigma
