"""Read an offline `.wandb` run file: W&B's protobuf records in a LevelDB-style log.

Written by hand because no Python library reads this file any more (wandb's own reader lives in
the Go core); `wandb leet inspect --json` is the official decoder, used as the fallback and as the
oracle in tests. Format: a 7-byte header (b":W&B", magic 0xBEE1 little-endian, version 0), then
32 KiB blocks of chunks, each with a 7-byte header (CRC-32 of type and payload, uint16 length,
uint8 type: FULL=1, FIRST=2, MIDDLE=3, LAST=4); a block tail shorter than a chunk header is zero
padding. Every checksum is verified (`Log`); damage and truncation are reported, never read past.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


DECODER_VERSION = 4  # bump whenever a change here changes what a run file decodes to: it keys the cache
_TYPE_CRC = [zlib.crc32(bytes([t])) for t in range(256)]  # each chunk's checksum starts with its type byte
_VERIFY = True  # off only in benchmarks/bench_runstore.py, to measure what verifying costs


class CorruptRunFile(ValueError):
    pass


class Log:
    """The record payloads of a run file, in order, with every chunk's checksum verified.

    The checksum is what wandb-core's writer stores (core/pkg/leveldb, `CRCAlgoIEEE`): the plain
    CRC-32 (IEEE, `zlib.crc32`) of the chunk's type byte and payload, not LevelDB's masked crc32c.
    A chunk whose checksum is wrong is dropped (with the record it belongs to); if its length field
    is itself damaged (no valid chunk follows it), the rest of its block is dropped and reading
    resumes at the next block's first FULL or FIRST chunk, as LevelDB's and wandb's readers
    recover. Each loss is listed in `damage`. `truncated` is True when the file ends inside a chunk or
    inside a record (a run killed mid-write).
    """

    def __init__(self, data: bytes, path: str = ""):
        if len(data) < HEADER.size:
            raise CorruptRunFile(f"{path}: {len(data)} bytes, too short for a W&B run file header")
        ident, magic, _version = HEADER.unpack_from(data, 0)
        if ident != b":W&B" or magic != 0xBEE1:
            raise CorruptRunFile(f"{path}: not a W&B run file (header {data[:7]!r}, want b':W&B' + 0xBEE1)")
        self.data = data
        self.damage: list[str] = []
        self.truncated = False

    def _lost(self, pos: int, what: str, after: int | None = None) -> int:
        """Record a damaged chunk at `pos`; return where reading resumes: `after` (the end of the
        chunk) if a valid chunk, the block's end or the file's end is there, else the next block."""
        if after is not None and self._valid_at(after):
            self.damage.append(f"{what} at byte {pos}: its record dropped")
            return after
        block = pos // BLOCK
        self.damage.append(f"{what} at byte {pos}: the rest of block {block} dropped")
        return (block + 1) * BLOCK

    def _valid_at(self, pos: int) -> bool:
        data = self.data
        if BLOCK - pos % BLOCK < CHUNK.size:
            pos += BLOCK - pos % BLOCK
        if pos >= len(data):
            return True
        if pos + CHUNK.size > len(data):
            return False
        crc, length, kind = CHUNK.unpack_from(data, pos)
        start = pos + CHUNK.size
        return (
            length <= BLOCK - pos % BLOCK - CHUNK.size
            and start + length <= len(data)
            and zlib.crc32(data[start : start + length], _TYPE_CRC[kind]) == crc
        )

    def __iter__(self) -> Iterator[bytes]:
        data, end = self.data, len(self.data)
        pos, parts = HEADER.size, None  # parts: the chunks of an unfinished record
        skipping = False  # after a loss: MIDDLE/LAST chunks of the lost record are expected, not news
        while True:
            space = BLOCK - pos % BLOCK
            if space < CHUNK.size:  # block trailer (zeros)
                pos += space
                continue
            if pos + CHUNK.size > end:
                if pos < end or parts is not None:
                    self.truncated = True  # cut inside a chunk header, or inside a record
                return
            crc, length, kind = CHUNK.unpack_from(data, pos)
            start = pos + CHUNK.size
            if crc == 0 and length == 0 and kind == 0:
                if not data.count(0, pos, end) == end - pos:
                    pos, parts, skipping = self._lost(pos, "a zeroed chunk header"), None, True
                    continue
                self.truncated = True  # zeros to the end: space allocated, never written
                return
            if start + length > end:
                self.truncated = True  # the last chunk was cut short
                return
            if length > space - CHUNK.size:
                pos, parts, skipping = self._lost(pos, "a chunk longer than its block"), None, True
                continue
            if _VERIFY and zlib.crc32(data[start : start + length], _TYPE_CRC[kind]) != crc:
                if len(data.rstrip(b"\0")) < start + length:  # cut, then zero-filled (a crash)
                    self.truncated = True
                    return
                pos, parts, skipping = self._lost(pos, "a chunk with a bad checksum", start + length), None, True
                continue
            chunk = data[start : start + length]
            here, pos = pos, start + length
            if kind in (FULL, FIRST):
                if parts is not None:
                    self.damage.append(f"a record without its last chunk before byte {here}: dropped")
                skipping = False
                if kind == FULL:
                    parts = None
                    yield chunk
                else:
                    parts = [chunk]
            elif kind in (MIDDLE, LAST):
                if parts is None:
                    if not skipping:
                        self.damage.append(
                            f"a {'middle' if kind == MIDDLE else 'last'} chunk without "
                            f"its first at byte {here}: dropped"
                        )
                    continue
                parts.append(chunk)
                if kind == LAST:
                    record, parts = b"".join(parts), None
                    yield record
            else:
                self.damage.append(f"a chunk of unknown type {kind} at byte {here}: dropped")


def _item_key(item) -> str:
    nk = item.nested_key
    # wandb-core writes one-element nested keys; str.join over a upb container is 3x slower.
    # A logged dict {"a": {"b": 1}} arrives as ["a", "b"]: "a.b", as W&B's API and leet name it.
    return nk[0] if len(nk) == 1 else (item.key or ".".join(nk))


def _json_values(items) -> dict[str, Any]:
    # One json.loads per record instead of one per value: ~10x faster on 100-metric rows.
    keys = [_item_key(i) for i in items]
    values = json.loads("[" + ",".join([i.value_json or "null" for i in items]) + "]")
    return dict(zip(keys, values))


class _DictRows:
    """History rows decoded item by item through upb: the plain, exact reading of any run file."""

    def __init__(self):
        self.rows: list[dict] = []
        self.steps: list[int | None] = []

    def add(self, hist) -> int:
        self.rows.append(_json_values(hist.item))
        self.steps.append(hist.step.num if hist.HasField("step") else None)
        return len(self.rows) - 1

    def shape(self, i: int) -> tuple[int, None]:  # item count; item bytes: not known here
        return len(self.rows[i]), None

    def row(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def signature(self, i: int):
        return frozenset(self.rows[i])

    def frame(self) -> pd.DataFrame:  # `_step` is added by the caller, from `steps`
        return pd.DataFrame.from_records(self.rows)


# Byte layout of the history rows wandb-core writes, decoded with numpy instead of item by item
# (written by hand: no library reads protobuf in bulk). A record is b"\x08" num, then its one field
# (history: tag 0x12, summary: 0x1a) with a varint length. A history row is its items, then its step.
# An item whose key is one nested_key element and whose value is short ASCII is
# b"\x0a" len b"\x12" len KEY b"\x82\x01" len VALUE, every length below 128.
# A summary record item: b"\x0a" len, key fields (tags 0x0a, 0x12), then the value as above.
_SUMMARY_ITEM = rb"\x0a[\x00-\x7f]((?:[\x0a\x12][\x00-\x7f][ -~]+)+)\x82\x01[\x00-\x7f][ -~]+"
_SUMMARY_KEYS = re.compile(_SUMMARY_ITEM)
_SUMMARY_ITEMS = re.compile(rb"(?:" + _SUMMARY_ITEM + rb")*")
_NUMBER_BYTES = np.zeros(256, bool)
_NUMBER_BYTES[list(b"0123456789+-.eE")] = True
_FRACTION_BYTES = np.zeros(256, np.uint8)
_FRACTION_BYTES[list(b".eE")] = True
_HASH = np.random.default_rng(0).integers(1, 2**63, 17, dtype=np.uint64) | np.uint64(1)  # keys < 128 bytes


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return value, pos
        shift += 7


def _record_field(payload: bytes) -> tuple[int, int, int] | None:
    """(tag, start, end) of a record's one field, as wandb-core lays records out; None otherwise."""
    try:
        pos = _varint(payload, 1)[1] if payload[0] == 0x08 else 0
        length, start = _varint(payload, pos + 1)
    except IndexError:
        return None
    return (payload[pos], start, start + length) if start + length <= len(payload) else None


