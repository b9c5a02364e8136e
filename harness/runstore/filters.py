"""W&B's MongoDB-style run filter, applied to offline runs.

`Api().runs(path, filters=...)` takes a MongoDB query over the run's fields, spelled as W&B spells
them: `config.model.width` (a nested config key, dotted), `summary_metrics.val/loss`, `state`,
`tags`, `group`, `sweep`, `display_name`, `job_type`. Offline the same filter is applied here, with
the operators the local runs need: $eq $ne $gt $gte $lt $lte $in $nin $exists $regex $and $or.
Anything else is refused with a one-line error before any run is chosen, and so is a key that no run
has (a typo would otherwise select every run, or none), with the nearest keys as suggestions; except
under `$exists` alone, whose question is whether runs have the key (`{"summary_metrics.error":
{"$exists": false}}` is every run when none has it). A run field without a value (no sweep, no
group) does not exist, as on W&B: `{"sweep": {"$exists": false}}` is the runs outside any sweep.
`$regex` searches a string (or a list's strings) with Python's `re`, as MongoDB's `$regex` does with
PCRE (the same syntax for the common cases: classes, anchors, alternation, repetition).
"""

from __future__ import annotations

import difflib
import numbers
import re
from typing import Any

from harness.errors import UserError

FIELD_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$regex")
# MongoDB nests documents at most 100 levels deep (its BSON limit); deeper $and/$or would only
# exhaust Python's recursion limit here.
MAX_DEPTH = 100
LOGIC_OPS = ("$and", "$or")
RUN_FIELDS = {
    "state": "state",
    "tags": "tags",
    "group": "group",
    "sweep": "sweep",
    "display_name": "name",
    "job_type": "job_type",
}
_MISSING = object()


class FilterError(UserError):
    """A filter the offline run store cannot apply exactly (one line)."""


def _lookup(d: dict, key: str) -> Any:
    """d[key], or a path through nested dicts (`a.b` in {"a": {"b": 1}}); _MISSING if absent."""
    if key in d:
        return d[key]
    head, _, rest = key.partition(".")
    while rest:
        if isinstance(d.get(head), dict):
            found = _lookup(d[head], rest)
            if found is not _MISSING:
                return found
        more, _, rest = rest.partition(".")
        head = f"{head}.{more}"
    return _MISSING


def value(meta: dict, key: str) -> Any:
    """The value a filter key names in a run's meta (config flat, summary nested); _MISSING if none."""
    if key.startswith("config."):
        return _lookup(meta["config"], key[len("config.") :])
    if key.startswith("summary_metrics."):
        return _lookup(meta["summary"], key[len("summary_metrics.") :])
    found = meta.get(RUN_FIELDS[key])
    return _MISSING if found is None or found == "" else found  # no sweep, no group: absent


def _keys(metas: list[dict]) -> set[str]:
    keys = set(RUN_FIELDS)
    for m in metas:
        keys.update(f"config.{k}" for k in m["config"])
        stack = list(m["summary"].items())
        while stack:  # nested summary dicts: every path is a key
            k, v = stack.pop()
            keys.add(f"summary_metrics.{k}")
            if isinstance(v, dict):
                stack.extend((f"{k}.{kk}", vv) for kk, vv in v.items())
    return keys


def check(filters: Any, metas: list[dict]) -> None:
    """Raise FilterError (one line) unless `filters` uses only what `matches` applies exactly."""
    if not isinstance(filters, dict):
        raise FilterError(f"filters must be a dict (a MongoDB query, as W&B's Api().runs takes), got {_short(filters)}")
    _check(filters, _keys(metas) if metas else None, 1)


