"""Packed Omnigrok MNIST (issue 14): a packed member against the same config trained solo (same init,
same minibatches, fixed-norm projection), events and W&B keys against a Lightning solo run, and a
failing member that fails alone. Real MNIST (the offline split) from $HARNESS_DATA_DIR."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import train_block

from harness import runstore
from harness.config.run import load_config
from harness.members.packed import train_packed
from harness.members.runs import Member
from harness.training.nn import MLP
from harness.training.train import train
from tasks import mnist_omnigrok as mo

STEP = "trainer/global_step"
# 200 training images in minibatches of 50 (an epoch is 4 steps, so 100 steps cross 25 epoch
# permutations), 784-24-24-10: a member step is well under a millisecond.
TINY = (
    "task=mnist_omnigrok",
    "data.n_train=200",
    "data.batch_size=50",
    "data.n_test=500",
    "trainer.progress_bar=false",
    "trainer.threads=1",
)
# Differ in every packable key: seed (init and batch order), init scale, lr, weight decay, fixed norm.
MEMBERS = (
    ("seed=0",),
    ("seed=1", "model.init_scale=1.0", "optim.weight_decay=0.3", "optim.fixed_norm=true"),
    ("seed=2", "model.init_scale=3.0", "optim.lr=0.003", "optim.weight_decay=1.0", "optim.fixed_norm=true"),
    ("seed=0", "model.init_scale=0.5"),
)  # seed 0's batches, shared with member 0


def configs(members, extra=(), base=TINY):
    return [base + tuple(extra) + tuple(m) for m in members]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def solo(overrides, steps):
    """The run's training step in a plain PyTorch loop (what its solo run did before it became a block of
    one): the task's model of one member (seeded as
    harness.training.train seeds it) on [batch, 784], its minibatch stream (MnistData.next_indices),
    loss_fn, torch's AdamW, rescale_ for a fixed norm. Returns the training losses and the final evaluation."""
    cfg = load_config(tuple(overrides))
    dtype = {"64-true": torch.float64, "32-true": torch.float32}[cfg.trainer.precision]
    torch.manual_seed(cfg.seed)
    model, _, (init_norm,) = mo.make_model(cfg)
    model = model.to(dtype)
    target = torch.tensor([init_norm], dtype=dtype)
    data = mo.MnistData(mo.load_data(cfg), cfg.data.batch_size)
    data.seed = cfg.seed
    t = data.tensors(torch.device("cpu"), dtype)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2))
    out = []
    for step in range(steps):
        idx = data.next_indices(step, torch.device("cpu"))
        loss = mo.loss_fn(o.loss, model(t["x_train"].index_select(0, idx)), t["y_train"].index_select(0, idx))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if o.fixed_norm:
            mo.rescale_(model, target)
        out.append(loss.item())
    metrics = mo.measure(cfg, model, (t["x_train"], t["y_train"], t["x_test"], t["y_test"]))
    return out, {k: float(v) for k, v in metrics.items()}


def packed(members, steps):
    block = mo.build_block([load_config(m) for m in members])
    out = train_block(block, steps)[1]
    return block, out, [block.evaluate(i, steps)[0] for i in range(len(members))]


def test_members_start_from_their_solo_runs_initial_weights():
    """make_model draws each member as the single run did before the member dimension (issue 20): torch
    seeded with the run's seed, MLP(784, width, depth, 10)'s own initialisers, times alpha; a model of
    one member (a solo run) and each member of a block hold exactly those weights."""
    cfgs = [load_config(m) for m in configs(MEMBERS, ("model.width=24",))]
    block, standard, initial = mo.make_model(cfgs[0], members=cfgs)
    for i, cfg in enumerate(cfgs):
        torch.manual_seed(cfg.seed)
        mlp = MLP(784, 24, cfg.model.depth, 10)
        norm = float(mo.weight_norm(mlp))
        want = [p.detach() * cfg.model.init_scale for p in mlp.parameters()]  # net.0.weight, net.0.bias, ...
        torch.manual_seed(cfg.seed)
        single, (single_standard,), (single_initial,) = mo.make_model(cfg)
        for model, j in ((single, 0), (block, i)):
            got = [p for k in range(len(model.weights)) for p in (model.weights[k][j], model.biases[k][j])]
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert standard[i] == single_standard == norm
        assert initial[i] == single_initial == float(mo.weight_norm(single))


