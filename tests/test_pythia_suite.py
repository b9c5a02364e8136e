"""The offline Pythia stand-in: a tiny GPT-NeoX trains with Lightning on local Pile text, saves its
checkpoints as Hugging Face directories, and `pythia_eval` loads them by name + revision."""

from __future__ import annotations

import os

import pytest

from harness.config.run import load_config
from harness.errors import ConfigError
from harness.training.train import train
from tasks import lm
from tasks import pythia_suite as ps
from tests.conftest import DATA  # noqa: E402  ($HARNESS_DATA_DIR, else ../shared/data)

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DATA, "pile", "pile_100.jsonl")),
    reason="needs HARNESS_DATA_DIR with pile/pile_100.jsonl and pythia/tokenizer.json",
)


@pytest.fixture
def env(tmp_path):
    # tests/conftest.py already made wandb offline in tmp_path, hub-free, with no sweep variables.
    return tmp_path


def test_suite_model_trains_saves_checkpoints_and_loads_for_eval(env):
    save = env / "suite"
    args = [
        "task=pythia_suite",
        f"data_dir={DATA}",
        "model.d_model=16",
        "data.seq_len=16",
        "data.batch_size=2",
        "data.val_windows=2",
        "trainer.steps=4",
        "trainer.eval_every=2",
        "save_every=2",
        f"save_dir={save}",
        "trainer.threads=1",
        "trainer.progress_bar=false",
    ]
    s = train(load_config(args), args)
    assert s["model/name"] == "neox-d16" and s["trainer/global_step"] == 4 and s["val/loss"]["last"] > 0
    assert s["model/params_nonembedding"] == s["model/params"] - 2 * 50304 * 16  # Pythia's padded vocab
    for sub in ("", "step2", "step4"):
        assert (save / "neox-d16" / sub / "config.json").exists(), sub
    cfg = load_config(
        [
            "task=pythia_eval",
            f"data_dir={DATA}",
            f"model.name={save / 'neox-d16'}",
            "model.revision=step2",
            "model.tokenizer=pythia/tokenizer.json",
            "data.source=pile/pile_100.jsonl",
        ]
    )
    assert lm.local_model_dir(cfg).endswith("step2")
    model = lm.load_model(cfg)
    assert lm.param_counts(model) == {k: s[k] for k in ("model/params", "model/params_nonembedding")}


def test_bad_suite_config_is_one_line():
    with pytest.raises(ConfigError, match="model.d_model=48 is not divisible by model.n_heads=5"):
        load_config(["task=pythia_suite", "model.d_model=48", "model.n_heads=5"])
    assert ps.layers(ps.ModelConfig(d_model=128)) == 4 and ps.padded_vocab(50281) == 50304
