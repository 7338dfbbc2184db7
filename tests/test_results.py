"""tf_codistill/results.py: the one schema of results.json, written by the
runner and read by the study runner and the console table."""

import json
import os

import pytest
from conftest import REPO

from tf_codistill.results import GroupResult, RankResult, RunResult, read_results, results_json


def _committed():
    root = os.path.join(REPO, "docs", "results")
    return sorted(
        os.path.join(folder, "results.json") for folder, _, names in os.walk(root) if "results.json" in names
    )


@pytest.mark.parametrize("path", _committed(), ids=lambda p: os.path.relpath(p, REPO))
def test_every_committed_results_json_loads_with_every_key_known(path):
    """Files written by earlier versions load, and the schema knows every key
    they hold (none is dropped on reading)."""
    with open(path) as f:
        entries = json.load(f)["runs"]
    runs = read_results(path)
    assert len(runs) == len(entries)
    for run, entry in zip(runs, entries):
        again = run.to_dict()
        assert {k: again[k] for k in entry if k != "groups"} == {
            k: v for k, v in entry.items() if k != "groups"
        }
        assert [g for g in again["groups"]] == entry["groups"]
        assert run.steps_per_epoch is not None and run.mean("test_loss") > 0


def _weights_run(**changes) -> RunResult:
    run = RunResult(
        arm="codistill",
        num_groups=2,
        world_size=4,
        exchange="weights/horovod",
        data_mode="independent",
        dataset="mnist1d",
        model="cnn1d",
        seed=3,
        steps=40,
        epochs=2,
        steps_per_epoch=20,
        batch_size_per_group=32,
        groups=[GroupResult(0, 0.5, 1.0, 0.9), GroupResult(1, 0.7, 0.8, 0.7)],
        ensemble_test_accuracy=0.65,
        bytes_equivalent_per_step=1280.0,
        params_per_model=1000,
        wall_seconds=3.0,
        train_seconds=2.0,
        distance="mse",
        alpha=1.0,
        temperature=1.0,
        exchange_every=10,
        staleness_max=9.0,
        peer_refreshes=4,
        peer_refresh_seconds=0.1,
        peer_bytes_received=8000.0,
        resumed_from_epoch=None,
        resumed_from_step=None,
        backup_seconds=0.5,
        ranks=[RankResult(0, 0, 1.5, 12), RankResult(1, 0, 1.5, None)],
    )
    for key, value in changes.items():
        setattr(run, key, value)
    return run


def test_the_layout_on_disk_and_a_round_trip():
    run = _weights_run()
    entry = json.loads(results_json([run]))["runs"][0]
    assert list(entry) == [
        "arm", "num_groups", "world_size", "exchange", "data_mode", "dataset", "model", "seed", "precision",
        "steps", "epochs", "steps_per_epoch", "batch_size_per_group", "groups", "ensemble_test_accuracy",
        "bytes_sent_per_step", "bytes_in_group_per_step", "bytes_cross_group_per_step",
        "bytes_equivalent_per_step", "params_per_model", "examples_per_second", "wall_seconds",
        "train_seconds", "distance", "alpha", "temperature", "exchange_every", "staleness_max",
        "peer_refreshes", "peer_refresh_seconds", "peer_bytes_received", "resumed_from_epoch",
        "resumed_from_step", "backup_seconds", "ranks",
    ]  # fmt: skip
    assert entry["groups"][1] == {"group": 1, "test_accuracy": 0.7, "test_loss": 0.8, "train_loss": 0.7}
    assert entry["ranks"][1] == {"rank": 1, "group": 0, "weights_checksum": 1.5, "threads": None}
    assert RunResult.from_dict(entry) == run
    assert run.mean("test_accuracy") == pytest.approx(0.6)


def test_keys_that_do_not_apply_are_left_out():
    """A sync run without a backup: no codistillation, exchange or resume keys;
    the ensemble accuracy is always there (null)."""
    run = _weights_run(
        arm="sync", num_groups=1, groups=[GroupResult(0, 0.5, 1.0, 0.9)], ensemble_test_accuracy=None
    )
    for key in ("distance", "alpha", "temperature", "exchange_every", "staleness_max", "peer_refreshes"):
        setattr(run, key, None)
    run.peer_refresh_seconds = run.peer_bytes_received = run.backup_seconds = run.ranks = None
    entry = run.to_dict()
    assert entry["ensemble_test_accuracy"] is None
    for key in (
        "distance",
        "exchange_every",
        "resumed_from_epoch",
        "resumed_from_step",
        "backup_seconds",
        "ranks",
    ):
        assert key not in entry, key
    assert "val_loss" not in entry["groups"][0]


def test_an_older_file_loads_with_defaults_and_a_broken_one_is_a_clear_error(tmp_path):
    old = {"arm": "sync", "num_groups": 1, "steps": 31, "groups": [{"group": 0, "test_accuracy": 0.5,
           "test_loss": 1.0, "train_loss": 1.1}], "retired_key": 1}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps({"runs": [old]}))
    (run,) = read_results(str(tmp_path))
    assert run.steps_per_epoch is None and run.train_seconds is None and run.exchange == "none"
    del old["steps"]
    (tmp_path / "results.json").write_text(json.dumps({"runs": [old]}))
    with pytest.raises(ValueError, match="results.json: not a results.json run: .*steps"):
        read_results(str(tmp_path))
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(ValueError, match='no "runs" list'):
        read_results(str(tmp_path / "results.json"))