def test_a_member_is_a_view_and_its_artifact_model_holds_only_its_weights():
    block = mo.build_block([load_config(m) for m in configs(MEMBERS[:3], ("model.width=24",))])
    view, saved = block.views[1], block.member_model(1)
    for v, s, p in zip(view.parameters(), saved.parameters(), block.model.parameters()):
        assert v.data_ptr() == p[1].data_ptr()  # evaluation reads the current weights, no copy
        assert torch.equal(s, v) and s.untyped_storage().nbytes() == s.numel() * s.element_size()


def test_packed_losses_equal_solo_for_100_steps_in_float64():
    members = configs(MEMBERS, ("trainer.precision=64-true", "model.width=24"))
    block, losses, evals = packed(members, 100)
    assert all(p.dtype == torch.float64 for p in block.model.parameters())
    for i, m in enumerate(members):
        solo_losses, solo_eval = solo(m, 100)  # a plain PyTorch loop of the run
        assert rel(losses[:, i], solo_losses) < 1e-6
        assert rel(losses[:, i], packed([m], 100)[1][:, 0]) < 1e-6  # its block of one: its solo run
        for key in ("train/loss", "val/loss", "model/weight_norm"):
            assert rel(evals[i][key], solo_eval[key]) < 1e-6
        assert evals[i]["val/acc"] == solo_eval["val/acc"]
    assert losses[-1, 0] < 0.5 * losses[0, 0]  # they trained
    # the fixed-norm members kept their initial norm; the free ones moved off it
    for i in (1, 2):
        assert evals[i]["model/weight_norm"] == pytest.approx(block.target[i].item(), rel=1e-12)
    assert abs(evals[0]["model/weight_norm"] / block.target[0].item() - 1) > 1e-3


def test_packed_losses_within_1e_3_of_solo_for_1000_steps_in_float32():
    # Measured (784-16-10): 2e-7..1e-6 over the 1000 steps for these members. Member 1 with seed=1
    # instead of 3 jumps from 4e-7 to 4e-4 at step ~420 and reaches 1.4e-2: float32 rounding amplified
    # by training (a discrete event, e.g. a ReLU unit within rounding of zero, is the likely cause;
    # not traced). The same config in float64 stays within 3e-15 of solo over 1000 steps.
    members = configs(
        (MEMBERS[0], ("seed=3",) + MEMBERS[1][1:], MEMBERS[2]),
        ("trainer.precision=32-true", "model.width=16", "model.depth=1"),
    )
    _, losses, _ = packed(members, 1000)
    for i, m in enumerate(members):
        solo_losses, _ = solo(m, 1000)
        assert rel(losses[:, i], solo_losses) < 1e-3


# ---- through harness.training.train (Lightning) and harness.members.packed.train_packed ----------------------------

# 784-32-32-10 on 200 images, float32: alpha=1 passes train acc 0.99 and test acc 0.75 at ~100 steps,
# alpha=2 at wd 1.0 a little later, alpha=0.5 held at its norm stays below both.
SHORT = (
    "task=mnist_omnigrok",
    "data.n_train=200",
    "data.batch_size=50",
    "data.n_test=1000",
    "model.width=32",
    "trainer.precision=32-true",
    "trainer.steps=300",
    "trainer.eval_every=25",
    "trainer.log_every=50",
    "eval.val_threshold=0.75",
    "eval.max_delay=50",
    "trainer.progress_bar=false",
    "trainer.threads=1",
)
SHORT_MEMBERS = (
    ("seed=0", "model.init_scale=1.0"),
    ("seed=2", "model.init_scale=2.0", "optim.weight_decay=1.0"),
    ("seed=3", "model.init_scale=0.5", "optim.fixed_norm=true"),
)
EVENTS = ("grok/t_train99", "grok/t_val75", "grok/t_val99")


