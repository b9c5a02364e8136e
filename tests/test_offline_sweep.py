"""A local sweep as a W&B user meets it (issue 21): its runs in the YAML's project (or --project's),
grouped and tagged by the sweep, one spelling of each config key; `harness sync` uploads them (the
W&B server is a fake at the HTTP boundary: it records what wandb sends); model and checkpoint
artifacts the Lightning way, staged under the wandb directory and never under the home directory;
Tables and history ready for pandas; the notebook recipe of docs/runstore.md run as it is written.

One sweep (two grid points, real wandb offline, real Lightning) serves every test here."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
import torch
from conftest import REPO, TINY_SWEEP, harness, write_sweep

from harness import runstore
from harness.runstore import upload
from harness.training.artifacts import read_model

LEET = os.path.join(os.path.dirname(sys.executable), "wandb")
YAML_EXTRA = "name: upload_smoke\nproject: proj-from-yaml\nentity: ent-x\n"


def leet_records(run_dir: str) -> list[dict]:
    out = subprocess.run(
        [LEET, "leet", "inspect", "--json", run_dir], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    home = root / "home"
    home.mkdir()
    params = {
        **TINY_SWEEP,
        "model.width": "{values: [4, 8]}",
        "trainer.ckpt_every": "{value: 20}",
        "trainer.log_checkpoints": "{value: true}",
    }
    # The sweep's metric picks the `best` model: val/loss at its highest, so that the best weights
    # are those of an earlier evaluation than the last (the step-0 loss is the highest here; the test
    # reads the argmax from the history rather than assuming it).
    path = write_sweep(root / "s.yaml", params, extra=YAML_EXTRA)
    text = (
        open(path)
        .read()
        .replace("metric: {name: val/loss, goal: minimize}", "metric: {name: val/loss, goal: maximize}")
    )
    open(path, "w").write(text)
    env = {
        "WANDB_DIR": str(root),
        "HOME": str(home),
        # matplotlib (imported by torchmetrics through Lightning) writes its font cache under
        # $HOME/.cache whoever runs: not wandb's staging, which this test is about.
        "MPLCONFIGDIR": str(root / "mpl"),
    }
    for var in (
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "WANDB_DATA_DIR",
        "WANDB_CACHE_DIR",
        "WANDB_ARTIFACT_DIR",
        "WANDB_CONFIG_DIR",
    ):
        env[var] = ""
    full = {k: v for k, v in {**os.environ, **env}.items() if v != ""}
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "sweep", path, "--local", "--project", "proj-cli"],
        capture_output=True,
        text=True,
        env=full,
        timeout=900,
        cwd=str(root),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_id = proc.stdout.split()[-1]
    wandb_root = str(root / "wandb")
    runs = runstore.load_runs(wandb_root, sweep=sweep_id)
    return {"root": str(root), "wandb": wandb_root, "home": str(home), "id": sweep_id, "runs": runs, "env": full}


# ---- point 1: upload whole -----------------------------------------------------------------------


def test_run_records_carry_project_group_tag_and_no_server_sweep(sweep):
    runs = sweep["runs"]
    assert len(runs) == 2 and set(runs["state"]) == {"finished"}
    for path in runs["path"]:
        (run,) = [r["run"] for r in leet_records(path) if r["type"] == "run"]
        assert run["project"] == "proj-cli"  # --project overrides the YAML's project, as for `wandb sweep`
        assert run["entity"] == "ent-x"
        assert run["run_group"] == f"upload_smoke-{sweep['id']}"
        assert run["tags"] == [f"sweep-{sweep['id']}"]
        assert not run.get("sweep_id")  # no W&B server knows this sweep
        config = run["config"]["update"]
        assert [k for k in config if "." in k] == []  # one spelling: nested only, no flat model.width
        assert config["model"]["width"] in (4, 8) and config["trainer"]["ckpt_every"] == 20
        assert "log_checkpoints" not in config["trainer"]  # plumbing, like ckpt_dir
    # The run store still selects the sweep's runs by its id (the tag), in the table and on the command line.
    assert set(runs["sweep"]) == {sweep["id"]} and set(runs["project"]) == {"proj-cli"}
    assert sorted(runs["config.model.width"]) == [4, 8]
    out = harness("runs", sweep["wandb"], "--sweep", sweep["id"]).stdout
    assert set(runs["id"]) <= set(out.split())


def test_sync_dry_run_names_the_run_dirs_project_and_group(sweep):
    proc = harness("sync", sweep["wandb"], "--sweep", sweep["id"], "--dry-run")
    out = proc.stdout
    assert "project: proj-cli" in out and "entity: ent-x" in out
    dirs = sorted(glob.glob(os.path.join(sweep["wandb"], "offline-run-*")))
    assert len(dirs) == 2 and all(d in out for d in dirs)
    assert out.count(f"group=upload_smoke-{sweep['id']}") == 2
    assert re.search(
        r"command: \S*wandb sync --project proj-cli --entity ent-x \S+offline-run-\S+ \S+offline-run-", out
    )
    up = upload.plan(sweep["wandb"], sweep["id"], project="other")
    assert up.project == "other" and up.argv()[:4] == ["wandb", "sync", "--project", "other"]
    bad = harness("sync", sweep["wandb"], "--sweep", "nope1234", "--dry-run", check=False)
    assert bad.returncode == 2 and "nope1234" in bad.stderr and sweep["id"] in bad.stderr


class _FakeWandb(BaseHTTPRequestHandler):
    """W&B's API at the HTTP boundary: records every request, answers `{"data": {}}`. Enough for
    `wandb sync` to send each run's UpsertBucket (project, entity, group, tags, sweep, config)."""

    requests: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append({"path": self.path, "body": body.decode("utf-8", "replace")})
        data = b'{"data": {}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_PUT = do_POST

    def do_GET(self):
        self.do_POST()

    def log_message(self, *args):
        pass


