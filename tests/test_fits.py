import math

import numpy as np
import pandas as pd
import pytest

from analysis import scaling
from analysis.fits import fit_power_law, fit_scaling_law
from tests.conftest import DATA


def test_recovers_a_known_exponent_exactly_without_noise():
    N = np.logspace(3, 7, 25)
    fit = fit_power_law(N, 0.5 + 30 * N**-0.35, n_bootstrap=20)
    assert fit.alpha[0] == pytest.approx(0.35, abs=1e-3)
    assert fit.E == pytest.approx(0.5, rel=1e-3) and fit.A[0] == pytest.approx(30, rel=1e-2)


@pytest.mark.slow  # 45 s of bootstrap draws; make test-all
def test_bootstrap_interval_covers_the_true_exponent_under_noise():
    # 2% multiplicative noise on 25 points; the 95% interval should cover the truth in most draws.
    N, alpha = np.logspace(3, 7, 25), 0.35
    estimates, covered, widths = [], 0, []
    for seed in range(1, 6):
        L = (0.5 + 30 * N**-alpha) * np.exp(np.random.default_rng(seed).normal(0, 0.02, N.size))
        fit = fit_power_law(N, L, n_bootstrap=100, seed=seed)
        lo, hi = fit.alpha_ci[0]
        estimates.append(fit.alpha[0])
        covered += lo <= alpha <= hi
        widths.append(hi - lo)
    assert covered >= 4
    assert abs(np.median(estimates) - alpha) < 0.01
    assert max(widths) < 0.1


def chinchilla_epoch_selection():
    """Epoch AI's data selection (analyzing-chinchilla): tokens D = FLOP / (6 N); the 5 highest-loss
    points are dropped (they keep losses strictly below the 5th highest): 240 of 245 points."""
    df = pd.read_csv(f"{DATA}/chinchilla/svg_extracted_data.csv")
    N = df["Model Size"].to_numpy(float)
    D = df["Training FLOP"].to_numpy(float) / (6 * N)
    L = df["loss"].to_numpy(float)
    keep = L < np.sort(L)[-5]
    return np.stack([N[keep], D[keep]], 1), L[keep]


# Chinchilla's own published estimates (Hoffmann et al., TeX source), the start Epoch's bootstrap uses.
HOFFMANN_START = np.array([6.0073404, 6.0179186, 0.33917084, 0.2849083, 0.5267228])  # a, b, alpha, beta, e


def test_chinchilla_fit_finds_epochs_optimum_on_their_240_points():
    X, L = chinchilla_epoch_selection()
    assert len(L) == 240
    # One start (ndarray inits) is enough to reach the grid optimum here; the grid takes ~20x longer.
    fit = fit_scaling_law(X, L, n_bootstrap=0, inits=HOFFMANN_START)
    # The optimum of Epoch's objective on these points (their grid of starts and ours agree):
    assert fit.A[0] == pytest.approx(477.8, rel=1e-3) and fit.B == pytest.approx(2143, rel=1e-3)
    assert fit.E == pytest.approx(1.8172, abs=1e-4)
    assert fit.alpha[0] == pytest.approx(0.3473, abs=1e-4) and fit.beta == pytest.approx(0.3672, abs=1e-4)
    # Epoch's published replication (E 1.817, A 482, B 2085, alpha 0.348, beta 0.366) comes from a
    # BFGS run that stops a little short of that optimum: within 1% on E, alpha, beta, 3% on A, B.
    assert fit.E == pytest.approx(1.817, rel=0.01)
    assert fit.A[0] == pytest.approx(482, rel=0.03) and fit.B == pytest.approx(2085, rel=0.03)
    assert fit.alpha[0] == pytest.approx(0.348, rel=0.01) and fit.beta == pytest.approx(0.366, rel=0.01)
    p = fit.params()
    assert p["B"] == fit.A[1] and p["beta"] == fit.alpha[1] and p["n_points"] == 240


