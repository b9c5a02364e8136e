"""Offline runs: a wandb directory's run files, decoded (harness.runstore.decoder) or served from the
cache (harness.runstore.cache), several files in worker processes, preempted-and-resumed files of one
run merged into one. What the store does when a file is damaged: DESIGN.md.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import pandas as pd

from harness.config.resources import available_cpus
from harness.config.run import flatten
from harness.errors import UserError
from harness.runstore import cache as run_cache
from harness.runstore.decoder import CorruptRunFile, RunFile, read_run_file, read_with_leet

PARALLEL_MIN_FILES = 8  # fewer uncached files than this are decoded in this process
RUNNING_GRACE_S = 120  # a run file without an exit record, written within this, is "running"
PREEMPTED_EXIT = 143  # 128 + SIGTERM: `harness train` exits so when preempted (contract C5)
_RUN_DIR_TIME = re.compile(r"run-(\d{8}_\d{6})-")


class SourceError(UserError):
    """A SOURCE that is neither a wandb directory nor a reachable W&B project (one line)."""


def is_local(source: str) -> bool:
    return os.path.exists(source)


def wandb_dir(source: str) -> str:
    """Accept the wandb directory itself or its parent (WANDB_DIR)."""
    if os.path.isdir(os.path.join(source, "wandb")) and not glob.glob(os.path.join(source, "*run-*")):
        return os.path.join(source, "wandb")
    return source


def _check_sweep(metas: list[dict], sweep: str | None, source: str) -> list[dict]:
    if sweep is None:
        return metas
    chosen = [m for m in metas if m["sweep"] == sweep]
    if not chosen:
        known = sorted({m["sweep"] for m in metas if m["sweep"]})
        raise SourceError(f"sweep {sweep!r} has no runs in {source}; sweeps there: {', '.join(known) or 'none'}")
    return chosen


def run_files(source: str) -> list[str]:
    root = wandb_dir(source)
    files = sorted(
        p for p in glob.glob(os.path.join(root, "*run-*", "run-*.wandb")) if not os.path.islink(os.path.dirname(p))
    )  # skip wandb's latest-run link
    if (
        not files
        and not os.path.isdir(os.path.join(root, "..", "wandb"))
        and not glob.glob(os.path.join(root, "sweep-*"))
    ):
        raise SourceError(f"{source!r} is not a wandb directory: no */run-*.wandb files under it")
    return files


# -- offline: one run file -> (meta, history frame) ---------------------------------------------

_WARNED: set[str] = set()  # each warning once per process (load_runs then load_history, say)


def _warn(msg: str, sink: list[str]) -> None:
    sink.append(msg)
    if msg not in _WARNED:
        _WARNED.add(msg)
        print(f"runstore: warning: {msg}", file=sys.stderr)


def _state(meta: dict) -> str:
    """Contract C5: exit 0 -> finished, 143 (or a non-zero exit after mark_preempting) -> preempted,
    other non-zero -> failed; no exit record -> running if written recently, else preempted (if
    it had called mark_preempting) or crashed."""
    code = meta["exit_code"]
    if code is not None:
        if code == 0:
            return "finished"
        return "preempted" if code == PREEMPTED_EXIT or meta["preempting"] else "failed"
    if time.time() - meta["_mtime"] < RUNNING_GRACE_S:
        return "running"
    return "preempted" if meta["preempting"] else "crashed"


SWEEP_TAG = "sweep-"  # a local sweep's runs are tagged sweep-<id> (harness.sweep.agent.local_sweep_env)


def sweep_of(sweep_id: str | None, tags) -> str | None:
    """A run's sweep: the W&B sweep id it ran under, else the local sweep its tag names."""
    return sweep_id or next((t[len(SWEEP_TAG) :] for t in tags or () if t.startswith(SWEEP_TAG)), None)


def _digest(rf: RunFile, path: str) -> tuple[dict, pd.DataFrame]:
    meta = {
        "id": rf.run_id or os.path.basename(path)[4:-6],
        "name": rf.name,
        "sweep": sweep_of(rf.sweep_id, rf.tags),
        "project": rf.project,
        "group": rf.group or None,
        "job_type": rf.job_type or None,
        "tags": list(rf.tags),
        "path": os.path.dirname(os.path.abspath(path)),  # absolute: the cache serves it from any directory
        "start_time": rf.start_time,
        "exit_code": rf.exit_code,
        "preempting": rf.preempting,
        "truncated": rf.truncated,
        "damage": list(rf.damage),
        "config": flatten(rf.config),
        "summary": {k: v for k, v in rf.summary.items() if not k.startswith("_")},
        "artifacts": rf.artifacts,
    }
    hist = rf.history
    if len(hist):
        hist["step"] = hist["trainer/global_step"] if "trainer/global_step" in hist else hist["_step"]
        # Columns sorted: wandb-core writes a row's items in no fixed order, and runs whose columns
        # line up concatenate block by block (5x faster for 200 runs than column by column).
        hist = hist[sorted(hist.columns)]
    return meta, run_cache.typed(hist)


