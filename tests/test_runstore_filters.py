"""Offline `load_runs(filters=...)`: W&B's MongoDB-style filter applied exactly, or refused in one
line; and the runs table's dtypes (numbers numeric, events' `reached` flags boolean)."""

import os

import pandas as pd
import pytest
import wandb

from harness import runstore
from harness.runstore import filters as run_filters
from harness.runstore import remote


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("filters")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        specs = [  # name, width, lr, tags, group, exit code, summary
            ("w8", 8, 1e-3, ["base"], "g1", 0, {"val/loss": 0.9, "grok/t_val99": 400, "grok/t_val99/reached": True}),
            (
                "w16",
                16,
                1e-3,
                ["base", "big"],
                "g1",
                0,
                {"val/loss": 0.5, "grok/t_val99": 1000, "grok/t_val99/reached": False},
            ),
            ("w32", 32, 3e-3, [], "g2", 1, {"val/loss": 0.2}),
            (
                "w64",
                64,
                3e-3,
                ["big"],
                None,
                0,
                {"val/loss": 0.1, "grok/t_val99": 250, "grok/t_val99/reached": True, "note": {"k": 1}},
            ),
        ]
        for name, width, lr, tags, group, code, summary in specs:
            run = wandb.init(
                project="t",
                dir=str(root),
                name=name,
                tags=tags,
                group=group,
                reinit="finish_previous",
                config={"model": {"width": width}, "optim": {"lr": lr}},
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
            run.log({"train/loss": 1.0, "trainer/global_step": 1})
            run.summary.update(summary)
            run.finish(exit_code=code)
        wandb.teardown()
    return str(root / "wandb")


def names(runs_dir, filters):
    return sorted(runstore.load_runs(runs_dir, filters=filters)["name"], key=lambda n: int(n[1:]))


def test_comparison_and_set_operators(runs_dir):
    assert names(runs_dir, {"config.model.width": {"$gte": 16}}) == ["w16", "w32", "w64"]
    assert names(runs_dir, {"config.model.width": {"$gt": 16, "$lte": 32}}) == ["w32"]
    assert names(runs_dir, {"config.model.width": {"$lt": 16}}) == ["w8"]
    assert names(runs_dir, {"config.model.width": 32}) == ["w32"]
    assert names(runs_dir, {"config.model.width": {"$eq": 32}}) == ["w32"]
    assert names(runs_dir, {"config.model.width": {"$ne": 32}}) == ["w8", "w16", "w64"]
    assert names(runs_dir, {"config.optim.lr": {"$in": [3e-3]}}) == ["w32", "w64"]
    assert names(runs_dir, {"config.model.width": {"$nin": [8, 64]}}) == ["w16", "w32"]
    assert names(runs_dir, {"summary_metrics.val/loss": {"$lt": 0.5}}) == ["w32", "w64"]
    assert names(runs_dir, {"summary_metrics.note.k": 1}) == ["w64"]  # a nested summary value


def test_run_fields_logic_and_exists(runs_dir):
    assert names(runs_dir, {"state": "failed"}) == ["w32"]
    assert names(runs_dir, {"state": {"$ne": "failed"}}) == ["w8", "w16", "w64"]
    assert names(runs_dir, {"tags": "big"}) == ["w16", "w64"]  # an array matches if an element does
    assert names(runs_dir, {"tags": {"$in": ["base"]}}) == ["w8", "w16"]
    assert names(runs_dir, {"tags": {"$nin": ["big"]}}) == ["w8", "w32"]
    assert names(runs_dir, {"group": "g1"}) == ["w8", "w16"]
    assert names(runs_dir, {"group": None}) == ["w64"]  # MongoDB: null matches a missing field
    assert names(runs_dir, {"summary_metrics.grok/t_val99": {"$exists": False}}) == ["w32"]
    assert names(runs_dir, {"summary_metrics.grok/t_val99/reached": True}) == ["w8", "w64"]
    assert names(runs_dir, {"summary_metrics.grok/t_val99/reached": 1}) == []  # true is not 1
    assert names(runs_dir, {"$or": [{"config.model.width": 8}, {"tags": "big", "state": "finished"}]}) == [
        "w8",
        "w16",
        "w64",
    ]
    assert names(runs_dir, {"$and": [{"config.model.width": {"$gte": 16}}, {"group": {"$in": ["g1", "g2"]}}]}) == [
        "w16",
        "w32",
    ]
    assert names(runs_dir, {}) == ["w8", "w16", "w32", "w64"]
    assert names(runs_dir, {"group": {"$exists": False}}) == ["w64"]  # a run without a group
    assert names(runs_dir, {"display_name": {"$regex": "^w(8|16)$"}}) == ["w8", "w16"]
    assert names(runs_dir, {"tags": {"$regex": "^bi"}}) == ["w16", "w64"]


@pytest.mark.parametrize(
    "filters, message",
    [
        (
            {"config.model.widht": 16},
            "filter key 'config.model.widht': no run has it; did you mean 'config.model.width'?",
        ),
        (
            {"config.model.width": {"$regex": "1.*", "$options": "i"}},
            "filter operator '$options' (on 'config.model.width') is not supported",
        ),
        ({"display_name": {"$regex": "w[8"}}, "filter display_name: $regex 'w[8' is not a valid regular expression"),
        ({"$nor": [{"state": "finished"}]}, "filter operator '$nor' is not supported offline"),
        ({"summary.val/loss": {"$lt": 1}}, "W&B spells summary keys 'summary_metrics.val/loss'"),
        ({"hostname": "x"}, "filter key 'hostname': use config.KEY, summary_metrics.KEY or one of state"),
        ({"config.model.width": {"$in": 8}}, "filter config.model.width: $in takes a list, got 8"),
        ({"config.model.width": {"$exists": 1}}, "$exists takes true or false"),
        ({"$or": {"state": "finished"}}, "filter $or takes a non-empty list of filters"),
        ([("state", "finished")], "filters must be a dict"),
    ],
)
def test_anything_else_is_a_one_line_error(runs_dir, filters, message):
    with pytest.raises(run_filters.FilterError) as e:
        runstore.load_runs(runs_dir, filters=filters)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_online_filters_go_to_wandb_unchanged(monkeypatch):
    seen = {}

    class Api:
        def runs(self, path, filters=None):
            seen.update(path=path, filters=filters)
            return []

    monkeypatch.setattr(remote, "api", lambda: Api())
    f = {"$or": [{"config.model.width": {"$regex": "1.*"}}, {"summary_metrics.x": {"$nor": []}}]}
    runstore.load_runs("me/proj", filters=f)
    assert seen == {"path": "me/proj", "filters": f}


def test_table_columns_have_numeric_and_boolean_dtypes(runs_dir, tmp_path):
    table = runstore.load_runs(runs_dir)
    assert str(table["config.model.width"].dtype) == "int64"
    assert str(table["summary.val/loss"].dtype) == "float64"
    assert str(table["summary.grok/t_val99"].dtype) == "float64"  # missing in one run: NaN, not object
    assert str(table["summary.grok/t_val99/reached"].dtype) == "boolean"  # missing in one run
    assert table["truncated"].dtype == bool and table["corrupt"].dtype == bool
    assert table["n_files"].dtype == "int64"
    numeric = [
        c
        for c in table.columns
        if c.startswith(("config.", "summary.")) and c not in ("summary.note.k",) and table[c].dtype == object
    ]
    assert numeric == [], numeric
    only_reached = runstore.load_runs(runs_dir, filters={"summary_metrics.grok/t_val99/reached": {"$exists": True}})
    assert only_reached["summary.grok/t_val99/reached"].dtype == bool
    runstore.to_parquet(table, str(tmp_path / "runs.parquet"))
    back = pd.read_parquet(tmp_path / "runs.parquet")
    assert str(back["summary.grok/t_val99/reached"].dtype) == "boolean" and back["summary.val/loss"].dtype == "float64"
    assert os.path.exists(tmp_path / "runs.parquet")
