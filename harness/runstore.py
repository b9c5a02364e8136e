"""One API for logged runs, from W&B or from offline run files, as pandas DataFrames.

    runs = load_runs("wandb")                      # a local wandb directory
    runs = load_runs("me/quanta", sweep="abc123")  # a W&B project (entity/project)
    hist = load_history("wandb", run_ids=runs.id, keys=["val/loss"])
"""
from __future__ import annotations

import glob
import hashlib
import os
import pickle
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable

import pandas as pd

from harness.errors import UserError
from harness.config import flatten
from harness.wandb_file import CorruptRunFile, RunFile, read_run_file, read_with_leet

CACHE_DIR = ".harness-cache"
RUNNING_GRACE_S = 120  # a run file without an exit record, written within this, is "running"
W_AND_B_PATH = re.compile(r"^[\w.-]+/[\w.-]+$")


class SourceError(UserError):
    """A SOURCE that is neither a wandb directory nor a reachable W&B project (one line)."""


def is_local(source: str) -> bool:
    return os.path.exists(source)


def wandb_dir(source: str) -> str:
    """Accept the wandb directory itself or its parent (WANDB_DIR)."""
    if os.path.isdir(os.path.join(source, "wandb")) and not glob.glob(os.path.join(source, "*run-*")):
        return os.path.join(source, "wandb")
    return source


def run_files(source: str) -> list[str]:
    root = wandb_dir(source)
    files = sorted(p for p in glob.glob(os.path.join(root, "*run-*", "run-*.wandb"))
                   if not os.path.islink(os.path.dirname(p)))  # skip wandb's latest-run link
    if not files and not os.path.isdir(os.path.join(root, "..", "wandb")) and not glob.glob(os.path.join(root, "sweep-*")):
        raise SourceError(f"{source!r} is not a wandb directory: no */run-*.wandb files under it")
    return files


# -- offline: one run file -> (meta, history frame), cached by path, size and mtime ---------------

def _state(rf: RunFile, mtime: float) -> str:
    if rf.exit_code is not None:
        return "finished" if rf.exit_code == 0 else "failed"
    return "running" if time.time() - mtime < RUNNING_GRACE_S and not rf.truncated else "crashed"


def _digest(rf: RunFile, path: str, mtime: float) -> tuple[dict, pd.DataFrame]:
    meta = {
        "id": rf.run_id or os.path.basename(path)[4:-6],
        "name": rf.name,
        "state": _state(rf, mtime),
        "sweep": rf.sweep_id or None,
        "project": rf.project,
        "path": os.path.dirname(path),
        "truncated": rf.truncated,
        "config": flatten(rf.config),
        "summary": {k: v for k, v in rf.summary.items() if not k.startswith("_")},
        "artifacts": rf.artifacts,
    }
    hist = rf.history
    if len(hist):
        hist["step"] = hist["trainer/global_step"] if "trainer/global_step" in hist else hist["_step"]
    return meta, hist


def _cache_path(path: str, st: os.stat_result) -> str:
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(os.path.dirname(path)), CACHE_DIR, f"{key}.pkl")


_MEMO: dict[str, tuple[dict, pd.DataFrame]] = {}  # cache file -> decoded run, for this process


def load_run_file(path: str, use_cache: bool = True) -> tuple[dict, pd.DataFrame]:
    st = os.stat(path)
    cache = _cache_path(path, st)
    if use_cache and cache in _MEMO:  # load_runs then load_history in one script read disk once
        return _MEMO[cache]
    if use_cache and os.path.exists(cache):
        with open(cache, "rb") as f:
            _MEMO[cache] = pickle.load(f)
        return _MEMO[cache]
    try:
        rf = read_run_file(path)
    except CorruptRunFile:
        raise
    except Exception:  # the fast path could not cope (a newer record layout): use the official decoder
        rf = read_with_leet(path)
    out = _digest(rf, path, st.st_mtime)
    if use_cache and out[0]["state"] != "running":
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}"
        with open(tmp, "wb") as f:
            pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cache)
        _MEMO[cache] = out
    return out


def _load_one(path: str):
    try:
        return path, load_run_file(path), None
    except (CorruptRunFile, OSError) as e:
        return path, None, str(e)


def _warm_cache(path: str) -> None:
    # In a worker process: decode into the disk cache and send nothing big back through the pipe
    # (pickling 200 histories to the parent cost more than reading them from the cache).
    try:
        load_run_file(path)
    except (CorruptRunFile, OSError):
        pass


def load_local(source: str, workers: int | None = None) -> tuple[list[dict], dict[str, pd.DataFrame], list[str]]:
    files = run_files(source)
    uncached = [p for p in files if not os.path.exists(_cache_path(p, os.stat(p)))]
    workers = workers or min(os.cpu_count() or 1, 8)
    if len(uncached) >= 8 and workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_warm_cache, uncached, chunksize=4))
    results = [_load_one(p) for p in files]
    metas, hists, errors = [], {}, []
    for path, res, err in results:
        if err:
            errors.append(err)
            print(f"runstore: skipped unreadable run file {err}", file=sys.stderr)
            continue
        meta, hist = res
        metas.append(meta)
        hists[meta["id"]] = hist
    return metas, hists, errors


# -- W&B: the official client; history at full resolution via scan_history ---------------------

def _api():
    import wandb

    return wandb.Api(timeout=60)


