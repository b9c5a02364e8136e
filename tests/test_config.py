import pytest

from harness.config import ConfigError, check_overrides, load_config, valid_keys
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
