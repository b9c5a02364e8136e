"""Issue 19 (6): nothing lost on resume. W&B computes a resumed run's summary aggregates (val/loss
min, val/acc max) from the part after the resume point only; the checkpoint carries the earlier
part's, so the resumed run's summary equals the uninterrupted run's. Tested end to end: modular
addition, SIGTERM after the first periodic checkpoint, a real resume, a best value that lies before
the checkpoint."""

import dataclasses
import os
import signal

import lightning as L
import pytest
from test_preemption import rows, run_files

from harness.config.run import load_config
from harness.runstore.decoder import read_run_file
from harness.training.checkpoint import Preempted, merge_summaries
from harness.training.train import train

CKPT = 100
ARGS = [
    "task=modular_addition",
    "data.p=23",
    "data.train_fraction=0.5",
    "model.init_scale=0.5",
    "trainer.steps=300",
    "trainer.eval_every=50",
    f"trainer.ckpt_every={CKPT}",
    "trainer.threads=1",
    "trainer.progress_bar=false",
    "model.save=false",
]


def sigterm_after(monkeypatch, step):
    """SIGTERM to this process once modular addition's training has passed `step` (after the
    checkpoint written there)."""
    import tasks.modular_addition as ma

    class Kill(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)

    build = ma.build
    monkeypatch.setattr(
        ma, "build", lambda cfg: dataclasses.replace(build(cfg), callbacks=[*build(cfg).callbacks, Kill()])
    )
    return lambda: monkeypatch.setattr(ma, "build", build)


def aggregates(summary):
    return {k: summary[k] for k in ("val/loss", "val/acc")}


def test_a_resumed_run_keeps_the_best_values_of_its_first_part(offline, monkeypatch):
    wandb_dir = str(offline / "wandb")
    ref = train(load_config(ARGS), ARGS)
    ref_hist = read_run_file(run_files(wandb_dir, ref["_run_id"])[0]).history
    loss, acc = rows(ref_hist, "val/loss"), rows(ref_hist, "val/acc")
    # The case the issue found: the best value lies before the resume point.
    assert min(loss, key=loss.get) < CKPT + 50, loss
    assert ref["val/loss"]["min"] == pytest.approx(min(loss.values()), rel=1e-6)

    restore = sigterm_after(monkeypatch, CKPT + 50)
    with pytest.raises(Preempted) as stop:
        train(load_config(ARGS), ARGS)
    restore()
    monkeypatch.setenv("WANDB_RUN_ID", stop.value.run_id)
    resumed = train(load_config(ARGS), ARGS)
    assert resumed["trainer/resumed_from_step"] == stop.value.step >= CKPT

    files = run_files(wandb_dir, stop.value.run_id)
    second = read_run_file(files[-1])
    after = rows(second.history, "val/loss")
    assert min(after.values()) > ref["val/loss"]["min"]  # W&B alone would report this part's min
    print("uninterrupted:", aggregates(ref), "resumed:", aggregates(resumed))
    for key in ("val/loss", "val/acc"):
        assert resumed[key] == pytest.approx(ref[key], rel=1e-6), key
        assert second.summary[key] == pytest.approx(ref[key], rel=1e-6), key  # what the run store reads
    assert max(acc.values()) == pytest.approx(resumed["val/acc"]["max"], rel=1e-6)


def test_merging_two_parts_of_a_run():
    before = {"val/loss": {"min": 1.0, "last": 3.0}, "val/acc": {"max": 0.9, "last": 0.2, "first": 0.0}}
    now = {"val/loss": {"min": 2.0, "last": 2.5}, "val/acc": {"max": 0.5, "last": 0.4, "first": 0.3}}
    assert merge_summaries(before, now) == {
        "val/loss": {"min": 1.0, "last": 2.5},
        "val/acc": {"max": 0.9, "last": 0.4, "first": 0.0},
    }
    assert merge_summaries({}, now) == now and merge_summaries(before, {}) == before
