"""One checkpoint format (issue 20): a packed member's resume point is its solo run's `last.ckpt`, for
every packable task. The member's checkpoint has the solo run's structure (model keys and shapes,
torch AdamW state, callback states, loops, step); a member resumes as a solo run through Lightning's own
resume, and a solo run's resume point resumes inside a block, each continuing its trajectory."""

import os

import pytest
import torch

from harness.config.run import load_config
from harness.members.packed import train_packed
from harness.members.runs import Member
from harness.training import checkpoint
from harness.training.train import train

COMMON = ("trainer.progress_bar=false", "trainer.threads=1", "trainer.steps=40", "trainer.eval_every=10")
COMMON += ("trainer.ckpt_every=20", "model.save=false")
TASKS = {
    # width packing: a strided output layer and flat hidden-to-hidden weights (depth 2)
    "sparse_parity": (
        ("task=sparse_parity", "data.n_tasks=8", "data.n=10", "data.k=2", "data.batch_size=64", "model.depth=2"),
        ("model.width=12", "optim.lr=0.01"),
        ("model.width=7", "optim.lr=0.003", "optim.weight_decay=0.1"),
    ),
    # stacked [M, ...] parameters against the solo run's [1, ...], with a fixed-norm rescale
    "mnist_omnigrok": (
        ("task=mnist_omnigrok", "data.n_train=200", "data.batch_size=50", "data.n_test=200"),
        ("seed=0",),
        ("seed=1", "model.init_scale=3.0", "optim.weight_decay=0.3", "optim.fixed_norm=true"),
    ),
    # PAIR's model, its members' own train sets
    "modular_addition": (
        ("task=modular_addition", "data.p=11", "model.embed_dim=16", "model.hidden=8"),
        ("seed=0", "data.train_fraction=0.8"),
        ("seed=1", "optim.lr=0.003", "data.train_fraction=0.6"),
    ),
}


def structure(ckpt: dict) -> dict:
    """What Lightning's resume relies on: model keys and shapes, the optimizer's groups (less their
    parameter indices) and per-parameter state shapes, the step and the loops."""
    opt = ckpt["optimizer_states"][0]
    return {
        "state_dict": {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()},
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
        "optimizer_state": {k: {n: tuple(t.shape) for n, t in s.items()} for k, s in opt["state"].items()},
        "global_step": ckpt["global_step"],
        "loops": ckpt["loops"],
    }


def last(run_id: str) -> dict:
    cfg = load_config(TASKS["modular_addition"][0] + COMMON)  # any config: the directory depends on WANDB_DIR
    return checkpoint.load(os.path.join(checkpoint.ckpt_dir(cfg, run_id), checkpoint.LAST), "test")


def unfinish(run_id: str) -> None:
    """As if the run had been killed after its step-20 checkpoint (its finished mark not yet written)."""
    cfg = load_config(TASKS["modular_addition"][0] + COMMON)
    os.remove(os.path.join(checkpoint.ckpt_dir(cfg, run_id), checkpoint.FINISHED))


@pytest.mark.parametrize("task", list(TASKS))
def test_a_members_last_ckpt_is_its_solo_runs_and_resumes_either_way(task, monkeypatch):
    base, *members = TASKS[task]
    overrides = [base + COMMON + m for m in members]
    block = train_packed([Member(load_config(o), list(o), f"m{i}") for i, o in enumerate(overrides)])
    assert [m.state for m in block] == ["finished", "finished"]
    monkeypatch.setenv("WANDB_RUN_ID", "solo1")
    solo = train(load_config(overrides[1]), list(overrides[1]))

    member, alone = last("m1"), last("solo1")
    assert member["global_step"] == alone["global_step"] == 20
    assert structure(member) == structure(alone)
    assert set(alone["callbacks"]) <= set(member["callbacks"])  # the solo run's callbacks find their states
    assert member["callbacks"]["StepCheckpoint"]["config"] == alone["callbacks"]["StepCheckpoint"]["config"]
    # the weights are member 1's, not member 0's (the two members differ in every weight)
    k = next(iter(member["state_dict"]))
    assert not torch.equal(member["state_dict"][k], last("m0")["state_dict"][k])

    # the member resumes as a solo run (Lightning's own resume), the solo run inside a block
    unfinish("m1")
    monkeypatch.setenv("WANDB_RUN_ID", "m1")
    resumed = train(load_config(overrides[1]), list(overrides[1]))
    monkeypatch.delenv("WANDB_RUN_ID")
    unfinish("solo1")
    (in_block,) = train_packed([Member(load_config(overrides[1]), list(overrides[1]), "solo1")])
    assert resumed["trainer/resumed_from_step"] == in_block.summary["trainer/resumed_from_step"] == 20
    # each continues its trajectory, up to the rounding of a block of two's shared matmuls against a block of one
    packed_last = block[1].summary["val/loss"]["last"]
    assert resumed["val/loss"]["last"] == pytest.approx(packed_last, rel=1e-4)
    assert in_block.summary["val/loss"]["last"] == pytest.approx(solo["val/loss"]["last"], rel=1e-4)


