"""The run store's disk cache of decoded run files: JSON (the run's meta) + an Arrow IPC file (its
history; the Feather v2 format, `pd.read_feather` reads it).

Neither format can run code when read (the old cache was pickle: a planted file ran `os.system`).
Arrow IPC rather than parquet: reading 200 histories of 2,000 x 104 took 2.9 s of CPU from parquet
(its per-column page decoding), 0.9 s from Arrow IPC, 0.5 s from pickle (DESIGN.md).
An entry is named by a hash of the run file's absolute path, size, mtime and the decoder's version,
and its JSON repeats those fields, which are checked on every read: a changed file, a newer decoder
or a foreign or corrupt entry is never served; the caller is told why and decodes the file again.
Every record is checksummed: the JSON carries the CRC-32 of its own content (one digit changed in a
summary value is caught) and of the Arrow file. Entries are written to a temporary file and renamed;
a write that fails (a full disk) removes what it wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc

from harness.runstore.decoder import DECODER_VERSION

CACHE_DIR = ".harness-cache"
FORMAT = 4  # of the entries themselves (1 was pickle, 2 parquet, 3 JSON without its own checksum)
CACHE_ENV = "HARNESS_CACHE_DIR"  # a writable cache elsewhere, for read-only or full wandb directories
_COLUMN_TYPES = (
    pa.types.is_int64,
    pa.types.is_float64,
    pa.types.is_boolean,
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_null,
)


class BadEntry(Exception):
    """A cache entry that cannot be served (the message says why)."""


def cache_dir(wandb_root: str) -> str:
    # Absolute: the history file named in a meta stays valid after the caller changes directory.
    return os.path.abspath(os.environ.get(CACHE_ENV) or os.path.join(wandb_root, CACHE_DIR))


def _content_crc(entry: dict) -> int:
    """CRC-32 of an entry's content (all but its own checksum) as json.dumps spells it: a parsed
    entry keeps its keys' order, so it spells the same text it was parsed from, whatever changed
    the file's spacing; a changed value changes the text."""
    body = {k: v for k, v in entry.items() if k != "crc32"}
    return zlib.crc32(json.dumps(body).encode())


