import json
import math
import os

import pytest
import torch
from conftest import TINY, harness

from harness.config.run import load_config
from harness.runstore import load_curves
from tasks.sparse_parity import MLP, SparseParityData, build, frequencies, n_params, per_subtask


def cfg_of(*overrides):
    return load_config(["task=sparse_parity", *overrides])


def test_frequencies_follow_the_papers_alpha_plus_one():
    p = frequencies(10, 0.4)
    assert abs(float(p.sum()) - 1) < 1e-12
    assert float(p[0] / p[1]) == pytest.approx(2.0**1.4, rel=1e-14)  # numpy's pow (harness.quanta_stats)


def test_parameter_count_matches_the_paper():
    # Michaud et al.: params = 603 * width + 2 for n_tasks=500, n=100 (one hidden layer).
    for width in (10, 100, 500):
        assert n_params(MLP(600, width, 1, 2)) == 603 * width + 2


def test_labels_are_parities_of_distinct_subsets():
    data = SparseParityData(
        cfg_of("data.n_tasks=20", "data.n=10", "data.k=3", "data.batch_size=5000", "eval.test_per_task=10")
    )
    assert len({tuple(s) for s in data.subsets.tolist()}) == 20
    x, y = data.train_batch(0, torch.device("cpu"))
    assert x.shape == (5000, 30)
    tasks = x[:, :20].argmax(1)
    assert torch.all(x[:, :20].sum(1) == 1)
    bits = x[:, 20:].long()
    expected = torch.stack([bits[i, data.subsets[t]].sum() % 2 for i, t in enumerate(tasks)])
    assert torch.equal(y, expected)
    # Subtask frequencies of a batch follow p_t (inverse-CDF sampling).
    counts = torch.bincount(tasks, minlength=20).double() / 5000
    assert abs(float(counts[0]) - float(data.p[0])) < 0.03


def test_finite_data_is_reshuffled_every_epoch_with_a_smaller_last_batch():
    # D = 10, batch 4: epochs of 3 batches (4, 4, 2), as the paper's loader (shuffle=True) gives.
    data = SparseParityData(
        cfg_of(
            "data.n_tasks=4",
            "data.n=8",
            "data.k=2",
            "data.n_train_samples=10",
            "data.batch_size=4",
            "eval.test_per_task=5",
        )
    )
    epochs = [[data.finite_batch_indices(3 * e + j) for j in range(3)] for e in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 2]
        assert sorted(torch.cat(batches).tolist()) == list(range(10))  # every sample once per epoch
    orders = [torch.cat(b).tolist() for b in epochs]
    assert orders[0] != orders[1] and orders[1] != orders[2]  # a new order each epoch
    # Deterministic by batch index (a resumed run replays the same batches), and the batch holds
    # exactly those samples.
    again = SparseParityData(
        cfg_of(
            "data.n_tasks=4",
            "data.n=8",
            "data.k=2",
            "data.n_train_samples=10",
            "data.batch_size=4",
            "eval.test_per_task=5",
        )
    )
    assert torch.equal(again.finite_batch_indices(4), epochs[1][1])
    cpu = torch.device("cpu")
    x, _ = data.train_batch(4, cpu)
    tasks, bits = data.finite
    assert torch.equal(x[:, 4:].to(torch.uint8), bits[epochs[1][1]])
    # batch >= D: every step sees all D samples.
    full = SparseParityData(
        cfg_of(
            "data.n_tasks=4",
            "data.n=8",
            "data.k=2",
            "data.n_train_samples=10",
            "data.batch_size=16",
            "eval.test_per_task=5",
        )
    )
    assert full.finite_batch_indices(7) is None and full.train_batch(7, cpu)[0].shape[0] == 10


def test_frequency_offset_matches_the_papers_law():
    # The paper's code: probs ~ n^-alpha for n in range(1 + offset, n_tasks + offset + 1).
    p = frequencies(5, 0.5, offset=3)
    ref = torch.tensor([(t + 3) ** -1.5 for t in range(1, 6)], dtype=torch.float64)
    assert torch.allclose(p, ref / ref.sum(), rtol=1e-12)
    assert torch.equal(frequencies(5, 0.5), frequencies(5, 0.5, 0.0))
    data = SparseParityData(
        cfg_of("data.n_tasks=5", "data.n=8", "data.offset=3", "data.zipf_alpha=0.5", "eval.test_per_task=5")
    )
    assert torch.allclose(data.p, p)


