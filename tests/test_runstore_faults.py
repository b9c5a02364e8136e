"""The run store under faults: read-only directories, a hostile or stale cache, damaged and cut
run files, a reader that fails. Each test fails on the run store before issue 10."""

import glob
import json
import os
import random
import re
import subprocess

import pandas as pd
import pytest

from harness import runstore
from harness.runstore import cache as run_cache
from harness.runstore import decoder as wandb_file
from harness.runstore import local as runstore_local
from harness.runstore.decoder import BLOCK, CHUNK, HEADER, read_run_file
from tests.conftest import harness
from tests.test_run_files import make_run


def _entries(root):
    return sorted(glob.glob(os.path.join(root, runstore.CACHE_DIR, "*")))


# -- 1. a read-only or full wandb directory ------------------------------------------------------


@pytest.fixture
def read_only(tmp_path):
    """A read-only view of tmp_path/src: a real read-only bind mount (root ignores chmod)."""
    src, view = tmp_path / "src", tmp_path / "view"
    src.mkdir()
    view.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(view)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (the unwritable-cache-path test covers the same code)")
    try:
        yield src, view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_read_only_wandb_directory_still_loads(read_only, capsys):
    src, view = read_only
    make_run(src, steps=20, name="ro")
    with pytest.raises(OSError):  # really read-only, even for root
        (view / "wandb" / "probe").write_text("x")
    table = runstore.load_runs(str(view / "wandb"))
    assert list(table["name"]) == ["ro"] and table.loc[0, "state"] == "finished"
    assert table.attrs["errors"] == []
    hist = runstore.load_history(str(view / "wandb"), keys=["m/03"])
    assert hist["m/03"].tolist() == [i * 0.5 + 3 for i in range(20)]
    err = capsys.readouterr().err
    assert err.count("cannot write the run cache") == 1 and "Read-only file system" in err
    assert "HARNESS_CACHE_DIR" in err and "unreadable" not in err
    cli = harness("runs", str(view / "wandb"), "-o", str(src.parent / "runs.csv"))
    assert "1 runs ->" in cli.stderr and len(pd.read_csv(src.parent / "runs.csv")) == 1


def test_unwritable_cache_path_is_a_warning_not_a_lost_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runstore_local, "PARALLEL_MIN_FILES", 2)  # the worker processes' path
    for i in range(3):
        make_run(tmp_path, steps=5, name=f"r{i}")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "file" / "cache"))  # cannot be created
    table = runstore.load_runs(str(tmp_path / "wandb"))
    assert sorted(table["name"]) == [f"r{i}" for i in range(3)] and table.attrs["errors"] == []
    assert len(runstore.load_history(str(tmp_path / "wandb"))) == 15
    err = capsys.readouterr().err
    assert err.count("cannot write the run cache") == 1 and "NotADirectoryError" in err
    assert [w for w in table.attrs["warnings"] if "cannot write" in w]


def test_harness_runs_exit_code_counts_failed_run_files(tmp_path):
    bad = tmp_path / "wandb" / "offline-run-20260101_000000-badrun01"
    bad.mkdir(parents=True)
    (bad / "run-badrun01.wandb").write_bytes(b"not a run file" * 10)
    proc = harness("runs", str(tmp_path / "wandb"), "-o", str(tmp_path / "runs.csv"), check=False)
    assert proc.returncode == 1, proc.stderr  # 0 runs because of errors is not a success
    assert "1 run file(s) failed to load" in proc.stderr and "badrun01" in proc.stderr
    make_run(tmp_path, steps=3, name="good")
    proc = harness("runs", str(tmp_path / "wandb"), "-o", str(tmp_path / "runs.csv"), check=False)
    assert proc.returncode == 0 and "1 run file(s) failed to load" in proc.stderr and "1 run(s) loaded" in proc.stderr
    proc = harness("runs", str(tmp_path / "wandb"), "-o", str(tmp_path / "runs.xlsx"), check=False)
    assert proc.returncode == 2 and "use a .csv or .parquet" in proc.stderr


# -- 2. the cache: no pickle, versioned, never trusted ------------------------------------------


