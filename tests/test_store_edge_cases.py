"""The run store at its edges (issue 18, points 6 and 9): a checksum on every cache record, a full
disk while the cache is written, absolute paths in the cache, one dtype for `_step` from the cache
and from a fresh decode, filters nested thousands deep, `$exists` on keys no run has, run fields
without a value, `$regex`."""

import errno
import glob
import json
import os

import pandas as pd
import pytest
import wandb

from harness import runstore
from harness.runstore import cache as run_cache
from harness.runstore import filters as run_filters
from harness.runstore import local as runstore_local
from tests.test_run_files import make_run


def _fresh_process(monkeypatch):
    """What a new Python process sees: no decoded run held in memory, no warning shown yet."""
    monkeypatch.setattr(runstore_local, "_MEMO", {})
    monkeypatch.setattr(runstore_local, "_WARNED", set())


def _cache_files(root):
    return sorted(glob.glob(os.path.join(root, runstore.CACHE_DIR, "*")))


# -- 6. every cache record carries a checksum ----------------------------------------------------


def test_one_digit_changed_in_a_json_entry_is_caught_and_decoded_again(tmp_path, monkeypatch):
    make_run(tmp_path, steps=5, summary={"final": 0.5029})
    root = str(tmp_path / "wandb")
    assert runstore.load_runs(root).loc[0, "summary.final"] == 0.5029
    (entry,) = [f for f in _cache_files(root) if f.endswith(".json")]
    text = open(entry).read()
    assert text.count("0.5029") == 1 and json.loads(text)["crc32"]
    open(entry, "w").write(text.replace("0.5029", "0.5929"))
    _fresh_process(monkeypatch)
    table = runstore.load_runs(root)
    assert table.loc[0, "summary.final"] == 0.5029  # before: 0.5929, no warning
    assert [w for w in table.attrs["warnings"] if "checksum does not match its content" in w and entry in w]
    # ... and decoding wrote a good entry back: served again without a warning.
    _fresh_process(monkeypatch)
    table = runstore.load_runs(root)
    assert table.loc[0, "summary.final"] == 0.5029 and table.attrs["warnings"] == []


def test_an_entry_respaced_but_unchanged_is_still_served(tmp_path, monkeypatch):
    make_run(tmp_path, steps=5, summary={"final": 0.5029})
    root = str(tmp_path / "wandb")
    runstore.load_runs(root)
    (entry,) = [f for f in _cache_files(root) if f.endswith(".json")]
    json.dump(json.load(open(entry)), open(entry, "w"), indent=2)  # same content, other spacing
    _fresh_process(monkeypatch)
    decoded = []
    real = runstore_local._decode
    monkeypatch.setattr(runstore_local, "_decode", lambda *a: decoded.append(a) or real(*a))
    table = runstore.load_runs(root)
    assert table.loc[0, "summary.final"] == 0.5029 and table.attrs["warnings"] == [] and decoded == []


# -- 9. a full disk, absolute paths, one dtype ---------------------------------------------------


class _FullDisk:
    """`open` for the cache module whose n-th entry file written (1: the Arrow history, 2: the JSON)
    fills the disk halfway through its write, as a write on a full file system fails: ENOSPC at the
    boundary, the OS call."""

    def __init__(self, fail_at: int):
        self.fail_at, self.opened = fail_at, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode or os.path.basename(path).startswith(".probe"):  # the writability probe passes
            return f
        self.opened += 1
        if self.opened != self.fail_at:
            return f
        real_write = f.write

        def write(data):
            real_write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        f.write = write
        return f


@pytest.mark.parametrize("fail_at", [1, 2], ids=["arrow-file", "json-entry"])
def test_a_cache_write_on_a_full_disk_leaves_nothing_behind(tmp_path, monkeypatch, fail_at):
    make_run(tmp_path, steps=6)
    root = str(tmp_path / "wandb")
    full = _FullDisk(fail_at)
    monkeypatch.setattr(run_cache, "open", full, raising=False)
    table = runstore.load_runs(root)
    assert full.opened == fail_at  # the write really failed where it was meant to
    assert len(table) == 1 and table.attrs["errors"] == []
    assert [w for w in table.attrs["warnings"] if "cannot write the run cache" in w and "No space left" in w]
    assert _cache_files(root) == []  # before: run-<hash>.arrow.<pid>.tmp stayed behind
    assert glob.glob(os.path.join(root, runstore.CACHE_DIR, ".*.tmp")) == []
    assert len(runstore.load_history(root)) == 6  # the run is still served, decoded


