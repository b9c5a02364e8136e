"""Packed sparse parity (issue 14): width packing (the task's one model, harness.training.nn.WidthPackedMLP: the
members' hidden layers concatenated, the output layers member by member; a single run is M = 1 and an
MLP as before) against each member trained solo with the same init and batches, StackedAdamW over concatenated
member axes against torch's AdamW, depth 2, emergence steps and W&B keys against harness train, isolation of a
failing member, and the GPU benchmark's CPU smoke path."""

import os
import subprocess
import sys

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, train_block

from harness import runstore
from harness.config.run import load_config
from harness.members.optim import MemberAxis, StackedAdamW
from harness.members.packed import train_packed
from harness.members.runs import Member
from harness.training.data import batch_seed, seed_rng
from harness.training.nn import MLP, n_params
from harness.training.train import train
from tasks.sparse_parity import SparseParityBlock, SparseParityData, make_model

STEP = "trainer/global_step"
# 8 subtasks, 10 data bits, batch 128: a member step is well under a millisecond.
TINY_SP = (
    "task=sparse_parity",
    "data.n_tasks=8",
    "data.n=10",
    "data.k=2",
    "data.batch_size=128",
    "eval.test_per_task=50",
    "trainer.progress_bar=false",
    "trainer.threads=1",
)
# Widths, lrs and weight decays differ; members 0, 1 and 3 share one stream (seed 0, or data.stream_seed=0
# and data.task_seed=0), member 2 (seed 1) has its own: both paths (one shared batch, a separate group).
MIXED = (
    ("seed=0", "model.width=8", "optim.lr=0.01"),
    ("seed=0", "model.width=20", "optim.lr=0.003", "optim.weight_decay=0.1"),
    ("seed=1", "model.width=12", "optim.lr=0.01", "optim.weight_decay=0.5"),
    ("seed=2", "model.width=5", "data.stream_seed=0", "data.task_seed=0", "optim.lr=0.02"),
)


def cfgs(*members, steps=100, eval_every=10, extra=(), base=TINY_SP):
    base = base + (f"trainer.steps={steps}", f"trainer.eval_every={eval_every}") + tuple(extra)
    return [base + tuple(m) for m in members]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


# ---- the optimizer over concatenated member axes --------------------------------------------------


@pytest.mark.parametrize("w2_dim", [0, 1])  # W2^T [sum_w, 2] (the block's layout), or W2 [2, sum_w]: strided views
def test_stacked_adamw_over_concatenated_widths_equals_torch_adamw_per_member(w2_dim):
    torch.manual_seed(0)
    widths, d_in = [3, 7, 1], 5
    lr, wd = [1e-3, 3e-2, 1e-1], [1.0, 0.0, 0.3]
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(widths))
    offsets = [0, 3, 10]
    # the block's layout: W1 [sum_w, d_in], b1 [sum_w], W2^T [sum_w, 2] concatenated, b2 [M, 2] stacked
    axes = [MemberAxis(0, owner), MemberAxis(0, owner), MemberAxis(w2_dim, owner), MemberAxis.stacked(3)]
    init = [
        torch.randn(11, d_in, dtype=torch.float64),
        torch.randn(11, dtype=torch.float64),
        torch.randn(11, 2, dtype=torch.float64) if w2_dim == 0 else torch.randn(2, 11, dtype=torch.float64),
        torch.randn(3, 2, dtype=torch.float64),
    ]

    def part(x, a, i):  # member i's slice of a packed tensor: a row if stacked, else its block of units
        return x[i] if len(a.owner) == 3 else x.narrow(a.dim, offsets[i], widths[i])

    grads = [[torch.randn_like(x) for x in init] for _ in range(100)]
    packed = [x.clone().requires_grad_() for x in init]
    opt = StackedAdamW(
        packed,
        torch.tensor(lr, dtype=torch.float64),
        torch.tensor(wd, dtype=torch.float64),
        betas=(0.9, 0.98),
        eps=1e-8,
        axes=axes,
    )
    solo = [[part(x, a, i).clone().requires_grad_() for x, a in zip(init, axes)] for i in range(3)]
    solo_opt = [torch.optim.AdamW(solo[i], lr=lr[i], weight_decay=wd[i], betas=(0.9, 0.98), eps=1e-8) for i in range(3)]
    for g in grads:
        for p, gp in zip(packed, g):
            p.grad = gp.clone()
        opt.step()
        for i in range(3):
            for p, gp, a in zip(solo[i], g, axes):
                p.grad = part(gp, a, i).clone()
            solo_opt[i].step()
    worst = max(rel(part(p.detach(), a, i), q.detach()) for i in range(3) for p, a, q in zip(packed, axes, solo[i]))
    assert worst < 1e-12
    # not trivially equal: each member moved away from its start, by its own lr
    assert rel(part(packed[0].detach(), axes[0], 1), part(init[0], axes[0], 1)) > 1e-2
    # a member's checkpoint slice round-trips through member_state / load_member_state
    state = opt.member_state(1)
    assert state["exp_avg"][0].shape == (7, d_in) and state["exp_avg"][2].shape == ((7, 2) if w2_dim == 0 else (2, 7))


