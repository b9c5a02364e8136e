"""Modular addition: Fourier progress measures on hand-built inputs, data and models, config errors,
real Lightning + offline W&B runs read back through the run store, the analysis CLI, sweep files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from analysis import grokking as ga
from harness import runstore
from harness.config.run import check_overrides, load_config
from harness.errors import ConfigError
from harness.events import PHASES
from harness.training.train import train
from tasks import fourier
from tasks import modular_addition as ma

REPO = Path(__file__).resolve().parents[1]
FAST = ["trainer.threads=1", "trainer.progress_bar=false"]
# A small problem that memorises in a few hundred full-batch steps on one CPU thread.
SMALL = ["data.p=23", "data.train_fraction=0.5", "model.init_scale=0.5", "trainer.eval_every=50"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_SWEEP_PARAM_PATH", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    return tmp_path


def run(*overrides: str) -> dict:
    args = ["task=modular_addition", *FAST, *overrides]
    return train(load_config(args), args)


# ---- Fourier measures --------------------------------------------------------------------------


def wave_embedding(p: int, freqs: list[int], d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(p, dtype=torch.float64)[:, None]
    e = torch.zeros(p, d, dtype=torch.float64)
    for k in freqs:
        e += torch.cos(2 * math.pi * k * x / p + 0.3) * torch.randn(1, d, generator=g, dtype=torch.float64)
    return e


def test_fourier_power_of_a_pure_frequency_embedding_is_that_frequency():
    power = fourier.fourier_power(wave_embedding(67, [14]))
    assert power.shape == (33,)
    assert int(power.argmax()) + 1 == 14
    assert power[13] == pytest.approx(1.0, abs=1e-9)
    assert fourier.key_frequencies(power) == [14]


def test_key_frequencies_find_a_handful_in_a_mixture_and_spread_for_noise():
    e = wave_embedding(67, [5, 21, 30]) + 0.01 * torch.randn(67, 16, dtype=torch.float64)
    assert sorted(fourier.key_frequencies(fourier.fourier_power(e))) == [5, 21, 30]
    noise = fourier.fourier_power(torch.randn(67, 500, dtype=torch.float64))
    assert noise.sum() == pytest.approx(1.0)
    assert len(fourier.key_frequencies(noise, mass=0.9, max_keys=33)) > 20  # memorising: no few keys


def test_frequency_k_and_p_minus_k_are_one_frequency_and_even_p_has_nyquist():
    assert fourier.fourier_power(wave_embedding(67, [67 - 9])).argmax() + 1 == 9
    power = fourier.fourier_power(wave_embedding(10, [5]))
    assert power.shape == (5,) and int(power.argmax()) + 1 == 5


def trig_logits(p: int, w: int, scale: float = 20.0, sign: int = 1) -> torch.Tensor:
    """Logits [p*p, p] of the ideal circuit: scale * cos(2 pi w (a + sign*b - c) / p)."""
    a = torch.arange(p).repeat_interleave(p)[:, None]
    b = torch.arange(p).repeat(p)[:, None]
    c = torch.arange(p)[None, :]
    return scale * torch.cos(2 * math.pi * w * (a + sign * b - c) / p)


def loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy (nats)."""
    return float(F.cross_entropy(logits.float(), labels))


@pytest.mark.parametrize("sign", [1, -1])
def test_restricted_loss_keeps_and_excluded_loss_destroys_a_trig_circuit(sign):
    p, w = 31, 7
    logits = trig_logits(p, w, sign=sign)
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    rows, y = a * p + b, (a + sign * b) % p
    full = loss(logits[rows], y)
    ((restricted, excluded),) = fourier.restricted_excluded(logits, fourier.sum_directions(p, [w], sign), [rows])
    assert loss(restricted, y) == pytest.approx(full, rel=1e-5)
    assert loss(excluded, y) == pytest.approx(math.log(p), rel=1e-4)  # chance
    # The wrong frequency restricts to nothing: chance level.
    ((wrong, _),) = fourier.restricted_excluded(logits, fourier.sum_directions(p, [w + 1], sign), [rows])
    assert loss(wrong, y) == pytest.approx(math.log(p), rel=1e-4)


# ---- data and models ---------------------------------------------------------------------------


def cfg_of(*overrides: str) -> ma.Config:
    return load_config(["task=modular_addition", *overrides])


