"""One API for logged runs, from W&B or from offline run files, as pandas DataFrames.

    runs = load_runs("wandb")                      # a local wandb directory
    runs = load_runs("me/quanta", sweep="abc123")  # a W&B project (entity/project)
    runs = load_runs("wandb", filters={"config.model.width": {"$gte": 16}})  # W&B's filter language
    hist = load_history("wandb", run_ids=runs.id, keys=["val/loss"])   # one row per (run, step)
    items = load_table("wandb", runs.id[0], "emergence/items")   # a summary wandb.Table as a DataFrame

Offline, nothing is dropped or altered silently: a run file that cannot be read is skipped and
listed (`table.attrs["errors"]`, and on stderr); a damaged one is loaded without its damaged
records and marked `corrupt`; a cache that cannot be written or read is reported once and
bypassed (`table.attrs["warnings"]`). What the store does in each case: DESIGN.md.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable

import numpy as np
import pandas as pd

from harness.runstore import cache as run_cache
from harness.runstore import filters as run_filters
from harness.runstore import remote
from harness.runstore.cache import CACHE_DIR
from harness.runstore.local import SourceError, _check_sweep, _Local, is_local, run_files, wandb_dir
from harness.runstore.remote import load_wandb

__all__ = [
    "load_runs",
    "load_history",
    "load_table",
    "load_curves",
    "artifact_files",
    "to_parquet",
    "load_wandb",
    "SourceError",
    "is_local",
    "wandb_dir",
    "run_files",
    "CACHE_DIR",
]
W_AND_B_PATH = re.compile(r"^[\w.-]+/[\w.-]+$")


# -- the public API -----------------------------------------------------------------------------

_RUN_COLUMNS = (
    "id",
    "name",
    "state",
    "sweep",
    "project",
    "group",
    "job_type",
    "tags",
    "path",
    "truncated",
    "corrupt",
    "n_files",
)


def _table(metas: list[dict], local: bool = False) -> pd.DataFrame:
    rows = []
    for m in metas:
        row = {k: m[k] for k in _RUN_COLUMNS if k in m}
        row.update({f"config.{k}": v for k, v in m["config"].items()})
        row.update(_summary_columns(m["summary"], run_dir=m["path"] if local else None))
        rows.append(row)
    if not rows:  # no run (or none matches): still the table's columns
        return pd.DataFrame(columns=list(_RUN_COLUMNS))
    return run_cache.typed(pd.DataFrame(rows))


TABLE_TYPES = ("table-file", "table")  # how a wandb.Table is referenced from a summary


def _is_table(v) -> bool:
    return isinstance(v, dict) and v.get("_type") in TABLE_TYPES and isinstance(v.get("path"), str)


def _summary_columns(summary: dict, prefix: str = "summary.", run_dir: str | None = None) -> dict:
    """A nested summary value becomes dotted columns, as in the W&B UI: `val/loss` declared with
    summary "min,last" -> summary.val/loss.min, summary.val/loss.last. A wandb.Table becomes a
    DataFrame (offline: read from the run's files/media/table/...json; from W&B: the reference
    dict, which `load_table` downloads). Other W&B media (a dict with `_type`) and lists stay
    one value."""
    out = {}
    for k, v in summary.items():
        if _is_table(v):
            out[f"{prefix}{k}"] = _read_table_file(run_dir, v, k) if run_dir else v
        elif isinstance(v, dict) and "_type" not in v:
            out.update(_summary_columns(v, f"{prefix}{k}.", run_dir))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _table_frame(path: str) -> pd.DataFrame:
    """A wandb.Table's JSON file ({"columns": [...], "data": [[...], ...]}) as a DataFrame."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("columns"), list)
        or not isinstance(data.get("data"), list)
    ):
        raise ValueError(f"{path}: not a wandb.Table file (no columns and data)")
    return run_cache.typed(pd.DataFrame(data["data"], columns=data["columns"]))


