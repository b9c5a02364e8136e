"""Commands that start at once: `harness tasks`, `--cfg`, sweep validation and `harness runs` load
neither torch, Lightning nor transformers (each run as a real process, its sys.modules read at exit);
`harness sweep --dry-run` lists the runs and times the costliest point."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import TINY

HEAVY = ("torch", "lightning", "transformers")
# Runs the harness command given as argv and reports, at exit, which heavy modules were loaded.
PROBE = (
    "import atexit, sys\n"
    f"atexit.register(lambda: print('heavy:', *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr))\n"
    "from harness.cli import main\n"
    "main(sys.argv[1:])\n"
)
SWEEP = """method: grid
command:
  - ${env}
  - ${interpreter}
  - -m
  - harness
  - train
  - ${args_no_hyphens}
parameters:
  task: {value: sparse_parity}
  data.n_tasks: {value: 4}
  data.n: {value: 8}
  data.k: {value: 2}
  data.batch_size: {value: 256}
  eval.test_per_task: {value: 200}
  trainer.steps: {value: 40}
  trainer.eval_every: {value: 20}
  trainer.steps_per_batch: {value: 1}
  model.width: {values: [4, 16]}
  seed: {values: [0, 1, 2]}
"""


def harness(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=cwd, env=dict(os.environ)
    )


def heavy_modules(out: subprocess.CompletedProcess) -> list[str]:
    line = [s for s in out.stderr.splitlines() if s.startswith("heavy:")]
    assert line, out.stderr[-2000:]
    return line[-1].split()[1:]


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """A wandb directory holding one real tiny offline run."""
    root = tmp_path_factory.mktemp("one_run")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true"}
    subprocess.run(
        [sys.executable, "-m", "harness", "train", *TINY, "model.save=false"], env=env, check=True, capture_output=True
    )
    return root / "wandb"


def test_light_commands_load_no_torch(tmp_path, one_run):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP)
    commands = {
        "tasks": ["tasks"],
        **{
            f"--cfg {t}": ["train", f"task={t}", "--cfg"]
            for t in (
                "sparse_parity",
                "modular_addition",
                "mnist_omnigrok",
                "pythia_eval",
                "pythia_suite",
                "quanta_discovery",
            )
        },
        "sweep validation": ["sweep", str(sweep), "--local", "--no-run", "--wandb-dir", str(tmp_path / "w")],
        "runs": ["runs", str(one_run)],
    }
    for name, argv in commands.items():
        out = harness(*argv)
        assert out.returncode == 0, (name, out.stderr[-2000:])
        assert heavy_modules(out) == [], name
    # Bad input is refused before torch is loaded, with or without --cfg.
    for argv in (["model.width=0", "--cfg"], ["model.width=0"], ["model.widht=8"]):
        out = harness("train", "task=sparse_parity", *argv)
        assert out.returncode == 2 and heavy_modules(out) == [], (argv, out.stderr)


def test_the_probe_sees_torch_when_a_run_loads_it(tmp_path):
    os.environ["WANDB_DIR"] = str(tmp_path)
    tiny = [o for o in TINY if not o.startswith(("trainer.steps=", "trainer.eval_every="))]
    out = harness("train", *tiny, "trainer.steps=2", "trainer.eval_every=2", "model.save=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert {"torch", "lightning"} <= set(heavy_modules(out))


def test_lightning_names_passed_without_lightning_are_lightning_names():
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    from harness.config.run import KNOWN_ACCELERATORS, KNOWN_STRATEGIES

    assert set(KNOWN_ACCELERATORS) - {"auto", "gpu"} <= set(AcceleratorRegistry.available_accelerators())
    assert set(KNOWN_STRATEGIES) - {"auto"} <= set(StrategyRegistry.available_strategies())


def test_dry_run_lists_the_grid_and_estimates_the_wall_time(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "sweep",
            str(sweep),
            "--dry-run",
            "--estimate-steps",
            "10",
            "--workers",
            "2",
            "--pack",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "grid: 6 runs; varied keys: model.width, seed" in text
    runs = re.findall(r"^ +\d+  model\.width=(\d+) seed=(\d+)$", text, re.M)
    assert sorted(runs) == sorted((w, s) for w in ("4", "16") for s in ("0", "1", "2"))
    assert "costliest point, 10 steps: model.width=16" in text  # the widest model is timed
    unpacked = re.search(r"unpacked, --workers 2: \S+ \((\d+) s", text)
    packed = re.search(r"--pack 3, --workers 2: \S+ \((\d+) s; 2 blocks", text)
    assert unpacked and packed, text
    assert int(unpacked.group(1)) > 0 and int(packed.group(1)) > 0
    assert not os.path.exists(tmp_path / "wandb")  # no sweep, no run left behind


def test_dry_run_refuses_a_bad_sweep_in_one_line(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP.replace("model.width", "model.widht"))
    out = subprocess.run(
        [sys.executable, "-m", "harness", "sweep", str(sweep), "--dry-run"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "did you mean model.width" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