def test_symmetric_split_covers_every_pair_once_with_correct_labels():
    cfg = cfg_of()
    data = ma.ModularData(cfg)
    (xt, yt), (xv, yv) = data.split["train"], data.split["val"]
    assert len(yt) == round(0.4 * 2278) == 911 and len(yt) + len(yv) == 67 * 68 // 2
    pairs = torch.cat([xt, xv])
    assert len({tuple(r) for r in pairs.tolist()}) == 2278 and bool((pairs[:, 0] <= pairs[:, 1]).all())
    assert torch.equal(yt, (xt[:, 0] + xt[:, 1]) % 67)
    again = ma.ModularData(cfg_of("seed=0"))
    assert torch.equal(again.split["train"][0], xt)  # the split follows the seed
    assert not torch.equal(ma.ModularData(cfg_of("seed=1")).split["train"][0], xt)
    assert torch.equal(ma.ModularData(cfg_of("seed=1", "data.split_seed=0")).split["train"][0], xt)


def test_operations_and_minibatches():
    data = ma.ModularData(cfg_of("data.operation=subtract", "data.symmetric=false", "data.p=7", "data.batch_size=5"))
    x, y = data.split["train"]
    assert torch.equal(y, (x[:, 0] - x[:, 1]) % 7) and len(y) == round(0.4 * 49)
    a, b, yb = data.train_batch(0, torch.device("cpu"))
    assert a.shape == (5,) and torch.equal(yb, (a - b) % 7)
    assert torch.equal(ma.apply_op("multiply", torch.tensor([3]), torch.tensor([5]), 7), torch.tensor([1]))


def test_pair_mlp_equals_embedding_first_and_is_symmetric():
    cfg = cfg_of("data.p=11", "model.embed_dim=8", "model.hidden=5", "model.bias=true")
    torch.manual_seed(0)
    m = ma.make_model(cfg)
    with torch.no_grad():
        m.b_in.normal_()
        m.b_out.normal_()
    a, b = torch.tensor([0, 3, 10]), torch.tensor([4, 3, 1])
    e, w_in, w_out = m.embed[0], m.w_in[0], m.w_out[0]
    naive = (torch.relu((e[a] + e[b]) @ w_in.T + m.b_in[0]) @ w_out.T + m.b_out[0]) @ e.T
    assert torch.allclose(m(a, b), naive, atol=1e-5)
    assert torch.allclose(m(a, b), m(b, a))


def test_members_of_one_model_equal_their_single_runs():
    """A model of M members (make_model with members) holds each member's single-run weights, and its
    forward on [M, n] pairs is each member's single forward, for both models."""
    for name in ("pair_mlp", "concat_mlp"):
        cfgs = [
            cfg_of(
                f"model.name={name}",
                "data.p=11",
                "model.embed_dim=8",
                "model.hidden=5",
                "model.bias=true",
                f"seed={s}",
                f"model.init_scale={x}",
            )
            for s, x in ((0, 1.0), (1, 0.5), (2, 2.0))
        ]
        block = ma.make_model(cfgs[0], members=cfgs)
        a, b = torch.tensor([[0, 3, 10], [1, 2, 3], [4, 4, 9]]), torch.tensor([[4, 3, 1], [0, 0, 0], [10, 2, 5]])
        logits = block(a, b)
        assert logits.shape == (3, 3, 11)
        for i, cfg in enumerate(cfgs):
            torch.manual_seed(cfg.seed)
            single = ma.make_model(cfg)
            assert all(torch.equal(p, q) for p, q in zip(single.parameters(), block.member(i).parameters()))
            assert torch.allclose(single(a[i], b[i]), logits[i], atol=1e-6)
        with torch.no_grad():  # a member's view shares its slice's storage
            block.embed[1].zero_()
        assert float(block.member(1).embed.abs().sum()) == 0