@pytest.mark.slow
def test_chinchilla_grid_and_bootstrap_intervals():
    X, L = chinchilla_epoch_selection()
    fit = fit_scaling_law(X, L, n_bootstrap=400, seed=42)  # the default grid of starts
    assert fit.A[0] == pytest.approx(477.8, rel=1e-3) and fit.B == pytest.approx(2143, rel=1e-3)
    assert fit.n_bootstrap == 400 and not fit.warnings
    # 95% percentile intervals over 400 resamples of the 240 points (measured; Epoch's 4000 give the
    # same to the second digit). Every published estimate lies inside its interval.
    for (lo, hi), ref, value in [
        (fit.E_ci, (1.770, 1.868), 1.817),
        (fit.A_ci[0], (299, 711), 482),
        (fit.B_ci, (943, 5938), 2085),
        (fit.alpha_ci[0], (0.3194, 0.3709), 0.348),
        (fit.beta_ci, (0.3262, 0.4165), 0.366),
    ]:
        assert lo == pytest.approx(ref[0], rel=0.02) and hi == pytest.approx(ref[1], rel=0.02)
        assert lo < value < hi


def test_the_245_point_fit_is_a_different_optimum():
    # Without Epoch's selection the 5 highest-loss points pull B and beta up (B ~1.3e4, beta ~0.45):
    # a different data set, not the same objective with a better optimum.
    df = pd.read_csv(f"{DATA}/chinchilla/svg_extracted_data.csv")
    N = df["Model Size"].to_numpy(float)
    D = df["Training FLOP"].to_numpy(float) / (6 * N)
    fit = fit_scaling_law(np.stack([N, D], 1), df["loss"].to_numpy(float), n_bootstrap=0, inits=HOFFMANN_START)
    assert fit.B > 5000 and fit.beta > 0.42


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="need >= 3"):
        fit_power_law([1, 2], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1, 2, 0], [1, 2, 3])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_one_line_error(bad):
    from analysis.fits import FitError
    from harness.errors import UserError

    with pytest.raises(FitError, match=r"non-finite input at point 2 .*1 of 4 points") as e:
        fit_power_law([1, 2, 3, 4], [1.0, 0.5, bad, 0.2])
    assert "\n" not in str(e.value) and isinstance(e.value, UserError)
    with pytest.raises(FitError, match="non-finite"):
        fit_power_law([1, 2, bad, 4], [1.0, 0.5, 0.3, 0.2])


def test_bootstrap_count_is_reported_and_fewer_than_two_refused():
    N = np.logspace(3, 6, 8)
    fit = fit_power_law(N, 0.1 + 5 * N**-0.4, n_bootstrap=7)
    assert fit.n_bootstrap == 7 and fit.params()["n_bootstrap"] == 7
    assert fit_power_law(N, 0.1 + 5 * N**-0.4, n_bootstrap=0).alpha_ci == []
    with pytest.raises(ValueError, match="n_bootstrap=1: an interval needs >= 2 resamples"):
        fit_power_law(N, 0.1 + 5 * N**-0.4, n_bootstrap=1)


def test_degenerate_fits_warn():
    from analysis.fits import FitWarning

    # 3 points, 3 parameters: every resample fits exactly, so the interval has zero width.
    with pytest.warns(FitWarning, match="zero-width interval"):
        fit = fit_power_law([10, 100, 1000], [1.0, 1.0, 1.0], n_bootstrap=20)
    assert any("zero-width" in w for w in fit.warnings)
    # A flat loss puts alpha on a bound of the search box (or makes it meaningless): warned.
    assert any("bound" in w or "zero-width" in w for w in fit.warnings)
    # A pure power law: E vanishes.
    N = np.logspace(2, 5, 10)
    with pytest.warns(FitWarning, match="E = .* is ~0"):
        fit_power_law(N, 3 * N**-0.5, n_bootstrap=0)


def test_inits_accept_arrays_and_check_their_shape():
    N = np.logspace(3, 7, 12)
    L = 0.5 + 30 * N**-0.35
    a = fit_power_law(N, L, n_bootstrap=0, inits=np.array([[3.0, 0.3, -0.5], [1.0, 1.0, 0.0]]))
    b = fit_power_law(N, L, n_bootstrap=0, inits=[np.array([3.0, 0.3, -0.5])])
    assert a.alpha[0] == pytest.approx(0.35, abs=1e-3) and b.alpha[0] == pytest.approx(0.35, abs=1e-3)
    with pytest.raises(ValueError, match="inits must be .* length 2\\*d\\+1 = 3"):
        fit_power_law(N, L, n_bootstrap=0, inits=np.zeros((2, 5)))