# ---- the model: one class for a single run and for a block -------------------------------------------


@pytest.mark.parametrize("depth", [1, 2])
def test_a_single_run_is_the_mlp_it_was(depth):
    """make_model(cfg) (M = 1) holds the weights a seeded MLP draws, computes MLP's outputs bit for bit,
    and loads an MLP's state dict (depth 1: the same keys and shapes; depth 2: a [w, w] hidden weight
    into its flat one)."""
    cfg = load_config(TINY_SP + ("model.width=7", f"model.depth={depth}"))
    d_in = cfg.data.n_tasks + cfg.data.n
    torch.manual_seed(3)
    model = make_model(cfg)
    torch.manual_seed(3)
    mlp = MLP(d_in, 7, depth, 2)
    x = torch.rand(5, d_in)
    assert torch.equal(model(x), mlp(x)) and n_params(model) == n_params(mlp)
    if depth == 1:
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in mlp.state_dict().items()}
    fresh = make_model(cfg)
    fresh.load_state_dict(mlp.state_dict())
    assert torch.equal(fresh(x), mlp(x))


def test_a_blocks_members_are_views_and_their_artifact_models_copies():
    members = cfgs(("seed=0", "model.width=4"), ("seed=1", "model.width=9", "optim.lr=0.003"), extra=("model.depth=2",))
    block = SparseParityBlock([load_config(m) for m in members])
    model = block.model
    x = block.groups[0].stream.batch(0)[0]
    view, copy = model.member(1), block.member_model(1)

    def close(a, b):  # the same numbers up to the rounding of a strided matmul
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    assert close(view(x), model(x)[1]) and close(copy(x), view(x))
    train_block(block, 3)
    assert close(view(x), model(x)[1]) and not close(copy(x), view(x))  # views follow training, a copy not


# ---- exactness against the solo training step -----------------------------------------------------


