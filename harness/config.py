"""Typed run configs: task defaults <- `key=value` overrides, validated by OmegaConf.

Every task defines a dataclass that extends `RunConfig`; `load_config(["task=...", "model.width=64"])`
returns that dataclass, or raises `ConfigError` with one line naming the bad key or value.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.errors import ConfigError  # noqa: F401  (re-exported: tasks raise it)

# Task name -> module. Imported lazily: the Pythia task pulls in transformers.
TASKS = {
    "sparse_parity": "tasks.sparse_parity",
    "modular_addition": "tasks.modular_addition",
    "mnist_omnigrok": "tasks.mnist_omnigrok",
    "pythia_eval": "tasks.pythia_eval",
    "pythia_suite": "tasks.pythia_suite",
}

DATA_DIR_ENV = "HARNESS_DATA_DIR"


@dataclass
class TrainerConfig:
    steps: int = 1000  # optimizer steps (max_steps)
    eval_every: int = 100  # evaluate every N optimizer steps (and after the last one)
    log_every: int = 50  # log train/* every N steps
    # Optimizer steps per Lightning batch, for tasks that support it (sparse parity). Lightning
    # costs ~1-3 ms per batch in hooks; on a CPU step of a few ms that is 1.2-1.4x, so tiny
    # models take several steps per batch. Rounded down to divide eval_every and steps.
    steps_per_batch: int = 1
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"  # Lightning precision string, e.g. bf16-mixed, 64-true
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default (OMP_NUM_THREADS)
    progress_bar: bool = True

    def batch_steps(self) -> int:
        """steps_per_batch, reduced so that evaluations and the end fall on batch boundaries."""
        return math.gcd(self.steps_per_batch, self.eval_every, self.steps or self.eval_every)


@dataclass
class WandbConfig:
    project: str = "quanta-harness"
    entity: Optional[str] = None
    name: Optional[str] = None  # default: generated from the varied keys
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; the WANDB_MODE variable always wins
    dir: Optional[str] = None  # parent of the wandb/ run directory; WANDB_DIR wins


@dataclass
class RunConfig:
    task: str = "?"
    seed: int = 0
    data_dir: Optional[str] = None  # real data (MNIST, Pile, tokenizer); default $HARNESS_DATA_DIR
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        """Cross-field checks a type cannot express; raise ConfigError. Tasks extend this."""
        t = self.trainer
        if t.steps < 0 or t.eval_every <= 0 or t.log_every <= 0 or t.steps_per_batch <= 0:
            raise ConfigError(
                f"trainer.steps={t.steps}, trainer.eval_every={t.eval_every}, trainer.log_every={t.log_every}, "
                f"trainer.steps_per_batch={t.steps_per_batch}: steps must be >= 0 and the others > 0"
            )


def task_module(name: str):
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def config_class(task: str) -> type:
    return task_module(task).Config


def valid_keys(cls_or_obj: Any, prefix: str = "") -> list[str]:
    """Dotted names of every leaf key of a config dataclass."""
    keys = []
    for f in dataclasses.fields(cls_or_obj):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += valid_keys(default, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def split_task(overrides: Iterable[str]) -> tuple[str, list[str]]:
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. model.width=64)")
    tasks = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "task"]
    if not tasks:
        raise ConfigError(f"no task given: add task=NAME; valid tasks: {', '.join(TASKS)}")
    return tasks[-1], overrides


def load_config(overrides: Iterable[str]) -> RunConfig:
    """Task defaults <- overrides (`a.b=value`, values parsed as YAML), validated."""
    task, overrides = split_task(overrides)
    cls = config_class(task)
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, cls, task)) from None
    cfg.validate()
    return cfg


def check_overrides(task: str, overrides: dict[str, Any], cross_field: bool = True) -> None:
    """Validate a {dotted key: value} mapping against a task's schema (used for sweep parameters).

    `cross_field=False` checks keys and types only (one parameter alone may be valid only
    together with the others, e.g. data.n=8 with a smaller data.n_tasks).
    """
    cls = config_class(task)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.from_dotlist(
            [f"{k}={_dotlist_value(v)}" for k, v in overrides.items()]))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, cls, task)) from None
    if cross_field:
        cfg.validate()


def _dotlist_value(v: Any) -> str:
    # Same rendering as wandb's ${args_no_hyphens}: f"{param}={value}".
    return str(v)


def _explain(e: OmegaConfBaseException, cls: type, task: str) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        valid = valid_keys(cls)
        return f"unknown config key {key!r} for task {task}; valid keys: {', '.join(valid)}"
    value = getattr(e, "value", None)
    return f"bad value {value!r} for config key {key!r} (task {task}): {msg}"


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def data_dir(cfg: RunConfig) -> str:
    path = cfg.data_dir or os.environ.get(DATA_DIR_ENV)
    if not path:
        raise ConfigError(f"no data directory: pass data_dir=PATH or set {DATA_DIR_ENV}")
    if not os.path.isdir(path):
        raise ConfigError(f"data directory {path!r} does not exist (data_dir= or ${DATA_DIR_ENV})")
    return path