@pytest.fixture(scope="module")
def solo_and_packed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("packed_omnigrok"))
    with pytest.MonkeyPatch.context() as mp:  # the module-scoped fixture runs before the per-test one
        mp.setenv("WANDB_DIR", root)
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_SWEEP_PARAM_PATH", raising=False)
        mp.delenv("WANDB_RUN_ID", raising=False)
        members = configs(SHORT_MEMBERS, base=SHORT)
        solo_runs = [train(load_config(m), list(m)) for m in members]
        out = train_packed([Member(load_config(m), list(m)) for m in members])
    return root, solo_runs, out


def present(row, columns):
    return sorted(k for k in columns if k.startswith(("summary.", "config.")) and not pd.isna(row[k]))


def history(root, run_id):
    h = runstore.load_history(root, run_ids=[run_id])
    return h.dropna(axis=1, how="all")


def test_packed_events_within_one_evaluation_of_lightning_solo(solo_and_packed):
    _, solo_runs, out = solo_and_packed
    for s, p in zip(solo_runs, out):
        assert p.state == "finished"
        assert p.summary["grok/phase"] == s["grok/phase"]
        for event in EVENTS:
            assert p.summary[event + "/reached"] == s[event + "/reached"]
            assert abs(p.summary[event] - s[event]) <= 25
        assert p.summary["model/weight_norm"] == pytest.approx(s["model/weight_norm"], rel=1e-3)
    # the check can fail: events happen mid-run for two members, never for the third
    assert 0 < solo_runs[0]["grok/t_train99"] < 300 and 0 < solo_runs[1]["grok/t_val75"] < 300
    assert not solo_runs[2]["grok/t_train99/reached"]
    assert out[2].summary["model/weight_norm"] == pytest.approx(out[2].summary["model/init_norm"], rel=1e-5)


def test_packed_member_runs_hold_the_solo_runs_keys(solo_and_packed):
    root, solo_runs, out = solo_and_packed
    runs = runstore.load_runs(root).set_index("id")
    for s, p in zip(solo_runs, out):
        a, b = runs.loc[s["_run_id"]], runs.loc[p.run_id]
        assert a["state"] == b["state"] == "finished" and a["job_type"] == b["job_type"] == "train"
        assert present(b, runs.columns) == present(a, runs.columns)  # summary and config keys
        assert a["name"] == b["name"]
        for k in (
            "config.seed",
            "config.model.init_scale",
            "config.optim.fixed_norm",
            "config.data.split",
            "summary.model/params",
            "summary.model/init_norm",
            "summary.data/source",
        ):
            assert a[k] == b[k]
        assert b["config.data.split"] == "offline"  # data.split=auto resolved, as the solo build records it
        ha, hb = history(root, s["_run_id"]), history(root, p.run_id)
        assert sorted(ha.columns) == sorted(hb.columns)
        assert ha[STEP].tolist() == hb[STEP].tolist()
        assert runstore.artifact_files(root, p.run_id, "model")
        val = ha["val/loss"].notna()
        # float32, batched kernels: the first evaluations agree closely, the later ones within 1e-3
        assert rel(hb.loc[val, "val/loss"], ha.loc[val, "val/loss"]) < 1e-3


# ---- isolation -------------------------------------------------------------------------------------


def test_a_member_with_a_non_finite_loss_fails_alone(offline):
    members = configs(
        (("seed=0",), ("seed=1", "model.init_scale=1e25")),
        (
            "trainer.precision=32-true",
            "model.width=16",
            "trainer.steps=60",
            "trainer.eval_every=20",
            "model.save=false",
        ),
    )
    out = train_packed([Member(load_config(m), list(m)) for m in members])
    assert [m.state for m in out] == ["finished", "failed"]
    assert "not finite" in out[1].error and "step 0" in out[1].error
    root = str(offline / "wandb")
    runs = runstore.load_runs(root).set_index("id")
    assert runs.loc[out[0].run_id, "state"] == "finished" and runs.loc[out[1].run_id, "state"] == "failed"
    h = history(root, out[0].run_id)
    assert h.loc[h["val/loss"].notna(), STEP].tolist() == [0, 20, 40, 60]
    # the survivor trained as it would have alone
    _, _, alone = packed(members[:1], 60)
    assert rel(out[0].summary["val/loss"]["last"], alone[0]["val/loss"]) < 1e-5