def test_planted_pickle_is_never_loaded(tmp_path):
    make_run(tmp_path, steps=5)
    root = tmp_path / "wandb"
    runstore.load_runs(str(root))
    runstore_local._MEMO.clear()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    blob = pickle.dumps(Payload())
    # Under every name the cache uses or used: the old pickle name and the new entries.
    for entry in _entries(root):
        with open(entry, "wb") as f:
            f.write(blob)
    (root / runstore.CACHE_DIR / "0123456789abcdef.pkl").write_bytes(blob)
    table = runstore.load_runs(str(root))
    hist = runstore.load_history(str(root))
    assert not marker.exists()
    assert len(table) == 1 and len(hist) == 5 and table.attrs["errors"] == []
    assert any("ignored a cache entry" in w for w in table.attrs["warnings"])


def test_corrupt_and_foreign_cache_entries_are_re_decoded(tmp_path, capsys):
    make_run(tmp_path, steps=8)
    root = str(tmp_path / "wandb")
    expected = runstore.load_history(root)
    history_file, meta_file = _entries(root)
    # A valid Arrow file of another history, and a JSON entry cut in half: both ignored, run decoded.
    pd.DataFrame({"m/00": [7.0]}).to_feather(history_file)
    runstore_local._MEMO.clear()
    pd.testing.assert_frame_equal(runstore.load_history(root), expected)
    runstore_local._MEMO.clear()
    text = open(meta_file).read()
    open(meta_file, "w").write(text[: len(text) // 2])
    pd.testing.assert_frame_equal(runstore.load_history(root), expected)
    err = capsys.readouterr().err
    assert err.count("ignored a cache entry") == 2 and "decoding" in err
    # ... and a good entry was written back.
    runstore_local._MEMO.clear()
    assert json.load(open(meta_file))["decoder"] == wandb_file.DECODER_VERSION


def test_entry_for_another_decoder_version_is_not_served(tmp_path, monkeypatch):
    make_run(tmp_path, steps=4, summary={"final": 1.5})
    root = str(tmp_path / "wandb")
    runstore.load_runs(root)
    meta_file = [e for e in _entries(root) if e.endswith(".json")][0]
    entry = json.load(open(meta_file))
    entry["meta"]["summary"]["final"] = -1.0  # what an older decoder might have produced
    entry["crc32"] = run_cache._content_crc(entry)  # written whole, checksum and all
    json.dump(entry, open(meta_file, "w"))
    runstore_local._MEMO.clear()
    assert runstore.load_runs(root).loc[0, "summary.final"] == -1.0  # same version: served
    runstore_local._MEMO.clear()
    monkeypatch.setattr(run_cache, "DECODER_VERSION", wandb_file.DECODER_VERSION + 1)
    assert runstore.load_runs(root).loc[0, "summary.final"] == 1.5  # bumped: decoded again
    assert len(_entries(root)) == 4  # the old entry stays unused; the new one beside it


# -- 3. checksums and truncation ------------------------------------------------------------------


def _value_run(tmp_path):
    import wandb

    run = wandb.init(project="t", dir=str(tmp_path), settings=wandb.Settings(console="off", x_disable_stats=True))
    for i in range(60):
        run.log({"loss": 1.1001 if i == 30 else 2.0 + i / 64, "trainer/global_step": i + 1})
    run.finish()
    wandb.teardown()
    return glob.glob(str(tmp_path / "wandb" / "*run-*" / "run-*.wandb"))[0]


def test_one_flipped_digit_is_reported_not_returned(tmp_path, capsys):
    path = _value_run(tmp_path)
    good = read_run_file(path)
    data = open(path, "rb").read()
    assert data.count(b"1.1001") >= 1
    open(path, "wb").write(data.replace(b"1.1001", b"7.1001"))
    for fast in (True, False):  # the packed reader and the item-by-item reader
        rf = read_run_file(path, packed=fast, shortcut=fast)
        assert rf.damage and "bad checksum" in rf.damage[0]
        assert 7.1001 not in rf.history["loss"].tolist() and rf.summary.get("loss") != 7.1001
        kept = good.history.set_index("_step").loc[rf.history["_step"]]
        pd.testing.assert_frame_equal(rf.history.set_index("_step"), kept)  # what is kept is right
    table = runstore.load_runs(str(tmp_path / "wandb"))
    assert bool(table.loc[0, "corrupt"]) and table["corrupt"].dtype == bool
    assert "damaged part(s)" in capsys.readouterr().err
    hist = runstore.load_history(str(tmp_path / "wandb"))
    assert 7.1001 not in hist["loss"].tolist() and 1.1001 not in hist["loss"].tolist()


def _chunk_payloads(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every chunk's payload, walking the blocks as the decoder does."""
    pos, out = HEADER.size, []
    while pos + CHUNK.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK.size:  # block trailer
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0:
            break
        out.append((pos + CHUNK.size, length))
        pos += CHUNK.size + length
    return out


def test_two_hundred_flipped_bytes_flag_the_run(tmp_path):
    path = make_run(tmp_path, steps=300)
    good = read_run_file(path)
    data = bytearray(open(path, "rb").read())
    # One byte flipped in the payload of each of 200 chunks, no two of them adjacent: each fails its
    # checksum and is followed by a valid chunk, so each is exactly one loss (random file offsets
    # could land two in one chunk, or in a length field that drops the rest of a block: 19 losses
    # once). The first and last 10 chunks (the run, config and exit records) are left whole.
    chunks = _chunk_payloads(bytes(data))
    assert len(chunks) > 420  # 300 history records and the rest
    rng = random.Random(0)
    for start, length in rng.sample([c for c in chunks[10:-10:2] if c[1] > 0], 200):
        data[start + rng.randrange(length)] ^= 0xFF
    open(path, "wb").write(bytes(data))
    rf = read_run_file(path)
    assert len(rf.damage) == 200 and 0 < len(rf.history) < 300
    kept = good.history.set_index("_step").loc[rf.history["_step"]]
    pd.testing.assert_frame_equal(rf.history.set_index("_step"), kept)
    table = runstore.load_runs(str(tmp_path / "wandb"))
    assert table.loc[0, "corrupt"] and table.attrs["errors"] == []


def test_file_cut_mid_write_is_truncated(tmp_path):
    path = make_run(tmp_path, steps=400)
    assert not read_run_file(path).truncated
    data = open(path, "rb").read()
    open(path, "wb").write(data[: 2 * BLOCK + 1234])
    os.utime(path, (1e9, 1e9))  # written long ago: crashed, not running
    rf = read_run_file(path)
    assert rf.truncated and not rf.damage and rf.exit_code is None
    table = runstore.load_runs(str(tmp_path / "wandb"))
    assert bool(table.loc[0, "truncated"]) and table.loc[0, "state"] == "crashed"
    assert not table.loc[0, "corrupt"]


# -- 4. no silent fallback; one bad run never stops the load --------------------------------------


def test_fallback_to_leet_is_announced_and_handles_removed_summary_keys(tmp_path, monkeypatch, capsys):
    import wandb

    run = wandb.init(project="t", dir=str(tmp_path), settings=wandb.Settings(console="off", x_disable_stats=True))
    run.log({"x": 1.0})
    run.summary["gone"] = 1
    run.summary["nest"] = {"a": 1, "b": 2}
    del run.summary["gone"]
    del run.summary["nest"]["a"]
    run.finish()
    wandb.teardown()
    path = glob.glob(str(tmp_path / "wandb" / "*run-*" / "run-*.wandb"))[0]
    assert read_run_file(path).summary["nest"] == {"b": 2}  # the fast reader applies removals too

    def broken(*args, **kwargs):
        raise IndexError("a record layout the fast reader does not know")

    monkeypatch.setattr(runstore_local, "read_run_file", broken)
    table = runstore.load_runs(str(tmp_path / "wandb"))
    assert len(table) == 1 and table.loc[0, "summary.nest.b"] == 2
    assert "summary.gone" not in table and "summary.nest.a" not in table
    err = capsys.readouterr().err
    assert f"{path}: the fast reader failed (IndexError: a record layout" in err and "wandb leet" in err


def test_one_run_that_breaks_every_reader_does_not_stop_the_load(tmp_path, monkeypatch):
    make_run(tmp_path, steps=3, name="a")
    make_run(tmp_path, steps=3, name="b")
    real = runstore_local.read_run_file

    def picky(path, *args, **kwargs):
        if "run-" in path and real(path).name == "b":
            raise KeyError("boom")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(runstore_local, "read_run_file", picky)
    monkeypatch.setattr(
        runstore_local, "read_with_leet", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("leet too"))
    )
    table = runstore.load_runs(str(tmp_path / "wandb"))
    assert list(table["name"]) == ["a"]
    assert len(table.attrs["errors"]) == 1 and "RuntimeError: leet too" in table.attrs["errors"][0]


# -- contract C5: states, preemption, resumed runs -------------------------------------------------


def test_exit_codes_map_to_states(tmp_path):
    import wandb

    for name, code, preempt in (
        ("ok", 0, False),
        ("preempted", 143, True),
        ("failed", 1, False),
        ("sigterm_after_preempting", 1, True),
    ):
        run = wandb.init(
            project="t",
            dir=str(tmp_path),
            name=name,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        run.log({"x": 1})
        if preempt:
            run.mark_preempting()
        run.finish(exit_code=code)
    wandb.teardown()
    states = runstore.load_runs(str(tmp_path / "wandb")).set_index("name")["state"].to_dict()
    assert states == {
        "ok": "finished",
        "preempted": "preempted",
        "failed": "failed",
        "sigterm_after_preempting": "preempted",
    }


def test_resumed_run_files_merge_into_one_run(tmp_path, monkeypatch):
    import wandb

    settings = wandb.Settings(console="off", x_disable_stats=True)
    run = wandb.init(project="t", dir=str(tmp_path), id="resume01", config={"w": 1}, settings=settings)
    for step in range(1, 8):  # checkpointed at 5, preempted after 7
        run.log({"loss": 10.0 - step, "trainer/global_step": step})
    run.mark_preempting()
    run.finish(exit_code=143)
    wandb.teardown()
    first = glob.glob(str(tmp_path / "wandb" / "*run-*resume01"))[0]
    os.rename(first, re.sub(r"run-\d{8}_\d{6}-", "run-19990101_000000-", first))  # surely the older one
    run = wandb.init(project="t", dir=str(tmp_path), id="resume01", resume="allow", config={"w": 1}, settings=settings)
    for step in range(6, 11):  # resumed from the checkpoint at step 5
        run.log({"loss": 100.0 + step, "trainer/global_step": step})
    run.log({"val": 3.0, "trainer/global_step": 10})
    run.summary["final"] = 2.0
    run.finish()
    wandb.teardown()
    table = runstore.load_runs(str(tmp_path / "wandb"))
    assert len(table) == 1 and table.loc[0, "n_files"] == 2 and table.loc[0, "state"] == "finished"
    assert table.loc[0, "summary.final"] == 2.0
    hist = runstore.load_history(str(tmp_path / "wandb"), keys=["loss"])
    assert hist["step"].tolist() == list(range(1, 11))
    assert hist["loss"].tolist() == [10.0 - s for s in range(1, 6)] + [100.0 + s for s in range(6, 11)]


def test_an_evaluation_at_the_resume_step_stays_when_the_resumed_file_does_not_redo_it(tmp_path):
    """Checkpointed after the evaluation at step 300, preempted there: the resumed file starts with
    the train loss of step 300 and never evaluates 300 again; the merged history keeps that evaluation
    and takes the train loss at 300 from the resumed file only."""
    import wandb

    settings = wandb.Settings(console="off", x_disable_stats=True)
    run = wandb.init(project="t", dir=str(tmp_path), id="resume02", settings=settings)
    for step in (100, 200, 300):
        run.log({"train/loss": 1.0 / step, "trainer/global_step": step - 100})
        run.log({"val/loss": 2.0 / step, "trainer/global_step": step})
    run.log({"train/loss": -1.0, "trainer/global_step": 300})  # taken before the kill, redone after
    run.mark_preempting()
    run.finish(exit_code=143)
    wandb.teardown()
    first = glob.glob(str(tmp_path / "wandb" / "*run-*resume02"))[0]
    os.rename(first, re.sub(r"run-\d{8}_\d{6}-", "run-19990101_000000-", first))
    run = wandb.init(project="t", dir=str(tmp_path), id="resume02", resume="allow", settings=settings)
    run.log({"train/loss": 1.0 / 400, "trainer/global_step": 300})
    run.log({"val/loss": 2.0 / 400, "trainer/global_step": 400})
    run.finish()
    wandb.teardown()
    hist = runstore.load_history(str(tmp_path / "wandb"), keys=["train/loss", "val/loss"])
    val = hist.dropna(subset=["val/loss"])
    assert val["step"].tolist() == [100, 200, 300, 400]
    train = hist.dropna(subset=["train/loss"])
    assert train["step"].tolist() == [0, 100, 200, 300] and train["train/loss"].iloc[-1] == 1.0 / 400