def _decode(path: str, notes: list[str]) -> tuple[dict, pd.DataFrame]:
    """Decode one run file; CorruptRunFile/OSError if it cannot be read at all."""
    try:
        rf = read_run_file(path)
    except (CorruptRunFile, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - a layout the fast reader does not know: say so, then leet
        why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        notes.append(f"{path}: the fast reader failed ({why}); reading it with `wandb leet inspect` (slow)")
        wandb_exe = os.path.join(os.path.dirname(sys.executable), "wandb")
        rf = read_with_leet(path, wandb_exe if os.path.exists(wandb_exe) else "wandb")
    return _digest(rf, path)


def _unwritable(cache_root: str, why: str) -> str:
    return (
        f"cannot write the run cache in {cache_root} ({why}); runs are decoded again on every load "
        f"(set {run_cache.CACHE_ENV} to a writable directory)"
    )


def _load_file(path: str, cache_root: str, write: bool, send_history: bool = True):
    """One run file the cache did not serve, decoded (and cached when `write`). Runs in a worker
    process too, so it prints nothing: returns (path, meta or None, history or None, error or None, notes)."""
    notes: list[str] = []
    try:
        st = os.stat(path)
        meta, hist = _decode(path, notes)
        meta["_mtime"] = st.st_mtime
        # A file still being written changes with every step: caching it would only litter.
        if write and _state(meta) != "running":
            try:
                written = run_cache.write(cache_root, run_cache.identity(path, st), meta, hist)
                if not send_history:  # the parent reads the history file when it needs it
                    return path, dict(meta, **written), None, None, notes
            except OSError as e:
                notes.append(_unwritable(cache_root, f"{type(e).__name__}: {e.strerror or e}"))
        return path, meta, hist, None, notes
    except (CorruptRunFile, OSError) as e:
        return path, None, None, str(e), notes
    except Exception as e:  # noqa: BLE001 - one bad run never stops the load: it is listed instead
        return path, None, None, f"{path}: {type(e).__name__}: {e}".splitlines()[0], notes


def _progress(items, n: int):
    """A bar on an interactive terminal when there are enough run files to decode to wait for."""
    from tqdm import tqdm

    return tqdm(
        items,
        total=n,
        desc="decoding run files",
        unit="run",
        file=sys.stderr,
        leave=False,
        disable=n < PARALLEL_MIN_FILES or not sys.stderr.isatty(),
    )


_MEMO: dict[tuple, tuple[dict, pd.DataFrame | None]] = {}  # (path, size, mtime_ns) -> decoded, this process


class _Local:
    """The run files of a wandb directory, merged by run id (contract C5)."""

    def __init__(self, source: str):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.cache_root = run_cache.cache_dir(wandb_dir(source))
        units: dict[str, tuple[dict, pd.DataFrame | None]] = {}
        todo = []
        for p in run_files(source):
            try:
                st = os.stat(p)
            except OSError as e:
                self.errors.append(str(e))
                continue
            key = (os.path.abspath(p), st.st_size, st.st_mtime_ns)
            if key in _MEMO:
                units[p] = _MEMO[key]
                continue
            try:
                meta = run_cache.read_meta(self.cache_root, run_cache.identity(p, st))
            except run_cache.BadEntry as e:
                _warn(f"ignored a cache entry ({e}); decoding {p} again", self.warnings)
                meta = None
            if meta is not None:
                meta["_mtime"] = st.st_mtime
                units[p] = _MEMO[key] = (meta, None)
            else:
                todo.append((p, key))
        if todo:  # decode what the cache does not hold (in worker processes when there are many)
            why = run_cache.probe(self.cache_root)
            if why:
                _warn(_unwritable(self.cache_root, why), self.warnings)
            workers = min(available_cpus(), 8)
            paths = [p for p, _ in todo]
            load = partial(_load_file, cache_root=self.cache_root, write=not why)
            if len(todo) >= PARALLEL_MIN_FILES and workers > 1:
                # Workers write the cache and send back the meta only: pickling 200 histories
                # through the pipe costs more than the parent reading them from the cache. (With
                # no writable cache, the histories have to come through the pipe.)
                with ProcessPoolExecutor(workers) as pool:
                    results = list(
                        _progress(
                            pool.map(partial(load, send_history=False), paths, chunksize=4),
                            len(paths),
                        )
                    )
            else:
                results = [load(p) for p in _progress(paths, len(paths))]
            for (path, meta, hist, err, notes), (_, key) in zip(results, todo):
                for n in notes:
                    _warn(n, self.warnings)
                if err:
                    self.errors.append(err)
                    continue
                units[path] = _MEMO[key] = (meta, hist)
        for err in self.errors:
            print(f"runstore: skipped unreadable run file {err}", file=sys.stderr)
        self.units = units
        self.by_id: dict[str, list[str]] = {}
        for path in sorted(units, key=lambda p: self._order(units[p][0], p)):
            self.by_id.setdefault(units[path][0]["id"], []).append(path)
        for run_id, paths in self.by_id.items():
            damaged = [d for p in paths for d in units[p][0]["damage"]]
            if damaged:
                _warn(
                    f"run {run_id} ({units[paths[-1]][0]['path']}): {len(damaged)} damaged part(s), "
                    f"their records dropped and the run marked corrupt: {damaged[0]}"
                    + (f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""),
                    self.warnings,
                )

    @staticmethod
    def _order(meta: dict, path: str):
        # Resumed runs: the files of one id in the order they were written (the run directory
        # names its start time; start_time and mtime break ties).
        m = _RUN_DIR_TIME.search(os.path.basename(os.path.dirname(path)))
        return (m.group(1) if m else "", meta.get("start_time") or 0, meta["_mtime"], path)

    def runs(self) -> list[dict]:
        out = []
        for paths in self.by_id.values():
            metas = [self.units[p][0] for p in paths]
            last = metas[-1]
            merged = {k: v for k, v in last.items() if not k.startswith("_")}
            merged["state"] = _state(last)
            merged["truncated"] = any(m["truncated"] for m in metas)
            merged["damage"] = [d for m in metas for d in m["damage"]]
            merged["corrupt"] = bool(merged["damage"])
            merged["n_files"] = len(paths)
            merged["artifacts"] = [a for m in metas for a in m["artifacts"]]
            out.append(merged)
        return out

    def _file_history(self, path: str) -> pd.DataFrame:
        meta, hist = self.units[path]
        if hist is None:
            try:
                hist = run_cache.read_history(meta)
            except run_cache.BadEntry as e:
                notes = [f"ignored a cache entry ({e}); decoding {path} again"]
                _, hist = _decode(path, notes)
                for n in notes:
                    _warn(n, self.warnings)
            self.units[path] = (meta, hist)
            st = os.stat(path)
            _MEMO[(os.path.abspath(path), st.st_size, st.st_mtime_ns)] = (meta, hist)
        return hist

    def tables(self, run_ids: list[str]):
        """The cached histories of these runs as Arrow tables, when every one is a single cached
        file without JSON-text columns (the common case): concatenated in Arrow and converted to
        pandas once, they load ~4x faster than run by run. None otherwise."""
        out = []
        for run_id in run_ids:
            paths = self.by_id[run_id]
            meta, hist = self.units[paths[0]]
            if len(paths) > 1 or hist is not None or meta.get("_json_columns"):
                return None
            try:
                out.append(run_cache.read_table(meta))
            except run_cache.BadEntry:
                return None  # the run-by-run path reports it and decodes the file again
        return out

    def history(self, run_id: str) -> pd.DataFrame:
        """A run's history; a resumed run's files joined: the rows of a file after the first step b
        of the next file are dropped (the resumed run redid them from its checkpoint at b), and its
        rows at b only where the next file logged the same metric at b. A checkpoint taken after
        the evaluation at b (harness.training.checkpoint) resumes with the loss of step b, never that
        evaluation again: that evaluation is in the earlier file only."""
        frames = [self._file_history(p) for p in self.by_id[run_id]]
        if len(frames) == 1:
            return frames[0]
        kept = []
        for i, h in enumerate(frames):
            nxt = next((f for f in frames[i + 1 :] if len(f)), None)
            if len(h) and nxt is not None and pd.notna(b := nxt["step"].min()):
                redone = [
                    c
                    for c in nxt.columns
                    if c in h.columns
                    and not c.startswith("_")
                    and c not in ("step", "trainer/global_step")
                    and nxt.loc[nxt["step"] == b, c].notna().any()
                ]
                again = (h["step"] == b) & h[redone].notna().any(axis=1) if redone else False
                h = h[~((h["step"] > b) | again)]
            if len(h):
                kept.append(h)
        return run_cache.typed(pd.concat(kept, ignore_index=True)) if kept else pd.DataFrame()
