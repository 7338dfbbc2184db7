"""Run folders -> rows: each run's `results.json` (read through
`tf_codistill.results`) and per-epoch history become one runs.csv row and
one curves.csv row per epoch (`tables` declares the columns)."""

from __future__ import annotations

import json
import math
import os

from tf_codistill import config
from tf_codistill.results import read_results
from tf_codistill.study.spec import run_dir
from tf_codistill.study.tables import curve_keys

__all__ = ["collect"]


def _failed_row(workdir: str) -> dict:
    with open(os.path.join(workdir, "failed.json")) as f:
        failed = json.load(f)
    status = "diverged" if failed.get("exit") == config.ExitStatus.DIVERGED else "failed"
    return {"status": status, "process_seconds": failed["seconds"]}


def _process_seconds(workdir: str) -> float | None:
    """The whole train.py process's seconds, start-up included (None: a run
    not started by the study runner)."""
    path = os.path.join(workdir, "study_run.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["seconds"]


def _run_rows(study: dict, label: str, seed: int, workdir: str) -> tuple[dict, list[dict]]:
    """The runs.csv row and the curves.csv rows of one finished run."""
    run = read_results(workdir)[0]
    with open(os.path.join(workdir, run.arm, "history.json")) as f:
        history = json.load(f)
    epochs = len(history.get("val_accuracy", []))
    # Files written before results.json recorded steps_per_epoch: whole epochs assumed.
    per_epoch = run.steps_per_epoch or math.ceil(run.steps / max(epochs, 1))
    row = {
        "study": study["name"],
        "arm": label,
        "seed": seed,
        "status": "ok",
        "mode": run.arm,
        "num_groups": run.num_groups,
        "batch_size_per_group": run.batch_size_per_group,
        "steps": run.steps,
        "epochs": epochs,
        "steps_per_epoch": per_epoch,
        "test_accuracy": run.mean("test_accuracy"),
        "test_loss": run.mean("test_loss"),
        "train_loss": run.mean("train_loss"),
        "ensemble_test_accuracy": run.ensemble_test_accuracy,
        "bytes_equivalent_per_step": run.bytes_equivalent_per_step,
        "wall_seconds": run.wall_seconds,
        "train_seconds": run.train_seconds,
        "process_seconds": _process_seconds(workdir),
    }
    if study.get("metric") == "nll":
        row.update(
            best_val_loss=run.mean("best_val_loss"),
            val_loss=run.mean("val_loss"),
            ensemble_best_val_loss=run.ensemble_best_val_loss,
            ensemble_val_loss=run.ensemble_val_loss,
            sample=run.groups[0].sample,
        )
    curves = []
    for epoch in range(epochs):
        curve = {
            "study": study["name"],
            "arm": label,
            "seed": seed,
            "epoch": epoch + 1,
            "updates": min((epoch + 1) * per_epoch, run.steps),
        }
        for key in curve_keys(study):
            values = history.get(key)
            curve[key] = values[epoch] if values and epoch < len(values) else None
        curves.append(curve)
    return row, curves


def collect(study: dict, out: str) -> tuple[list[dict], list[dict]]:
    """(runs.csv rows, curves.csv rows) from the run folders under `out`.

    Raises:
        OSError: a run has neither results.json nor failed.json (not run yet).
        ValueError: a results.json that is not one.
    """
    runs, curves = [], []
    for arm in study["arms"]:
        for seed in study["seeds"]:
            workdir = run_dir(study, arm, seed, out)
            if os.path.exists(os.path.join(workdir, "failed.json")):
                runs.append(
                    {"study": study["name"], "arm": arm["label"], "seed": seed, **_failed_row(workdir)}
                )
                continue
            row, rows = _run_rows(study, arm["label"], seed, workdir)
            runs.append(row)
            curves += rows
    return runs, curves
