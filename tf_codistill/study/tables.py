"""The CSV seam: runs.csv (one row per run) and curves.csv (one row per run
and epoch), their columns declared once, written and read back with the
types every report builder expects. Everything after collection reads
these two files alone, so a report rebuilds from them byte for byte."""

from __future__ import annotations

import csv
import os

__all__ = ["RUN_FIELDS", "CURVE_FIELDS", "write_csvs", "read_csvs", "curve_keys"]

RUN_FIELDS = (
    "study",
    "arm",
    "seed",
    "status",
    "mode",
    "num_groups",
    "batch_size_per_group",
    "steps",
    "epochs",
    "steps_per_epoch",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "ensemble_test_accuracy",
    "bytes_equivalent_per_step",
    "wall_seconds",
    "train_seconds",
    "process_seconds",
)
CURVE_FIELDS = (
    "study",
    "arm",
    "seed",
    "epoch",
    "updates",
    "val_accuracy",
    "val_ensemble_accuracy",
    "task_loss",
    "epoch_seconds",
)
CURVE_KEYS = ("val_accuracy", "val_ensemble_accuracy", "task_loss", "epoch_seconds")
# Language-model studies (metric = "nll") add these columns; the others' CSVs are unchanged.
NLL_RUN_FIELDS = ("best_val_loss", "val_loss", "ensemble_best_val_loss", "ensemble_val_loss", "sample")
NLL_CURVE_KEYS = ("val_loss", "val_ensemble_loss")
_INT_FIELDS = {
    "seed",
    "num_groups",
    "batch_size_per_group",
    "steps",
    "epochs",
    "steps_per_epoch",
    "epoch",
    "updates",
}
_STR_FIELDS = {"study", "arm", "status", "mode", "sample"}


def run_fields(study: dict) -> tuple:
    """runs.csv's columns for `study`."""
    return RUN_FIELDS + (NLL_RUN_FIELDS if study.get("metric") == "nll" else ())


def curve_keys(study: dict) -> tuple:
    """The per-epoch history keys curves.csv holds for `study`."""
    return CURVE_KEYS + (NLL_CURVE_KEYS if study.get("metric") == "nll" else ())


def curve_fields(study: dict) -> tuple:
    """curves.csv's columns for `study`."""
    return CURVE_FIELDS + (NLL_CURVE_KEYS if study.get("metric") == "nll" else ())


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.7g}"  # the report is built from these text values, so it is reproducible
    return str(value)


def _write_csv(path: str, fields, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(fields)
        for row in rows:
            writer.writerow([_cell(row.get(k)) for k in fields])


def _read_csv(path: str, fields) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(fields) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; rerun the study to rewrite it.")
        rows = []
        for raw in reader:
            row = {}
            for key in fields:
                text = raw[key]
                if key in _STR_FIELDS:
                    row[key] = text
                elif text == "":
                    row[key] = None
                elif key in _INT_FIELDS:
                    row[key] = int(text)
                else:
                    row[key] = float(text)
            rows.append(row)
    return rows


def write_csvs(study_dir: str, runs: list[dict], curves: list[dict], study: dict | None = None) -> None:
    """Writes `<study_dir>/runs.csv` and `curves.csv` (`collect`'s rows)."""
    os.makedirs(study_dir, exist_ok=True)
    study = study or {}
    _write_csv(os.path.join(study_dir, "runs.csv"), run_fields(study), runs)
    _write_csv(os.path.join(study_dir, "curves.csv"), curve_fields(study), curves)


def read_csvs(study: dict, study_dir: str) -> tuple[list[dict], list[dict]]:
    """The two CSVs of `study`, checked against its arms and seeds."""
    runs = _read_csv(os.path.join(study_dir, "runs.csv"), run_fields(study))
    curves = _read_csv(os.path.join(study_dir, "curves.csv"), curve_fields(study))
    have = {(r["arm"], r["seed"]) for r in runs}
    want = [(arm["label"], seed) for arm in study["arms"] for seed in study["seeds"]]
    missing = [f"{a}/seed{s}" for a, s in want if (a, s) not in have]
    if missing:
        raise ValueError(
            f"{study_dir}/runs.csv lacks {len(missing)} run(s) of {study['name']} "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); run the study without --report_only."
        )
    wanted = set(want)
    return [r for r in runs if (r["arm"], r["seed"]) in wanted], [
        c for c in curves if (c["arm"], c["seed"]) in wanted
    ]
