"""Every value a run would reject is rejected up front, in one line, exit 2 (issue 18, points 5, 8
and 9): seeds outside [0, 2**32), lengths and characters W&B refuses, overrides read by their key's
type (never as YAML again, never a YAML tag), one bad member of a packed block failing alone, and
the sweep controller's edges: a SIGKILLed block's log, run names in a block, a full disk while a
sweep is created, a leftover HARNESS_SWEEP_VARIED, QDG's bound on its n x n matrix."""

import errno
import json
import os
import threading
import time

import pytest
import yaml

from harness.cli import main
from harness.config import limits
from harness.config.run import check_overrides, load_config
from harness.errors import ConfigError
from harness.sweep import state as sweep_state
from harness.sweep.local import create_local_sweep
from harness.sweep.packed_agent import PackedAgent
from harness.sweep.spec import load_sweep_yaml, validate_sweep
from harness.training import tracking
from tests.conftest import write_sweep

MODADD = {
    "task": "{value: modular_addition}",
    "data.p": "{value: 11}",
    "model.embed_dim": "{value: 16}",
    "model.hidden": "{value: 8}",
    "trainer.eval_every": "{value: 20}",
    "trainer.progress_bar": "{value: false}",
    "trainer.steps": "{value: 40}",
    "model.save": "{value: false}",
}


def cli(capsys, *argv) -> tuple[int, str, str]:
    """The `harness` entry point in this process: an exception other than a one-line error would
    escape here as a traceback, not as SystemExit."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def refused(capsys, tmp_path, *argv) -> str:
    """Exit 2, one line on stderr, and no run or sweep directory made."""
    code, _, err = cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "wandb"), os.listdir(tmp_path / "wandb")
    return err


# -- 5. seeds -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-5", str(2**32), str(10**23), "10**23"])
def test_a_seed_outside_uint32_is_refused_by_cfg_and_by_train(capsys, tmp_path, seed):
    for extra in (["--cfg"], []):
        err = refused(capsys, tmp_path, "train", "task=sparse_parity", f"seed={seed}", *extra)
        assert "seed" in err and seed in err
        if seed != "10**23":  # that one is not an integer at all
            assert "seeds lie in [0, 2**32) = [0, 4294967295]" in err
    assert load_config(["task=sparse_parity", f"seed={2**32 - 1}"]).seed == 2**32 - 1  # the bounds are valid
    assert load_config(["task=sparse_parity", "seed=0"]).seed == 0


def test_task_seeds_keep_their_minus_one_and_nothing_else_below_zero():
    assert load_config(["task=sparse_parity", "data.task_seed=-1"]).data.task_seed == -1  # "the run's seed"
    with pytest.raises(ConfigError, match=r"data.task_seed=-2: seeds lie in .* \(or -1: derived from the run's seed\)"):
        load_config(["task=sparse_parity", "data.task_seed=-2"])
    with pytest.raises(ConfigError, match=r"trainer.steps=10000000000000000000000: integers must fit in 64 bits"):
        load_config(["task=sparse_parity", f"trainer.steps={10**22}"])


def test_a_sweep_with_a_bad_seed_is_refused_with_and_without_pack(capsys, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", {**MODADD, "seed": "{values: [-1, 0]}"})
    for extra in ([], ["--pack", "2"], ["--no-run"]):
        err = refused(capsys, tmp_path, "sweep", path, "--local", *extra)
        assert "seed=-1: seeds lie in [0, 2**32)" in err
    ranged = write_sweep(
        tmp_path / "r.yaml", {**MODADD, "seed": "{min: -5, max: 5}"}, method="random", extra="run_cap: 2\n"
    )
    assert "seed=-5" in refused(capsys, tmp_path, "sweep", ranged, "--local", "--pack", "2")


def test_one_bad_member_fails_alone_not_its_whole_packed_block(tmp_path, capsys):
    """A sweep created before a check existed (or its sweep.yaml edited): the bad point fails alone,
    exit 2 with its one line in its log, and the block's other points train."""
    sweep_id = create_local_sweep(write_sweep(tmp_path / "s.yaml", {**MODADD, "seed": "{values: [0, 1, 2]}"}), "wandb")
    spec = tmp_path / "wandb" / f"sweep-{sweep_id}" / "sweep.yaml"
    cfg = yaml.safe_load(spec.read_text())
    cfg["parameters"]["seed"] = {"values": [0, -1, 1]}
    spec.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code = PackedAgent(sweep_id, "wandb", workers=1, count=None, pack=3).run()
    runs = {r["params"]["seed"]: r for r in json.load(open(spec.parent / "state.json"))["runs"]}
    assert code == 1 and sorted(runs) == [-1, 0, 1]
    assert (runs[-1]["state"], runs[-1]["exitcode"]) == ("failed", 2)  # before: all three failed, exit 2
    assert runs[0]["state"] == runs[1]["state"] == "finished"
    log = (spec.parent / f"{runs[-1]['id']}.log").read_text()
    assert (
        log.strip()
        == "harness: error: seed=-1: seeds lie in [0, 2**32) = [0, 4294967295] (Lightning's seed_everything)"
    )
    assert f"{runs[-1]['id']}.log" in capsys.readouterr().err


