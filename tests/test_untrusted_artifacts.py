"""Issue 18 (1): model artifacts and resume points are bytes from elsewhere (a W&B download, a
shared directory). Loading one must never run code: a planted object whose __reduce__ would write a
marker file is refused with one line (exit 2) and the marker never appears."""

import glob
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY, harness

from harness import runstore
from harness.config.run import load_config
from harness.training import checkpoint
from harness.training.train import train

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this calls os.system (what the issue's probe ran): it touches `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, marker, shape: dict):
    """A torch file shaped like the real one (`shape`), with the payload inside."""
    torch.save({**shape, "payload": _Payload(marker)}, path)
    assert not os.path.exists(marker)


def one_line_refusal(proc, path):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("harness: error: ") and "refused" in lines[-1] and str(path) in lines[-1], lines[-3:]
    assert not any(line.startswith("Traceback") for line in lines), proc.stderr[-2000:]


def test_a_planted_model_artifact_is_refused_and_runs_nothing(offline):
    args = [a for a in TINY if not a.startswith("trainer.steps=")] + ["trainer.steps=20"]
    s = train(load_config(args), args)
    root = str(offline / "wandb")
    model_pt = runstore.artifact_files(root, s["_run_id"], "model")["model.ckpt"]
    real = torch.load(model_pt, weights_only=True)  # the harness's own file loads weights-only
    assert {"state_dict", "config", "global_step"} <= set(real)
    marker = offline / "PWNED-model"
    plant(model_pt, marker, real)

    proc = harness(
        "train",
        "task=quanta_discovery",
        "model.source=artifact",
        f"model.artifact={s['_run_id']}",
        f"model.artifact_source={root}",
        "samples.n=20",
        "cluster.counts=[3,5]",
        "trainer.progress_bar=false",
        check=False,
    )
    one_line_refusal(proc, model_pt)
    assert "model.artifact=" in proc.stderr
    assert not marker.exists()


def test_a_planted_resume_point_is_refused_before_any_run_is_made(offline):
    directory = offline / "wandb" / "checkpoints" / "evil1"
    directory.mkdir(parents=True)
    marker = offline / "PWNED-ckpt"
    plant(directory / "last.ckpt", marker, {"global_step": 20, "state_dict": {}})

    proc = harness("train", *TINY, env={"WANDB_RUN_ID": "evil1"}, check=False)
    one_line_refusal(proc, directory / "last.ckpt")
    assert not marker.exists()
    assert glob.glob(str(offline / "wandb" / "*run-*evil1*")) == []  # no W&B run was created


def test_a_planted_packed_resume_point_is_never_read(offline):
    """A packed member's resume point is its last.ckpt since issue 20; a packed.pt (an older harness's, or
    planted) is not read: its run id is refused in one line (exit 2), nothing runs, no W&B run is made."""
    directory = offline / "wandb" / "checkpoints" / "evil2"
    directory.mkdir(parents=True)
    marker = offline / "PWNED-packed"
    plant(directory / "packed.pt", marker, {"step": 10, "params": [torch.zeros(2)]})
    proc = harness("train", *TINY, env={"WANDB_RUN_ID": "evil2"}, check=False)
    assert proc.returncode == 2 and not marker.exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("harness: error: ") and str(directory / "packed.pt") in last and "resume=never" in last
    assert glob.glob(str(offline / "wandb" / "*run-*evil2*")) == []


def test_a_file_that_is_not_a_torch_file_is_one_line(offline):
    path = offline / "model.pt"
    path.write_text("not a torch file\n")
    with pytest.raises(checkpoint.UnreadableFile, match="not a readable torch file") as e:
        checkpoint.load(str(path), "model.artifact='x':")
    assert "\n" not in str(e.value)


# Every way to turn bytes into code: none may remain outside checkpoint.load (weights_only=True).
UNSAFE = re.compile(
    r"weights_only\s*=\s*False|\bpickle\.loads?\(|\byaml\.(unsafe_)?load\((?![^)]*Loader=yaml\.BaseLoader\))|yaml\.Loader|"
    r"\bdill\b|\bmarshal\.loads?\(|allow_pickle\s*=\s*True|read_pickle\(|(?<![\w.])(eval|exec)\("
)


# Lightning's save_checkpoint(..., weights_only=False) writes a whole resume point (optimizer, loops): a
# write, not a load, so it is not a site (reading one back goes through checkpoint.load).
SAVE = re.compile(r"\.save_checkpoint\([^)]*\)")


def unsafe(code: str, filename: str = "") -> bool:
    code = SAVE.sub("", code)
    return bool(UNSAFE.search(code)) or ("torch.load(" in code and filename != "checkpoint.py")


def unsafe_sites() -> list[str]:
    sites = []
    for folder in ("harness", "tasks", "analysis"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if unsafe(line.split("#", 1)[0], path.name):
                    sites.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    return sites


def test_no_unsafe_load_site_is_left():
    assert unsafe_sites() == []
    # The one home: checkpoint.load reads weights-only.
    source = (REPO / "harness" / "training" / "checkpoint.py").read_text()
    assert source.count("torch.load(") == 1 and "weights_only=True" in source


def test_the_site_scanner_finds_what_it_looks_for(tmp_path):
    bad_ones = ("torch.load(p, weights_only=False)", "pickle.load(f)", "yaml.load(f)", "eval(s)", "exec(code)")
    bad_ones += ("trainer.save_checkpoint(p); torch.load(p, weights_only=False)", "load(p, weights_only=False)")
    for bad in bad_ones:
        assert unsafe(bad), bad
    fine_ones = ("model.eval()", "yaml.safe_load(f)", "yaml.load(t, Loader=yaml.BaseLoader)", "trainer.validate(x)")
    fine_ones += ("trainer.save_checkpoint(tmp, weights_only=False)",)
    for fine in fine_ones:
        assert not unsafe(fine), fine