def _span_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the spans [starts[i], starts[i] + lengths[i]), one after the other."""
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())


class _PackedRows:
    """History rows kept as wandb-core's bytes and decoded together with numpy: ~5x faster than
    item by item. `decode` refuses (False) whatever it does not fully account for, and the caller
    then reads the file with `_DictRows`; the result is the same either way."""

    def __init__(self):
        self.regions: list[bytes] = []  # per row: its items' bytes
        self.steps: list[int | None] = []
        self.counts: list[int] = []
        self.sizes: list[int] = []

    def add(self, payload: bytes, start: int, end: int) -> int:
        # The step closes the row: b"\x12\x00" (step 0) or b"\x12" len b"\x08" varint. Found from
        # the end; whether everything before it is items is checked in `decode`.
        stop, step = end, None
        if payload.startswith(b"\x12\x00", end - 2):
            stop, step = end - 2, 0
        else:
            for length in range(2, 12):
                at = end - 2 - length
                if at >= start and payload[at] == 0x12 and payload[at + 1] == length and payload[at + 2] == 0x08:
                    try:
                        num, after = _varint(payload, at + 3)
                    except IndexError:
                        return None
                    if after == end:
                        stop, step = at, num
                    break
        self.regions.append(payload[start:stop])
        self.steps.append(step)
        self.counts.append(payload.count(b"\x82\x01", start, stop))
        self.sizes.append(stop - start)
        return len(self.regions) - 1

    def shape(self, i: int) -> tuple[int, int]:  # item count, item bytes
        return self.counts[i], self.sizes[i]

    def decode(self) -> bool:
        """Parse every row at once; False if some item or value is not in the packed layout."""
        n = len(self.regions)
        buf = b"".join(self.regions)
        arr = np.frombuffer(buf, np.uint8)
        lens = np.array(self.sizes, dtype=np.int64)
        ends = np.cumsum(lens)
        starts = ends - lens
        # Value tags: in these rows 0x82 occurs only there (lengths < 128, text is ASCII).
        tag = np.flatnonzero(arr == 0x82)
        tag = tag[arr[np.minimum(tag + 1, len(arr) - 1)] == 0x01]
        counts = np.searchsorted(tag, ends) - np.searchsorted(tag, starts)
        if not np.array_equal(counts, self.counts):
            return False
        vstart = tag + 3
        vlen = arr[tag + 2].astype(np.int64)
        vend = vstart + vlen
        item = np.empty_like(tag)  # where each item starts: its row's start or the last value's end
        item[1:] = vend[:-1]
        rows_with = counts > 0
        first = (np.cumsum(counts) - counts)[rows_with]
        item[first] = starts[rows_with]
        # Every length byte must agree with this layout: then protobuf reads the same items.
        ok = (
            (arr[item] == 0x0A)
            & (arr[item + 2] == 0x12)
            & (item + 4 + arr[item + 3] == tag)
            & (item + 2 + arr[item + 1] == vend)
        ).all()
        ok = ok and (vend[np.cumsum(counts)[rows_with] - 1] == ends[rows_with]).all() and not lens[~rows_with].any()
        if not ok:
            return False
        # Values: their bytes side by side, then Arrow's string-to-double cast (C++, exact).
        voff = np.zeros(len(tag) + 1, np.int64)
        np.cumsum(vlen, out=voff[1:])
        text = arr[_span_index(vstart, vlen)]
        if not _NUMBER_BYTES[text].all():  # strings, NaN, null, objects: the plain reader
            return False
        try:
            strings = pa.StringArray.from_buffers(len(tag), pa.py_buffer(voff.astype(np.int32)), pa.py_buffer(text))
            values = pc.cast(strings, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return False
        # JSON integers (kept as ints, as json.loads gives them): integral values without . e E.
        is_int = values == np.floor(values)
        maybe = np.flatnonzero(is_int)
        if len(maybe):
            span = vlen[maybe]
            is_int[maybe] = (
                np.add.reduceat(_FRACTION_BYTES[text[_span_index(voff[maybe], span)]], np.cumsum(span) - span) == 0
            )
        if (np.abs(values[is_int]) >= 2**53).any():
            return False
        # Keys: read 8 bytes at a time at each key's start, mask what lies past its end, hash the
        # words, then check every key against its hash's first holder (exact, whatever the hash).
        klen = tag - item - 4
        if klen.max(initial=0) > 8 * (len(_HASH) - 1):
            return False
        words = np.ndarray((len(buf),), "<u8", buf + bytes(8), 0, (1,))  # a word at every byte
        parts = [klen.astype(np.uint64)]
        for j in range(0, int(klen.max(initial=0)), 8):
            at = np.minimum(item + 4 + j, len(buf) - 1)  # past a short key: masked to 0 below
            keep = np.clip(klen - j, 0, 8).astype(np.uint64)
            mask = np.where(keep == 8, np.uint64(2**64 - 1), (np.uint64(1) << (keep * np.uint64(8))) - np.uint64(1))
            parts.append(words[at] & mask)
        hashes = np.zeros(len(klen), np.uint64)
        for k, part in enumerate(parts):
            hashes += part * _HASH[k]
        col, _ = pd.factorize(hashes)  # codes in order of first appearance, as pandas orders dicts
        firsts = np.flatnonzero(np.diff(np.maximum.accumulate(col), prepend=-1)) if len(col) else col
        if not all((part == part[firsts[col]]).all() for part in parts):
            return False
        self.names = [arr[item[f] + 4 : tag[f]].tobytes().decode() for f in firsts]
        row = np.repeat(np.arange(n), counts)
        self.table = np.full((n, len(self.names)), np.nan)
        self.table[row, col] = values
        self.present = np.zeros(self.table.shape, bool)
        self.present[row, col] = True
        self.ints = np.zeros(self.table.shape, bool)
        self.ints[row, col] = is_int
        return True

    def row(self, i: int) -> dict[str, Any]:
        cols = np.flatnonzero(self.present[i])
        return {self.names[c]: int(v) if self.ints[i, c] else float(v) for c, v in zip(cols, self.table[i, cols])}

    def signature(self, i: int) -> bytes:
        return self.present[i].tobytes()

    def frame(self) -> pd.DataFrame:
        whole = self.ints.all(0) if len(self.table) else np.zeros(len(self.names), bool)
        table = np.asfortranarray(self.table)  # contiguous columns
        # JSON integers in every row stay int64; one dict, so pandas makes one block per dtype.
        return pd.DataFrame(
            {name: table[:, c].astype(np.int64) if whole[c] else table[:, c] for c, name in enumerate(self.names)}
        )


@dataclass
class RunFile:
    run_id: str = ""
    name: str = ""
    project: str = ""
    sweep_id: str = ""
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per logged step
    artifacts: list[dict] = field(default_factory=list)
    exit_code: int | None = None
    preempting: bool = False  # the run called mark_preempting()
    truncated: bool = False  # the file ends inside a chunk or a record (killed mid-write)
    damage: list[str] = field(default_factory=list)  # chunks or records dropped (bad checksum, ...)
    start_time: float | None = None
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)


def _apply_config(config: dict, rec) -> None:
    for item in rec.update:
        *path, last = item.nested_key or [item.key]
        node = config
        for k in path:
            node = node.setdefault(k, {})
        node[last] = json.loads(item.value_json) if item.value_json else None
    for item in rec.remove:
        config.pop(_item_key(item), None)


def _summary_keys(payload: bytes) -> bytes | None:
    """The key fields of a summary record that only updates, in the packed layout; else None."""
    head = _record_field(payload)
    if head is None or not _SUMMARY_ITEMS.fullmatch(payload, head[1], head[2]):
        return None
    return b"\0".join(_SUMMARY_KEYS.findall(payload, head[1], head[2]))


def _pop_path(d: dict, path: list[str]) -> None:
    """Remove the entry at `path` (a list of keys) from the nested dict `d`, if it is there."""
    node = d
    for k in path[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _replay_summary(ops: list, rows) -> dict[str, Any]:
    """The summary after all its operations, replayed from the last, so that an operation whose
    keys are all written later is skipped undecoded (wandb-core writes two summary records a step).
    Operations: ("update", dict), ("record", summary record payload), ("rows", first, end)."""
    out: dict[str, Any] = {}
    done: set[str] = set()
    seen_rows: set = set()  # key sets of rows already applied: a row with one of them adds nothing
    seen_records: set = set()  # the same for summary records (their key fields' bytes)
    cut: list[list[str]] = []  # nested keys removed later than the operation at hand ({"a": {"b"}})

    def put(items: dict, removed=()) -> None:
        done.update(removed)  # a record removes after it updates: its removals win
        for k, v in items.items():
            if k not in done:
                if isinstance(v, dict) and any(p[0] == k for p in cut):
                    v = json.loads(json.dumps(v))  # a copy, without the entries removed later
                    for p in cut:
                        if p[0] == k:
                            _pop_path(v, p[1:])
                out[k] = v
                done.add(k)

    for op in reversed(ops):
        if op[0] == "update":
            put(op[1])
        elif op[0] == "record":
            keys = _summary_keys(op[1])
            if keys is not None and keys in seen_records:
                continue
            seen_records.add(keys)
            rec = pb.Record()
            rec.ParseFromString(op[1])
            s = rec.summary
            removed = [k for k in map(_item_key, s.remove) if k not in done]
            cut.extend(list(i.nested_key) for i in s.remove if len(i.nested_key) > 1)
            if removed or not done.issuperset([_item_key(i) for i in s.update]):
                put(_json_values(s.update), removed)
        else:
            for r in range(op[2] - 1, op[1] - 1, -1):
                sig = rows.signature(r)
                if sig not in seen_rows:
                    seen_rows.add(sig)
                    put(rows.row(r))
    return dict(reversed(out.items()))  # roughly the order of first writes


def read_run_file(path: str, shortcut: bool = True, packed: bool = True) -> RunFile:
    """Decode a run file. `shortcut` and `packed` (see `_decode`) change the speed, not the result."""
    with open(path, "rb") as f:
        data = f.read()
    out = _decode(data, path, shortcut, packed)
    if out is None and packed:  # a row or value outside the packed layout: read item by item
        out = _decode(data, path, shortcut, False)
    if out is None:  # a summary policy appeared after the shortcut was taken: decode exactly
        out = _decode(data, path, False, False)
    return out


def _decode(data: bytes, path: str, shortcut: bool, packed: bool) -> RunFile | None:
    """Replay the records of a run file.

    Just before every history row, wandb-core writes a summary record holding that row's values
    (the default "last value" summary). Decoding those costs as much as the history itself, so with
    `shortcut` a summary record directly followed by a row with as many items (and, packed, as many
    bytes) is taken as that row. That is exact unless a metric record asks for another summary
    (min, max, ...): then return None and the caller decodes everything. `packed` reads history
    rows with `_PackedRows`; None if they do not fit its layout.
    """
    out = RunFile()
    log = Log(data, path)
    rec = pb.Record()
    rows = _PackedRows() if packed else _DictRows()
    ops: list[tuple] = []  # summary operations, see _replay_summary
    # The last summary record, not applied yet: (its payload, item count, item bytes or None).
    pending: tuple[bytes, int, int | None] | None = None

    def flush():
        nonlocal pending
        if pending is not None:
            ops.append(("record", pending[0]))
            pending = None

    for n, payload in enumerate(log, 1):
        try:
            head = _record_field(payload) if packed else None
            if head is not None and head[0] == 0x12:  # history
                row = rows.add(payload, head[1], head[2])
                if row is None:  # not the packed layout: the caller reads the file item by item
                    return None
            elif head is not None and head[0] == 0x1A and shortcut:  # summary
                flush()  # value tags and bytes are compared with the next row's before it is dropped
                pending = (payload, payload.count(b"\x82\x01", head[1], head[2]), head[2] - head[1])
                continue
            else:
                rec.ParseFromString(payload)
                kind = rec.WhichOneof("record_type")
                if kind == "history" and packed:  # a history record in another layout
                    return None
                row = rows.add(rec.history) if kind == "history" else None
            if row is not None:
                if pending is not None and pending[1:] == rows.shape(row):
                    pending = None  # the summary record is this row: apply the row instead
                    if ops and ops[-1][0] == "rows" and ops[-1][2] == row:
                        ops[-1] = ("rows", ops[-1][1], row + 1)
                    else:
                        ops.append(("rows", row, row + 1))
                flush()
                continue
            flush()
            if kind == "summary":
                if shortcut and not len(rec.summary.remove):
                    pending = (payload, len(rec.summary.update), None)
                else:
                    ops.append(("record", payload))
            elif kind == "metric":
                m = rec.metric
                policies = ("min", "max", "mean", "best", "none", "first")  # all but last and copy
                if shortcut and m.HasField("summary") and any(getattr(m.summary, p) for p in policies):
                    return None
            elif kind == "config":
                _apply_config(out.config, rec.config)
            elif kind == "run":
                r = rec.run
                out.run_id, out.project = r.run_id, r.project
                out.name = r.display_name or out.name
                out.sweep_id = r.sweep_id or out.sweep_id
                out.group, out.job_type = r.run_group or out.group, r.job_type or out.job_type
                out.tags = list(r.tags) or out.tags
                if r.HasField("start_time"):
                    out.start_time = r.start_time.seconds
                _apply_config(out.config, r.config)
                ops.append(("update", _json_values(r.summary.update)))
            elif kind == "artifact":
                a = rec.artifact
                out.artifacts.append(
                    {
                        "name": a.name,
                        "type": a.type,
                        "aliases": list(a.aliases),
                        "metadata": a.metadata,
                        "files": {e.path: e.local_path for e in a.manifest.contents},
                    }
                )
            elif kind == "exit":
                out.exit_code = rec.exit.exit_code
            elif kind == "preempting":
                out.preempting = True
        except DecodeError as e:  # checksums matched, yet not a Record: a writer bug, or a forged file
            if n == 1:
                raise CorruptRunFile(f"{path}: cannot decode the first record ({e})") from None
            log.damage.append(f"record {n} does not decode ({e}): dropped")
            flush()
    flush()
    out.truncated, out.damage = log.truncated, log.damage
    if packed and not rows.decode():
        return None
    out.summary = _replay_summary(ops, rows)
    out.history = rows.frame() if rows.steps else pd.DataFrame()
    if any(s is not None for s in rows.steps):  # a row without a step: NaN (float64 converts None)
        out.history["_step"] = np.array(rows.steps, dtype=np.int64 if None not in rows.steps else np.float64)
    out.config.pop("_wandb", None)
    return out


def read_with_leet(path: str, wandb_exe: str = "wandb") -> RunFile:
    """The official decoder (slow: ~1-2 s a run): `wandb leet inspect --json`."""
    proc = subprocess.run([wandb_exe, "leet", "inspect", "--json", path], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CorruptRunFile(f"{path}: wandb leet inspect failed: {proc.stderr.strip()[:200]}")
    out, history = RunFile(), []
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        kind = rec.get("type")
        body = rec.get(kind) or {}
        if kind == "history":
            row = dict(body.get("item", {}))
            if "step" in body:
                row["_step"] = int(body["step"].get("num", 0))
            history.append(row)
        elif kind == "run":
            out.run_id, out.name = body.get("run_id", ""), body.get("display_name", "")
            out.project, out.sweep_id = body.get("project", ""), body.get("sweep_id", "")
            out.group, out.job_type = body.get("run_group", ""), body.get("job_type", "")
            out.tags = list(body.get("tags", []))
            out.config.update(body.get("config", {}).get("update", {}))
            out.summary.update(body.get("summary", {}).get("update", {}))
        elif kind == "summary":
            out.summary.update(body.get("update", {}))
            _leet_remove(out.summary, body.get("remove") or [])
        elif kind == "config":
            out.config.update(body.get("update", {}))
            _leet_remove(out.config, body.get("remove") or [])
        elif kind == "exit":
            out.exit_code = int(body.get("exit_code", 0))
        elif kind == "preempting":
            out.preempting = True
    out.history = pd.DataFrame.from_records(history)
    out.config.pop("_wandb", None)
    return out


def _leet_remove(d: dict, items: list) -> None:
    """Apply leet's `"remove": [{"key": k} | {"nested_key": [k1, k2, ...]}]` to a summary or config."""
    for item in items:
        _pop_path(d, item.get("nested_key") or [item.get("key", "")] if isinstance(item, dict) else [str(item)])
