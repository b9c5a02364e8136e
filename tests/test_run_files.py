"""The fast reader of offline .wandb files against W&B's own decoder (`wandb leet inspect`)."""

import glob
import math
import os
import sys

import pandas as pd
import pytest
import wandb

from harness import runstore
from harness.runstore import decoder as wandb_file
from harness.runstore import local as runstore_local
from harness.runstore.decoder import BLOCK, CorruptRunFile, read_run_file, read_with_leet

WANDB_EXE = os.path.join(os.path.dirname(sys.executable), "wandb")


def make_run(root, steps=300, metrics=20, name="r", exit_code=0, summary=None):
    run = wandb.init(
        project="t",
        dir=str(root),
        name=name,
        config={"model": {"width": 7}, "lr": 1e-3},
        settings=wandb.Settings(console="off", x_disable_stats=True),
        reinit="finish_previous",
    )
    for i in range(steps):
        run.log({f"m/{j:02d}": i * 0.5 + j for j in range(metrics)} | {"trainer/global_step": i + 1})
    run.summary.update(summary or {"final": 1.5})
    run.finish(exit_code=exit_code)
    wandb.teardown()  # finish() can return before wandb-core has written the exit record
    return glob.glob(os.path.join(root, "wandb", f"*run-*{run.id}", f"run-{run.id}.wandb"))[0]


def _packed(path):
    return wandb_file._decode(open(path, "rb").read(), path, shortcut=True, packed=True)


def _same_frames(a, b):
    pd.testing.assert_frame_equal(a, b[list(a.columns)], check_dtype=False)
    assert sorted(a.columns) == sorted(b.columns)


def test_fast_reader_matches_the_official_decoder(tmp_path):
    path = make_run(tmp_path, summary={"final": 1.5, "emergence/step/0003": "censored"})
    fast, oracle = read_run_file(path), read_with_leet(path, WANDB_EXE)
    assert fast.run_id == oracle.run_id and fast.exit_code == 0 and _packed(path) is not None
    _same_frames(fast.history, oracle.history)
    assert len(fast.history) == 300 and fast.history["m/19"].iloc[-1] == 299 * 0.5 + 19
    assert fast.history["trainer/global_step"].dtype == "int64" and fast.history["m/03"].dtype == "float64"
    assert fast.config == oracle.config == {"model": {"width": 7}, "lr": 1e-3}
    assert fast.summary["final"] == 1.5 and fast.summary["emergence/step/0003"] == "censored"
    assert fast.summary["m/05"] == oracle.summary["m/05"] == 299 * 0.5 + 5
    # The shortcuts give exactly what a record-by-record, item-by-item replay gives.
    plain = read_run_file(path, shortcut=False, packed=False)
    assert plain.summary == fast.summary
    pd.testing.assert_frame_equal(plain.history, fast.history)


def test_rows_outside_the_packed_layout_read_the_same(tmp_path):
    """Strings, nested dicts, NaN, non-ASCII and 200-byte keys, sparse and mixed int/float columns:
    the packed reader either decodes them exactly or hands the file to the item-by-item reader."""
    run = wandb.init(project="t", dir=str(tmp_path), settings=wandb.Settings(console="off", x_disable_stats=True))
    long_key = "k" * 200
    for i in range(40):
        row = {"x": i * 0.25, "mixed": i if i % 2 else i + 0.5, "big": 2**40 + i}
        if i % 3 == 0:
            row["sparse"] = -1.5e-7 * i
        if i == 20:
            row.update({"text": "hello", "nested": {"a": 1}, "nan": float("nan"), "grüße": 1.0, long_key: 2.0})
        run.log(row)
    run.finish()
    wandb.teardown()
    path = glob.glob(str(tmp_path / "wandb" / "*run-*" / "run-*.wandb"))[0]
    fast, plain = read_run_file(path), read_run_file(path, shortcut=False, packed=False)
    assert _packed(path) is None  # the packed reader refused: the file was read item by item
    pd.testing.assert_frame_equal(fast.history, plain.history)
    assert fast.summary == plain.summary and fast.summary["grüße"] == 1.0 and fast.summary[long_key] == 2.0
    # leet writes NaN as the string "NaN" (JSON has no NaN); we read the float.
    _same_frames(fast.history.drop(columns="nan"), read_with_leet(path, WANDB_EXE).history.drop(columns="nan"))
    assert math.isnan(fast.summary["nan"])
    h = fast.history
    assert h["big"].tolist() == [2**40 + i for i in range(40)] and h.loc[20, "text"] == "hello"
    assert h.loc[20, "nested.a"] == 1 and fast.summary["nested.a"] == 1
    assert h["mixed"].iloc[:3].tolist() == [0.5, 1, 2.5] and h["sparse"].isna().sum() == 26


def test_packed_rows_give_ints_floats_and_gaps_as_pandas_would(tmp_path):
    run = wandb.init(project="t", dir=str(tmp_path), settings=wandb.Settings(console="off", x_disable_stats=True))
    for i in range(30):
        run.log({"n": i, "f": i / 7, "mixed": i if i % 2 else i + 0.5, **({"every5": 10 * i} if i % 5 == 0 else {})})
    run.finish()
    wandb.teardown()
    path = glob.glob(str(tmp_path / "wandb" / "*run-*" / "run-*.wandb"))[0]
    fast, plain = read_run_file(path), read_run_file(path, packed=False)
    assert _packed(path) is not None  # numbers only: read by the packed reader
    pd.testing.assert_frame_equal(fast.history, plain.history)
    assert fast.summary == plain.summary
    assert type(fast.summary["n"]) is int and type(fast.summary["f"]) is float
    h = fast.history
    assert str(h["n"].dtype) == "int64" and str(h["f"].dtype) == "float64" and str(h["mixed"].dtype) == "float64"
    assert h["every5"].dropna().tolist() == [0, 50, 100, 150, 200, 250] and h["f"].iloc[7] == 1.0


