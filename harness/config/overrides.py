"""`key=value` overrides -> a nested dict of values, each read by its key's declared type.

OmegaConf's `from_dotlist` reads every value as YAML, so a string key's value was parsed again:
`wandb.name=run #3` became `run` (a comment), `wandb.group=yes` became True, tags `[on, off]` became
booleans, and `!!python/object/...` reached the YAML constructor (a traceback). Here a value is read
by the type its key declares, with `yaml.safe_load` only where a type needs parsing:

- `str`: the text as given, never parsed (`run #3`, `yes`, `${...}` stay as written);
- `List[str]`: a YAML flow list whose items all stay text (`yaml.BaseLoader`: no type resolution);
- anything else (int, float, bool, lists of numbers): `yaml.safe_load`, then OmegaConf checks the type;
- an Optional key: `null` (or `None`, as wandb's agent renders a sweep's null) is None.

A value that starts with `!` is a YAML tag: refused for every key (one line), never constructed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

import yaml

from harness.errors import ConfigError

_NULLS = ("null", "None")  # "None": str(None), how wandb's ${args} renders a sweep value null
_INTERPOLATION = re.compile(r"(\\*)\$\{")


def declared_type(cls: type, dotted: str) -> Any:
    """The annotation of a dotted key in a config dataclass tree, or None for an unknown key."""
    klass: Any = cls
    for part in dotted.split("."):
        if not (isinstance(klass, type) and dataclasses.is_dataclass(klass)):
            return None
        if part not in {f.name for f in dataclasses.fields(klass)}:
            return None
        try:
            klass = typing.get_type_hints(klass)[part]
        except (NameError, TypeError):  # an annotation that cannot be resolved here: read the value as YAML
            return None
    return klass


def _unwrap_optional(t: Any) -> tuple[Any, bool]:
    # Optional[X] and X | None (the config's annotations, as pyupgrade writes them) are two origins
    if typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in typing.get_args(t):
        rest = [a for a in typing.get_args(t) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else t), True
    return t, False


def _literal(value: Any) -> Any:
    """Escape OmegaConf's interpolation syntax, so `${oc.env:WANDB_API_KEY}` in a value stays text
    (OmegaConf would resolve it: a run name could read any environment variable). Its grammar:
    `\\${` is a literal `${`, and 2k backslashes before `${` stand for k."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, list):
        return [_literal(v) for v in value]
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    return value


def parse_value(cls: type, key: str, text: str) -> Any:
    """One override's value, read by the declared type of `key` (see the module docstring)."""
    t, optional = _unwrap_optional(declared_type(cls, key))
    if text.startswith("!"):
        raise ConfigError(
            f"{key}={text[:60]!r}: a value starting with '!' is a YAML tag, which overrides do not "
            f"take; give a plain value{f' of type {_name(t)}' if t is not None else ''}"
        )
    if optional and text in _NULLS:
        return None
    if t is str:
        return _literal(text)
    if typing.get_origin(t) is list and typing.get_args(t) == (str,):
        try:
            items = yaml.load(text, Loader=yaml.BaseLoader)  # every scalar stays a string
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}={text!r}: not a list ({_first_line(e)}); write e.g. {key}=[a,b]") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{key}={text!r}: a list of strings, e.g. {key}=[a,b]")
        return _literal(items)
    try:
        return _literal(yaml.safe_load(text))
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{key}={text!r}: not a valid value ({_first_line(e)})"
            f"{f'; need a value of type {_name(t)}' if t is not None else ''}"
        ) from None


def nested_overrides(cls: type, overrides: list[str]) -> dict:
    """`["model.width=64", "wandb.name=run #3"]` -> {"model": {"width": 64}, "wandb": {"name": "run #3"}}."""
    out: dict = {}
    for item in overrides:
        key, text = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r}: {p!r} is a value, not a group of keys")
        if isinstance(node.get(leaf), dict):
            raise ConfigError(f"config key {key!r} is a group of keys ({', '.join(node[leaf])}); set its keys")
        node[leaf] = parse_value(cls, key, text)
    return out


def _name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split())[:120]