def identity(path: str, st: os.stat_result) -> dict:
    return {
        "format": FORMAT,
        "decoder": DECODER_VERSION,
        "path": os.path.abspath(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def entry_name(ident: dict) -> str:
    key = "\0".join(str(ident[k]) for k in ("format", "decoder", "path", "size", "mtime_ns"))
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def read_meta(root: str, ident: dict) -> dict | None:
    """The cached meta of a run file; None if there is no entry; BadEntry if it cannot be served."""
    path = os.path.join(root, entry_name(ident) + ".json")
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache directory) yet
        return None
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise BadEntry(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("meta"), dict):
        raise BadEntry(f"{path}: not a run-store cache entry")
    if any(entry.get(k) != v for k, v in ident.items()):
        raise BadEntry(f"{path}: written for another file, file version or decoder version")
    if entry.get("crc32") != _content_crc(entry):
        raise BadEntry(f"{path}: its checksum does not match its content")
    meta = entry["meta"]
    meta["_json_columns"] = entry.get("json_columns", [])
    meta["_history_file"] = path[:-5] + ".arrow" if entry.get("rows") else None
    meta["_history_crc32"] = entry.get("history_crc32")
    return meta


def read_history(meta: dict) -> pd.DataFrame:
    """The cached history of a run whose meta came from `read_meta`; BadEntry if it cannot be served."""
    table = read_table(meta)
    if table is None:
        return pd.DataFrame()
    hist = table.to_pandas(ignore_metadata=True, use_threads=False)  # pandas metadata is not trusted
    for c in meta["_json_columns"]:
        if c not in hist:
            raise BadEntry(f"{meta['_history_file']}: column {c!r} missing")
        try:
            hist[c] = [json.loads(v) if v is not None else None for v in hist[c]]
        except (TypeError, ValueError) as e:
            raise BadEntry(f"{meta['_history_file']}: column {c!r} is not JSON ({e})") from None
    return typed(hist)


def read_table(meta: dict) -> pa.Table | None:
    """The cached history as an Arrow table (JSON-text columns not decoded), None if the run has no
    history; BadEntry if it cannot be served."""
    path = meta.get("_history_file")
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
        if zlib.crc32(data) != meta["_history_crc32"]:  # another file under this name, or damaged
            raise BadEntry(f"{path}: its checksum does not match its entry")
        reader = ipc.open_file(pa.BufferReader(data))
        odd = [f"{f.name}: {f.type}" for f in reader.schema if not any(ok(f.type) for ok in _COLUMN_TYPES)]
        if odd:  # e.g. an extension type: never let a foreign file choose how it is deserialised
            raise BadEntry(f"{path}: unexpected column types ({', '.join(odd[:3])})")
        return reader.read_all()
    except (OSError, pa.ArrowException) as e:
        raise BadEntry(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def write(root: str, ident: dict, meta: dict, hist: pd.DataFrame) -> dict:
    """Write an entry (history first, then the JSON that makes it visible); OSError if it cannot.
    Returns what `read_meta` adds to a meta read back, so a caller can drop the history it holds."""
    os.makedirs(root, exist_ok=True)
    name = os.path.join(root, entry_name(ident))
    dtypes = hist.dtypes
    json_columns = [c for c, t in dtypes.items() if t == object]  # noqa: E721 (a numpy dtype compares equal to object; it is not object)
    bools = [c for c, t in dtypes.items() if isinstance(t, pd.BooleanDtype)]
    if len(hist):
        out = hist.copy() if json_columns or bools else hist  # the caller's frame stays as it is
        for c in json_columns:  # strings, dicts, mixed types: exact through JSON text
            out[c] = [json.dumps(v) for v in out[c]]
        for c in bools:  # nullable booleans: JSON text too (without pandas metadata they come back as objects)
            out[c] = [None if v is pd.NA else json.dumps(bool(v)) for v in out[c]]
        json_columns += bools
        table = pa.Table.from_pandas(out, preserve_index=False)
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, table.schema) as writer:  # uncompressed: reading is a copy
            writer.write_table(table)
        data = sink.getvalue()
        _replace(name + ".arrow", data)
    entry = dict(
        ident,
        rows=len(hist),
        json_columns=json_columns,
        history_crc32=zlib.crc32(data) if len(hist) else None,
        meta={k: v for k, v in meta.items() if not k.startswith("_")},
    )
    entry["crc32"] = _content_crc(entry)
    try:
        _replace(name + ".json", json.dumps(entry).encode("utf-8"))
    except BaseException:  # no history file without the entry that names it
        with contextlib.suppress(OSError):
            os.remove(name + ".arrow")
        raise
    return {
        "_json_columns": json_columns,
        "_history_file": name + ".arrow" if len(hist) else None,
        "_history_crc32": entry["history_crc32"],
    }


def _replace(path: str, data: bytes) -> None:
    """Write `path` atomically (a temporary file renamed over it); on failure (ENOSPC, EIO) the
    temporary file is removed and the error raised."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def probe(root: str) -> str | None:
    """None if entries can be written under `root`, else why not (one line)."""
    try:
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, f".probe.{os.getpid()}")
        with open(path, "w") as f:
            f.write("x")
        os.remove(path)
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"


def typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Give numeric and boolean columns numeric and boolean dtypes: an `object` column whose values
    (missing ones aside) are all numbers becomes float64 (int64 when all are present integers), all
    booleans: bool (or the nullable "boolean" when some are missing). Other columns stay as they are."""
    for c in frame.columns[frame.dtypes.values == object]:  # noqa: E721 (numpy dtypes: == object, not is)
        col = frame[c]
        present = col[col.notna()]
        if not len(present):
            continue
        kinds = set(map(type, present))
        if kinds == {bool} or kinds == {np.bool_}:
            frame[c] = col.astype(bool) if len(present) == len(col) else col.astype("boolean")
        elif kinds <= {int, float, np.int64, np.float64}:
            whole = kinds <= {int, np.int64} and len(present) == len(col)
            frame[c] = col.astype(np.int64) if whole and present.abs().max() < 2**63 else col.astype(float)
    return frame