def test_one_term_fit_has_no_B():
    N = np.logspace(3, 7, 12)
    fit = fit_power_law(N, 0.5 + 30 * N**-0.35, n_bootstrap=0)
    with pytest.raises(AttributeError, match="two-term fit"):
        _ = fit.B
    assert set(fit.params()) >= {"E", "A", "alpha", "A_ci", "alpha_ci", "n_bootstrap"}


def test_loglog_fit_is_the_papers_plain_regression():
    from analysis.fits import fit_loglog

    N = np.logspace(2, 5, 10)
    ll = fit_loglog(N, 3 * N**-0.5 * np.exp(np.random.default_rng(0).normal(0, 0.01, 10)), n_bootstrap=100)
    assert ll.alpha == pytest.approx(0.5, abs=0.01) and ll.intercept == pytest.approx(math.log(3), abs=0.05)
    lo, hi = ll.alpha_ci
    assert lo < 0.5 < hi and hi - lo < 0.05 and ll.n_bootstrap == 100
    # Bits or nats move only the intercept.
    assert fit_loglog(N, 3 * N**-0.5 / math.log(2), n_bootstrap=0).alpha == pytest.approx(0.5, abs=1e-9)


def synthetic_runs(widths, alpha=0.4, states=None):
    params = [603 * w + 2 for w in widths]
    rows = [
        {
            "id": f"r{i}",
            "name": f"w{w}",
            "state": (states or {}).get(i, "finished"),
            "sweep": "s",
            "config.model.width": w,
            "config.data.zipf_alpha": alpha,
            "summary.model/params": p,
            "summary.val/loss": 0.05 + 20 * p**-alpha,
            "summary.emergence/n_learned": i,
        }
        for i, (w, p) in enumerate(zip(widths, params))
    ]
    return pd.DataFrame(rows)


def test_scaling_analysis_reports_exponent_and_excluded_runs(tmp_path):
    runs = synthetic_runs([10, 20, 40, 80, 160, 320, 640], states={3: "crashed"})
    result = scaling.analyze(runs, n_bootstrap=50)
    assert result["n_runs"] == 6 and result["excluded_runs"] == [{"id": "r3", "state": "crashed"}]
    assert result["alpha_N"] == pytest.approx(0.4, abs=0.01)
    lo, hi = result["alpha_N_ci"]
    assert lo - 1e-6 <= 0.4 <= hi + 1e-6 and result["theory_alpha"] == 0.4
    plots = scaling.plot(result, str(tmp_path))
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in plots)
    md = scaling.report(result, "src", "s", plots)
    assert "alpha_N = **0.40" in md and "r3 (crashed)" in md


def test_scaling_analysis_refuses_too_few_runs():
    from harness.errors import UserError

    with pytest.raises(UserError, match="need >= 3 finished runs"):
        scaling.analyze(synthetic_runs([10, 20]))


def test_scaling_report_names_the_subtasks_each_width_learned(tmp_path):
    runs = synthetic_runs([10, 20, 40, 80])
    thr = 0.1 * math.log(2)
    rows = []
    # Run i learns subtasks 0..i-1 (in frequency order), except run 3 learns 0, 1, 3 (out of order).
    learned = {"r0": [], "r1": [0], "r2": [0, 1], "r3": [0, 1, 3]}
    for rid, ls in learned.items():
        for step in (0, 100, 200):
            for item in range(5):
                loss = (
                    0.69 if step == 0 or item not in ls else (0.01 if step == 200 else thr * 2 if item == 3 else 0.01)
                )
                rows.append({"run_id": rid, "step": step, "item": item, "loss": loss})
    result = scaling.analyze(runs, n_bootstrap=20, curves=pd.DataFrame(rows))
    pts = {p["id"]: p for p in result["points"]}
    assert pts["r2"]["learned"] == [0, 1] and pts["r2"]["top_ranks"]
    assert pts["r3"]["learned"] == [0, 1, 3] and not pts["r3"]["top_ranks"]
    assert pts["r3"]["first_step"] == {0: 100, 1: 100, 3: 200}
    assert pts["r1"]["final_loss"][0] == 0.01 and pts["r1"]["final_loss"][1] == 0.69
    assert result["alpha_N_plain"] == pytest.approx(0.4, abs=0.1) and len(result["alpha_N_plain_ci"]) == 2
    plots = scaling.plot(result, str(tmp_path))
    assert any(p.endswith("quanta_vs_params.png") for p in plots)
    md = scaling.report(result, "src", "s", plots)
    assert "| 0, 1, 3 | no |" in md and "in 3 of 4 runs the learned subtasks are exactly the most frequent" in md


