"""Typed run configs: task defaults <- `key=value` overrides, validated by OmegaConf.

Every task defines a dataclass that extends `RunConfig`; `load_config(["task=...", "model.width=64"])`
returns that dataclass, or raises `ConfigError` with one line naming the bad key or value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config.limits import check_limits
from harness.config.overrides import nested_overrides
from harness.config.registry import config_class, tasks
from harness.config.resources import DATA_DIR_ENV, data_root
from harness.errors import ConfigError

# Lightning's precision strings (lightning.fabric.connector), checked before a run is created.
PRECISIONS = (
    "64-true",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64",
    "32",
    "16",
    "bf16",
    "transformer-engine",
    "transformer-engine-float16",
)
RESUME_MODES = ("auto", "never")  # trainer.resume (harness/training/checkpoint.py)


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
    # A bar counting optimizer steps; None: on when stderr is a terminal and the run is not part of a sweep.
    progress_bar: bool | None = None
    # Save the resume point (last.ckpt) every N optimizer steps; 0 = only when SIGTERM stops the run.
    ckpt_every: int = 0
    # last.ckpt lives in <ckpt_dir>/<run id>/; None = <wandb root>/checkpoints (harness/training/checkpoint.py).
    ckpt_dir: str | None = None
    # auto: continue this run id's last.ckpt if its run config equals this one (else a one-line error),
    # refuse an id whose run finished; never: train the run id from step 0, ignoring what it left.
    resume: str = "auto"
    # Log every saved last.ckpt as W&B artifact checkpoint-<run id>, so that another machine can resume from it.
    log_checkpoints: bool = False
    # Resume from a checkpoint: a local last.ckpt or artifact directory, a run id or an artifact name (W&B, online).
    resume_from: str | None = None

    def batch_steps(self) -> int:
        """steps_per_batch, reduced so that evaluations, checkpoints and the end fall on batch boundaries."""
        return math.gcd(self.steps_per_batch, self.eval_every, self.ckpt_every, self.steps or self.eval_every)


@dataclass
class WandbConfig:
    project: str = "quanta-harness"
    entity: str | None = None
    name: str | None = None  # default: generated from the varied keys
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None  # online | offline | disabled; the WANDB_MODE variable always wins
    dir: str | None = None  # parent of the wandb/ run directory; WANDB_DIR wins


@dataclass
class RunConfig:
    task: str = "?"
    seed: int = 0
    data_dir: str | None = None  # real data (MNIST, Pile, tokenizer); default $HARNESS_DATA_DIR
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    # False for evaluation-only tasks (stage validate), whose trainer.steps is 0.
    fits: ClassVar[bool] = True

    def validate(self) -> None:
        """Cross-field checks a type cannot express; raise ConfigError. Tasks extend this."""
        _check_finite(self)
        check_limits(self)
        t = self.trainer
        if t.steps < (1 if self.fits else 0) or t.eval_every <= 0 or t.log_every <= 0 or t.steps_per_batch <= 0:
            raise ConfigError(
                f"trainer.steps={t.steps}, trainer.eval_every={t.eval_every}, trainer.log_every={t.log_every}, "
                f"trainer.steps_per_batch={t.steps_per_batch}: steps must be >= {1 if self.fits else 0} "
                "and the others > 0"
            )
        if t.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={t.precision!r}: valid values are {', '.join(PRECISIONS)}")
        _check_lightning_names(t)
        if t.devices < 1 or t.threads < 0:
            raise ConfigError(f"trainer.devices={t.devices}, trainer.threads={t.threads}: need >= 1 and >= 0")
        if t.ckpt_every < 0:
            raise ConfigError(f"trainer.ckpt_every={t.ckpt_every}: need >= 0 (0 = checkpoint only on SIGTERM)")
        if t.resume not in RESUME_MODES:
            raise ConfigError(f"trainer.resume={t.resume!r}: valid values are {', '.join(RESUME_MODES)}")
        if t.devices > 1 and t.strategy not in ("auto", "ddp"):
            # Only the "ddp" launcher re-runs `harness train` per rank, so that rank 0 alone owns the
            # W&B run; spawn/fork would need the run object pickled into each worker.
            raise ConfigError(
                f"trainer.strategy={t.strategy!r} with trainer.devices={t.devices}: use trainer.strategy=ddp (or auto)"
            )
        if hasattr(self, "optim"):  # a task with an optimizer (evaluation-only tasks have none)
            _check_optim(self.optim)


# Names every Lightning 2.x registers (checked against the installed Lightning in
# tests/test_startup.py): these pass without importing Lightning, so `--cfg` and sweep validation stay
# light; any other name is looked up in Lightning's own registries.
KNOWN_ACCELERATORS = ("auto", "gpu", "cpu", "cuda", "mps", "tpu")
KNOWN_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp", "deepspeed", "single_device")


def _check_lightning_names(t: TrainerConfig) -> None:
    """trainer.accelerator and trainer.strategy against Lightning's registries, before a run is created."""
    if t.accelerator in KNOWN_ACCELERATORS and t.strategy in KNOWN_STRATEGIES:
        return
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    accelerators = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    if t.accelerator not in accelerators:
        raise ConfigError(f"trainer.accelerator={t.accelerator!r}: valid values are {', '.join(accelerators)}")
    strategies = ["auto", *StrategyRegistry.available_strategies()]
    if t.strategy not in strategies:
        raise ConfigError(
            f"trainer.strategy={t.strategy!r}: valid values are {', '.join(strategies[:8])}, ... "
            "(Lightning's strategy registry)"
        )


