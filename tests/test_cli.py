"""The `harness` command as a new user meets it: tasks, --cfg, did-you-mean, one-line errors, progress."""

import os

import pytest

from harness.cli import main
from harness.config.run import load_config
from harness.training.progress import enabled
from harness.training.train import train
from tests.conftest import TINY


def cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_tasks_are_listed(capsys):
    code, out, _ = cli(capsys, "tasks")
    names = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and {"sparse_parity", "modular_addition", "mnist_omnigrok", "pythia_eval"} <= set(names)


def test_cfg_prints_the_resolved_config_and_runs_nothing(capsys, tmp_path):
    code, out, _ = cli(capsys, "train", "--task=sparse_parity", "--model.width=4", "--cfg")
    assert code == 0
    assert "model.width: int = 4  (default 100)  # hidden units per layer" in out.splitlines()
    assert "trainer.steps: int = 25000  # optimizer steps (max_steps)" in out.splitlines()
    assert not os.path.exists(tmp_path / "wandb")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["model.widht=8"], "did you mean model.width?"),
        (["optim.beta1=2.0"], "optim.beta1=2.0: Adam's betas lie in [0, 1)"),
        (["optim.lr=nan"], "optim.lr=nan: must be a finite number"),
        (["trainer.precision=banana"], "trainer.precision='banana': valid values are"),
        (["trainer.steps=0"], "trainer.steps=0"),
        (["model.width=8", "model.width=16"], "given twice"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_any_run(capsys, tmp_path, argv, says):
    code, out, err = cli(capsys, "train", "task=sparse_parity", *argv)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "wandb")  # no run was created


def test_progress_bar_counts_optimizer_steps(capsys):
    # 10 optimizer steps per Lightning batch: Lightning's own bar would count 6 batches.
    cfg = load_config(
        [o for o in TINY if not o.startswith("trainer.progress_bar")]
        + ["trainer.progress_bar=true", "trainer.steps_per_batch=10"]
    )
    train(cfg, [])
    frames = capsys.readouterr().err.replace("\r", "\n").splitlines()
    bars = [f for f in frames if f.startswith("train:")]
    assert bars and "60/60" in bars[-1] and "100%" in bars[-1], frames[-5:]
    assert not any("/6 " in f or "/6[" in f for f in bars)


def test_progress_bar_default_is_on_for_a_terminal_and_off_under_a_sweep(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert enabled(None) is True
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")  # set by wandb agent and the local controller
    assert enabled(None) is False
    assert enabled(True) is True and enabled(False) is False  # an explicit setting wins