def test_haiku_init_is_the_pair_notebooks():
    torch.manual_seed(0)
    m = ma.make_model(cfg_of())
    # Embedding: VarianceScaling(2), fan_in = p = 67: truncated normal rescaled to std sqrt(2/67),
    # cut at 2 unscaled sigmas. Linear: TruncatedNormal(1/sqrt(fan_in)), cut at 2 sigma, not rescaled.
    assert m.embed.std().item() == pytest.approx(math.sqrt(2 / 67), rel=0.02)
    assert m.embed.abs().max().item() <= 2 * math.sqrt(2 / 67) / 0.87962566103423978 + 1e-6
    assert m.w_in.std().item() == pytest.approx(0.8796 / math.sqrt(500), rel=0.05)
    assert m.w_out.abs().max().item() <= 2 / math.sqrt(24) + 1e-6
    assert ma.weight_norm(m).item() == pytest.approx(37.4, rel=0.03)  # the notebook logs 37.39 at step 0
    half = ma.make_model(cfg_of("model.init_scale=0.5"))
    assert ma.weight_norm(half).item() == pytest.approx(37.4 / 2, rel=0.03)
    concat = ma.make_model(cfg_of("model.name=concat_mlp", "model.embed_dim=16", "model.hidden=32"))
    assert concat(torch.tensor([1, 2]), torch.tensor([3, 4])).shape == (2, 67)
    assert concat.token_inputs().shape == (1, 67, 64)


# ---- config errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.p=1", ["data.p=1", ">= 2"]),
        ("data.train_fraction=0.0", ["data.train_fraction=0.0", "between 0 and 1"]),
        ("data.train_fraction=1.0", ["data.train_fraction=1.0", "between 0 and 1"]),
        ("data.train_fraction=1.5", ["data.train_fraction=1.5"]),
        ("data.operation=divide", ["data.operation='divide'", "add, subtract, multiply"]),
        ("model.name=transformer", ["model.name='transformer'", "pair_mlp, concat_mlp"]),
        ("model.activation=swish", ["model.activation='swish'", "relu"]),
        ("data.modulus=5", ["unknown config key", "data.modulus", "--cfg"]),
    ],
)
def test_bad_input_is_one_line_config_error(override, words):
    with pytest.raises(ConfigError) as e:
        cfg_of(override)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_tiny_train_fraction_that_leaves_no_train_pair_is_an_error():
    with pytest.raises(ConfigError, match="0 train"):
        cfg_of("data.p=3", "data.train_fraction=0.05")


def test_cli_bad_input_exits_2_with_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "harness", "train", "task=modular_addition", "data.p=1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "data.p=1" in r.stderr


# ---- real runs ---------------------------------------------------------------------------------


def test_short_full_batch_run_memorises_and_logs_everything(env):
    s = run(*SMALL, "trainer.steps=600", "seed=3")
    assert s["train/acc"] >= 0.99 and s["grok/t_train99/reached"] is True and s["grok/t_train99"] <= 600
    assert s["grok/phase"] in PHASES and s["grok/last_step"] == 600
    keys = ga.parse_keys(s["fourier/key_freqs"])
    assert 1 <= len(keys) == s["fourier/n_keys"] <= 8
    assert s["model/params"] == 23 * 500 + 2 * 500 * 24 and s["data/n_train"] == round(0.5 * 276)
    assert s["perf/steps_per_s"] > 0
    for key in (
        "val/restricted_loss",
        "train/excluded_loss",
        "model/weight_norm",
        "fourier/n_keys",
        "fourier/key_power",
        "val/acc",
        "train/loss",
    ):
        assert key in s, key
    assert not [k for k in s if k.startswith(("fourier/power/", "fourier/key/"))]  # arrays: the artifact

    # The spectrum of every evaluation is in the curves artifact: 11 frequencies (p // 2), shares
    # summing to 1, the key frequencies flagged as at the end.
    curves = runstore.load_curves(str(env), "fourier")
    assert sorted(curves["step"].unique()) == list(range(0, 601, 50)) and curves["item"].nunique() == 11
    assert curves.groupby("step")["power"].sum().to_numpy() == pytest.approx(1.0, abs=1e-6)
    assert curves.dtypes[["step", "item"]].tolist() == ["int64", "int64"] and curves["power"].dtype == "float64"
    final = ga.final_spectrum(curves, s["_run_id"])
    assert final.loc[final["key"], "k"].tolist() == sorted(keys)

    runs = runstore.load_runs(str(env))
    assert len(runs) == 1 and runs.loc[0, "state"] == "finished"
    assert runs.loc[0, "config.data.p"] == 23
    hist = ga.merge_rows(runstore.load_history(str(env), keys=["train/acc", "val/acc", "model/weight_norm"]))
    assert hist["step"].tolist() == list(range(0, 601, 50))  # one evaluation every 50 steps (and at 0), at its step
    assert hist[["train/acc", "val/acc", "model/weight_norm"]].notna().all().all()
    assert ga.first_step_at_least(hist["step"], hist["train/acc"], 0.99) == s["grok/t_train99"]

    out = env / "analysis"
    ga.main([str(env), "--out", str(out)])
    result = json.loads((out / "grokking.json").read_text())
    (rec,) = result["runs"]
    assert rec["t_train"] == s["grok/t_train99"] and rec["phase"] == s["grok/phase"] and result["threshold"] == 0.99
    assert rec["key_freqs"] == keys and rec["summary_agrees"]
    for name in ("curves.png", "progress.png", "spectrum.png", "report.md"):
        assert (out / name).stat().st_size > 0, name


