"""Omnigrok MNIST: IDX parsing on the real files, splits, config errors, real Lightning + offline W&B
runs (init scale, fixed norm, a short run that learns), the analysis CLI and the sweep files."""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from harness.config.run import load_config
from harness.errors import ConfigError
from harness.training.train import make_trainer, train
from tasks import mnist_omnigrok as mo

REPO = Path(__file__).resolve().parents[1]
DATA = os.environ.get("HARNESS_DATA_DIR") or str(REPO.parent / "shared" / "data")
MNIST = os.path.join(DATA, "mnist")
FAST = ["trainer.precision=32-true", "trainer.threads=1", "trainer.progress_bar=false", "data.n_test=1000"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("HARNESS_DATA_DIR", DATA)
    monkeypatch.delenv("WANDB_SWEEP_PARAM_PATH", raising=False)
    return tmp_path


def run(*overrides: str) -> dict:
    args = ["task=mnist_omnigrok", *FAST, *overrides]
    return train(load_config(args), args)


def write_idx(path: str, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + arr.astype(np.uint8).tobytes())


# ---- data --------------------------------------------------------------------------------------


def test_idx_parse_real_test_split():
    images = mo.read_idx(os.path.join(MNIST, "t10k-images-idx3-ubyte.gz"))
    labels = mo.read_idx(os.path.join(MNIST, "t10k-labels-idx1-ubyte.gz"))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert labels.shape == (10000,)
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test digits
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_offline_split_is_first_n_train_then_the_rest():
    d = mo.load_mnist(MNIST, "auto", n_train=1000)
    assert d["split"] == "offline"
    assert d["x_train"].shape == (1000, 784) and d["x_test"].shape == (9000, 784)
    full = mo.read_idx(os.path.join(MNIST, "t10k-labels-idx1-ubyte.gz"))
    assert (d["y_train"] == full[:1000]).all() and (d["y_test"] == full[1000:]).all()


def test_standard_split_when_all_four_files_are_present(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(os.path.join(MNIST, name), tmp_path / name)
    # Training files in the official format, built from real digits (reversed test images).
    images = mo.read_idx(os.path.join(MNIST, "t10k-images-idx3-ubyte.gz"))[::-1][:3000]
    labels = mo.read_idx(os.path.join(MNIST, "t10k-labels-idx1-ubyte.gz"))[::-1][:3000]
    write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), images)
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), labels)
    d = mo.load_mnist(str(tmp_path), "auto", n_train=1000)
    assert d["split"] == "standard"
    assert d["x_test"].shape == (10000, 784)
    assert (d["x_train"] == images[:1000].reshape(1000, 784)).all() and (d["y_train"] == labels[:1000]).all()


def test_missing_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        mo.load_mnist(str(tmp_path), "auto")
    msg = str(e.value)
    assert "\n" not in msg and "t10k-images-idx3-ubyte" in msg and mo.MIRROR in msg
    shutil.copy(os.path.join(MNIST, "t10k-images-idx3-ubyte.gz"), tmp_path)
    shutil.copy(os.path.join(MNIST, "t10k-labels-idx1-ubyte.gz"), tmp_path)
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte.gz is missing"):
        mo.load_mnist(str(tmp_path), "standard")