def _upserts(requests: list[dict]) -> list[dict]:
    out = []
    for r in list(requests):
        if "UpsertBucket" in r["body"]:
            try:
                out.append(json.loads(r["body"])["variables"])
            except (ValueError, KeyError):
                pass
    return out


def test_sync_uploads_to_the_project_grouped_with_one_config_spelling(sweep, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeWandb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(
        sweep["env"],
        WANDB_BASE_URL=f"http://127.0.0.1:{server.server_address[1]}",
        WANDB_API_KEY="x" * 40,
        WANDB_MODE="online",
        HOME=str(tmp_path),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "sync", sweep["wandb"], "--sweep", sweep["id"]],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while (
            time.time() < deadline
            and len({v["name"] for v in _upserts(_FakeWandb.requests) if v.get("groupName")}) < 2
            and proc.poll() is None
        ):
            time.sleep(1)
    finally:  # the fake answers nothing useful to the later calls: stop wandb sync once the runs are sent
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        server.shutdown()
    first = {v["name"]: v for v in reversed(_upserts(_FakeWandb.requests)) if v.get("groupName")}
    assert set(first) == set(sweep["runs"]["id"])
    for v in first.values():
        assert (v["project"], v["entity"]) == ("proj-cli", "ent-x")
        assert v["groupName"] == f"upload_smoke-{sweep['id']}" and v["tags"] == [f"sweep-{sweep['id']}"]
        assert v["sweep"] is None
        config = json.loads(v["config"])
        assert "model" in config and not [k for k in config if "." in k]


# ---- point 2: artifacts the Lightning way --------------------------------------------------------


def _artifacts(run_dir: str) -> list[dict]:
    return [r["artifact"] for r in leet_records(run_dir) if r["type"] == "artifact"]


def test_model_artifact_is_a_lightning_checkpoint_with_latest_and_best(sweep):
    hist = runstore.load_history(sweep["wandb"], sweep=sweep["id"], keys=["val/loss"])
    for _, run in sweep["runs"].iterrows():
        models = [a for a in _artifacts(run["path"]) if a["type"] == "model"]
        assert {a["name"] for a in models} == {f"model-{run['id']}"}
        h = hist[hist["run_id"] == run["id"]]
        best_step = int(h.loc[h["val/loss"].idxmax(), "step"])  # the sweep's metric: val/loss, maximize
        # wandb records `latest` on every version it logs, and W&B keeps it on the newest one: the
        # final weights are logged last; `best` is on exactly one version.
        by_alias = {"latest": models[-1], "best": next(a for a in models if "best" in a["aliases"])}
        assert "latest" in models[-1]["aliases"] and sum("best" in a["aliases"] for a in models) == 1
        meta = {k: json.loads(a["metadata"]) for k, a in by_alias.items()}
        assert meta["latest"]["step"] == 60 and meta["best"]["step"] == best_step
        assert meta["best"]["score"] == pytest.approx(h["val/loss"].max())
        assert len(models) == (1 if best_step == 60 else 2)
        for a in by_alias.values():
            (entry,) = a["manifest"]["contents"]
            assert entry["path"] == "model.ckpt"
            # staged under the sweep's wandb directory (WANDB_DATA_DIR set there), not under ~/.local
            assert entry["local_path"].startswith(os.path.join(sweep["wandb"], "data", "artifacts", "staging"))
            ckpt = torch.load(entry["local_path"], map_location="cpu", weights_only=True)
            assert ckpt["global_step"] == 60 and "pytorch-lightning_version" in ckpt  # Lightning's layout
            assert sorted(ckpt["state_dict"]) == [
                "model.net.0.bias",
                "model.net.0.weight",
                "model.net.2.bias",
                "model.net.2.weight",
            ]
            assert ckpt["config"]["model"]["width"] == run["config.model.width"]
        if best_step != 60:  # the best version holds other weights than the final one
            a, b = (
                torch.load(by_alias[k]["manifest"]["contents"][0]["local_path"], weights_only=True)
                for k in ("best", "latest")
            )
            assert not torch.equal(a["state_dict"]["model.net.0.weight"], b["state_dict"]["model.net.0.weight"])
        # what tasks/quanta_discovery.py reads: the nn.Module's keys and the config
        files = runstore.artifact_files(sweep["wandb"], run["id"], "model")
        assert set(read_model(files["model.ckpt"])["state_dict"]) == {
            "net.0.weight",
            "net.0.bias",
            "net.2.weight",
            "net.2.bias",
        }


def test_checkpoints_are_logged_and_nothing_is_written_under_home(sweep):
    for _, run in sweep["runs"].iterrows():
        ckpts = [a for a in _artifacts(run["path"]) if a["type"] == "checkpoint"]
        assert {a["name"] for a in ckpts} == {f"checkpoint-{run['id']}"}
        assert [json.loads(a["metadata"])["step"] for a in ckpts] == [20, 40]  # every last.ckpt (not at the end)
        for a in ckpts:
            (entry,) = a["manifest"]["contents"]
            assert entry["path"] == "last.ckpt" and a["aliases"] == ["latest"]
            assert entry["local_path"].startswith(os.path.join(sweep["wandb"], "data"))
            assert "optimizer_states" in torch.load(entry["local_path"], map_location="cpu", weights_only=True)
    assert [os.path.relpath(os.path.join(d, f), sweep["home"]) for d, _, fs in os.walk(sweep["home"]) for f in fs] == []


def test_resume_from_a_logged_checkpoint_artifact_dir(sweep, tmp_path):
    """Another machine: only the artifact's file (as `wandb artifact get` downloads it), the same run id."""
    run = sweep["runs"].iloc[0]
    (last,) = [a for a in _artifacts(run["path"]) if a["type"] == "checkpoint"][-1:]
    art = tmp_path / "artifact"
    art.mkdir()
    os.link(last["manifest"]["contents"][0]["local_path"], art / "last.ckpt")
    # the run's own config (a resume point belongs to one run config): the sweep's keys and its cadence
    over = [f"{k}={v.strip('{}').split(': ', 1)[1]}" for k, v in TINY_SWEEP.items()] + ["trainer.ckpt_every=20"]
    proc = harness(
        "train",
        *over,
        f"model.width={run['config.model.width']}",
        f"trainer.resume_from={art}",
        env={"WANDB_DIR": str(tmp_path), "WANDB_RUN_ID": run["id"]},
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["trainer/resumed_from_step"] == 40 and summary["trainer/global_step"] == 60
    bad = harness("train", *over, "trainer.resume_from=nope-run-id", env={"WANDB_DIR": str(tmp_path)}, check=False)
    assert bad.returncode == 2 and "trainer.resume_from='nope-run-id'" in bad.stderr
    # Another run config (issue 18: a run id names one run): refused before any W&B run is made.
    runs_before = sorted((tmp_path / "wandb").glob("offline-run-*"))
    width = int(run["config.model.width"]) + 1
    other = harness(
        "train",
        *over,
        f"model.width={width}",
        f"trainer.resume_from={art}",
        env={"WANDB_DIR": str(tmp_path), "WANDB_RUN_ID": "otherrun1"},
        check=False,
    )
    last = other.stderr.strip().splitlines()[-1]
    assert other.returncode == 2 and "another run config" in last and "model.width" in last, last
    assert sorted((tmp_path / "wandb").glob("offline-run-*")) == runs_before


# ---- point 3: notebooks --------------------------------------------------------------------------


def test_summary_table_is_a_dataframe_and_load_table_reads_it(sweep, monkeypatch):
    runs = sweep["runs"]
    items = runs["summary.emergence/items"].iloc[0]
    assert isinstance(items, pd.DataFrame)
    # the same from the cache, from another directory by a relative path (run paths are kept absolute)
    monkeypatch.chdir(sweep["root"])
    cached = runstore.load_runs("wandb", sweep=sweep["id"])
    assert all(os.path.isabs(p) for p in cached["path"])
    pd.testing.assert_frame_equal(cached["summary.emergence/items"].iloc[0], items)
    assert list(items.columns) == ["item", "step", "reached", "final_loss"] and len(items) == 4
    assert items["final_loss"].dtype == float and items["reached"].dtype == bool
    again = runstore.load_table(sweep["wandb"], runs["id"].iloc[0], "emergence/items")
    pd.testing.assert_frame_equal(again, items)
    with pytest.raises(runstore.SourceError, match="is not a Table"):
        runstore.load_table(sweep["wandb"], runs["id"].iloc[0], "val/loss")
    out = os.path.join(sweep["root"], "runs.parquet")
    runstore.to_parquet(runs, out)
    back = json.loads(pd.read_parquet(out)["summary.emergence/items"].iloc[0])
    assert back["columns"] == ["item", "step", "reached", "final_loss"]


def test_history_is_one_row_per_step_and_long_on_request(sweep):
    hist = runstore.load_history(sweep["wandb"], sweep=sweep["id"])
    assert not hist.duplicated(["run_id", "step"]).any()
    at0 = hist[hist["step"] == 0]
    assert len(at0) == 2 and at0["train/loss"].notna().all() and at0["val/loss"].notna().all()  # side by side
    assert set(hist.loc[hist["val/loss"].notna(), "step"]) == {0, 20, 40, 60}
    long = runstore.load_history(sweep["wandb"], sweep=sweep["id"], long=True)
    assert list(long.columns) == ["run_id", "step", "metric", "value"]
    assert long["value"].notna().all() and not long.duplicated(["run_id", "step", "metric"]).any()
    assert len(long[long["metric"] == "val/loss"]) == hist["val/loss"].notna().sum()


def _recipe() -> str:
    text = open(os.path.join(REPO, "docs", "runstore.md")).read()
    (code,) = re.findall(r"<!-- notebook recipe.*?-->\s*```python\n(.*?)```", text, re.S)
    return code


def test_the_notebook_recipe_in_the_docs_runs(sweep):
    code = _recipe()
    assert 'SWEEP = "SWEEP_ID"' in code
    code = code.replace('SWEEP = "SWEEP_ID"', f'SWEEP = "{sweep["id"]}"')
    script = os.path.join(sweep["root"], "recipe.py")
    open(script, "w").write(code + "\nprint('recipe ok', len(runs), len(hist), len(items))\n")
    proc = subprocess.run(
        [sys.executable, script],
        capture_output=True,
        text=True,
        cwd=sweep["root"],
        env=dict(sweep["env"], MPLBACKEND="Agg"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recipe ok 2 10 4" in proc.stdout  # 2 runs; steps 0, 20, 40, 50 (train/loss), 60; 4 subtasks
