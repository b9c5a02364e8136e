"""Which W&B mode a run (or an analysis) gets: pure, no wandb import, so analysis code may use it.

WANDB_MODE always wins; then the configured mode; then online iff credentials are configured.
"""

from __future__ import annotations

import netrc
import os

from harness.errors import ConfigError

WANDB_HOST = "api.wandb.ai"
MODES = ("online", "offline", "disabled", "dryrun", "run")


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
        if mode not in MODES:
            raise ConfigError(f"W&B mode {mode!r} is not one of online, offline, disabled")
        return mode
    return "online" if has_credentials() else "offline"