def test_the_cache_stores_absolute_paths(tmp_path, monkeypatch):
    make_run(tmp_path, steps=4)
    monkeypatch.chdir(tmp_path)
    first = runstore.load_runs("wandb")  # a relative source, as `harness runs wandb` gives it
    path = first.loc[0, "path"]
    assert os.path.isabs(path) and os.path.isdir(path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _fresh_process(monkeypatch)
    served = runstore.load_runs(str(tmp_path / "wandb"))  # from the cache, another working directory
    assert served.loc[0, "path"] == path and served.attrs["warnings"] == []
    assert len(runstore.load_history(str(tmp_path / "wandb"))) == 4
    monkeypatch.chdir(tmp_path)
    _fresh_process(monkeypatch)
    assert runstore.load_runs("wandb").loc[0, "path"] == path


def test_step_has_one_dtype_from_the_cache_and_from_a_fresh_decode(tmp_path, monkeypatch):
    make_run(tmp_path, steps=5, name="logged")
    run = wandb.init(
        project="t",
        dir=str(tmp_path),
        name="empty",
        reinit="finish_previous",
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    run.finish()  # a run that logged no row (crashed before its first step, say)
    wandb.teardown()
    root = str(tmp_path / "wandb")
    fresh = runstore.load_history(root)  # decoded now
    _fresh_process(monkeypatch)
    cached = runstore.load_history(root)  # from the cache's Arrow files
    assert fresh["_step"].dtype == cached["_step"].dtype == "int64"  # before: float64 when fresh
    assert fresh.dtypes.to_dict() == cached.dtypes.to_dict()
    pd.testing.assert_frame_equal(fresh, cached)


# -- 9. filters -------------------------------------------------------------------------------------


@pytest.fixture
def two_runs(tmp_path, monkeypatch):
    """One run in a sweep (started as the local controller starts it: WANDB_SWEEP_ID), one outside."""
    for name, sweep in (("plain", None), ("swept", "abcd1234")):
        if sweep:
            monkeypatch.setenv("WANDB_SWEEP_ID", sweep)
        run = wandb.init(
            project="t",
            dir=str(tmp_path),
            name=name,
            tags=["base", f"n-{name}"],
            config={"model": {"width": 8}},
            reinit="finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        run.log({"loss": 1.0})
        run.finish()
        wandb.teardown()  # wandb reads WANDB_SWEEP_ID when it sets up, once per process
        monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    return str(tmp_path / "wandb")


def _names(root, filters):
    return sorted(runstore.load_runs(root, filters=filters)["name"])


def test_exists_on_keys_no_run_has_and_on_run_fields_without_a_value(two_runs):
    table = runstore.load_runs(two_runs)
    assert sorted(zip(table["name"], table["sweep"].fillna("-"))) == [("plain", "-"), ("swept", "abcd1234")]
    # Before: refused ("no run has it"); MongoDB and W&B: every run lacks it.
    assert _names(two_runs, {"summary_metrics.error": {"$exists": False}}) == ["plain", "swept"]
    assert _names(two_runs, {"summary_metrics.error": {"$exists": True}}) == []
    # Before: [] (the sweep field held None, counted as present).
    assert _names(two_runs, {"sweep": {"$exists": False}}) == ["plain"]
    assert _names(two_runs, {"sweep": {"$exists": True}}) == ["swept"]
    assert _names(two_runs, {"group": {"$exists": False}}) == ["plain", "swept"]
    assert _names(two_runs, {"sweep": None}) == ["plain"]  # null still matches a missing field
    with pytest.raises(run_filters.FilterError, match="no run has it"):  # the typo guard stays elsewhere
        runstore.load_runs(two_runs, filters={"summary_metrics.error": 1})


def test_regex_works_offline_as_on_wandb(two_runs):
    assert _names(two_runs, {"display_name": {"$regex": "^sw"}}) == ["swept"]
    assert _names(two_runs, {"display_name": {"$regex": ".*p.*"}}) == ["plain", "swept"]
    assert _names(two_runs, {"tags": {"$regex": "^n-p"}}) == ["plain"]  # an array: any element
    assert _names(two_runs, {"config.model.width": {"$regex": "8"}}) == []  # $regex matches strings only
    assert _names(two_runs, {"$or": [{"display_name": {"$regex": "ain$"}}, {"sweep": {"$regex": "^abc"}}]}) == [
        "plain",
        "swept",
    ]
    for bad, message in (("(open", "is not a valid regular expression"), (5, "$regex takes a pattern string")):
        with pytest.raises(run_filters.FilterError) as e:
            runstore.load_runs(two_runs, filters={"display_name": {"$regex": bad}})
        assert message in str(e.value) and "\n" not in str(e.value)


def test_and_nested_thousands_deep_is_one_line(two_runs):
    deep: dict = {"display_name": "plain"}
    for _ in range(3000):
        deep = {"$and": [deep]}
    with pytest.raises(run_filters.FilterError) as e:  # before: RecursionError
        runstore.load_runs(two_runs, filters=deep)
    assert "nested more than 100 levels" in str(e.value) and "\n" not in str(e.value)
    ok: dict = {"display_name": "plain"}
    for _ in range(99):
        ok = {"$and": [ok]}
    assert _names(two_runs, ok) == ["plain"]
    worse = {"$and": {"$or": deep}}  # not a list, and too deep even to print
    with pytest.raises(run_filters.FilterError, match="takes a non-empty list"):
        runstore.load_runs(two_runs, filters=worse)