def test_a_block_resumed_from_its_members_last_ckpt_continues_bit_for_bit_and_blocks_of_two_steps():
    """A block resumed from its members' checkpoints (composed into one for Lightning's resume) ends
    exactly where the uninterrupted block ended; in one process, members at different steps (one
    resumed at step 20, one fresh) train as two blocks, one after the other."""
    base, *members = TASKS["modular_addition"]
    overrides = [base + COMMON + m for m in members]

    def block(ids, which=(0, 1)):
        return train_packed([Member(load_config(overrides[i]), list(overrides[i]), r) for i, r in zip(which, ids)])

    first = block(["b0", "b1"])
    unfinish("b0")
    unfinish("b1")
    again = block(["b0", "b1"])
    for a, b in zip(first, again):
        assert b.state == "finished" and b.summary["trainer/resumed_from_step"] == 20
        assert b.summary["val/loss"]["last"] == a.summary["val/loss"]["last"]  # bit for bit
        assert b.summary["val/loss"]["min"] == a.summary["val/loss"]["min"]  # the whole run's best
    unfinish("b1")
    mixed = block(["b1", "fresh"], which=(1, 0))
    assert [m.state for m in mixed] == ["finished", "finished"]
    assert mixed[0].summary["trainer/resumed_from_step"] == 20 and "trainer/resumed_from_step" not in mixed[1].summary
    # b1 now trained from step 20 as a block of one: the same trajectory up to the fused AdamW's rounding
    assert mixed[0].summary["val/loss"]["last"] == pytest.approx(first[1].summary["val/loss"]["last"], rel=1e-4)
    assert mixed[1].summary["val/loss"]["last"] == first[0].summary["val/loss"]["last"]  # fresh: as b0 alone
    assert sorted(os.listdir(os.path.dirname(checkpoint.ckpt_dir(load_config(overrides[0]), "b1")))) == [
        "b0",
        "b1",
        "fresh",
    ]
    for run_id in ("b0", "b1", "fresh"):  # no scratch file left beside a member's resume point
        d = checkpoint.ckpt_dir(load_config(overrides[0]), run_id)
        assert sorted(os.listdir(d)) == ["finished.json", "last.ckpt"]


def _old_shape(task: str, key: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor as a resume point written before issue 20 held it."""
    if task == "mnist_omnigrok":  # no member dimension
        return t.squeeze(0)
    if key.endswith("net.2.weight"):  # sparse parity depth 2: the hidden-to-hidden weight [w, w]
        w = int(round(t.numel() ** 0.5))
        return t.view(w, w)
    return t


@pytest.mark.parametrize("task", ["mnist_omnigrok", "sparse_parity"])
def test_a_resume_point_written_before_issue_20_still_resumes(task, monkeypatch):
    base, member, _ = TASKS[task]
    overrides = base + COMMON + member
    monkeypatch.setenv("WANDB_RUN_ID", "old1")
    train(load_config(overrides), list(overrides))
    path = os.path.join(checkpoint.ckpt_dir(load_config(overrides), "old1"), checkpoint.LAST)
    ckpt = checkpoint.load(path, "test")
    unfinish("old1")
    resumed = train(load_config(overrides), list(overrides))  # from the step-20 resume point as written
    keys = list(ckpt["state_dict"])
    changed = 0
    for k, key in enumerate(keys):
        old = _old_shape(task, key, ckpt["state_dict"][key])
        changed += old.shape != ckpt["state_dict"][key].shape
        ckpt["state_dict"][key] = old
        for name in ("exp_avg", "exp_avg_sq"):
            state = ckpt["optimizer_states"][0]["state"][k]
            state[name] = _old_shape(task, key, state[name])
    assert changed  # the file now has the old shapes
    torch.save(ckpt, path)
    unfinish("old1")
    again = train(load_config(overrides), list(overrides))
    assert again["trainer/resumed_from_step"] == 20
    assert again["val/loss"]["last"] == resumed["val/loss"]["last"]  # as the same resume point in today's shapes


def test_a_sigterm_outside_fit_preempts_the_blocks_not_started_and_lets_finished_members_finish(monkeypatch):
    """SIGTERM while a block's members finish (here: right after the first block's member is marked
    finished) is too late for that block, whose member finishes (exit 0); the next block (members at
    another step) is not started: its member ends preempted (exit 143) and the process lives on."""
    import signal

    base, *members = TASKS["modular_addition"]
    overrides = [base + COMMON + m for m in members]
    train_packed([Member(load_config(overrides[0]), list(overrides[0]), "t0")])
    unfinish("t0")  # t0 resumes at step 20: a block of its own, trained before the fresh member's
    mark = checkpoint.mark_finished

    def mark_then_sigterm(*args):
        mark(*args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint, "mark_finished", mark_then_sigterm)
    out = train_packed([Member(load_config(o), list(o), r) for o, r in zip(overrides, ["t0", "t1"])])
    assert [(m.state, m.run_id) for m in out] == [("finished", "t0"), ("preempted", "t1")]
    assert out[0].summary["trainer/resumed_from_step"] == 20
