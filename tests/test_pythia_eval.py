"""Pythia per-token evaluation: losses equal transformers' own, batching changes nothing, bad input
fails in one line, a real Lightning + offline W&B run writes the artifact the analysis reads, and
the token classifier on synthetic curves. Tiny GPT-NeoX models with the real Pythia tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from analysis import tokens as tk
from harness.config.run import load_config
from harness.errors import ConfigError
from harness.training.train import train
from tasks import lm
from tasks import pythia_eval as pe

REPO = Path(__file__).resolve().parents[1]
from tests.conftest import DATA  # noqa: E402  ($HARNESS_DATA_DIR, else ../shared/data)

TOKENIZER = os.path.join(DATA, "pythia", "tokenizer.json")
PILE = os.path.join(DATA, "pile", "pile_100.jsonl")
pytestmark = pytest.mark.skipif(
    not os.path.isfile(TOKENIZER) or not os.path.isfile(PILE),
    reason="needs HARNESS_DATA_DIR with pythia/tokenizer.json and pile/pile_100.jsonl",
)


def tiny_neox(vocab: int = 50304, d: int = 32, layers: int = 2, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * d,
        max_position_embeddings=512,
        rotary_pct=0.25,
    )
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    import tokenizers

    return lm.Tokenizer(tokenizers.Tokenizer.from_file(TOKENIZER))


@pytest.fixture(scope="module")
def docs(tok):
    texts = [json.loads(line)["text"] for line in open(PILE)][:12]
    return tok.encode(texts, 256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("neox")
    tiny_neox().save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_file=TOKENIZER).save_pretrained(path)
    return str(path)


@pytest.fixture
def env(tmp_path):
    # tests/conftest.py already made wandb offline in tmp_path, hub-free, with no sweep variables.
    return tmp_path


def one_doc(losses: lm.TokenLosses, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.inference_mode():
        return losses(x, torch.ones_like(x))


# ---- numerics ---------------------------------------------------------------------------------


def test_mean_per_token_loss_equals_transformers_loss(docs):
    model = tiny_neox()
    losses = lm.TokenLosses(model, head_chunk=50)  # several head chunks per document
    assert losses.split
    for ids in docs[:4]:
        x = torch.tensor([ids])
        with torch.no_grad():
            ref = model(input_ids=x, labels=x).loss.item()
        per_token = one_doc(losses, ids)
        assert per_token.shape == (len(ids) - 1,)
        assert abs(per_token.double().mean().item() - ref) < 1e-5


def test_bfloat16_model_scores_its_bfloat16_logits_in_float32(docs):
    model = tiny_neox().to(torch.bfloat16)
    losses = lm.TokenLosses(model, head_chunk=64)
    x = torch.tensor([docs[0]])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].float()  # what transformers' loss upcasts
    want = F.cross_entropy(logits, x[0, 1:], reduction="none")
    got = one_doc(losses, docs[0])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_batched_padded_losses_equal_one_document_at_a_time(docs):
    model = tiny_neox()
    losses = lm.TokenLosses(model)
    batch = pe.collate(sorted(enumerate(docs), key=lambda d: -len(d[1])))
    assert batch["attention_mask"].sum(1).tolist() != [batch["input_ids"].shape[1]] * len(docs)  # really padded
    with torch.inference_mode():
        batched = losses(batch["input_ids"], batch["attention_mask"])
    single = torch.cat([one_doc(losses, docs[i]) for i in batch["doc"].tolist()])
    assert batched.shape == single.shape
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    # With the padding mask passed to the model too, and through the model's own full-logits path
    # (used when the head cannot be split off): the same losses.
    for split, mask_attention in ((True, True), (False, False), (False, True)):
        losses.split, losses.mask_attention = split, mask_attention
        with torch.inference_mode():
            torch.testing.assert_close(losses(batch["input_ids"], batch["attention_mask"]), single, atol=1e-5, rtol=0)


def test_packing_bounds_padded_tokens_and_keeps_every_document(docs):
    items = list(enumerate(docs))
    batches = list(pe.pack(items, batch_tokens=600, max_docs=5))
    assert sorted(d for b in batches for d, _ in b) == list(range(len(docs)))
    for b in batches:
        assert len(b) <= 5 and (len(b) == 1 or len(b) * len(b[0][1]) <= 600)
    # A padding bound splits batches of unlike lengths: every batch then wastes at most that share.
    lengths = [(i, [0] * n) for i, n in enumerate([100, 95, 91, 60, 58, 10])]
    tight = list(pe.pack(lengths, batch_tokens=10_000, max_docs=64, max_padding=0.1))
    assert [[d for d, _ in b] for b in tight] == [[0, 1, 2], [3, 4], [5]]
    assert [[d for d, _ in b] for b in pe.pack(lengths, 10_000, 64)] == [[0, 1, 2, 3, 4, 5]]


# ---- data sources and sharding ----------------------------------------------------------------


def test_jsonl_zst_and_folder_sources_read_the_same_documents(tmp_path):
    import zstandard

    texts = [json.loads(line)["text"] for line in open(PILE)][:5]
    plain = tmp_path / "d.jsonl"
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"{i:03d}.txt").write_text(t)
    for src in (plain, tmp_path / "d.jsonl.zst", folder):
        assert list(lm.iter_texts(str(src))) == texts


def test_shards_partition_the_first_n_documents(tok):
    cfg = load_config(
        [
            "task=pythia_eval",
            f"data_dir={DATA}",
            "data.source=pile/pile_100.jsonl",
            "data.first_doc=3",
            "data.n_docs=10",
            "eval.sort_buffer=4",
            "data.context_length=64",
            "eval.batch_tokens=256",
        ]
    )
    seen = []
    for slot in range(3):
        ds = pe.DocumentBatches(cfg, tok, PILE, slot, 3)
        docs = [d for b in ds for d in b["doc"].tolist()]
        assert all((d - 3) % 3 == slot for d in docs)
        seen += docs
        for b in ds:
            assert b["input_ids"].shape[1] <= 64 and b["input_ids"].numel() <= 256
    assert sorted(seen) == list(range(3, 13))
    # Several devices within one shard keep to that shard's documents and split them.
    for shard in range(3):
        per_device = [
            {r for r in range(60) if r % pe.device_slot(shard, 3, rank, 2)[1] == pe.device_slot(shard, 3, rank, 2)[0]}
            for rank in range(2)
        ]
        assert per_device[0].isdisjoint(per_device[1])
        assert per_device[0] | per_device[1] == {r for r in range(60) if r % 3 == shard}


# ---- bad input --------------------------------------------------------------------------------


def test_unloadable_model_name_says_it_needs_the_hub_or_a_local_path(env):
    cfg = load_config(
        ["task=pythia_eval", f"data_dir={DATA}", "model.name=EleutherAI/pythia-70m", "model.revision=step143000"]
    )
    with pytest.raises(ConfigError) as e:
        pe.build(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "hub" in msg and "local" in msg and "pythia-70m" in msg


def test_jsonl_without_text_field_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "hello", "meta": {}}) + "\n")
    with pytest.raises(ConfigError) as e:
        list(lm.iter_texts(str(bad)))
    assert "\n" not in str(e.value) and "'text'" in str(e.value) and "body" in str(e.value)


def test_tokenizer_that_does_not_match_the_model_vocabulary(env, tmp_path):
    small = tmp_path / "small"
    tiny_neox(vocab=1000).save_pretrained(small)
    cfg = load_config(
        [
            "task=pythia_eval",
            f"data_dir={DATA}",
            f"model.name={small}",
            "model.tokenizer=pythia/tokenizer.json",
            "data.source=pile/pile_100.jsonl",
        ]
    )
    with pytest.raises(ConfigError, match="do not match.*50281 ids.*1000 rows"):
        pe.build(cfg)


def test_bad_config_values_name_the_key():
    with pytest.raises(ConfigError, match="model.dtype"):
        load_config(["task=pythia_eval", "model.dtype=float8"])
    with pytest.raises(ConfigError, match="shard_index"):
        pe.build(
            load_config(
                [
                    "task=pythia_eval",
                    "data.num_shards=2",
                    "data.shard_index=2",
                    "eval.batch_tokens=1024",
                    "data.context_length=1024",
                ]
            )
        )


# ---- a real run -------------------------------------------------------------------------------


def test_run_writes_per_token_artifact_and_summary(env, model_dir, tok):
    from harness import runstore

    args = [
        "task=pythia_eval",
        f"data_dir={DATA}",
        f"model.name={model_dir}",
        "data.source=pile/pile_100.jsonl",
        "data.n_docs=6",
        "data.context_length=128",
        "eval.batch_tokens=512",
        "eval.row_group_rows=100",
        "trainer.threads=1",
        "trainer.progress_bar=false",
    ]
    summary = train(load_config(args), args)
    # train() returns once the run file is complete (artifact and exit records written): no waiting.
    files = runstore.artifact_files(str(env / "wandb"), summary["_run_id"], "per_token_losses")
    assert len(files) == 1
    path = next(iter(files.values()))
    table = pq.read_table(path).to_pandas()
    assert pq.ParquetFile(path).num_row_groups > 1  # written incrementally
    assert len(table) == summary["eval/tokens"] and summary["eval/docs"] == 6
    assert table["loss"].astype("float64").mean() == pytest.approx(summary["eval/mean_loss"], abs=1e-5)
    # Tokens and positions line up with the documents (the model's own tokenizer, as saved).
    texts = [json.loads(line)["text"] for line in open(PILE)][:6]
    for doc, ids in enumerate(tok.encode(texts, 128)):
        rows = table[table["doc"] == doc].sort_values("pos")
        assert rows["pos"].tolist() == list(range(1, len(ids))) and rows["token"].tolist() == ids[1:]
    counts = lm.param_counts(tiny_neox())
    assert summary["model/params"] == counts["model/params"]
    assert summary["model/params_nonembedding"] == counts["model/params_nonembedding"]
    assert counts["model/params"] - counts["model/params_nonembedding"] == 2 * 50304 * 32


# ---- token classes on synthetic curves --------------------------------------------------------


def test_classify_synthetic_curves():
    n = np.array([1e6, 3e6, 1e7, 3e7, 1e8, 3e8])
    ln = np.log(n)
    losses = np.array(
        [
            [7.0, 6.5, 6.2, 0.1, 0.05, 0.02],  # monogenic: drops at the 4th model
            [5.5, 5.2, 0.2, 0.1, 0.1, 0.1],  # monogenic: drops at the 3rd
            8.0 - 0.5 * (ln - ln[0]),  # polygenic: slope -0.5, a straight line in ln N
            [3.0, 3.1, 2.9, 3.0, 3.05, 2.95],  # flat: other
            [7.0, 6.0, 4.0, 0.1, 0.1, 0.1],  # drop, but not above 5 nats for every smaller model: other
            [6.0, 6.0, 6.0, 6.0, 6.0, 0.2],  # drop at the last model
        ]
    )
    cls = tk.classify(losses, n)
    assert cls["class"].tolist() == ["monogenic", "monogenic", "polygenic", "other", "other", "monogenic"]
    assert cls["drop"].tolist() == [3, 2, -1, -1, -1, 5]
    assert cls["slope"].iat[2] == pytest.approx(-0.5) and cls["r2"].iat[2] == pytest.approx(1.0)
    assert cls["learned"].tolist() == [3, 2, -1, -1, 3, 5]
    # Thresholds are options: a laxer "high" makes the 5th curve monogenic.
    assert tk.classify(losses, n, tk.Thresholds(mono_high=3.5))["class"].iat[4] == "monogenic"
    assert tk.fractions(cls["class"]) == pytest.approx({"monogenic": 0.5, "polygenic": 1 / 6, "other": 1 / 3})


def test_align_matches_tokens_across_models_and_rejects_other_tokenizers():
    import pandas as pd

    a = pd.DataFrame({"doc": [0, 0, 1, 1], "pos": [1, 2, 1, 2], "token": [5, 6, 7, 8], "loss": [1.0, 2, 3, 4]})
    b = a.iloc[[3, 0, 2]].assign(loss=[40.0, 10, 30])  # shuffled, one token missing
    index, losses = tk.align([a, b])
    assert index[["doc", "pos"]].values.tolist() == [[0, 1], [1, 1], [1, 2]]
    assert losses.tolist() == [[1, 10], [3, 30], [4, 40]]
    with pytest.raises(ValueError, match="tokenizer"):
        tk.align([a, a.assign(token=[5, 6, 7, 9])])


def test_sweep_files_validate():
    from harness.sweep.spec import load_sweep_yaml, validate_sweep

    for name in (
        "pythia_suite",
        "pythia_suite_fp16",
        "pythia_checkpoints",
        "pythia_suite_smoke",
        "pythia_checkpoints_smoke",
        "pythia_build_offline",
    ):
        path = REPO / "sweeps" / f"{name}.yaml"
        cfg = load_sweep_yaml(str(path))
        assert cfg["command"] == ["${env}", "${interpreter}", "-m", "harness", "train", "${args_no_hyphens}"]
        assert validate_sweep(cfg, str(path)) in ("pythia_eval", "pythia_suite")


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "train",
            "task=pythia_eval",
            "model.name=EleutherAI/pythia-70m",
            "model.tokenizer=pythia/tokenizer.json",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("harness: error: model.name='EleutherAI/pythia-70m'")


@pytest.mark.slow
def test_analysis_end_to_end_on_two_models_and_two_checkpoints(env, tmp_path):
    from analysis import pythia as ap

    for name, d, rev in (("small", 16, "step1"), ("small", 16, "step2"), ("big", 64, "step2")):
        path = tmp_path / name / rev
        if not path.exists():
            tiny_neox(d=d, seed=d + int(rev[4:])).save_pretrained(path)
        args = [
            "task=pythia_eval",
            f"data_dir={DATA}",
            f"model.name={tmp_path / name}",
            f"model.revision={rev}",
            "model.tokenizer=pythia/tokenizer.json",
            "data.source=pile/pile_100.jsonl",
            "data.n_docs=4",
            "data.context_length=64",
            "eval.batch_tokens=256",
            "trainer.threads=1",
            "trainer.progress_bar=false",
        ]
        train(load_config(args), args)
    out = tmp_path / "analysis"
    ap.main([str(env / "wandb"), "--out", str(out), "--bootstrap", "20"])
    result = json.loads((out / "pythia.json").read_text())
    size, ckpt = result["size"], result["checkpoints"]
    assert [os.path.basename(p["model"]) for p in size["points"]] == ["small", "big"]
    assert [p["step"] for p in ckpt["points"]] == [1, 2]
    assert size["n_tokens"] == ckpt["n_tokens"] > 100
    assert sum(size["class_fractions"].values()) == pytest.approx(1.0)
    for name in ("scaling.png", "checkpoints.png", "report.md"):
        assert (out / name).exists(), name
