"""Quanta discovery from gradients: per-sample gradients equal the paper's one-at-a-time method,
blocked/streamed/projected similarity, the paper's token selection, rank-frequency statistics, bad
input as one line before any gradient, planted quanta recovered on sparse parity, and real runs
(Lightning + offline W&B) through analysis.quanta, for an LM and for a model artifact (C7)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness import quanta_stats as qs
from harness.config.run import load_config
from harness.errors import ConfigError
from harness.training.train import train
from tasks import qdg_core as core
from tests.conftest import DATA

TOKENIZER = os.path.join(DATA, "pythia", "tokenizer.json")
PILE = os.path.join(DATA, "pile", "pile_100.jsonl")
needs_data = pytest.mark.skipif(
    not os.path.isfile(TOKENIZER) or not os.path.isfile(PILE),
    reason="needs HARNESS_DATA_DIR with pythia/tokenizer.json and pile/pile_100.jsonl",
)

# The planted-quanta setting of sweeps/quanta_sparse_parity_smoke.yaml, trained for fewer steps.
PARITY = [
    "train.task=sparse_parity",
    "train.data.n_tasks=4",
    "train.data.n=12",
    "train.data.k=2",
    "train.data.zipf_alpha=0.1",
    "train.data.batch_size=2048",
    "train.model.width=128",
    "train.eval.test_per_task=200",
]


def tiny_neox(d: int = 32, layers: int = 2, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * d,
        max_position_embeddings=512,
        rotary_pct=0.25,
    )
    return GPTNeoXForCausalLM(cfg).eval()


def mlp(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


# ---- gradients ----------------------------------------------------------------------------------


def test_parameter_selection_follows_the_paper_and_refuses_an_empty_one():
    model = tiny_neox()
    names = list(core.select_params(model))
    assert names and not any("layernorm" in n or "embed" in n for n in names)
    assert "lm_head.weight" not in names  # transformers' name for embed_out: dropped by identity
    assert "gpt_neox.final_layer_norm.weight" in names  # "layer_norm" is not "layernorm", as in the paper
    assert "lm_head.weight" in core.select_params(model, drop_embeddings=False)
    with pytest.raises(ConfigError) as e:
        core.select_params(model, include="^nothing")
    assert "\n" not in str(e.value) and "'^nothing'" in str(e.value) and "gpt_neox.embed_in.weight" in str(e.value)


def test_shared_forward_batched_gradients_equal_one_document_pass_per_token():
    model = tiny_neox()
    params = core.select_params(model)
    g = torch.Generator().manual_seed(0)
    docs = {0: torch.randint(0, 50000, (80,), generator=g), 3: torch.randint(0, 50000, (50,), generator=g)}
    doc, pos = np.array([0, 0, 0, 3, 3, 0]), np.array([5, 40, 79, 1, 49, 20])
    src = core.LMGrads(model, params, docs, doc, pos, batch=2)  # several batched backwards per document
    ours = src.grads(np.arange(len(doc)))
    paper = F.normalize(
        torch.stack([core.paper_token_grad(model, params, docs[d], p) for d, p in zip(doc, pos)]), dim=1
    )
    assert ours.shape == (6, core.n_selected(params))
    assert (ours - paper).abs().max() < 1e-5


def test_vmap_gradients_equal_a_loop():
    net = mlp()
    x, y = torch.randn(20, 10), torch.randint(0, 2, (20,))
    params = core.select_params(net)
    got = core.MLPGrads(net, params, x, y, chunk=7).grads(np.arange(20))
    want = []
    for i in range(20):
        gs = torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), list(params.values()))
        want.append(torch.cat([t.flatten() for t in gs]))
    assert (got - F.normalize(torch.stack(want), dim=1)).abs().max() < 1e-6


def test_streamed_similarity_equals_all_at_once_and_projection_reports_its_error():
    net = mlp()
    x, y = torch.randn(100, 10), torch.randint(0, 2, (100,))
    src = core.MLPGrads(net, core.select_params(net), x, y)
    whole, streamed = {}, {}
    C = core.exact_similarity(src, block=30, stats=whole)
    P = src.dim
    C2 = core.exact_similarity(src, block=30, max_grad_bytes=4 * P * 30, stats=streamed)  # one block resident
    assert whole["gradients_computed"] == 100 and streamed["gradients_computed"] == 100 + 70 + 40 + 10
    np.testing.assert_allclose(C2, C, atol=1e-6)
    G = src.grads(np.arange(100))
    np.testing.assert_allclose(C, (G @ G.T).numpy(), atol=1e-6)
    assert np.allclose(np.diag(C), 1, atol=1e-5) and np.allclose(C, C.T)
    Cp = core.projected_similarity(src, dim=2048, block=30, seed=1)
    err = core.projection_error(src, Cp, n_check=40, seed=2)
    off = ~np.eye(100, dtype=bool)
    assert 0 < err["proj_error_max"] <= np.abs(Cp - C)[off].max() + 1e-6 and err["proj_error_samples"] == 40
    assert err["proj_error_rms"] < 0.05  # ~1/sqrt(dim) for a Gaussian projection
    A = core.affinity_(C.copy())
    assert A.min() >= 0 and A.max() <= 1 and np.allclose(np.diag(A), 1, atol=2e-3)


def test_token_selection_follows_the_paper():
    ids = [5, 6, 7, 8, 5, 6, 7, 9, 1, 2]  # trigram (5,6,7) repeats at index 6
    assert core.repeated_trigrams(ids).tolist() == [False] * 6 + [True] + [False] * 3
    losses = np.array([0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # targets 1..9
    docs = [(0, ids, losses), (1, ids, losses)]
    chosen, passing = core.select_tokens(iter(docs), 0.1, True, 1, 0)
    assert [p for d, p, _ in chosen if d == 0] == [1, 3, 4, 5, 7, 8, 9] and passing == 14
    chosen, _ = core.select_tokens(iter(docs), 0.1, False, 3, 4)  # every 3rd of those passing, first 4
    assert [(d, p) for d, p, _ in chosen] == [(0, 1), (0, 5), (0, 8), (1, 3)]  # the stride runs across documents


def test_rank_frequency_fit_envelope_and_agreement():
    ranks = np.arange(1, 301)
    sizes = np.round(5000 * ranks**-1.3).astype(int)
    fit = qs.fit_slope(sizes, 10, 100)
    assert fit["n_ranks"] == 91 and fit["slope"] == pytest.approx(-1.3, abs=0.02)
    assert fit["slope_lo"] < fit["slope"] < fit["slope_hi"] and fit["slope_hi"] - fit["slope_lo"] < 0.05
    assert qs.fit_slope(sizes, 1, 0)["rank_max"] == 300
    assert qs.envelope([np.array([5, 3]), np.array([4, 4, 1])]).tolist() == [5, 4, 1]
    true = np.array([0, 0, 0, 1, 1, 1])
    assert qs.agreement(true, [1, 1, 1, 0, 0, 0]) == {"ari": 1.0, "purity": 1.0}
    assert qs.purity(true, [0, 0, 1, 1, 2, 2]) == pytest.approx(5 / 6)


# ---- bad input: one line, before any gradient ---------------------------------------------------


def test_bad_input_is_one_line_before_any_gradient(tmp_path, monkeypatch):
    from tasks import quanta_discovery as qd

    calls = []
    monkeypatch.setattr(core, "exact_similarity", lambda *a, **k: calls.append(1))
    with pytest.raises(ConfigError, match=r"cluster.counts=\[10, 600\]: \[600\] not below samples.n=600"):
        load_config(["task=quanta_discovery", "samples.n=600", "cluster.counts=[10,600]"])
    cfg = load_config(["task=quanta_discovery", "model.source=train", "trainer.steps=1", *PARITY, "grad.include=^attn"])
    with pytest.raises(ConfigError, match=r"grad.include='\^attn'.*selects no parameter.*net.0.weight"):
        qd.build(cfg)
    os.makedirs(tmp_path / "wandb")
    cfg = load_config(
        [
            "task=quanta_discovery",
            "model.source=artifact",
            "model.artifact=abc123",
            f"model.artifact_source={tmp_path / 'wandb'}",
        ]
    )
    with pytest.raises(ConfigError, match=r"model.artifact='abc123': run 'abc123' not found"):
        qd.build(cfg)
    # More samples than pass the selection: the run fails after the forward passes, before gradients.
    args = [
        "task=quanta_discovery",
        "model.source=train",
        "trainer.steps=20",
        "trainer.eval_every=20",
        "trainer.progress_bar=false",
        "trainer.threads=1",
        *PARITY,
        "samples.n=790",
        "cluster.counts=[4]",
    ]
    with pytest.raises(ConfigError) as e:
        train(load_config(args), args)
    assert "\n" not in str(e.value) and str(e.value).startswith("samples.n=790 but only") and not calls


# ---- planted quanta -----------------------------------------------------------------------------


@pytest.mark.slow
def test_planted_quanta_recovered_on_sparse_parity(tmp_path, monkeypatch):
    """4 subtasks, n=12, k=2, width 128, 1500 steps (the smoke sweep's setting), at seeds 0, 1, 2. ARI at
    8 clusters with the paper's signed similarity (a subtask splits by the class it predicts: a pure
    2-way split of 4 equal subtasks scores ARI 0.6 at most) varies with the seed: measured over seeds
    0-5, 0.19-0.60 (median 0.42; purity 0.57-1.0) with this harness and 0.37-0.60 (median 0.43) before
    issue 20's one path, whose float32 rounding moves which test samples pass samples.max_loss. Random
    labels score ~0. So the median over three seeds is held to ARI >= 0.3 and purity >= 0.7, far above
    chance, and 2 clusters (which cannot hold 4 subtasks) to ARI < 0.1 at every seed."""
    from analysis import quanta as aq

    args = [
        "task=quanta_discovery",
        "model.source=train",
        "trainer.steps=1500",
        "trainer.eval_every=500",
        "trainer.steps_per_batch=10",
        "trainer.progress_bar=false",
        "trainer.threads=1",
        *PARITY,
        "samples.n=600",
        "cluster.counts=[2]",
        "cluster.subtask_multiples=[1,2]",
        "cluster.n_init=10",
        "cluster.fit_rank_min=1",
        "cluster.fit_rank_max=0",
    ]
    at_8 = []
    for seed in (0, 1, 2):
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / f"s{seed}"))
        s = train(load_config([*args, f"seed={seed}"]), [*args, f"seed={seed}"])
        assert s["qdg/n_subtasks"] == 4 and s["qdg/ari_clusters"] == 4
        out = tmp_path / f"out{seed}"
        result, _, md = aq.analyse(str(tmp_path / f"s{seed}" / "wandb"), None, str(out))
        r = result["runs"][0]
        at_8.append(r["per_count"]["8"])
        assert r["per_count"]["2"]["ari"] < 0.1, seed  # 2 clusters cannot hold 4 subtasks
        assert "Confusion table" in md and (out / "quanta.json").exists()
    assert np.median([r["ari"] for r in at_8]) >= 0.3 and np.median([r["purity"] for r in at_8]) >= 0.7, at_8


# ---- real runs ----------------------------------------------------------------------------------


def _wait_for_artifact(root, run_id, kind):
    """The run's `kind` artifact files; train() returns once the run file is complete, so they are
    there at once (no waiting)."""
    from harness import runstore

    files = runstore.artifact_files(root, run_id, kind)
    assert files, f"no {kind} artifact for {run_id}"
    return files


def test_trained_model_artifact_is_loaded_and_analysed(tmp_path):
    """C7: a sparse-parity run's model.pt is rebuilt through its task and analysed in a second run."""
    sp = [
        "task=sparse_parity",
        "data.n_tasks=4",
        "data.n=12",
        "data.k=2",
        "data.zipf_alpha=0.1",
        "data.batch_size=1024",
        "model.width=64",
        "eval.test_per_task=100",
        "trainer.steps=200",
        "trainer.eval_every=200",
        "trainer.steps_per_batch=10",
        "trainer.progress_bar=false",
        "trainer.threads=1",
    ]
    s = train(load_config(sp), sp)
    root = str(tmp_path / "wandb")
    _wait_for_artifact(root, s["_run_id"], "model")
    args = [
        "task=quanta_discovery",
        "model.source=artifact",
        f"model.artifact={s['_run_id']}",
        f"model.artifact_source={root}",
        "samples.n=60",
        "samples.max_loss=0.7",
        "cluster.counts=[3,5]",
        "cluster.n_init=3",
        "cluster.fit_rank_min=1",
        "cluster.fit_rank_max=0",
        "trainer.progress_bar=false",
        "trainer.threads=1",
    ]
    q = train(load_config(args), args)
    assert (
        q["qdg/n_samples"] == 60 and q["qdg/n_params"] == s["model/params"] and q["qdg/model_task"] == "sparse_parity"
    )
    assert -1 <= q["qdg/ari"] <= 1 and q["qdg/ari_clusters"] == 3
    files = _wait_for_artifact(root, q["_run_id"], "quanta")
    assert {"samples.parquet", "clusters.parquet", "result.json", "similarity.npy"} <= set(files)