def _check_sweep(metas: list[dict], sweep: str | None, source: str) -> list[dict]:
    if sweep is None:
        return metas
    chosen = [m for m in metas if m["sweep"] == sweep]
    if not chosen:
        known = sorted({m["sweep"] for m in metas if m["sweep"]})
        raise SourceError(f"sweep {sweep!r} has no runs in {source}; sweeps there: {', '.join(known) or 'none'}")
    return chosen


def load_wandb(source: str, sweep: str | None = None, filters: dict | None = None) -> list[dict]:
    f = dict(filters or {})
    if sweep:
        f["sweep"] = sweep
    try:
        runs = list(_api().runs(source, filters=f or None))
    except Exception as e:  # the client raises several types (CommError, ValueError, HTTPError)
        raise SourceError(f"{source!r} is neither a wandb directory nor a reachable W&B project: {e}".splitlines()[0]) from None
    metas = []
    for r in runs:
        summary = getattr(r.summary, "_json_dict", None) or dict(r.summary)
        metas.append({
            "id": r.id, "name": r.name, "state": r.state,
            "sweep": r.sweep.id if getattr(r, "sweep", None) else None,
            "project": r.project, "path": "/".join(r.path), "truncated": False,
            "config": flatten(dict(r.config)),
            "summary": {k: v for k, v in summary.items() if not k.startswith("_")},
            "artifacts": [], "_run": r,
        })
    if sweep and not metas:
        raise SourceError(f"sweep {sweep!r} has no runs in {source}")
    return metas


# -- the public API -----------------------------------------------------------------------------

def _table(metas: list[dict]) -> pd.DataFrame:
    rows = []
    for m in metas:
        row = {k: m[k] for k in ("id", "name", "state", "sweep", "project", "path", "truncated")}
        row.update({f"config.{k}": v for k, v in m["config"].items()})
        for k, v in m["summary"].items():
            row[f"summary.{k}"] = v if not isinstance(v, (dict, list)) else str(v)
        rows.append(row)
    return pd.DataFrame(rows)


def _resolve(source: str):
    if is_local(source):
        return "local"
    if W_AND_B_PATH.match(source):
        return "wandb"
    raise SourceError(f"SOURCE {source!r} is neither a local wandb directory nor a W&B path entity/project")


def load_runs(source: str, sweep: str | None = None, filters: dict | None = None) -> pd.DataFrame:
    """One row per run: id, name, state, sweep, project, path, config.*, summary.*."""
    if _resolve(source) == "local":
        metas, _, errors = load_local(source)
        metas = _check_sweep(metas, sweep, source)
        table = _table(metas)
        table.attrs["errors"] = errors
    else:
        table = _table(load_wandb(source, sweep, filters))
        table.attrs["errors"] = []
    if filters and len(table):
        for key, value in filters.items():
            if key.startswith("config.") and key in table:
                table = table[table[key] == value]
    return table.reset_index(drop=True)


def load_history(source: str, run_ids: Iterable[str] | None = None, sweep: str | None = None,
                 keys: list[str] | None = None) -> pd.DataFrame:
    """Full-resolution history, one row per logged step: run_id, step, metric columns."""
    ids = None if run_ids is None else set(run_ids)
    frames = []
    if _resolve(source) == "local":
        metas, hists, _ = load_local(source)
        for m in _check_sweep(metas, sweep, source):
            if ids is None or m["id"] in ids:
                frames.append(_select(hists[m["id"]], keys).assign(run_id=m["id"]))
    else:
        for m in load_wandb(source, sweep):
            if ids is None or m["id"] in ids:
                wanted = None if keys is None else list(keys) + ["trainer/global_step", "_step"]
                h = pd.DataFrame.from_records(list(m["_run"].scan_history(keys=wanted)))
                if len(h):
                    h["step"] = h["trainer/global_step"] if "trainer/global_step" in h else h["_step"]
                frames.append(_select(h, keys).assign(run_id=m["id"]))
    if not frames:
        return pd.DataFrame(columns=["run_id", "step", *(keys or [])])
    hist = pd.concat(frames, ignore_index=True)
    front = ["run_id", "step"]
    return hist[front + [c for c in hist.columns if c not in front]]


def _select(hist: pd.DataFrame, keys: list[str] | None) -> pd.DataFrame:
    if keys is None or not len(hist):
        return hist.copy() if len(hist) else pd.DataFrame(columns=["step"])
    present = [k for k in keys if k in hist.columns]
    sub = hist[["step", *present]]
    return sub.dropna(subset=present, how="all") if present else sub.iloc[0:0]


def artifact_files(source: str, run_id: str, artifact_type: str) -> dict[str, str]:
    """{path in artifact: local file} for the artifacts of one type that a run logged."""
    if _resolve(source) == "local":
        metas, _, _ = load_local(source)
        for m in metas:
            if m["id"] == run_id:
                files = {}
                for a in m["artifacts"]:
                    if a["type"] == artifact_type:
                        files.update(a["files"])
                return files
        raise SourceError(f"run {run_id!r} not found in {source}")
    run = _api().run(f"{source}/{run_id}")
    files = {}
    for art in run.logged_artifacts():
        if art.type == artifact_type:
            root = art.download()
            for entry in art.manifest.entries:
                files[entry] = os.path.join(root, entry)
    return files


def to_parquet(table: pd.DataFrame, path: str) -> None:
    # Summary columns can mix numbers, strings and nulls (censored events): store those as text.
    out = table.copy()
    for c in out.columns:
        if out[c].dtype == object and out[c].map(type).nunique() > 1:
            out[c] = out[c].map(lambda v: None if v is None else str(v))
    out.to_parquet(path, index=False)