def _check_finite(cfg: Any, prefix: str = "") -> None:
    """NaN or infinity in any float key is a typo, never a setting."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}={value}: must be a finite number")


def _check_optim(o: Any) -> None:
    """The Adam-family keys the tasks share (lr, weight_decay, beta1, beta2, eps), where present."""
    if hasattr(o, "lr") and not o.lr > 0:
        raise ConfigError(f"optim.lr={o.lr}: the learning rate must be > 0")
    if getattr(o, "weight_decay", 0) < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay}: must be >= 0")
    for name in ("beta1", "beta2"):
        if hasattr(o, name) and not 0 <= getattr(o, name) < 1:
            raise ConfigError(f"optim.{name}={getattr(o, name)}: Adam's betas lie in [0, 1)")
    if hasattr(o, "eps") and not o.eps > 0:
        raise ConfigError(f"optim.eps={o.eps}: must be > 0")


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
    """The task name and the overrides as `key=value`.

    `--key=value` (what `wandb agent` passes for `${args}`) is read as `key=value`. A key given twice
    is an error: with a sweep's parameters and a hand-written override, silently taking the last
    one hides which value a run used.
    """
    overrides = [o[2:] if o.startswith("--") else o for o in overrides]
    seen: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. model.width=64)")
        key, value = item.split("=", 1)
        if key in seen:
            raise ConfigError(f"config key {key!r} given twice ({key}={seen[key]} and {key}={value}); give it once")
        seen[key] = value
    if "task" not in seen:
        raise ConfigError(f"no task given: add task=NAME; valid tasks: {', '.join(tasks())}")
    return seen["task"], overrides


def load_config(overrides: Iterable[str]) -> RunConfig:
    """Task defaults <- overrides (`a.b=value`, each value read by its key's type:
    harness.config.overrides), validated."""
    task, overrides = split_task(overrides)
    cfg = _merge(task, overrides)
    cfg.validate()
    return cfg


def _merge(task: str, overrides: list[str]) -> RunConfig:
    cls = config_class(task)
    values = nested_overrides(cls, overrides)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(values))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, cls, task)) from None


def check_overrides(task: str, overrides: dict[str, Any], cross_field: bool = True) -> None:
    """Validate a {dotted key: value} mapping against a task's schema (used for sweep parameters).

    `cross_field=False` checks keys, types and each value's limits only (one parameter alone may be
    valid only together with the others, e.g. data.n=8 with a smaller data.n_tasks).
    """
    # Each value as the run will read it: rendered as wandb's ${args_no_hyphens} renders it
    # (f"{param}={value}"), then parsed by the key's type, as `harness train` parses it.
    cfg = _merge(task, [f"{k}={v}" for k, v in overrides.items()])
    if cross_field:
        cfg.validate()
    else:
        _check_finite(cfg)
        check_limits(cfg)


def _explain(e: OmegaConfBaseException, cls: type, task: str) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return f"unknown config key {key!r} for task {task}; {suggest(key, valid_keys(cls), task)}"
    value = getattr(e, "value", None)
    return f"bad value {value!r} for config key {key!r} (task {task}): {msg}"


def suggest(key: str, valid: list[str], task: str) -> str:
    """'did you mean model.width?': the nearest valid keys, by the whole dotted key, then by its last part."""
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.8)
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(valid)}
    close += [
        by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75) if by_leaf[m] not in close
    ]
    listing = f"`harness train task={task} --cfg` lists every key"
    return f"did you mean {' or '.join(close[:3])}? ({listing})" if close else listing


def describe(cfg: RunConfig) -> str:
    """The resolved config, one key a line: `key: type = value  # the dataclass's comment`.

    A value that differs from the task's default shows the default too. Comments come from the
    source of the dataclass that declares the field (trailing, or the comment lines just above).
    """
    default = type(cfg)()
    lines = [f"# task {cfg.task} ({type(cfg).__module__}): key: type = value  # comment"]

    def walk(obj: Any, dflt: Any, prefix: str) -> None:
        comments = _field_comments(type(obj))
        for f in dataclasses.fields(obj):
            value, dvalue = getattr(obj, f.name), getattr(dflt, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, dvalue, f"{prefix}{f.name}.")
                continue
            line = f"{prefix}{f.name}: {_type_name(f.type)} = {_show(value)}"
            if value != dvalue:
                line += f"  (default {_show(dvalue)})"
            if comments.get(f.name):
                line += f"  # {comments[f.name]}"
            lines.append(line)

    walk(cfg, default, "")
    return "\n".join(lines)


def _show(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> comment, read from the source of each class in the MRO that declares fields."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments = {
            tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(src).readline)
            if tok.type == tokenize.COMMENT
        }
        lines = src.splitlines()
        for node in ast.parse(src).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = comments.get(node.end_lineno)
                if text is None:  # a block of comment lines right above the field
                    above, i = [], node.lineno - 1
                    while i in comments and lines[i - 1].strip().startswith("#"):
                        above.insert(0, comments[i])
                        i -= 1
                    text = " ".join(above) or None
                if text:
                    out[node.target.id] = text
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def data_dir(cfg: RunConfig) -> str:
    path = data_root(cfg.data_dir)
    if not path:
        raise ConfigError(f"no data directory: pass data_dir=PATH or set {DATA_DIR_ENV}")
    if not os.path.isdir(path):
        raise ConfigError(f"data directory {path!r} does not exist (data_dir= or ${DATA_DIR_ENV})")
    return path