def test_steps_per_batch_changes_speed_not_the_run(env):
    one = run(*SMALL, "trainer.steps=100", "trainer.steps_per_batch=1")
    ten = run(*SMALL, "trainer.steps=100", "trainer.steps_per_batch=10")
    assert ten["grok/last_step"] == one["grok/last_step"] == 100
    for key in ("train/loss", "model/weight_norm"):
        assert ten[key] == pytest.approx(one[key], rel=1e-5), key
    assert ten["val/loss"]["last"] == pytest.approx(one["val/loss"]["last"], rel=1e-5)


def test_no_weight_decay_and_a_small_train_set_memorises(env):
    small = [o for o in SMALL if not o.startswith("data.train_fraction=")]
    s = run(*small, "data.train_fraction=0.3", "optim.weight_decay=0.0", "trainer.steps=400")
    assert s["grok/phase"] == "memorization"
    assert s["train/acc"] >= 0.99 and s["val/acc"]["last"] < 0.5
    # Censored events are numbers: the last evaluated step, flagged not reached.
    assert s["grok/t_val99"] == 400 and s["grok/t_val99/reached"] is False
    assert s["grok/delay/reached"] is False and s["grok/delay"] == 400 - s["grok/t_train99"]


# ---- analysis helpers and sweep files ----------------------------------------------------------


def test_phase_helpers():
    assert ga.first_step_at_least([100, 200, 300], [0.5, 0.995, 1.0], 0.99) == 200
    assert ga.first_step_at_least([100, 200], [0.5, float("nan")], 0.99) is None
    assert ga.classify(300, 40800, 1000) == "grokking"
    assert ga.classify(300, 1100, 1000) == "comprehension"
    assert ga.classify(300, None, 1000) == "memorization" and ga.classify(None, None, 1000) == "confusion"
    recs = [{"x": 0.3, "y": 1.0, "phase": "grokking"}, {"x": 0.3, "y": 1.0, "phase": "memorization"}]
    assert ga.phase_cells(recs, "x", "y")[(0.3, 1.0)] == {"grokking": 1, "memorization": 1}
    assert ga.parse_keys("3,14") == [3, 14] and ga.parse_keys("") == [] and ga.parse_keys(None) == []


@pytest.mark.parametrize("name", ["modadd_pair", "modadd_pair_smoke", "modadd_phase", "modadd_phase_smoke"])
def test_sweep_files_follow_the_contract(name):
    text = (REPO / "sweeps" / f"{name}.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["command"] == ["${env}", "${interpreter}", "-m", "harness", "train", "${args_no_hyphens}"]
    assert cfg["method"] == "grid" and cfg["parameters"]["task"] == {"value": "modular_addition"}
    params = {k: v.get("values", [v.get("value")]) for k, v in cfg["parameters"].items() if k != "task"}
    for key, values in params.items():
        for v in values:
            assert not isinstance(v, str) or not v[:1].isdigit(), f"{key}: {v!r} reads as a string"
            check_overrides("modular_addition", {key: v})


def test_phase_diagram_plot_has_one_panel_per_learning_rate(tmp_path):
    recs = [
        {"id": f"r{i}", "name": "", "data.train_fraction": f, "optim.weight_decay": wd, "optim.lr": lr, "phase": ph}
        for i, (f, wd, lr, ph) in enumerate(
            [
                (0.3, 0.0, 1e-3, "memorization"),
                (0.8, 1.0, 1e-3, "comprehension"),
                (0.5, 1.0, 3e-3, "grokking"),
                (0.5, 1.0, 3e-3, "confusion"),
            ]
        )
    ]
    path = tmp_path / "phase.png"
    assert ga.plot_phase({"runs": recs}, str(path))
    assert path.stat().st_size > 0
    assert not ga.plot_phase({"runs": [{"phase": "grokking"}]}, str(tmp_path / "none.png"))