# -- 5. what wandb would refuse --------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, says",
    [
        (
            "wandb.tags=[ok, " + "t" * 65 + "]",
            "wandb.tags[1]='tttttttttttttttttttt...tttttttttt' has 65 characters: W&B tags have 1 to 64",
        ),
        ("wandb.tags=[a, '']", "wandb.tags[1]='' has 0 characters"),
        ("wandb.project=" + "p" * 129, "has 129 characters: W&B takes 1 to 128"),
        (
            "wandb.project=lab/quanta",
            "wandb.project='lab/quanta': W&B project names cannot contain / \\ # ? % : (found /)",
        ),
        ("wandb.mode=offlne", "wandb.mode='offlne': valid values are online, offline, disabled"),
    ],
)
def test_values_wandb_would_refuse_at_run_time_are_refused_up_front(capsys, tmp_path, override, says):
    for extra in (["--cfg"], []):
        assert says in refused(capsys, tmp_path, "train", "task=sparse_parity", override, *extra)


def test_sweep_validation_refuses_what_wandb_would(tmp_path):
    for key, value in (("wandb.tags", "{value: [%s]}" % ("t" * 65)), ("wandb.project", "{value: %s}" % ("p" * 200))):
        path = write_sweep(tmp_path / "s.yaml", {**MODADD, key: value})
        with pytest.raises(Exception, match="W&B (tags have 1 to 64|takes 1 to 128)") as e:
            validate_sweep(load_sweep_yaml(path), path)
        assert "\n" not in str(e.value)


def test_the_limits_are_the_installed_wandb_and_lightnings_own():
    """limits.py copies the numbers (importing wandb and Lightning costs seconds at every start);
    here each is checked against the library's own validator, at and beyond each boundary."""
    from lightning.fabric.utilities.seed import max_seed_value, min_seed_value, seed_everything
    from wandb.sdk.wandb_settings import Settings

    assert (limits.SEED_MIN, limits.SEED_MAX) == (min_seed_value, max_seed_value)
    for seed in (limits.SEED_MIN - 1, limits.SEED_MAX + 1):
        with pytest.raises(ValueError):
            seed_everything(seed, verbose=False)

    def wandb_takes(**settings) -> bool:
        try:
            Settings(**settings)
            return True
        except Exception:  # noqa: BLE001 - pydantic's ValidationError or wandb's UsageError
            return False

    def we_take(override: str) -> bool:
        try:
            load_config(["task=sparse_parity", override])
            return True
        except ConfigError:
            return False

    for n in (1, limits.TAG_MAX, limits.TAG_MAX + 1):
        assert wandb_takes(run_tags=("t" * n,)) == we_take(f"wandb.tags=[{'t' * n}]") == (n <= 64)
    for n in (limits.PROJECT_MAX, limits.PROJECT_MAX + 1):
        assert wandb_takes(project="p" * n) == we_take(f"wandb.project={'p' * n}") == (n <= 128)
    for c in limits.PROJECT_BAD_CHARS:
        assert not wandb_takes(project=f"a{c}b") and not we_take(f"wandb.project=a{c}b")
    assert wandb_takes(run_name="n" * 5000, run_group="g" * 5000)  # no limit on names and groups to copy