def _read_table_file(run_dir: str, ref: dict, key: str) -> pd.DataFrame | None:
    """The Table a summary value references, from an offline run directory; None (with a warning)
    if its file is missing or broken. The path is the run file's (untrusted): it must stay inside
    the run's files/ directory."""
    files = os.path.realpath(os.path.join(run_dir, "files"))
    path = os.path.realpath(os.path.join(files, ref["path"]))
    try:
        if os.path.commonpath([files, path]) != files:
            raise ValueError(f"table path {ref['path']!r} leaves the run's files/ directory")
        return _table_frame(path)
    except (OSError, ValueError) as e:
        print(f"runstore: warning: summary {key} of {run_dir}: {str(e).splitlines()[0]}", file=sys.stderr)
        return None


def load_table(source: str, run_id: str, key: str) -> pd.DataFrame:
    """A summary wandb.Table of one run as a DataFrame (e.g. key "emergence/items", or its column
    name "summary.emergence/items"): offline from the run's media file, from W&B by downloading it."""
    key = key.removeprefix("summary.")
    if _resolve(source) == "local":
        meta = next((m for m in _Local(source).runs() if m["id"] == run_id), None)
        if meta is None:
            raise SourceError(f"run {run_id!r} not found in {source}")
        ref = meta["summary"].get(key)
        if not _is_table(ref):
            raise SourceError(
                f"run {run_id}: summary {key!r} is not a Table (tables: "
                f"{', '.join(k for k, v in meta['summary'].items() if _is_table(v)) or 'none'})"
            )
        frame = _read_table_file(meta["path"], ref, key)
        if frame is None:
            raise SourceError(f"run {run_id}: the file of summary {key!r} cannot be read ({ref['path']})")
        return frame
    run = remote.api().run(f"{source}/{run_id}")
    ref = (getattr(run.summary, "_json_dict", None) or dict(run.summary)).get(key)
    if not _is_table(ref):
        raise SourceError(f"run {run_id}: summary {key!r} is not a Table")
    with tempfile.TemporaryDirectory() as tmp:
        run.file(ref["path"]).download(root=tmp, replace=True)
        return _table_frame(os.path.join(tmp, ref["path"]))


def _resolve(source: str):
    if is_local(source):
        return "local"
    if W_AND_B_PATH.match(source):
        return "wandb"
    raise SourceError(f"SOURCE {source!r} is neither a local wandb directory nor a W&B path entity/project")


def load_runs(source: str, sweep: str | None = None, filters: dict | None = None) -> pd.DataFrame:
    """One row per run: id, name, state, sweep, project, group, job_type, tags, path, truncated,
    corrupt, n_files (offline), config.*, summary.*. `filters`: W&B's MongoDB-style filter
    (harness/runstore/filters.py says what works offline). attrs: "errors" (run files skipped),
    "warnings"."""
    if _resolve(source) == "local":
        local = _Local(source)
        metas = _check_sweep(local.runs(), sweep, source)
        if filters is not None:
            run_filters.check(filters, metas)
            metas = [m for m in metas if run_filters.matches(filters, m)]
        table = _table(metas, local=True)
        table.attrs["errors"], table.attrs["warnings"] = local.errors, local.warnings
    else:
        table = _table(load_wandb(source, sweep, filters))
        table.attrs["errors"], table.attrs["warnings"] = [], []
    return table


def load_history(
    source: str,
    run_ids: Iterable[str] | None = None,
    sweep: str | None = None,
    keys: list[str] | None = None,
    long: bool = False,
) -> pd.DataFrame:
    """Full-resolution history: run_id, step, one column per metric, one row per (run, step), train
    and evaluation metrics of the same step side by side (wandb writes them as separate rows).
    `long=True`: the tidy form instead, one row per (run_id, step, metric) with its value (NaN-free;
    W&B's own `_step`, `_runtime`, `_timestamp` and the step axis itself left out)."""
    hist = _one_row_per_step(_load_history(source, run_ids, sweep, keys))
    return _long_form(hist) if long else hist


def _one_row_per_step(hist: pd.DataFrame) -> pd.DataFrame:
    if not len(hist) or "step" not in hist or not hist.duplicated(["run_id", "step"]).any():
        return hist
    # first() takes each column's first non-missing value of the step: rows of one step never log the
    # same metric twice (a resumed run's files are joined without repeats: harness.runstore.local).
    out = hist.groupby(["run_id", "step"], sort=False, as_index=False, dropna=False).first()
    return run_cache.typed(out)