def test_scaling_fits_one_data_budget_and_lists_the_data_scaling_runs():
    from harness.errors import UserError

    # A width sweep at infinite data beside finite-D runs at one width: only the former is fitted.
    runs = synthetic_runs([10, 20, 40, 80, 160])
    data = synthetic_runs([40, 40, 40]).assign(
        id=["d0", "d1", "d2"], **{"config.data.n_train_samples": [1000, 4000, 16000]}
    )
    data["summary.val/loss"] = [0.5, 0.3, 0.2]  # one parameter count, three losses
    mixed = pd.concat([runs.assign(**{"config.data.n_train_samples": 0}), data], ignore_index=True)
    result = scaling.analyze(mixed, n_bootstrap=20)
    assert result["n_runs"] == 5 and result["alpha_N"] == pytest.approx(0.4, abs=0.01)
    assert result["data_budget"] == "infinite"
    assert [r["id"] for r in result["other_data_runs"]] == ["d0", "d1", "d2"]
    assert "d1 (D=4000)" in scaling.report(result, "src", None, [])
    # A data sweep alone (D varies, one width): a clear message instead of a fit of one size.
    with pytest.raises(UserError, match=r"found 1 at D = 1000 .*analysis.data_scaling"):
        scaling.analyze(data)
    # Finite D fixed, widths varied: a parameter-scaling sweep at that D.
    fixed = runs.assign(**{"config.data.n_train_samples": 5000})
    assert scaling.analyze(fixed, n_bootstrap=20)["data_budget"] == "5000"


def test_scaling_fits_one_zipf_alpha():
    runs = pd.concat(
        [
            synthetic_runs([10, 20, 40, 80], alpha=0.4),
            synthetic_runs([10, 20, 40], alpha=0.8).assign(id=["a0", "a1", "a2"]),
        ],
        ignore_index=True,
    )
    result = scaling.analyze(runs, n_bootstrap=20)
    assert result["n_runs"] == 4 and result["theory_alpha"] == 0.4 and result["alpha_N"] == pytest.approx(0.4, abs=0.01)
    assert result["zipf_alphas_in_source"] == [0.4, 0.8]
    assert "zipf_alpha = 0.4 only" in scaling.report(result, "src", None, [])


def test_bootstrap_resamples_start_from_the_grid_never_from_the_full_data_optimum(monkeypatch):
    from analysis import fits

    N = np.repeat(np.logspace(3, 5, 6), 3)
    L = (0.05 + 20 * N**-0.4) * np.exp(np.random.default_rng(0).normal(0, 0.03, N.size))
    starts = []
    real = fits._fit_once
    monkeypatch.setattr(
        fits, "_fit_once", lambda lx, ll, d, inits: starts.append(np.array(inits)) or real(lx, ll, d, inits)
    )
    fit = fits.fit_power_law(N, L, n_bootstrap=5, strata=N)
    full = np.array([math.log(fit.A[0]), fit.alpha[0], math.log(fit.E)])
    assert len(starts) == 6 and len(starts[0]) == len(fits._grid(1, np.log(L)))
    for s in starts[1:]:  # every resample: the bootstrap grid, not the optimum
        assert len(s) >= 4 and not any(np.allclose(row, full, atol=1e-6) for row in s)


def test_the_bootstrap_grid_reaches_the_full_grids_optimum():
    from analysis.fits import _boot_grid, _fit_once, _grid

    rng = np.random.default_rng(3)
    N = np.repeat(np.logspace(3, 5, 10), 3)
    for E in (0.0, 0.02, 0.2):
        logL = np.log((E + 20 * N**-0.5) * np.exp(rng.normal(0, 0.05, N.size)))
        _, full = _fit_once(np.log(N)[:, None], logL, 1e-3, _grid(1, logL))
        _, thin = _fit_once(np.log(N)[:, None], logL, 1e-3, _boot_grid(1, logL))
        assert thin == pytest.approx(full, rel=1e-6)


