"""W&B run lifecycle: mode (online/offline), naming, config, summaries, artifacts."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from typing import Any

import wandb
import yaml

from harness.config.run import RunConfig, flatten
from harness.errors import ConfigError
from harness.wandb_mode import resolve_mode

PARAM_ENV = "HARNESS_SWEEP_PARAM_PATH"  # the local controller's parameters file (harness.sweep.agent)


def sweep_parameters() -> dict[str, Any]:
    """The parameters `wandb agent` (or the local controller) handed to this run, if any."""
    path = os.environ.get(PARAM_ENV) or os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return {
        k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in raw.items() if k != "wandb_version"
    }


# Config keys that say where and how a run ran, not what it computed: kept out of the logged config
# (and out of run names). The sweep engine may still inject one as a flat key (see run_config).
PLUMBING = (
    "wandb",
    "data_dir",
    "trainer.threads",
    "trainer.progress_bar",
    "trainer.ckpt_dir",
    "trainer.resume",
    "trainer.log_checkpoints",
    "trainer.resume_from",
)
VARIED_ENV = "HARNESS_SWEEP_VARIED"  # comma-separated keys a sweep varies (set by the local controller)


def is_plumbing(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in PLUMBING)


def _drop(d: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p, {})
        if not isinstance(d, dict):
            return
    d.pop(leaf, None)


def run_config(cfg: RunConfig) -> dict:
    """The config to log: the science and the schedule, nested, in one shape for every run.

    Under a W&B sweep (`wandb agent`), wandb.init also puts each sweep parameter into run.config as
    a flat dotted key (`model.width`): W&B's sweep engine reads the parameters back from there (grid
    search skips the points it finds), so those keys stay. A local sweep's runs get their parameters
    under HARNESS_SWEEP_PARAM_PATH, which wandb does not read: their config is the nested tree alone.
    The nested tree holds every key, so `config.model.width` filters sweep and plain runs alike
    (W&B's filters do not match dotted key names, wandb/wandb#3087), and the run store maps both
    spellings onto one column.
    """
    nested = asdict(cfg)
    flat = flatten(nested)
    for key, value in sweep_parameters().items():
        if key in flat and str(flat[key]) != str(value) and flat[key] != value:
            raise ConfigError(f"sweep parameter {key}={value!r} disagrees with the run config {flat[key]!r}")
    for key in PLUMBING:
        _drop(nested, key)
    return nested


def _lookup(cfg: RunConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"{VARIED_ENV} names {dotted!r}, which is not a config key of task {cfg.task}")
        value = getattr(value, part)
    return value


def default_name(cfg: RunConfig, overrides: list[str]) -> str:
    """`task[width=32,seed=1]`: the keys a sweep varies ($HARNESS_SWEEP_VARIED), else the overrides,
    without plumbing; each key by its last part unless two keys share it."""
    varied = os.environ.get(VARIED_ENV)
    # Only a run the sweep handed parameters to (HARNESS_SWEEP_PARAM_PATH, or wandb's own under `wandb agent`; set with the variable by the
    # local controller) is named by the sweep's keys: a variable left in a shell by an earlier sweep
    # must not rename plain runs.
    if varied is not None and sweep_parameters():
        pairs = [(k, _lookup(cfg, k)) for k in varied.split(",") if k and k != "task" and not is_plumbing(k)]
    else:
        given: dict[str, str] = {}
        for o in overrides:
            key, _, value = o.partition("=")
            if key != "task" and not is_plumbing(key):
                given[key] = value  # a repeated key keeps its place and takes its last value
        pairs = list(given.items())
    last = [k.split(".")[-1] for k, _ in pairs]
    short = ",".join(f"{k if last.count(k.split('.')[-1]) > 1 else k.split('.')[-1]}={v}" for k, v in pairs)
    return f"{cfg.task}" + (f"[{short}]" if short else "")


# The summary aggregates W&B keeps beside the last value. A resumed run carries them over from its
# checkpoint (harness.training.checkpoint.merge_summaries), so each must be mergeable: min, max, first, last.
SUMMARIES = {"val/loss": "min,last", "val/acc": "max,last"}


def define_metrics(run) -> None:
    """The step axis (contract C2): every metric is plotted against trainer/global_step (optimizer
    steps completed), and the summary keeps the best validation values beside the last ones."""
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    for key, aggregates in SUMMARIES.items():
        run.define_metric(key, summary=aggregates)


STAGING_VARS = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache", "WANDB_ARTIFACT_DIR": "artifacts"}
_STAGING_SET: set[str] = set()  # the variables this process set itself (it moves them with the run's dir)


def wandb_dir(cfg: RunConfig) -> str | None:
    """The directory wandb puts `wandb/` in: $WANDB_DIR, else `wandb.dir` (None: the current one)."""
    return os.environ.get("WANDB_DIR") or cfg.wandb.dir


def wandb_root(cfg: RunConfig) -> str:
    """`<wandb dir>/wandb`: where wandb puts run directories (and the harness its checkpoints and staging)."""
    return os.path.join(wandb_dir(cfg) or "", "wandb")


def stage_under(root: str) -> None:
    """wandb stages artifact files under WANDB_DATA_DIR (`<it>/artifacts/staging`), caches them under
    WANDB_CACHE_DIR and downloads to WANDB_ARTIFACT_DIR; unset, the first two are in the home
    directory (~/.local/share/wandb, ~/.cache/wandb), where cluster quotas fill and a read-only home
    fails the run. Each one the user did not set goes under `root` (the run's `wandb/` directory),
    beside the runs whose offline artifacts point into it (for `wandb sync`)."""
    for var, sub in STAGING_VARS.items():
        if var not in os.environ or var in _STAGING_SET:
            os.environ[var] = os.path.join(os.path.abspath(root), sub)
            _STAGING_SET.add(var)


def init_run(cfg: RunConfig, overrides: list[str] | None = None, job_type: str = "train", **init_kwargs):
    """`init_kwargs` go to wandb.init as they are: a packed process (harness.members.packed) passes each
    member's `id` and `reinit="create_new"`, so several runs stay open in one process.

    WANDB_PROJECT and WANDB_ENTITY, when set, win over `wandb.project`/`wandb.entity`, as a sweep's
    project wins under `wandb agent` (the local controller sets them from the sweep's YAML);
    WANDB_TAGS are added to `wandb.tags`; WANDB_RUN_GROUP is wandb's own default for `wandb.group`.
    The run's step axis and summaries are declared (define_metrics)."""
    mode = resolve_mode(cfg.wandb.mode)
    stage_under(wandb_root(cfg))
    env_tags = [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]
    kwargs: dict[str, Any] = dict(
        project=os.environ.get("WANDB_PROJECT") or cfg.wandb.project,
        entity=os.environ.get("WANDB_ENTITY") or cfg.wandb.entity,
        group=cfg.wandb.group,
        job_type=job_type,
        tags=list(dict.fromkeys([*cfg.wandb.tags, *env_tags])) or None,
        name=cfg.wandb.name or default_name(cfg, overrides or []),
        config=run_config(cfg),
        mode="offline" if mode == "dryrun" else mode,
        dir=wandb_dir(cfg),
        settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
        reinit="finish_previous",
        # A restart with the same WANDB_RUN_ID (wandb agent, the local controller, SLURM requeue)
        # continues that run (contract C5); without one this starts a new run as usual.
        resume="allow",
    )
    kwargs.update(init_kwargs)
    if kwargs["dir"]:
        os.makedirs(kwargs["dir"], exist_ok=True)
    run = wandb.init(**{k: v for k, v in kwargs.items() if v is not None})
    define_metrics(run)
    return run


def summary_dict(run) -> dict:
    """Plain-JSON copy of a run's summary (what `harness train` prints last), nested as W&B keeps it:
    `{"val/loss": {"min": ..., "last": ...}}` for the metrics declared with summaries."""
    return {k: _plain(v) for k, v in run.summary._as_dict().items() if not k.startswith("_")}


def _plain(v):
    if isinstance(v, dict) or hasattr(v, "_as_dict"):
        items = v._as_dict() if hasattr(v, "_as_dict") else v
        return {k: _plain(x) for k, x in items.items()}
    return v


def result_line(summary: dict) -> str:
    """The JSON line a run prints last on stdout (the local controller reads it from the run's log).
    Strict JSON: a NaN or infinity would be a bare NaN token that JSON readers reject."""
    return json.dumps(_json_safe(summary), default=str, allow_nan=False)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def log_artifact(
    run, path: str, name: str, type_: str, metadata: dict | None = None, policy: str = "mutable", aliases=None
) -> None:
    """A file or folder (under its own name) as a W&B artifact, with `aliases` (None: wandb's `latest`).
    policy="mutable" stages a copy now (the file may go); "immutable" references the files where they
    are (no staging copy): for files written once, in the run directory, and never changed."""
    art = wandb.Artifact(name=name, type=type_, metadata=metadata or {})
    if os.path.isdir(path):
        art.add_dir(path, policy=policy)
    else:
        art.add_file(path, policy=policy)
    run.log_artifact(art, aliases=aliases)