def test_corrupt_files_are_one_line_errors(tmp_path):
    blob = open(os.path.join(MNIST, "t10k-labels-idx1-ubyte.gz"), "rb").read()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConfigError) as e:
        mo.read_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"))
    assert "\n" not in str(e.value) and "corrupt" in str(e.value) and "t10k-labels-idx1-ubyte" in str(e.value)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") * 3 + b"x")
    with pytest.raises(ConfigError, match="corrupt .1 data bytes for shape"):
        mo.read_idx(str(tmp_path / "t10k-images-idx3-ubyte"))


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.loss=hinge", ["optim.loss='hinge'", "mse, ce"]),
        ("data.split=train", ["data.split='train'", "auto, standard, offline"]),
        ("model.init_scale=0.0", ["model.init_scale=0.0", "init_scale > 0"]),
        ("model.widht=3", ["model.widht", "model.width"]),
    ],
)
def test_bad_config_is_one_line(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(["task=mnist_omnigrok", override])
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_missing_data_dir_through_the_cli_path(env, tmp_path):
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte.gz is missing"):
        run(f"data_dir={tmp_path}")


# ---- model and training: four short real runs, shared by the tests below ----------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    wandb_dir = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(wandb_dir))
        mp.setenv("HARNESS_DATA_DIR", DATA)
        mp.delenv("WANDB_SWEEP_PARAM_PATH", raising=False)
        fixed = [
            "optim.fixed_norm=true",
            "optim.weight_decay=0.0",
            "data.n_train=200",
            "trainer.steps=60",
            "trainer.eval_every=30",
        ]
        out = {
            "learn": run("model.init_scale=1.0", "trainer.steps=300", "trainer.eval_every=100"),
            "free": run("model.init_scale=3.0", "optim.weight_decay=1.0", "trainer.steps=40", "trainer.eval_every=20"),
            "small": run("model.init_scale=0.3", *fixed),
            "large": run("model.init_scale=3.0", *fixed),
        }
    out["dir"] = wandb_dir
    return out


def test_init_scale_multiplies_norm_and_fixed_norm_keeps_it(runs):
    for name, alpha in (("small", 0.3), ("large", 3.0), ("free", 3.0)):
        s = runs[name]
        assert s["model/standard_norm"] == pytest.approx(11.7, abs=0.2)  # PyTorch default init, 784-200-200-10
        assert s["model/init_norm"] == pytest.approx(alpha * s["model/standard_norm"], rel=1e-6)
    for name in ("small", "large"):
        assert runs[name]["model/weight_norm"] == pytest.approx(runs[name]["model/init_norm"], rel=1e-5)
    assert runs["free"]["model/weight_norm"] < 0.99 * runs["free"]["model/init_norm"]  # weight decay shrinks it


def test_short_run_learns_and_records_split(runs):
    s = runs["learn"]
    assert s["data/source"] == "offline" and s["data/n_train"] == 1000 and s["data/n_test"] == 1000
    assert s["trainer/global_step"] == 300  # optimizer steps, 10 per Lightning batch
    assert s["train/acc"] > 0.9 and s["val/acc"]["last"] > 0.75  # a standard-init MLP generalises early
    assert s["grok/t_val80"] in (100, 200, 300) and s["grok/t_val80/reached"] is True
    assert s["grok/val_threshold"] == 0.8 and s["grok/t_val99/reached"] is False and s["grok/t_val99"] == 300
    from harness.runstore import load_history, load_runs

    table = load_runs(str(runs["dir"]))
    assert set(table["config.data.split"]) == {"offline"}  # resolved from auto into the run config
    # trainer.log_every counts optimizer steps (10 per Lightning batch): batch losses at 0, 100, 200.
    (run_id,) = table.loc[table["summary.trainer/global_step"] == 300, "id"]
    hist = load_history(str(runs["dir"]), run_ids=[run_id], keys=["train/batch_loss"])
    assert hist["step"].tolist() == [0, 100, 200]


def test_float64_runs_on_device_tensors(env):
    cfg = load_config(
        [
            "task=mnist_omnigrok",
            "trainer.precision=64-true",
            "trainer.steps=5",
            "trainer.eval_every=5",
            "trainer.progress_bar=false",
            "data.n_test=100",
            "optim.loss=ce",
        ]
    )
    job = mo.build(cfg)
    trainer = make_trainer(cfg, logger=False, callbacks=job.callbacks)
    trainer.fit(job.module, datamodule=job.datamodule)
    assert job.module.model.weights[0].dtype == torch.float64
    ((device, dtype),) = job.data._cache
    assert dtype == torch.float64 and job.data._cache[(device, dtype)]["x_train"].max() == 1.0
    assert 0 <= job.module.eval_metrics["val/acc"] <= 1 and trainer.global_step == 5


def test_minibatches_cover_each_epoch_once():
    arrays = mo.load_mnist(MNIST, "offline", n_train=1000)
    data = mo.MnistData(arrays, batch_size=200)
    idx = torch.cat([data.next_indices(i, torch.device("cpu")) for i in range(5)])
    assert sorted(idx.tolist()) == list(range(1000))


# ---- analysis and sweeps -----------------------------------------------------------------------


def test_analysis_cli_on_real_runs(runs, tmp_path):
    from analysis import omnigrok

    out = tmp_path / "out"
    omnigrok.main([str(runs["dir"]), "--out", str(out)])
    result = json.loads((out / "omnigrok.json").read_text())
    by_alpha = {r["init_scale"]: r for r in result["grokking"]}
    assert set(by_alpha) == {1.0, 3.0} and by_alpha[1.0]["t_val"] in (100, 200, 300)
    assert [r["alpha"] for r in result["landscape"]] == [0.3, 3.0]
    assert set(result["lu_shape"]) == {"200"}
    assert (out / "curves.png").stat().st_size > 0 and (out / "lu.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "t_train (acc >= 0.99)" in md and "offline stand-in split" in md and len(result["landscape_runs"]) == 2


def test_analysis_rejects_a_source_without_omnigrok_runs(tmp_path):
    from analysis import omnigrok

    with pytest.raises(ValueError, match="no mnist_omnigrok runs"):
        omnigrok.analyse(
            pd.DataFrame({"id": ["a"], "state": ["finished"], "config.task": ["sparse_parity"]}),
            pd.DataFrame(columns=["run_id", "step"]),
            str(tmp_path),
        )


def test_lu_shape_pure():
    from analysis.omnigrok import first_step_at_least, lu_shape

    t = pd.DataFrame(
        {
            "n_train": [100] * 4,
            "alpha": [0.1, 1.0, 3.0, 10.0],
            "val_loss": [0.09, 0.03, 0.05, 0.2],
            "train_loss": [0.09, 0.01, 1e-4, 1e-5],
        }
    )
    s = lu_shape(t)[100]
    assert s["alpha_best_val_loss"] == 1.0 and s["u_shaped"] and s["val_loss_rise"] == pytest.approx(0.2 / 0.03)
    h = pd.DataFrame({"step": [100, 200, 300], "val/acc": [0.5, 0.81, 0.7]})
    assert first_step_at_least(h, "val/acc", 0.8) == 200 and first_step_at_least(h, "val/acc", 0.9) is None


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "sweeps" / "omnigrok_*.yaml"))))
def test_sweep_files(path):
    from harness.sweep.spec import load_sweep_yaml, validate_sweep

    spec = load_sweep_yaml(path)
    assert validate_sweep(spec, path) == "mnist_omnigrok"  # W&B's schema and every value vs the config
    assert spec["command"] == ["${env}", "${interpreter}", "-m", "harness", "train", "${args_no_hyphens}"]
    assert spec["method"] == "grid"
    params = {k: v.get("values", [v.get("value")]) for k, v in spec["parameters"].items()}
    assert all(isinstance(a, float) for a in params["model.init_scale"])
    if path.endswith("_smoke.yaml"):
        assert params.get("trainer.threads") == [1]


def test_sweeps_come_in_pairs():
    names = {os.path.basename(p) for p in glob.glob(str(REPO / "sweeps" / "omnigrok_*.yaml"))}
    assert {"omnigrok_mnist.yaml", "omnigrok_landscape.yaml"} <= names
    assert {n.replace(".yaml", "_smoke.yaml") for n in names if "smoke" not in n} <= names