def test_task_seed_follows_the_run_seed_unless_fixed():
    base = ("data.n_tasks=20", "data.n=10", "eval.test_per_task=5")
    s0, s1 = (SparseParityData(cfg_of(*base, f"seed={s}")).subsets for s in (0, 1))
    assert not torch.equal(s0, s1)  # default task_seed=-1: the draw follows seed, as in the paper
    f0, f1 = (SparseParityData(cfg_of(*base, f"seed={s}", "data.task_seed=7")).subsets for s in (0, 1))
    assert torch.equal(f0, f1)  # a fixed task_seed: one draw for every seed
    assert torch.equal(SparseParityData(cfg_of(*base, "data.task_seed=1")).subsets, s1)


def test_bad_task_seed_or_offset_is_refused():
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="data.task_seed=-2"):
        cfg_of("data.task_seed=-2")
    with pytest.raises(ConfigError, match="offset must be > -1"):
        cfg_of("data.offset=-1.0")


def test_per_subtask_eval_equals_a_naive_loop():
    cfg = cfg_of("data.n_tasks=6", "data.n=10", "data.k=3", "eval.test_per_task=50", "eval.chunk=37")
    job = build(cfg)
    model, data = job.module.model, job.data
    tasks, bits = data.val_batch(0, torch.device("cpu"))
    loss, acc = per_subtask(cfg, model, data, torch.device("cpu"))
    for t in range(6):
        x, y = data.encode(tasks[tasks == t], bits[tasks == t], torch.device("cpu"))
        ref = torch.nn.functional.cross_entropy(model(x), y)
        assert torch.allclose(loss[t], ref, atol=1e-6)


def test_train_prints_summary_last_and_detects_emergence(tmp_path):
    # 2 subtasks of 2 bits among 4: learned within a few hundred steps at width 64.
    proc = harness(
        "train",
        "task=sparse_parity",
        "data.n_tasks=2",
        "data.n=4",
        "data.k=2",
        "data.batch_size=512",
        "model.width=64",
        "optim.lr=1.0e-2",
        "eval.test_per_task=200",
        "trainer.steps=300",
        "trainer.eval_every=25",
        "trainer.progress_bar=false",
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["model/params"] == (2 + 4) * 64 + 64 + 64 * 2 + 2
    assert summary["val/loss"]["last"] < 0.1 * math.log(2)
    assert summary["val/loss"]["min"] <= summary["val/loss"]["last"]
    assert summary["emergence/n_learned"] == summary["emergence/n_below_end"] == 2
    assert summary["trainer/global_step"] == 300 and summary["val/n_learned"] == 2
    # Per-subtask curves come back from the run's curves artifact; the emergence steps from them
    # agree with the table the callback wrote.
    curves = load_curves(str(tmp_path), "subtask")
    assert sorted(curves["step"].unique()) == list(range(0, 301, 25)) and set(curves["item"]) == {0, 1}
    below = curves[curves["loss"] < 0.1 * math.log(2)].groupby("item")["step"].min()
    assert all(0 < s <= 300 and s % 25 == 0 for s in below)
    rows = table_rows(summary, "emergence/items")
    assert [(r[0], r[1], r[2]) for r in rows] == [(i, int(below[i]), True) for i in (0, 1)]


def test_never_learned_subtasks_are_censored_numbers(tmp_path):
    proc = harness("train", *TINY, "model.width=2")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = table_rows(summary, "emergence/items")
    censored = [r for r in rows if not r[2]]
    assert censored and all(r[1] == 60 for r in censored)  # the last evaluated step, a number
    assert summary["emergence/n_learned"] == 4 - len(censored)
    assert summary["emergence/last_step"] == 60
    assert not any(isinstance(v, str) for k, v in summary.items() if k.startswith("emergence/"))


def table_rows(summary: dict, key: str) -> list:
    """The rows of a wandb.Table logged to the summary, from the run's media file."""
    path = os.path.join(summary["_run_dir"], summary[key]["path"])
    with open(path) as f:
        return json.load(f)["data"]


def test_a_subtask_below_the_threshold_at_step_0_is_learned_at_step_0():
    import numpy as np

    from harness.training.detectors import EmergenceCallback

    cb = EmergenceCallback(threshold_nats=0.1)
    for step, losses in ((0, [0.05, 0.7, 0.7]), (20, [0.2, 0.05, 0.7]), (40, [0.01, 0.02, 0.7])):
        cb.observe(step, np.array(losses))
    # step 0 is a reached event (not "never", which is -1 inside and the last step, censored, outside)
    assert [r[:3] for r in cb.table_rows()] == [[0, 0, True], [1, 20, True], [2, 40, False]]
    assert cb.summary()["emergence/n_learned"] == 2 and cb.summary()["emergence/n_below_end"] == 2