def test_truncated_file_keeps_the_records_before_the_cut(tmp_path):
    path = make_run(tmp_path, steps=400)
    data = open(path, "rb").read()
    assert len(data) > 3 * BLOCK
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[: 2 * BLOCK + 1234])  # killed mid-write, in the middle of a block
    rf = read_run_file(str(cut))
    assert rf.exit_code is None and 0 < len(rf.history) < 400
    assert rf.history["trainer/global_step"].tolist() == list(range(1, len(rf.history) + 1))
    pd.testing.assert_frame_equal(rf.history, read_run_file(str(cut), packed=False).history)


def test_corrupt_file_is_reported_and_other_runs_still_load(tmp_path, capsys):
    make_run(tmp_path, steps=10, name="good")
    bad_dir = tmp_path / "wandb" / "offline-run-20260101_000000-badrun01"
    bad_dir.mkdir()
    (bad_dir / "run-badrun01.wandb").write_bytes(b"this is not a run file at all" * 10)
    with pytest.raises(CorruptRunFile, match="not a W&B run file"):
        read_run_file(str(bad_dir / "run-badrun01.wandb"))
    table = runstore.load_runs(str(tmp_path / "wandb"))
    assert list(table["name"]) == ["good"] and table.loc[0, "state"] == "finished"
    assert any("badrun01" in e for e in table.attrs["errors"])
    assert "badrun01" in capsys.readouterr().err


def test_states_config_columns_and_history(tmp_path):
    make_run(tmp_path, steps=5, name="ok")
    make_run(tmp_path, steps=5, name="bad", exit_code=1)
    table = runstore.load_runs(str(tmp_path)).set_index("name")  # the parent of wandb/ works too
    assert table.loc["ok", "state"] == "finished" and table.loc["bad", "state"] == "failed"
    assert table.loc["ok", "config.model.width"] == 7
    hist = runstore.load_history(str(tmp_path), keys=["m/03"])
    assert list(hist.columns) == ["run_id", "step", "m/03"] and len(hist) == 10
    assert sorted(hist["step"].unique()) == [1, 2, 3, 4, 5]


def _second_load(tmp_path, monkeypatch):
    """Load twice; before the second load, forget this process's memo and make decoding fail."""
    make_run(tmp_path, steps=50)
    first = runstore.load_history(str(tmp_path / "wandb"))
    runstore_local._MEMO.clear()

    def no_decoding(path, *args, **kwargs):
        raise CorruptRunFile(f"{path}: decoded again")

    monkeypatch.setattr(runstore_local, "read_run_file", no_decoding)
    return first, runstore.load_history(str(tmp_path / "wandb"))


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    first, second = _second_load(tmp_path, monkeypatch)
    assert len(first) == 50 and first["m/19"].iloc[-1] == 49 * 0.5 + 19
    pd.testing.assert_frame_equal(first, second)  # every value, every dtype, from the cache
    entries = sorted(os.listdir(tmp_path / "wandb" / runstore.CACHE_DIR))
    assert [e.rsplit(".", 1)[1] for e in entries] == ["arrow", "json"]


def test_without_the_cache_the_second_load_decodes_again(tmp_path, monkeypatch):
    """The test above can fail: with the cache unwritable, the second load has to decode (and here
    cannot), so it returns no history."""
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "not-a-dir" / "cache"))
    first, second = _second_load(tmp_path, monkeypatch)
    assert len(first) == 50 and len(second) == 0


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(runstore.SourceError, match="neither a local wandb directory nor a W&B path"):
        runstore.load_runs("not a path or project")
    (tmp_path / "empty").mkdir()
    with pytest.raises(runstore.SourceError, match="not a wandb directory"):
        runstore.load_runs(str(tmp_path / "empty"))


def test_unreachable_wandb_project_is_a_one_line_error(monkeypatch):
    """The W&B path goes through the official client; this test stops at its HTTP boundary."""
    import http.server
    import threading

    seen = []

    class GraphQL(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(self.path)
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = b'{"data": {"viewer": null}}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GraphQL)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    try:
        with pytest.raises(runstore.SourceError) as e:
            runstore.load_runs("someone/some-project")
    finally:
        server.shutdown()
    assert "'someone/some-project' is neither a wandb directory nor a reachable W&B project" in str(e.value)
    assert "\n" not in str(e.value) and seen and seen[0] == "/graphql"


def test_history_in_one_piece_equals_run_by_run(tmp_path, monkeypatch):
    """load_history reads cached runs as Arrow tables and converts them once; the result is what
    reading and concatenating them run by run gives (runs with different columns, keys or not)."""
    make_run(tmp_path, steps=30, metrics=3, name="a")
    make_run(tmp_path, steps=20, metrics=5, name="b")
    root = str(tmp_path / "wandb")
    runstore.load_runs(root)
    runstore_local._MEMO.clear()  # from here on the histories come from the cache
    for keys in (None, ["m/04", "m/01"], ["m/04"], ["nothing"]):
        fast = runstore.load_history(root, keys=keys)
        with monkeypatch.context() as m:
            m.setattr(runstore_local._Local, "tables", lambda self, ids: None)
            slow = runstore.load_history(root, keys=keys)
        pd.testing.assert_frame_equal(fast, slow)
    assert len(fast) == 0 and len(runstore.load_history(root, keys=["m/04"])) == 20
    full = runstore.load_history(root)
    assert len(full) == 50 and full["m/04"].isna().sum() == 30 and str(full["trainer/global_step"].dtype) == "int64"