def _long_form(hist: pd.DataFrame) -> pd.DataFrame:
    values = [c for c in hist.columns if c not in ("run_id", "step", "trainer/global_step") and not c.startswith("_")]
    out = hist.melt(id_vars=["run_id", "step"], value_vars=values, var_name="metric", value_name="value")
    return out.dropna(subset=["value"]).sort_values(["run_id", "step", "metric"], kind="stable").reset_index(drop=True)


def _load_history(
    source: str, run_ids: Iterable[str] | None, sweep: str | None, keys: list[str] | None
) -> pd.DataFrame:
    ids = None if run_ids is None else set(run_ids)
    frames: dict[str, pd.DataFrame] = {}  # run id -> its rows
    if _resolve(source) == "local":
        local = _Local(source)
        chosen = [m["id"] for m in _check_sweep(local.runs(), sweep, source) if ids is None or m["id"] in ids]
        tables = local.tables(chosen)
        if tables is not None and any(t is not None for t in tables):
            return _history_from_tables(chosen, tables, keys)
        for run_id in chosen:
            frames[run_id] = _select(local.history(run_id), keys)
    else:
        for m in load_wandb(source, sweep):
            if ids is None or m["id"] in ids:
                wanted = None if keys is None else list(keys) + ["trainer/global_step", "_step"]
                h = pd.DataFrame.from_records(list(m["_run"].scan_history(keys=wanted)))
                if len(h):
                    h["step"] = h["trainer/global_step"] if "trainer/global_step" in h else h["_step"]
                frames[m["id"]] = _select(run_cache.typed(h), keys)
    # A run without rows adds none, but its empty frame would make pandas turn the other runs'
    # int64 columns (_step) into float64; the cached Arrow path above keeps int64.
    frames = {run_id: f for run_id, f in frames.items() if len(f)}
    if not frames:
        return pd.DataFrame(columns=["run_id", "step", *(keys or [])])
    # One copy (the concat; the frames may be this process's memo, never modified), then run_id and
    # step moved to the front without copying the float columns.
    hist = run_cache.typed(pd.concat(frames.values(), ignore_index=True))  # a column some runs lack: still numeric
    hist.insert(0, "run_id", np.repeat(np.array(list(frames), dtype=object), [len(f) for f in frames.values()]))
    if "step" in hist:
        hist.insert(1, "step", hist.pop("step"))
    return hist


def _history_from_tables(run_ids: list[str], tables: list, keys: list[str] | None) -> pd.DataFrame:
    """What the run-by-run path of load_history gives, from the runs' cached Arrow tables."""
    import pyarrow as pa

    parts, owners = [], []
    for run_id, t in zip(run_ids, tables):
        if t is None:
            continue
        if keys is not None:
            present = [k for k in keys if k in t.column_names]
            t = t.select(["step", *present]) if present else t.select(["step"]).slice(0, 0)
        parts.append(t)
        owners.append(run_id)
    hist = pa.concat_tables(parts, promote_options="default").to_pandas(ignore_metadata=True, use_threads=False)
    hist.insert(0, "run_id", np.repeat(np.array(owners, dtype=object), [t.num_rows for t in parts]))
    if keys is not None:
        present = [k for k in keys if k in hist.columns]
        hist = hist.dropna(subset=present, how="all").reset_index(drop=True) if present else hist.iloc[0:0]
    hist = run_cache.typed(hist)
    hist.insert(1, "step", hist.pop("step"))
    return hist


def _select(hist: pd.DataFrame, keys: list[str] | None) -> pd.DataFrame:
    if keys is None or not len(hist):
        return hist  # an empty one is dropped by _load_history
    present = [k for k in keys if k in hist.columns]
    sub = hist[["step", *present]]
    return sub.dropna(subset=present, how="all") if present else sub.iloc[0:0]


