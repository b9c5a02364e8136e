"""W&B run lifecycle: mode (online/offline), naming, config, summaries, artifacts."""
from __future__ import annotations

import netrc
import os
from typing import Any

import wandb
import yaml

from harness.config import ConfigError, RunConfig, flatten, to_dict

WANDB_HOST = "api.wandb.ai"


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(configured: str | None = None) -> str:
    """WANDB_MODE always wins; then the config; then online iff credentials are configured."""
    mode = os.environ.get("WANDB_MODE") or configured
    if mode:
        if mode not in ("online", "offline", "disabled", "dryrun", "run"):
            raise ConfigError(f"W&B mode {mode!r} is not one of online, offline, disabled")
        return mode
    return "online" if has_credentials() else "offline"


def sweep_parameters() -> dict[str, Any]:
    """The parameters `wandb agent` (or the local controller) handed to this run, if any."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in raw.items()
            if k != "wandb_version"}


def _drop_leaf(d: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p, {})
        if not isinstance(d, dict):
            return
    d.pop(leaf, None)


def run_config(cfg: RunConfig) -> dict:
    """The resolved config, nested, minus the keys a sweep injects itself as flat dotted keys.

    Under a sweep, wandb.init puts each sweep parameter into run.config under its own (dotted)
    name; the sweep engine needs them there. Logging the same value again nested would show each
    such key twice in the UI, so the sweep keys stay flat and everything else is nested. The run
    store maps both spellings onto the same `config.a.b` column.
    """
    nested = to_dict(cfg)
    flat = flatten(nested)
    for key, value in sweep_parameters().items():
        if key in flat:
            if str(flat[key]) != str(value) and flat[key] != value:
                raise ConfigError(f"sweep parameter {key}={value!r} disagrees with the run config {flat[key]!r}")
            _drop_leaf(nested, key)
    return nested


def default_name(cfg: RunConfig, overrides: list[str]) -> str:
    varied = [o for o in overrides if not o.startswith(("task=", "wandb.", "data_dir="))]
    short = ",".join(o.split("=", 1)[0].split(".")[-1] + "=" + o.split("=", 1)[1] for o in varied)
    return f"{cfg.task}" + (f"[{short}]" if short else "")


def init_run(cfg: RunConfig, overrides: list[str] | None = None):
    mode = resolve_mode(cfg.wandb.mode)
    kwargs: dict[str, Any] = dict(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        group=cfg.wandb.group,
        tags=list(cfg.wandb.tags) or None,
        name=cfg.wandb.name or (default_name(cfg, overrides or []) if "WANDB_SWEEP_ID" not in os.environ else None),
        config=run_config(cfg),
        mode="offline" if mode == "dryrun" else mode,
        dir=os.environ.get("WANDB_DIR") or cfg.wandb.dir,
        settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
        reinit="finish_previous",
    )
    if kwargs["dir"]:
        os.makedirs(kwargs["dir"], exist_ok=True)
    return wandb.init(**{k: v for k, v in kwargs.items() if v is not None})


def summary_dict(run) -> dict:
    """Plain-JSON copy of a run's summary (what `harness train` prints last)."""
    out = {}
    for k, v in dict(run.summary).items():
        if k.startswith("_"):
            continue
        if hasattr(v, "_json_dict"):
            v = v._json_dict
        elif hasattr(v, "items"):
            v = dict(v)
        out[k] = v
    return out


def log_artifact(run, path: str, name: str, type_: str, metadata: dict | None = None) -> None:
    art = wandb.Artifact(name=name, type=type_, metadata=metadata or {})
    if os.path.isdir(path):
        art.add_dir(path)
    else:
        art.add_file(path)
    run.log_artifact(art)