def _check(query: dict, known: set[str] | None, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise FilterError(
            f"filter nested more than {MAX_DEPTH} levels deep ($and/$or); MongoDB and W&B take at most {MAX_DEPTH}"
        )
    for key, cond in query.items():
        if key in LOGIC_OPS:
            if not isinstance(cond, list) or not cond or not all(isinstance(q, dict) for q in cond):
                raise FilterError(f"filter {key} takes a non-empty list of filters, got {_short(cond)}")
            for q in cond:
                _check(q, known, depth + 1)
            continue
        if key.startswith("$"):
            raise FilterError(
                f"filter operator {key!r} is not supported offline; supported: {', '.join(LOGIC_OPS + FIELD_OPS)}"
            )
        only_exists = isinstance(cond, dict) and set(cond) == {"$exists"}
        _check_key(key, None if only_exists else known)
        if isinstance(cond, dict) and any(k.startswith("$") for k in cond):
            for op, arg in cond.items():
                if op not in FIELD_OPS:
                    raise FilterError(
                        f"filter operator {op!r} (on {key!r}) is not supported offline; "
                        f"supported: {', '.join(FIELD_OPS)}"
                    )
                if op in ("$in", "$nin") and not isinstance(arg, (list, tuple)):
                    raise FilterError(f"filter {key}: {op} takes a list, got {_short(arg)}")
                if op == "$exists" and not isinstance(arg, bool):
                    raise FilterError(f"filter {key}: $exists takes true or false, got {_short(arg)}")
                if op in ("$gt", "$gte", "$lt", "$lte") and not (_number(arg) or isinstance(arg, str)):
                    raise FilterError(f"filter {key}: {op} takes a number or a string, got {_short(arg)}")
                if op == "$regex":
                    _compile(key, arg)


def _compile(key: str, pattern: Any) -> re.Pattern:
    if not isinstance(pattern, str):
        raise FilterError(f"filter {key}: $regex takes a pattern string, got {_short(pattern)}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise FilterError(f"filter {key}: $regex {_short(pattern)} is not a valid regular expression ({e})") from None


def _short(v: Any) -> str:
    try:
        text = repr(v)
    except RecursionError:  # a value nested thousands deep
        return f"a {type(v).__name__} nested too deep to show"
    return text if len(text) <= 80 else text[:60] + "..." + text[-10:]


def _check_key(key: str, known: set[str] | None) -> None:
    if key.startswith("summary."):
        raise FilterError(f"filter key {key!r}: W&B spells summary keys 'summary_metrics.{key[8:]}'")
    if not (key.startswith(("config.", "summary_metrics.")) or key in RUN_FIELDS):
        raise FilterError(f"filter key {key!r}: use config.KEY, summary_metrics.KEY or one of {', '.join(RUN_FIELDS)}")
    if known is not None and key not in known:
        near = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(k) for k in near)}?" if near else ""
        raise FilterError(f"filter key {key!r}: no run has it{hint}")


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def _eq(have: Any, want: Any) -> bool:
    if isinstance(have, list) and not isinstance(want, list):  # an array matches if an element does
        return any(_eq(h, want) for h in have)
    if isinstance(have, bool) or isinstance(want, bool):  # MongoDB: true is not 1
        return type(have) is type(want) and have == want
    return have == want


def _order(have: Any, op: str, want: Any) -> bool:
    if isinstance(have, list):
        return any(_order(h, op, want) for h in have)
    if not ((_number(have) and _number(want)) or (isinstance(have, str) and isinstance(want, str))):
        return False  # MongoDB compares within a type only: 3 is not > "2"
    return {"$gt": have > want, "$gte": have >= want, "$lt": have < want, "$lte": have <= want}[op]


def _field(have: Any, op: str, arg: Any) -> bool:
    present = have is not _MISSING
    value_ = have if present else None  # MongoDB: a missing field equals null
    if op == "$eq":
        return _eq(value_, arg)
    if op == "$ne":
        return not _eq(value_, arg)
    if op == "$in":
        return any(_eq(value_, a) for a in arg)
    if op == "$nin":
        return not any(_eq(value_, a) for a in arg)
    if op == "$exists":
        return present == arg
    if op == "$regex":
        pattern = _compile("", arg)
        texts = have if isinstance(have, list) else [have]  # an array matches if an element does
        return any(isinstance(t, str) and pattern.search(t) is not None for t in texts)
    return present and _order(have, op, arg)


def matches(query: dict, meta: dict) -> bool:
    """Whether a run (its meta: config flat, summary, state, ...) satisfies a checked filter."""
    for key, cond in query.items():
        if key == "$and":
            ok = all(matches(q, meta) for q in cond)
        elif key == "$or":
            ok = any(matches(q, meta) for q in cond)
        elif isinstance(cond, dict) and any(k.startswith("$") for k in cond):
            have = value(meta, key)
            ok = all(_field(have, op, arg) for op, arg in cond.items())
        else:
            ok = _field(value(meta, key), "$eq", cond)
        if not ok:
            return False
    return True
