"""Errors meant for the user: one line each, printed by the CLI without a traceback (exit code 2).

They live here, below everything else in `harness`, so that any module (config, controller, run
store, analysis) can raise them without importing the CLI that catches them.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a path, a sweep file, a source): printed as one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A bad config key or value; the message is one line naming the key and what would be valid."""
