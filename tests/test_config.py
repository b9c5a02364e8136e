import pytest

from harness.config.run import check_overrides, load_config, valid_keys
from harness.errors import ConfigError
from tasks.sparse_parity import Config


def test_overrides_are_typed_and_nested():
    cfg = load_config(["task=sparse_parity", "model.width=64", "optim.lr=3.0e-4", "data.zipf_alpha=0.4"])
    assert cfg.model.width == 64 and isinstance(cfg.model.width, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.n_tasks == 100 and cfg.data.k == 3  # the paper's code defaults


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(["task=sparse_parity", "model.widht=64"])
    msg = str(e.value)
    assert "model.widht" in msg and "model.width" in msg and "\n" not in msg


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as e:
        load_config(["task=sparse_parity", "model.width=wide"])
    assert "model.width" in str(e.value) and "wide" in str(e.value)


def test_k_larger_than_n_is_refused():
    with pytest.raises(ConfigError, match=r"data.k=9 > data.n=8"):
        load_config(["task=sparse_parity", "data.n=8", "data.k=9"])


def test_missing_and_unknown_task():
    with pytest.raises(ConfigError, match="no task given"):
        load_config(["model.width=3"])
    with pytest.raises(ConfigError, match="unknown task 'nope'.*sparse_parity"):
        load_config(["task=nope"])


def test_check_overrides_uses_the_argv_rendering():
    check_overrides("sparse_parity", {"optim.lr": 0.001, "model.width": 10})
    with pytest.raises(ConfigError, match="model.depthh"):
        check_overrides("sparse_parity", {"model.depthh": 2})


def test_valid_keys_are_dotted_leaves():
    keys = valid_keys(Config)
    assert "model.width" in keys and "trainer.steps" in keys and "data.zipf_alpha" in keys
    assert "model" not in keys


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.beta1=2.0", "optim.beta1=2.0"),
        ("optim.lr=nan", "optim.lr=nan"),
        ("optim.lr=0", "optim.lr=0"),
        ("trainer.precision=banana", "trainer.precision='banana'"),
        ("trainer.steps=0", "trainer.steps=0"),
        ("data.zipf_alpha=inf", "data.zipf_alpha=inf"),
        ("trainer.accelerator=gpuu", "trainer.accelerator='gpuu'"),
        ("trainer.strategy=dpp", "trainer.strategy='dpp'"),
        ("optim.weight_decay=-1.0", "optim.weight_decay=-1.0"),
    ],
)
def test_values_that_pass_the_type_check_but_are_invalid_are_one_line_errors(override, named):
    with pytest.raises(ConfigError) as e:
        load_config(["task=sparse_parity", override])
    assert named in str(e.value) and "\n" not in str(e.value)


def test_precision_lists_the_valid_ones_and_eval_tasks_keep_zero_steps():
    with pytest.raises(ConfigError, match="bf16-mixed"):
        load_config(["task=sparse_parity", "trainer.precision=banana"])
    assert load_config(["task=sparse_parity", "trainer.precision=64-true"]).trainer.precision == "64-true"
    assert load_config(["task=pythia_eval"]).trainer.steps == 0  # evaluation only: no optimizer steps


def test_a_key_given_twice_is_refused_not_silently_the_last():
    with pytest.raises(ConfigError, match=r"'model.width' given twice \(model.width=8 and model.width=16\)"):
        load_config(["task=sparse_parity", "model.width=8", "model.width=16"])


def test_hyphenated_overrides_from_wandb_agent_args_are_read_as_key_value():
    cfg = load_config(["--task=sparse_parity", "--model.width=4", "--optim.lr=0.01"])
    assert cfg.model.width == 4 and cfg.optim.lr == 0.01


def test_unknown_key_suggests_the_nearest_keys():
    for typo, meant in [
        ("model.widht", "model.width"),
        ("widht", "model.width"),
        ("optim.lrr", "optim.lr"),
        ("trainer.step", "trainer.steps"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(["task=sparse_parity", f"{typo}=3"])
        assert f"did you mean {meant}" in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="did you mean sparse_parity"):
        load_config(["task=sparse_parit"])


def test_tasks_come_from_the_entry_point_registry():
    from importlib.metadata import entry_points

    from harness.config.registry import tasks

    registered = {ep.name: ep.value for ep in entry_points(group="harness.tasks")}
    assert {n: ep.value for n, ep in tasks().items()} == registered
    assert {"sparse_parity", "modular_addition", "mnist_omnigrok", "pythia_eval", "pythia_suite"} <= set(registered)


def test_describe_shows_values_defaults_types_and_comments():
    from harness.config.run import describe

    text = describe(load_config(["task=sparse_parity", "model.width=64"])).splitlines()
    line = next(l for l in text if l.startswith("model.width:"))
    assert line == "model.width: int = 64  (default 100)  # hidden units per layer"
    assert "data.n_tasks: int = 100  # number of subtasks (control bits)" in text
    # A comment block above a field counts as its comment; inherited fields come with theirs.
    assert any(l.startswith("data.zipf_alpha: float = 0.4  # The paper's alpha") for l in text)
    assert any(l.startswith("trainer.steps: int = 25000  # optimizer steps") for l in text)
    assert len(text) == len(valid_keys(Config)) + 1  # one line per key, plus the header