def solo_losses(overrides, steps, dtype):
    """The run's training step in a plain PyTorch loop: the task's model of one member (seeded as
    harness.training.train seeds a run), its data, F.cross_entropy and torch's AdamW, batches drawn as
    DeviceDataModule draws them (global RNG seeded per Lightning batch of K steps)."""
    cfg = load_config(tuple(overrides))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = make_model(cfg).to(dtype)
    data = SparseParityData(cfg)  # after the init: finite-data samples come from the global RNG there
    data.seed = cfg.seed
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2))
    k = cfg.trainer.batch_steps()
    cpu = torch.device("cpu")
    out = []
    for step in range(steps):
        if step % k == 0:
            seed_rng(cpu, batch_seed(data.seed, 0, step // k))
            batches = [data.train_batch(step + j, cpu) for j in range(k)]
        x, y = batches[step % k]
        loss = F.cross_entropy(model(x.to(dtype)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def packed_losses(members, steps):
    block = SparseParityBlock([load_config(m) for m in members])
    return block, train_block(block, steps)[1]


# Infinite data: members 0, 1, 3 share one batch per step, member 2 has its own. Finite data (300 samples,
# batches of 128 reshuffled every epoch): with data.stream_seed=-1 a member's samples depend on its init,
# so members 0-2 are one group each; member 3 (stream seed 0) draws its own samples from that seed.
@pytest.mark.parametrize("data,groups", [((), [3, 1]), (("data.n_train_samples=300",), [1, 1, 1, 1])])
def test_packed_widths_train_as_their_solo_runs_for_100_steps_in_float64(data, groups):
    members = cfgs(*MIXED, extra=("trainer.precision=64-true",) + data)
    block, packed = packed_losses(members, 100)
    assert [len(g.members) for g in block.groups] == groups
    assert all(p.dtype == torch.float64 for p in block.model.parameters())
    errors = [rel(packed[:, i], solo_losses(m, 100, torch.float64)) for i, m in enumerate(members)]
    print("float64 max relative error per member:", errors)
    assert max(errors) < 1e-6
    # a solo run is a block of one: each member trains as its own block of one
    alone = [rel(packed[:, i], packed_losses([m], 100)[1][:, 0]) for i, m in enumerate(members)]
    print("float64 max relative error per member against its block of one:", alone)
    assert max(alone) < 1e-6
    assert (packed[-10:].mean(0) < packed[:10].mean(0) - 0.02).all()  # every member trained
    # the members are not one network: different widths give different losses
    assert len({round(float(v), 6) for v in packed[0]}) == len(members)


def test_packed_depth_2_members_of_different_widths_train_as_their_solo_runs():
    members = cfgs(
        ("seed=0", "model.width=6", "optim.lr=0.01"),
        ("seed=1", "model.width=9", "optim.lr=0.003"),
        ("seed=0", "model.width=4", "optim.lr=0.01", "optim.weight_decay=0.3"),
        extra=("trainer.precision=64-true", "model.depth=2"),
    )
    block, packed = packed_losses(members, 50)
    assert len(block.groups) == 2 and dict(block.model.named_parameters())["net.2.weight"].shape == (
        6 * 6 + 9 * 9 + 4 * 4,
    )
    assert max(rel(packed[:, i], solo_losses(m, 50, torch.float64)) for i, m in enumerate(members)) < 1e-6


def test_packed_widths_stay_within_1e_3_of_solo_over_1000_steps_in_float32():
    members = cfgs(
        ("seed=0", "model.width=6"),
        ("seed=0", "model.width=16", "optim.weight_decay=0.1"),
        ("seed=1", "model.width=10", "optim.lr=0.003"),
        steps=1000,
        base=(
            "task=sparse_parity",
            "data.n_tasks=4",
            "data.n=6",
            "data.k=2",
            "data.batch_size=32",
            "eval.test_per_task=50",
            "trainer.progress_bar=false",
            "trainer.threads=1",
        ),
    )
    _, packed = packed_losses(members, 1000)
    errors = [rel(packed[:, i], solo_losses(m, 1000, torch.float32)) for i, m in enumerate(members)]
    print("float32 max relative error per member over 1000 steps:", errors)
    assert max(errors) < 1e-3
    assert (packed[-100:].mean(0) < packed[:100].mean(0)).all()


def test_a_resumed_stream_replays_the_batches_of_its_lightning_batch():
    members = cfgs(("seed=0", "model.width=4"), ("seed=0", "model.width=9"))
    a, b = (SparseParityBlock([load_config(m) for m in members]) for _ in range(2))
    sa, sb = a.groups[0].stream, b.groups[0].stream
    run = [sa.batch(s) for s in range(14)]
    x, y = sb.batch(13)  # a resume at step 13, inside Lightning batch 1 (steps 10..19)
    assert torch.equal(x, run[13][0]) and torch.equal(y, run[13][1])
    assert not torch.equal(run[12][0], run[13][0])


def test_a_fixed_stream_seed_gives_every_seed_and_width_the_same_batches():
    def first_batch(*o):
        cfg = load_config(TINY_SP + o)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        data = SparseParityData(cfg)
        data.seed = cfg.seed
        seed_rng(torch.device("cpu"), batch_seed(data.seed, 0, 0))
        return data.train_batch(0, torch.device("cpu"))[0]

    a = first_batch("seed=0", "data.stream_seed=5", "model.width=4")
    assert torch.equal(a, first_batch("seed=3", "data.stream_seed=5", "model.width=9"))
    assert not torch.equal(a, first_batch("seed=3", "model.width=9"))  # -1: follows the seed
    assert isinstance(SparseParityData(load_config(TINY_SP)).seed, int)


# ---- W&B runs and emergence against harness train -------------------------------------------------

# 8 subtasks among 8 bits at lr 1e-2: the frequent subtasks are learned within ~200-400 steps.
SMALL_SP = (
    "task=sparse_parity",
    "data.n_tasks=8",
    "data.n=8",
    "data.k=2",
    "data.batch_size=256",
    "eval.test_per_task=100",
    "optim.lr=0.01",
    "trainer.progress_bar=false",
    "trainer.threads=1",
)


@pytest.fixture(scope="module")
def solo_and_packed(tmp_path_factory):
    """Three widths trained solo (`harness.training.train.train`, Lightning) and packed, 600 steps, float32."""
    root = str(tmp_path_factory.mktemp("packed_sp"))
    os.environ["WANDB_DIR"] = root  # the module-scoped fixture runs before the per-test one
    members = cfgs(
        ("model.width=32",),
        ("model.width=12", "optim.weight_decay=0.1"),
        ("model.width=4",),
        steps=600,
        eval_every=20,
        base=SMALL_SP,
    )
    solo = [train(load_config(m), list(m)) for m in members]
    packed = train_packed([Member(load_config(m), list(m)) for m in members])
    return root, solo, packed


def present(row, columns):
    # a summary Table comes back as a DataFrame (present); a scalar is present unless missing
    return sorted(
        k
        for k in columns
        if k.startswith(("summary.", "config.")) and not (pd.api.types.is_scalar(row[k]) and pd.isna(row[k]))
    )


def first_below(curves, run_id, threshold):
    c = curves[(curves["run_id"] == run_id) & (curves["loss"] < threshold)]
    return c.groupby("item")["step"].min().to_dict()


def test_packed_width_members_log_what_their_solo_runs_log(solo_and_packed):
    root, solo, packed = solo_and_packed
    runs = runstore.load_runs(root).set_index("id")
    for s, p in zip(solo, packed):
        a, b = runs.loc[s["_run_id"]], runs.loc[p.run_id]
        assert p.state == "finished" and b["state"] == "finished"
        assert present(b, runs.columns) == present(a, runs.columns)
        assert a["name"] == b["name"] and a["job_type"] == b["job_type"] == "train"
        for k in (
            "config.model.width",
            "config.optim.weight_decay",
            "summary.model/params",
            "summary.emergence/threshold_nats",
        ):
            assert a[k] == b[k]
        for kind in ("curves", "model"):
            assert runstore.artifact_files(root, p.run_id, kind)
        h = runstore.load_history(root, run_ids=[s["_run_id"], p.run_id])
        steps = [
            sorted(h[(h["run_id"] == r) & h["val/loss"].notna()][STEP].astype(int)) for r in (s["_run_id"], p.run_id)
        ]
        assert steps[0] == steps[1] == list(range(0, 601, 20))
        train_steps = [
            sorted(h[(h["run_id"] == r) & h["train/loss"].notna()][STEP].astype(int)) for r in (s["_run_id"], p.run_id)
        ]
        assert train_steps[0] == train_steps[1] and train_steps[0]
    # the model artifact holds the solo run's model.ckpt layout (LightningModule keys, under `model.`)
    sd = torch.load(runstore.artifact_files(root, packed[1].run_id, "model")["model.ckpt"], weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd["state_dict"].items()} == {
        "model.net.0.weight": (12, 16),
        "model.net.0.bias": (12,),
        "model.net.2.weight": (2, 12),
        "model.net.2.bias": (2,),
    }
    # its own weights only, not views into the whole block's storage
    assert all(
        v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * v.element_size()
        for v in sd["state_dict"].values()
    )


def test_packed_emergence_steps_within_one_evaluation_of_solo(solo_and_packed):
    root, solo, packed = solo_and_packed
    curves = runstore.load_curves(root, "subtask")
    threshold = solo[0]["emergence/threshold_nats"]
    learned = []
    for s, p in zip(solo, packed):
        a, b = first_below(curves, s["_run_id"], threshold), first_below(curves, p.run_id, threshold)
        # equal sets of learned subtasks, except one at the edge: learned within one evaluation of the end
        for item in set(a) | set(b):
            assert abs(a.get(item, 620) - b.get(item, 620)) <= 20, (item, a, b)
        assert abs(p.summary["emergence/n_learned"] - s["emergence/n_learned"]) <= 1
        learned.append(s["emergence/n_learned"])
        print("emergence steps solo", a, "packed", b)
    # the check can fail: the widest member learns subtasks mid-run, more than the narrowest
    assert learned[0] >= 2 and learned[0] > learned[2]
    assert any(0 < v < 600 for v in first_below(curves, solo[0]["_run_id"], threshold).values())


# ---- isolation -------------------------------------------------------------------------------------


def test_a_width_member_with_a_non_finite_loss_fails_alone(offline):
    members = cfgs(
        ("model.width=8",),
        ("model.width=5", "optim.lr=1e36"),
        ("model.width=3",),
        steps=60,
        eval_every=20,
        extra=("model.save=false",),
    )
    out = train_packed([Member(load_config(m), list(m)) for m in members])
    assert [m.state for m in out] == ["finished", "failed", "finished"]
    assert "not finite" in out[1].error
    root = str(offline / "wandb")
    runs = runstore.load_runs(root).set_index("id")
    assert [runs.loc[m.run_id, "state"] for m in out] == ["finished", "failed", "finished"]
    h = runstore.load_history(root, run_ids=[out[2].run_id])
    assert sorted(h[h["val/loss"].notna()][STEP].astype(int)) == [0, 20, 40, 60]
    assert np.isfinite(h["val/loss"].dropna()).all()


# ---- the GPU benchmark's smoke path ----------------------------------------------------------------


def test_gpu_benchmark_runs_on_cpu_as_a_smoke_check():
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_packed.py", "--device", "cuda", "--smoke-on-cpu", "--steps", "3"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("summary:")]
    assert len(summary) == 1, proc.stdout
    assert "packed" in summary[0] and "unpacked" in summary[0] and "fits in an hour" in summary[0]
    assert "batches equal" in proc.stdout