@needs_data
def test_language_model_run_to_report_with_example_contexts(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from analysis import quanta as aq

    model_dir = tmp_path / "neox"
    tiny_neox().save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_file=TOKENIZER).save_pretrained(model_dir)
    args = [
        "task=quanta_discovery",
        f"data_dir={DATA}",
        f"model.name={model_dir}",
        "data.source=pile/pile_100.jsonl",
        "data.context_length=64",
        "samples.max_loss=100",
        "samples.stride=3",
        "samples.n=50",
        "sim.mode=projected",
        "sim.dim=512",
        "sim.check_samples=20",
        "cluster.counts=[3,6]",
        "cluster.n_init=3",
        "cluster.fit_rank_min=1",
        "cluster.fit_rank_max=0",
        "trainer.progress_bar=false",
        "trainer.threads=1",
    ]
    s = train(load_config(args), args)
    assert s["qdg/n_samples"] == 50 and 0 < s["qdg/proj_error_max"] < 0.5 and s["qdg/proj_error_samples"] == 20
    assert s["qdg/slope_lo"] <= s["qdg/slope"] <= s["qdg/slope_hi"]
    _wait_for_artifact(str(tmp_path / "wandb"), s["_run_id"], "quanta")
    out = tmp_path / "out"
    aq.main([str(tmp_path / "wandb"), "--out", str(out), "--examples", "2", "--clusters", "2"])
    result = json.loads((out / "quanta.json").read_text())
    top = result["runs"][0]["top_clusters"]
    assert len(top) == 2 and top[0]["size"] >= top[1]["size"] and len(top[0]["examples"]) == 2
    md = (out / "report.md").read_text()
    assert "**" in md and f"rank_frequency_{s['_run_id']}.png" in md
    assert (out / f"rank_frequency_{s['_run_id']}.png").exists()


def test_sweep_files_validate():
    from harness.sweep.spec import load_sweep_yaml, validate_sweep

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("quanta_pythia", "quanta_sparse_parity_smoke", "quanta_suite_smoke"):
        path = os.path.join(repo, "sweeps", f"{name}.yaml")
        cfg = load_sweep_yaml(path)
        assert cfg["command"] == ["${env}", "${interpreter}", "-m", "harness", "train", "${args_no_hyphens}"]
        assert validate_sweep(cfg, path) == "quanta_discovery"