def artifact_files(source: str, run_id: str, artifact_type: str) -> dict[str, str]:
    """{path in artifact: local file} for the artifacts of one type that a run logged."""
    if _resolve(source) == "local":
        for m in _Local(source).runs():
            if m["id"] == run_id:
                return _local_artifact_files(m, artifact_type)
        raise SourceError(f"run {run_id!r} not found in {source}")
    run = remote.api().run(f"{source}/{run_id}")
    files = {}
    for art in run.logged_artifacts():
        if art.type == artifact_type:
            root = art.download()
            for entry in art.manifest.entries:
                files[entry] = os.path.join(root, entry)
    return files


def _local_artifact_files(meta: dict, artifact_type: str) -> dict[str, str]:
    """{path in artifact: local file} of an offline run's artifacts of one type (a later one wins)."""
    return {path: file for a in meta["artifacts"] if a["type"] == artifact_type for path, file in a["files"].items()}


def exportable(table: pd.DataFrame) -> pd.DataFrame:
    """The runs table for a file: a Table cell (a DataFrame) as its JSON text (orient "split")."""
    out = table.copy()
    for c in out.columns:
        if out[c].dtype == object and out[c].map(lambda v: isinstance(v, pd.DataFrame)).any():
            out[c] = out[c].map(
                lambda v: (
                    v.to_json(orient="split", index=False)
                    if isinstance(v, pd.DataFrame)
                    else None
                    if v is None
                    else json.dumps(v, default=str)
                )
            )
    return out


def to_parquet(table: pd.DataFrame, path: str) -> None:
    # A summary column can still mix types (a string in one run, a number in another): store such
    # columns as text rather than fail.
    out = exportable(table)
    for c in out.columns:
        if out[c].dtype == object and out[c].map(type).nunique() > 1:
            out[c] = out[c].map(lambda v: None if v is None else str(v))
    out.to_parquet(path, index=False)


def load_curves(source: str, name: str, run_ids: Iterable[str] | None = None, sweep: str | None = None) -> pd.DataFrame:
    """Per-item curves (contract C4): `<name>.parquet` of each run's `curves` artifact, e.g. name
    "subtask" (sparse parity: loss, acc per subtask) or "fourier" (modular addition: power, key per
    frequency), as one frame: run_id, step (int64), item (int64), one float64 column per metric.

    Runs without that file (crashed before the end of fit, or another task) are left out and listed
    in `frame.attrs["missing"]` and on stderr. A resumed run's last artifact wins. Offline, a file
    is found where the artifact recorded it, or in the run directory's curves/ (a moved wandb dir).
    """
    file = f"{name}.parquet"
    wanted = None if run_ids is None else list(dict.fromkeys(run_ids))
    paths: dict[str, str | None] = {}
    if _resolve(source) == "local":
        by_id = {m["id"]: m for m in _check_sweep(_Local(source).runs(), sweep, source)}
        for rid in wanted if wanted is not None else list(by_id):
            if rid not in by_id:
                raise SourceError(f"run {rid!r} not found in {source}" + (f" (sweep {sweep})" if sweep else ""))
            files = _local_artifact_files(by_id[rid], "curves")
            moved = os.path.join(by_id[rid]["path"], "curves", file)
            path = files.get(file)
            paths[rid] = (
                path if path and os.path.exists(path) else (moved if file in files and os.path.exists(moved) else None)
            )
    else:
        ids = wanted if wanted is not None else list(load_runs(source, sweep=sweep)["id"])
        paths = {rid: artifact_files(source, rid, "curves").get(file) for rid in ids}
    missing = [rid for rid, p in paths.items() if p is None]
    if missing:
        print(
            f"runstore: {len(missing)} run(s) have no curves {file}: {', '.join(missing[:10])}"
            + (" ..." if len(missing) > 10 else ""),
            file=sys.stderr,
        )
    frames = [pd.read_parquet(p).assign(run_id=rid) for rid, p in paths.items() if p is not None]
    out = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(
            {"step": pd.Series(dtype="int64"), "item": pd.Series(dtype="int64"), "run_id": pd.Series(dtype=str)}
        )
    )
    out = out[["run_id", "step", "item", *[c for c in out.columns if c not in ("run_id", "step", "item")]]]
    out.attrs["missing"] = missing
    return out