# -- 8. overrides read by their key's type ---------------------------------------------------------


def test_string_overrides_stay_as_written_and_typed_keys_still_parse():
    cfg = load_config(
        [
            "task=sparse_parity",
            "wandb.name=run #3",
            "wandb.group=yes",
            "wandb.tags=[on, off, 1, null]",
            "wandb.entity=${oc.env:HOME}",
        ]
    )
    assert cfg.wandb.name == "run #3" and cfg.wandb.group == "yes"  # before: "run", True
    assert cfg.wandb.tags == ["on", "off", "1", "null"]  # before: True, False, ...
    assert cfg.wandb.entity == "${oc.env:HOME}"  # text, not OmegaConf's resolver reading the environment
    cfg = load_config(
        [
            "task=sparse_parity",
            "model.width=64",
            "optim.lr=3e-4",
            "trainer.progress_bar=false",
            "wandb.group=null",
            "data.zipf_alpha=1",
        ]
    )
    assert cfg.model.width == 64 and cfg.optim.lr == 3e-4 and cfg.trainer.progress_bar is False
    assert cfg.wandb.group is None and cfg.data.zipf_alpha == 1.0
    # Sweep values are rendered as wandb's agent renders them and read the same way.
    check_overrides("sparse_parity", {"wandb.name": "run #3", "wandb.group": "yes", "wandb.tags": ["on", "off"]})


@pytest.mark.parametrize(
    "override",
    [
        'wandb.name=!!python/object/apply:os.system ["touch PWNED"]',
        'model.width=!!python/object/apply:os.system ["touch PWNED"]',
        'wandb.tags=!!python/object/apply:os.system ["touch PWNED"]',
        "wandb.group=!custom x",
    ],
)
def test_a_yaml_tag_is_one_line_exit_2_never_constructed(capsys, tmp_path, override):
    err = refused(capsys, tmp_path, "train", "task=sparse_parity", override, "--cfg")
    key = override.split("=", 1)[0]
    assert f"{key}='!" in err and "a value starting with '!' is a YAML tag" in err  # before: a yaml traceback
    assert not os.path.exists(tmp_path / "PWNED")


# -- 9. the controller's edges ---------------------------------------------------------------------


def test_run_names_do_not_split_a_packed_block(tmp_path):
    params = {**MODADD, "wandb.name": "{values: [first, second, third]}"}
    sweep_id = create_local_sweep(write_sweep(tmp_path / "s.yaml", params), "wandb")
    block = PackedAgent(sweep_id, "wandb", workers=1, count=None, pack=3).claim_block()
    assert sorted(run["params"]["wandb.name"] for run, _, _ in block) == ["first", "second", "third"]  # before: 1


def test_a_sigkilled_packed_process_names_the_block_log(tmp_path, capsys):
    sweep_id = create_local_sweep(write_sweep(tmp_path / "s.yaml", {**MODADD, "seed": "{values: [0, 1]}"}), "wandb")
    agent = PackedAgent(sweep_id, "wandb", workers=1, count=None, pack=2)

    def kill_the_block():
        deadline = time.time() + 300
        while time.time() < deadline:
            with agent.procs_lock:
                procs = list(agent.procs.values())
            if procs:
                procs[0].kill()  # SIGKILL: no results file, every member recorded by the exit code
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_block, daemon=True)
    killer.start()
    code = agent.run()
    killer.join()
    err = capsys.readouterr().err
    runs = json.load(open(os.path.join(agent.path, "state.json")))["runs"]
    tag = runs[0]["id"]  # a block is named by its first member
    assert code == 1 and [r["state"] for r in runs] == ["crashed", "crashed"]
    for r in runs:
        assert f"run {r['id']} FAILED (exit -9; log {agent.path}/pack-{tag}.log)" in err  # before: <id>.log
    assert os.path.exists(os.path.join(agent.path, f"pack-{tag}.log"))