def test_resampling_within_strata_keeps_every_x_and_its_count():
    from analysis.fits import fit_loglog, resample_indices

    x = np.repeat([1.0, 2.0, 4.0, 8.0], [3, 3, 2, 3])
    idx = resample_indices(len(x), x, np.random.default_rng(0))
    assert list(np.bincount(np.searchsorted([1, 2, 4, 8], x[idx]))) == [3, 3, 2, 3]
    # Seeds that agree within each x: the seed-level interval has no width, the point bootstrap has.
    L = 3 * np.repeat([1.0, 2.0, 4.0, 8.0], 3) ** -0.5 * np.repeat([1.0, 1.1, 0.9, 1.0], 3)
    xs = np.repeat([1.0, 2.0, 4.0, 8.0], 3)
    lo, hi = fit_loglog(xs, L, n_bootstrap=50, strata=xs).alpha_ci
    assert hi - lo == pytest.approx(0, abs=1e-12)
    lo, hi = fit_loglog(xs, L, n_bootstrap=50).alpha_ci
    assert hi - lo > 0.01


def test_scaling_over_seeds_prints_the_design_prediction_and_warns_naming_the_runs(tmp_path):
    from analysis.design import design_alpha
    from harness.quanta_stats import zipf_frequencies

    p = zipf_frequencies(100, 0.4)
    counts = {8: [1, 1, 2], 16: [3, 4, 3], 32: [6, 7, 6], 64: [12, 11, 13]}  # 4 widths x 3 seeds
    rows = []
    for w, ns in counts.items():
        for seed, n in enumerate(ns):
            # A loss that steepens in log-log (no floor to find): the offset fit's E goes to its bound.
            params = 115 * w + 2
            rows.append(
                {
                    "id": f"w{w}s{seed}",
                    "state": "finished",
                    "config.seed": seed,
                    "config.model.width": w,
                    "config.data.zipf_alpha": 0.4,
                    "config.data.n_tasks": 100,
                    "config.data.offset": 0.0,
                    "summary.model/params": params,
                    "summary.val/loss.last": 20 * params**-0.4 * math.exp(-params / 4000 + 0.02 * seed),
                    "summary.emergence/n_below_end": n,
                    "summary.emergence/n_learned": n,
                }
            )
    runs = pd.DataFrame(rows)
    steps = np.arange(17) * 250
    hist = pd.concat(
        [
            pd.DataFrame(
                {
                    "run_id": r["id"],
                    "step": steps,
                    "val/n_learned": 3,
                    "val/loss": 0.3 * np.exp(-steps / 1000) + 0.05 if r["id"] == "w64s1" else 0.3,
                }
            )
            for r in rows
        ]
    )
    result = scaling.analyze(runs, n_bootstrap=50, history=hist)
    assert result["runs_per_width"] == {str(115 * w + 2): 3 for w in counts}
    assert "cluster bootstrap over seeds" in result["interval"]
    x = runs["summary.model/params"].to_numpy(float)
    n = runs["summary.emergence/n_below_end"].to_numpy(float)
    assert result["alpha_N_design"] == pytest.approx(design_alpha(x, n, p))
    assert result["alpha_N_primary"] == "plain" and result["alpha_N"] == result["alpha_N_plain"]
    w = " | ".join(result["warnings"])
    assert "only 4 distinct parameter counts" in w and "w8s0" in w
    assert "sits on its bound 0" in w and "mis-specified" in w
    assert "1 run(s) still learning" in w and "width 64 seed 1 (w64s1)" in w
    assert [pt["seed"] for pt in result["points"][:3]] == [0, 1, 2]
    plots = scaling.plot(result, str(tmp_path))
    assert all(open(path, "rb").read(4) == b"\x89PNG" for path in plots)
    md = scaling.report(result, "src", "s", plots)
    assert "| width | seed |" in md and "| 8 | 0 | 922 |" in md
    assert (
        f"design-predicted alpha_N (this design's frequencies, each run's learned count) = {result['alpha_N_design']:.3f}"
        in md
    )
    assert "asymptotic alpha_N (infinitely many subtasks) = alpha = 0.4" in md
