"""Values Lightning or wandb would refuse when the run starts, refused when the config is loaded.

`harness train`, `harness train ... --cfg`, sweep validation and a packed block's members all load
their configs through harness.config.run, which calls `check_limits`: a seed of -5 or 2**32, a
65-character tag or a 129-character project is one line before any run or sweep exists, not a
Lightning or wandb error at run time (or one member failing a whole packed block).

The limits are copied here, not imported, so that loading a config stays free of Lightning and
wandb (imports of seconds; `--cfg` and sweep validation must start at once). Each names its source;
tests/test_up_front_checks.py checks every one against the installed library's own validator.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from harness.errors import ConfigError
from harness.wandb_mode import MODES

# lightning/fabric/utilities/seed.py: `min_seed_value = 0`, `max_seed_value = 4294967295` (uint32);
# seed_everything raises ValueError outside them (numpy's legacy seeding takes a uint32).
SEED_MIN, SEED_MAX = 0, 2**32 - 1
# A task seed whose default is -1 means "derive it from the run's seed" (sparse_parity's
# data.task_seed, modular_addition's data.split_seed): -1 stays valid for those.
SEED_SENTINEL = -1
# Integers go into torch tensors, numpy arrays and wandb's history as int64.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
# wandb/sdk/wandb_settings.py, Settings.validate_project: at most 128 characters, none of /\#?%:
PROJECT_MAX = 128
PROJECT_BAD_CHARS = "/\\#?%:"
# wandb/sdk/wandb_settings.py, Settings.validate_run_tags: each tag 1 to 64 characters.
TAG_MIN, TAG_MAX = 1, 64
# Run name, group and entity: the wandb package sets no length limit (no validator in Settings for
# run_name, run_group or entity, and wandb.init passes them on as they are), so none is set here.


def check_limits(cfg: Any) -> None:
    """Raise ConfigError (one line) for the first value Lightning or wandb would refuse at run time."""
    _check_ints(cfg, "")
    w = cfg.wandb  # a RunConfig's: every caller passes one
    if w.mode is not None and w.mode not in MODES:  # wandb.init's `mode`; harness.wandb_mode would refuse it later
        raise ConfigError(
            f"wandb.mode={w.mode!r}: valid values are {', '.join(MODES)} (or null: WANDB_MODE, "
            "else online with W&B credentials)"
        )
    if len(w.project) > PROJECT_MAX or not w.project:
        raise ConfigError(
            f"wandb.project={_short(w.project)} has {len(w.project)} characters: W&B takes 1 to {PROJECT_MAX}"
        )
    bad = sorted({c for c in w.project if c in PROJECT_BAD_CHARS})
    if bad:
        raise ConfigError(
            f"wandb.project={_short(w.project)}: W&B project names cannot contain "
            f"{' '.join(PROJECT_BAD_CHARS)} (found {' '.join(bad)})"
        )
    for i, tag in enumerate(w.tags):
        if not TAG_MIN <= len(tag) <= TAG_MAX:
            raise ConfigError(
                f"wandb.tags[{i}]={_short(tag)} has {len(tag)} characters: W&B tags have {TAG_MIN} to {TAG_MAX}"
            )


def _check_ints(cfg: Any, prefix: str) -> None:
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_ints(value, key + ".")
        elif isinstance(value, int) and not isinstance(value, bool):
            if f.name == "seed" or f.name.endswith("_seed"):
                dflt = f.default  # seeds are ints: a plain default, never a default_factory
                ok = SEED_MIN <= value <= SEED_MAX or (value == SEED_SENTINEL and dflt == SEED_SENTINEL)
                if not ok:
                    extra = f" (or {SEED_SENTINEL}: derived from the run's seed)" if dflt == SEED_SENTINEL else ""
                    raise ConfigError(
                        f"{key}={value}: seeds lie in [{SEED_MIN}, 2**32) = [0, {SEED_MAX}]{extra} "
                        "(Lightning's seed_everything)"
                    )
            elif not INT_MIN <= value <= INT_MAX:
                raise ConfigError(f"{key}={value}: integers must fit in 64 bits (|value| < 2**63)")


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:20] + "..." + text[-10:])