@pytest.mark.parametrize("fills", ["sweep.yaml", "state.json"])
def test_a_full_disk_while_a_sweep_is_created_leaves_no_sweep_directory(capsys, tmp_path, monkeypatch, fills):
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):  # the write fails as on a full file system: ENOSPC
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and os.path.basename(path).startswith(fills):
            real_write = f.write

            def write(data):
                real_write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            f.write = write
        return f

    monkeypatch.setattr(sweep_state, "open", full_disk, raising=False)
    path = write_sweep(tmp_path / "s.yaml", {**MODADD, "seed": "{values: [0]}"})
    code, _, err = cli(capsys, "sweep", path, "--local", "--no-run")
    assert code == 2 and len(err.strip().splitlines()) == 1, err  # before: a traceback
    assert "cannot create the sweep in" in err and "No space left on device" in err
    assert os.listdir(tmp_path / "wandb") == []  # before: an empty sweep-<id>/ stayed


def test_a_leftover_sweep_varied_variable_does_not_rename_plain_runs(tmp_path, monkeypatch):
    overrides = ["task=sparse_parity", "seed=3"]
    cfg = load_config(overrides)
    monkeypatch.setenv(tracking.VARIED_ENV, "model.width,optim.lr")  # left in the shell by an earlier sweep
    assert tracking.default_name(cfg, overrides) == "sparse_parity[seed=3]"  # before: [width=100,lr=...]
    params = tmp_path / "config-abc.yaml"  # a run the controller started: it sets both variables
    params.write_text("model.width: {value: 100}\noptim.lr: {value: 0.001}\n")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    assert tracking.default_name(cfg, overrides) == f"sparse_parity[width={cfg.model.width},lr={cfg.optim.lr}]"


# -- 9. QDG's n x n similarity ----------------------------------------------------------------------


def test_qdg_refuses_a_similarity_matrix_above_its_bound_unless_asked(monkeypatch):
    from harness.training.train import train
    from tasks import qdg_core as core
    from tests.test_quanta import PARITY

    with pytest.raises(ConfigError) as e:
        load_config(["task=quanta_discovery", "samples.n=20000"])
    assert str(e.value) == (
        "samples.n=20000: 20000 samples > samples.max_n=10000; the 20000 x 20000 similarity and "
        "spectral clustering's copies of it take ~7.5 GiB (20 n^2 bytes); lower samples.n or raise "
        "samples.max_n to 20000 to ask for it"
    )
    assert load_config(["task=quanta_discovery", "samples.n=20000", "samples.max_n=20000"]).samples.n == 20000
    # samples.n=0 (every sample that passes): counted once the model is evaluated, before any gradient.
    calls = []
    monkeypatch.setattr(core, "exact_similarity", lambda *a, **k: calls.append(1))
    args = [
        "task=quanta_discovery",
        "model.source=train",
        "trainer.steps=20",
        "trainer.eval_every=20",
        "trainer.progress_bar=false",
        "trainer.threads=1",
        *PARITY,
        "samples.n=0",
        "samples.max_loss=100",
        "samples.max_n=50",
        "cluster.counts=[4]",
    ]
    with pytest.raises(ConfigError) as e:
        train(load_config(args), args)
    assert str(e.value).startswith("samples.n=0 chose every sample that passes: 800 samples > samples.max_n=50; ")
    assert "\n" not in str(e.value) and not calls
