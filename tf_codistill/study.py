"""Study runner: arms x seeds of train.py, in parallel, resumable, with a report.

    python -m tf_codistill.study --config=experiments/sync_vs_codistill.toml
    python -m tf_codistill.study --config=experiments --out=docs/results     # every study
    python -m tf_codistill.study --config=experiments --out=docs/results --report_only

A study is a TOML file (comments allowed: each file starts with the command
that runs it and the outcome expected before the run):

    name = "sync_vs_codistill"
    title = "Sync vs codistillation out of the box"
    expect = "codistillation trails sync."   # written before the run
    seeds = [0, 1, 2, 3, 4]
    baseline = "sync"        # every other arm is compared with this one ...
    [common]                 # train.py flags for every arm
    dataset = "mnist1d/n70000"
    steps = 13110
    [[arms]]
    label = "sync"
    mode = "sync"
    [[arms]]
    label = "codistill"
    mode = "codistill"
    expected = "lower"       # the paper's direction of (this arm - its baseline)
    # compare_to = "sync"    # ... or per arm

Optional keys. Top level: `[[contrasts]]` (`name`, `plus`, `minus` lists of
arm labels, `expected`): a difference of gaps, e.g. (codistill_cosine -
sync_cosine) - (codistill_step - sync_step); `target_accuracy` (e.g. 0.97):
the report gives the updates each arm needed to reach it and plots them
against the total batch; `select` ("test_accuracy" or "train_loss"): how the
best point of an arm's grid is chosen. Per arm: `[arms.grid]` maps train.py
flags to lists of values; the arm runs every combination (labels
`<label>-<flag><value>...`) and is reported at its best one.

Every (arm, seed) is one `train.py` process writing to
`<out>/<study>/<arm>/seed<k>`; a run whose `results.json` exists is not run
again, so an interrupted study resumes, and a run whose flags and seed equal a
finished run of another study under `--out` is copied from it, not trained
again (e.g. the sync arm every 8,740-update study shares). Then the runner writes two CSVs per
study, `<out>/<study>/runs.csv` (one row per run) and `curves.csv` (one row
per run and epoch: test accuracy, training loss, updates, seconds), and
builds everything else from those two files alone: `<out>/<study>/REPORT.md`,
`curves.png` (mean ± standard error across seeds), and the combined
`<out>/REPORT.md`. `--report_only` rebuilds them from the CSVs without
training (the run folders need not exist), byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import glob
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor

from tf_codistill import config, selection, stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["load_study", "run_study", "collect", "write_csvs", "read_csvs", "build_report", "main"]

# Set by the runner for every run: a study gives `seeds` and `--out` instead.
_RUNNER_FLAGS = ("seed", "workdir", "verbose")
_STUDY_KEYS = (
    "name",
    "title",
    "expect",
    "seeds",
    "common",
    "arms",
    "baseline",
    "contrasts",
    "target_accuracy",
    "select",
    "metric",
)
_ARM_KEYS = ("label", "compare_to", "expected", "grid")  # study keys in [[arms]], not train.py flags
_SELECT = ("test_accuracy", "train_loss", *selection.SELECT)
# What a study compares: test accuracy (classifiers), or validation NLL in nats
# per token (language models: chosen and compared on validation, test beside it).
_METRICS = ("accuracy", "nll")
# The convergence criterion: sync's mean test accuracy may change by less than
# this many points over the last `_TAIL` of the run's updates.
CONVERGED_POINTS = 0.2
_TAIL = 0.2

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
_CURVE_KEYS = ("val_accuracy", "val_ensemble_accuracy", "task_loss", "epoch_seconds")
# Language-model studies (metric = "nll") add these columns; the others' CSVs are unchanged.
_NLL_RUN_FIELDS = ("best_val_loss", "val_loss", "ensemble_best_val_loss", "ensemble_val_loss", "sample")
_NLL_CURVE_KEYS = ("val_loss", "val_ensemble_loss")
# The two NLL outcomes every language-model comparison reports.
_NLL_OUTCOMES = (("best_val_loss", "best validation NLL"), ("val_loss", "final validation NLL"))
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


def _run_fields(study: dict) -> tuple:
    return RUN_FIELDS + (_NLL_RUN_FIELDS if study.get("metric") == "nll" else ())


def _curve_keys(study: dict) -> tuple:
    return _CURVE_KEYS + (_NLL_CURVE_KEYS if study.get("metric") == "nll" else ())


def _curve_fields(study: dict) -> tuple:
    return CURVE_FIELDS + (_NLL_CURVE_KEYS if study.get("metric") == "nll" else ())


# --------------------------------------------------------------------------- study files
def _check_settings(path: str, where: str, settings: dict) -> None:
    """Each key must be a train.py setting the study may set, with a value that
    setting accepts (tf_codistill/config.py checks both)."""
    for key, value in settings.items():
        if key in _ARM_KEYS and where != "[common]":
            continue
        if key in _RUNNER_FLAGS:
            raise ValueError(
                f"{path}: {where} sets `{key}`, which the study runner sets for every run; "
                "use `seeds` (and --out) instead."
            )
        if key not in config.SETTINGS:
            raise ValueError(f"{path}: {where} has `{key}`, which is not a train.py flag.")
        if isinstance(value, (dict, list)):
            raise ValueError(f"{path}: {where} `{key}` must be a single value, got {value!r}.")
        try:
            config.check_setting(key, value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {where}: {err}") from None


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _expand_grid(path: str, arm: dict) -> list[dict]:
    """One arm per combination of its `grid` values (or the arm itself)."""
    grid = arm.get("grid")
    base = {k: v for k, v in arm.items() if k != "grid"}
    if grid is None:
        return [{**base, "_base": arm["label"], "_point": {}}]
    where = f"arm {arm['label']!r} grid"
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{path}: {where} must be a table of train.py flags to lists of values.")
    for key, values in grid.items():
        if not isinstance(values, list) or not values or len(set(map(repr, values))) != len(values):
            raise ValueError(f"{path}: {where} `{key}` must be a non-empty list of distinct values.")
        if key in base:
            raise ValueError(f"{path}: {where} `{key}` is also set on the arm; set it in one place.")
        for value in values:
            _check_settings(path, where, {key: value})
    arms = []
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo))
        label = arm["label"] + "".join(f"-{k}{_value_text(v)}" for k, v in point.items())
        arms.append({**base, **point, "label": label, "_base": arm["label"], "_point": point})
    return arms


def _label_list(path: str, where: str, value, labels) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: {where} must be a non-empty list of arm labels.")
    for label in value:
        if label not in labels:
            raise ValueError(f"{path}: {where} names {label!r}, which is not an arm ({sorted(labels)}).")
    return value


def _check_expected(path: str, where: str, value) -> None:
    if value is not None and value not in stats.EXPECTATIONS:
        raise ValueError(
            f"{path}: {where} `expected` must be one of {list(stats.EXPECTATIONS)}; got {value!r}."
        )


def load_study(path: str) -> dict:
    """Reads and checks one study file. Raises ValueError naming the problem."""
    with open(path, "rb") as f:
        try:
            study = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from err
    unknown = sorted(set(study) - set(_STUDY_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; a study has {list(_STUDY_KEYS)}.")
    for key in ("name", "seeds", "arms"):
        if key not in study:
            raise ValueError(f"{path}: missing `{key}`.")
    name = study["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"{path}: `name` must be a folder name (letters, digits, _ . -); got {name!r}.")
    for key in ("title", "expect"):
        if key in study and not isinstance(study[key], str):
            raise ValueError(f"{path}: `{key}` must be a string.")
    arms = study["arms"]
    if not isinstance(arms, list) or not arms or not all(isinstance(arm, dict) for arm in arms):
        raise ValueError(f"{path}: `arms` must be a non-empty array of tables ([[arms]] sections).")
    labels = [arm.get("label") for arm in arms]
    if None in labels or len(set(labels)) != len(labels):
        raise ValueError(f"{path}: every arm needs a unique `label`; got {labels}.")
    if not all(isinstance(label, str) and re.fullmatch(r"[\w.-]+", label) for label in labels):
        raise ValueError(f"{path}: arm labels must be folder names (letters, digits, _ . -); got {labels}.")
    seeds = study["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError(f"{path}: `seeds` must be a non-empty list of distinct integers >= 0.")
    study.setdefault("title", study["name"])
    study.setdefault("common", {})
    if not isinstance(study["common"], dict):
        raise ValueError(f"{path}: `common` must be a table ([common] section) of train.py flags.")
    _check_settings(path, "[common]", study["common"])
    baseline = study.get("baseline")
    if baseline is not None and baseline not in labels:
        raise ValueError(f"{path}: `baseline` = {baseline!r} is not an arm ({labels}).")
    for arm in arms:
        where = f"arm {arm['label']!r}"
        _check_settings(path, where, arm)
        _check_expected(path, where, arm.get("expected"))
        if "compare_to" in arm and arm["compare_to"] not in labels:
            raise ValueError(
                f"{path}: {where} `compare_to` = {arm['compare_to']!r} is not an arm ({labels})."
            )
        if arm.get("compare_to") == arm["label"]:
            raise ValueError(f"{path}: {where} is compared with itself.")
        if "expected" in arm and arm.get("compare_to", baseline) in (None, arm["label"]):
            raise ValueError(f"{path}: {where} has `expected` but no arm to compare with (`compare_to`).")
    contrasts = study.setdefault("contrasts", [])
    if not isinstance(contrasts, list) or not all(isinstance(c, dict) for c in contrasts):
        raise ValueError(f"{path}: `contrasts` must be an array of tables ([[contrasts]]).")
    for i, item in enumerate(contrasts):
        where = f"contrast {item.get('name', i)!r}"
        if set(item) - {"name", "plus", "minus", "expected"} or not isinstance(item.get("name"), str):
            raise ValueError(f"{path}: {where} takes `name`, `plus`, `minus` and `expected` (name required).")
        _label_list(path, f"{where} `plus`", item.get("plus"), labels)
        _label_list(path, f"{where} `minus`", item.get("minus"), labels)
        _check_expected(path, where, item.get("expected"))
    target = study.get("target_accuracy")
    if target is not None and not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ValueError(f"{path}: `target_accuracy` must be a number in (0, 1]; got {target!r}.")
    study.setdefault("metric", "accuracy")
    if study["metric"] not in _METRICS:
        raise ValueError(f"{path}: `metric` must be one of {list(_METRICS)}; got {study['metric']!r}.")
    if study["metric"] == "nll" and (target is not None or any("grid" in arm for arm in arms)):
        raise ValueError(f'{path}: metric = "nll" takes no `target_accuracy` and no `[arms.grid]`.')
    selection.check(path, study)  # a validation criterion where the dataset has one, else test_accuracy
    if study["select"] not in _SELECT:
        raise ValueError(f"{path}: `select` must be one of {list(_SELECT)}; got {study['select']!r}.")
    study["arms"] = [expanded for arm in arms for expanded in _expand_grid(path, arm)]
    study["path"] = path
    return study


def _train_settings(arm: dict) -> dict:
    return {k: v for k, v in arm.items() if k not in _ARM_KEYS and not k.startswith("_")}


def _flags(settings: dict) -> list[str]:
    return [f"--{key}={_value_text(value)}" for key, value in _train_settings(settings).items()]


def _effective(study: dict, arm: dict, key: str):
    settings = {**study["common"], **_train_settings(arm)}
    return settings.get(key, config.SETTINGS[key].default)


def _reported_arms(study: dict) -> list[str]:
    """Base labels in file order (a grid arm counts once)."""
    return list(dict.fromkeys(arm["_base"] for arm in study["arms"]))


# --------------------------------------------------------------------------- running
def _workdir(study: dict, arm: dict, seed: int, out: str) -> str:
    return os.path.join(out, study["name"], arm["label"], f"seed{seed}")


def _run_key(settings: dict) -> str:
    """What makes two runs the same run: every train.py setting (defaults filled
    in, numbers compared as numbers) but the workdir and the console output."""
    values = {}
    for name, spec in sorted(config.SETTINGS.items()):
        if name in ("workdir", "verbose"):
            continue
        value = settings.get(name, spec.default)
        if name == "alpha" and value is None:  # its default depends on the exchange
            value = config.default_alpha(settings.get("exchange", "auto"))
        if spec.kind == "float" and value is not None:
            value = float(value)
        values[name] = value
    return json.dumps(values)


def _find_same_run(out: str, key: str, workdir: str) -> str | None:
    """Another study's finished run of exactly these flags and seed, if any."""
    for path in sorted(glob.glob(os.path.join(glob.escape(out), "*", "*", "seed*", "study_run.json"))):
        other = os.path.dirname(path)
        if os.path.abspath(other) == os.path.abspath(workdir):
            continue
        try:
            with open(path) as f:
                if json.load(f).get("key") == key and os.path.exists(os.path.join(other, "results.json")):
                    return other
        except (OSError, ValueError):
            continue
    return None


def _run_one(study: dict, arm: dict, seed: int, out: str, timeout: float, log) -> dict:
    workdir = _workdir(study, arm, seed, out)
    failed = os.path.join(workdir, "failed.json")
    if os.path.exists(os.path.join(workdir, "results.json")) or os.path.exists(failed):
        return {"arm": arm["label"], "seed": seed, "skipped": True}
    settings = {**study["common"], **_train_settings(arm), "seed": seed, "workdir": workdir, "verbose": 2}
    key = _run_key(settings)
    same = _find_same_run(out, key, workdir)
    if same is not None:  # identical flags and seed in another study: the same run, not trained twice
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.copytree(same, workdir)
        log(f"  {study['name']}/{arm['label']} seed {seed}: the same run as {same}, copied")
        return {"arm": arm["label"], "seed": seed, "skipped": True}
    cmd = [sys.executable, "train.py", *_flags(settings)]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
    os.makedirs(workdir, exist_ok=True)
    start = time.monotonic()
    with open(os.path.join(workdir, "train.log"), "w") as out_log:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=out_log, stderr=subprocess.STDOUT, timeout=timeout
        )
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        message = (
            f"{study['name']}/{arm['label']} seed {seed} failed (exit {proc.returncode}); "
            f"see {os.path.join(workdir, 'train.log')}"
        )
        diverged = proc.returncode == config.ExitStatus.DIVERGED
        if not (arm["_point"] or diverged):
            raise RuntimeError(message)
        # A run that diverged is an outcome, and a grid point may fail: record
        # it and go on (the report names it and leaves it out of the means).
        with open(failed, "w") as f:
            json.dump({"exit": proc.returncode, "seconds": seconds}, f)
        why = "diverged" if diverged else "a grid point"
        log(f"  {message} ({why}: recorded as {'diverged' if diverged else 'failed'})")
        return {"arm": arm["label"], "seed": seed, "skipped": False}
    with open(os.path.join(workdir, "study_run.json"), "w") as f:
        json.dump({"seconds": seconds, "key": key}, f)  # seconds: the whole process, start-up included
    log(f"  {study['name']}/{arm['label']} seed {seed}: done in {seconds:.0f}s")
    return {"arm": arm["label"], "seed": seed, "skipped": False}


def run_study(study: dict, out: str, parallel: int, timeout: float, log=print) -> None:
    """Runs every missing (arm, seed) of `study`."""
    # Seed by seed: an interrupted study has whole seeds of every arm.
    jobs = [(arm, seed) for seed in study["seeds"] for arm in study["arms"]]
    log(f"{study['name']}: {len(jobs)} runs ({parallel} at a time)")
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(_run_one, study, arm, seed, out, timeout, log) for arm, seed in jobs]
        for future in futures:
            future.result()


def _steps_per_epoch(workdir: str, arm_name: str) -> int | None:
    """Updates per epoch, from the line train.py prints for each arm."""
    try:
        with open(os.path.join(workdir, "train.log")) as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(rf"\[{arm_name}\][^\n]*\((\d+) epochs? of (\d+) steps\)", text)
    return int(match.group(2)) if match else None


def _mean(values):
    return math.fsum(values) / len(values)


def collect(study: dict, out: str) -> tuple[list[dict], list[dict]]:
    """(runs.csv rows, curves.csv rows) from the run folders."""
    runs, curves = [], []
    for arm in study["arms"]:
        for seed in study["seeds"]:
            workdir = _workdir(study, arm, seed, out)
            row = {"study": study["name"], "arm": arm["label"], "seed": seed}
            if os.path.exists(os.path.join(workdir, "failed.json")):
                with open(os.path.join(workdir, "failed.json")) as f:
                    failed = json.load(f)
                status = "diverged" if failed.get("exit") == config.ExitStatus.DIVERGED else "failed"
                row.update(status=status, process_seconds=failed["seconds"])
                runs.append(row)
                continue
            with open(os.path.join(workdir, "results.json")) as f:
                run = json.load(f)["runs"][0]
            with open(os.path.join(workdir, run["arm"], "history.json")) as f:
                history = json.load(f)
            groups = run["groups"]
            process = None
            if os.path.exists(os.path.join(workdir, "study_run.json")):
                with open(os.path.join(workdir, "study_run.json")) as f:
                    process = json.load(f)["seconds"]
            epochs = len(history.get("val_accuracy", []))
            per_epoch = _steps_per_epoch(workdir, run["arm"]) or math.ceil(run["steps"] / max(epochs, 1))
            row.update(
                status="ok",
                mode=run["arm"],
                num_groups=run["num_groups"],
                batch_size_per_group=run["batch_size_per_group"],
                steps=run["steps"],
                epochs=epochs,
                steps_per_epoch=per_epoch,
                test_accuracy=_mean([g["test_accuracy"] for g in groups]),
                test_loss=_mean([g["test_loss"] for g in groups]),
                train_loss=_mean([g["train_loss"] for g in groups]),
                ensemble_test_accuracy=run["ensemble_test_accuracy"],
                bytes_equivalent_per_step=run["bytes_equivalent_per_step"],
                wall_seconds=run["wall_seconds"],
                train_seconds=run.get("train_seconds"),
                process_seconds=process,
            )
            if study.get("metric") == "nll":
                row.update(
                    best_val_loss=_mean([g["best_val_loss"] for g in groups]),
                    val_loss=_mean([g["val_loss"] for g in groups]),
                    ensemble_best_val_loss=run.get("ensemble_best_val_loss"),
                    ensemble_val_loss=run.get("ensemble_val_loss"),
                    sample=groups[0].get("sample"),
                )
            runs.append(row)
            for epoch in range(epochs):
                curve = {
                    "study": study["name"],
                    "arm": arm["label"],
                    "seed": seed,
                    "epoch": epoch + 1,
                    "updates": min((epoch + 1) * per_epoch, run["steps"]),
                }
                for key in _curve_keys(study):
                    values = history.get(key)
                    curve[key] = values[epoch] if values and epoch < len(values) else None
                curves.append(curve)
    return runs, curves


# --------------------------------------------------------------------------- CSVs
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
    os.makedirs(study_dir, exist_ok=True)
    study = study or {}
    _write_csv(os.path.join(study_dir, "runs.csv"), _run_fields(study), runs)
    _write_csv(os.path.join(study_dir, "curves.csv"), _curve_fields(study), curves)


def read_csvs(study: dict, study_dir: str) -> tuple[list[dict], list[dict]]:
    """The two CSVs of `study`, checked against its arms and seeds."""
    runs = _read_csv(os.path.join(study_dir, "runs.csv"), _run_fields(study))
    curves = _read_csv(os.path.join(study_dir, "curves.csv"), _curve_fields(study))
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


# --------------------------------------------------------------------------- report
def _finite(values):
    return [v for v in values if v is not None and math.isfinite(v)]


def _pct(values, digits=2) -> str:
    values = _finite(values)
    if not values:
        return "-"
    mean, se = stats.mean_se(values)
    return f"{100 * mean:.{digits}f} ± {100 * se:.{digits}f}"


def _num(values, digits=4) -> str:
    values = _finite(values)
    if not values:
        return "-"
    mean, se = stats.mean_se(values)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


class _Data:
    """A study's CSV rows, indexed; grid arms resolved to their best point."""

    def __init__(self, study: dict, runs: list[dict], curves: list[dict]):
        self.study = study
        self.by_label = {arm["label"]: arm for arm in study["arms"]}
        self.runs = {}
        for r in runs:
            self.runs.setdefault(r["arm"], []).append(r)
        self.curves = {}
        for c in curves:
            self.curves.setdefault((c["arm"], c["seed"]), []).append(c)
        for rows in self.curves.values():
            rows.sort(key=lambda c: c["epoch"])
        self.points = {}  # base label -> [labels of its points]
        for arm in study["arms"]:
            self.points.setdefault(arm["_base"], []).append(arm["label"])
        self.chosen = {base: self._choose(labels) for base, labels in self.points.items()}

    def ok(self, label: str) -> list[dict]:
        return [r for r in self.runs.get(label, []) if r["status"] == "ok"]

    def score(self, label: str) -> float:
        """The selection score of one grid point (higher is better)."""
        key = self.study["select"]
        runs = self.runs.get(label, [])
        values = [r[key] for r in runs if r["status"] == "ok"]
        if not runs or len(values) < len(runs) or not values or not all(math.isfinite(v) for v in values):
            return -math.inf  # a failed or diverged seed disqualifies the point
        return _mean(values) if key == "test_accuracy" else -_mean(values)

    def _choose(self, labels: list[str]) -> str:
        if len(labels) == 1:
            return labels[0]
        if self.study["select"] in selection.SELECT:
            return selection.choose(self, labels)
        return max(labels, key=self.score)  # the first of equals, in file order

    def accuracies(self, base: str, key: str = "test_accuracy") -> list[float]:
        return [r[key] for r in self.ok(self.chosen[base])]

    def history(self, label: str, seed: int) -> dict:
        rows = self.curves.get((label, seed), [])
        return {
            key: [c[key] for c in rows] if rows and rows[0][key] is not None else []
            for key in _curve_keys(self.study)
        }

    def updates_to(self, label: str, seed: int, target: float):
        for c in self.curves.get((label, seed), []):
            if c["val_accuracy"] is not None and c["val_accuracy"] >= target:
                return c["updates"]
        return None


def _convergence(data: _Data) -> list[str]:
    """One line per sync arm: the change of its mean test accuracy (over seeds)
    from the last epoch ending at or before 80% of the run to the last epoch."""
    lines = []
    for base in _reported_arms(data.study):
        label = data.chosen[base]
        if _effective(data.study, data.by_label[label], "mode") != "sync":
            continue
        seeds = [r["seed"] for r in data.ok(label)]
        curves = [data.curves.get((label, s), []) for s in seeds]
        curves = [c for c in curves if c]
        if not curves:
            lines.append(f"Convergence of `{base}`: no per-epoch curve (criterion not computed).")
            continue
        length = min(len(c) for c in curves)
        total = curves[0][length - 1]["updates"]
        start = 0
        for i in range(length):
            if curves[0][i]["updates"] <= (1 - _TAIL) * total:
                start = i
        mean = [_mean([c[i]["val_accuracy"] for c in curves]) for i in range(length)]
        change = 100 * (mean[-1] - mean[start])
        holds = "holds" if abs(change) < CONVERGED_POINTS and length > 1 else "fails"
        losses = [_mean([c[i]["task_loss"] for c in curves]) for i in (0, length - 1)]
        if not losses[1] < 0.9 * losses[0]:  # flat at its first epoch's loss (or worse): it diverged
            holds += f", but it did not learn (training loss {losses[0]:.3g} -> {losses[1]:.3g})"
        lines.append(
            f"Convergence of `{base}`: sync accuracy changed by {change:+.2f} points over the last "
            f"20% of epochs (epoch {start + 1} -> {length}, updates {curves[0][start]['updates']:,} -> "
            f"{total:,}, mean of {len(curves)} seeds; criterion < {CONVERGED_POINTS:g}): {holds}."
        )
    if not lines:
        lines.append(
            "Convergence: this study has no sync arm; its run length is the one the studies with a "
            "sync arm are checked at."
        )
    return lines


def _comparisons(data: _Data, key: str = "test_accuracy") -> list[dict]:
    """Every declared comparison of outcome `key`: arm vs its baseline, then the contrasts."""
    study = data.study
    items = []
    for base in _reported_arms(study):
        arm = data.by_label[data.points[base][0]]
        against = arm.get("compare_to", study.get("baseline"))
        if against is None or against == base:
            continue
        items.append(
            {
                "name": f"{base} - {against}",
                "samples": [data.accuracies(base, key), data.accuracies(against, key)],
                "coefficients": [1, -1],
                "expected": arm.get("expected"),
            }
        )
    for item in study["contrasts"]:
        items.append(
            {
                "name": item["name"],
                "samples": [data.accuracies(b, key) for b in item["plus"] + item["minus"]],
                "coefficients": [1] * len(item["plus"]) + [-1] * len(item["minus"]),
                "expected": item.get("expected"),
                "formula": " + ".join(item["plus"]) + " - " + " - ".join(item["minus"]),
            }
        )
    for item in items:
        if all(len(s) >= 2 for s in item["samples"]):
            item["result"] = stats.contrast(item["samples"], item["coefficients"])
            item["verdict"] = stats.verdict(item["result"], item["expected"])
        else:
            item["result"] = None
            item["verdict"] = "needs 2 or more seeds per arm"
    return items


def _finding(study: dict, items: list[dict]) -> str:
    judged = [i for i in items if i["expected"] is not None]
    if not judged:
        return "Finding: no expected direction is declared for this study, so nothing to hold or fail."
    seeds = len(study["seeds"])
    parts = []
    for verdict in ("held", "failed", "cannot be told apart", "needs 2 or more seeds per arm"):
        names = [f"{i['name']} (expected {i['expected']})" for i in judged if i["verdict"] == verdict]
        if names:
            what = f"cannot be told apart at {seeds} seeds" if verdict == "cannot be told apart" else verdict
            parts.append(f"{what} for {', '.join(names)}")
    return "Finding: the expected difference " + "; ".join(parts) + "."


def _arm_flags(arm: dict) -> str:
    return " ".join(_flags(arm))


def _plot_curves(data: _Data, path: str) -> None:
    from tf_codistill.report import plot_runs  # loads Keras: only when a report is built

    sizes = {}  # updates per epoch: differs where an arm's batch or training set does
    for base in _reported_arms(data.study):
        ok = data.ok(data.chosen[base])
        sizes[base] = ok[0]["steps_per_epoch"] if ok else None
    known = [size for size in sizes.values() if size is not None]
    common = max(set(known), key=known.count) if known else None
    runs = {}
    for base in _reported_arms(data.study):
        label = data.chosen[base]
        name = base if sizes[base] in (common, None) else f"{base} (1 epoch = {sizes[base]:,} updates)"
        runs[name] = [data.history(label, r["seed"]) for r in data.ok(label)]
    kwargs = {}
    if len(set(known)) > 1:
        kwargs["xlabel"] = f"epoch ({common:,} updates unless the legend says otherwise)"
    if data.study.get("metric") == "nll":
        kwargs["metric"] = "loss"
    plot_runs(runs, path, title=data.study["title"], **kwargs)


def _series(study: dict, arm: dict) -> tuple[str, str]:
    """The line an arm belongs to in the target plots: (method, optimizer)."""
    method = "sync"
    if _effective(study, arm, "mode") != "sync":
        method = f"codistill, {_effective(study, arm, 'num_groups')} groups"
    return method, _effective(study, arm, "optimizer")


def _series_name(series: tuple[str, str]) -> str:
    """The method, and the optimizer when that is not the default."""
    method, optimizer = series
    return method if optimizer == config.SETTINGS["optimizer"].default else f"{method}, {optimizer.upper()}"


_SERIES_COLOURS = {
    "sync": "tab:blue",
    "codistill, 2 groups": "tab:orange",
    "codistill, 4 groups": "tab:green",
}


def _series_style(series: tuple[str, str], index: int) -> dict:
    """One colour per method, dashed with square markers for a non-default optimizer."""
    method, optimizer = series
    colour = _SERIES_COLOURS.get(method, f"C{(index + 3) % 10}")
    other = optimizer != config.SETTINGS["optimizer"].default
    return {"color": colour, "linestyle": "--" if other else "-", "marker": "s" if other else "o"}


def _target_series(data: _Data):
    """Per line of the target plots (`_series`): its arms at their best grid
    points, as (total batch, label), sorted by batch."""
    lines = {}
    for base in _reported_arms(data.study):
        label = data.chosen[base]
        arm = data.by_label[label]
        lines.setdefault(_series(data.study, arm), []).append(
            (_effective(data.study, arm, "batch_size"), label)
        )
    return {series: sorted(points) for series, points in lines.items()}


def _batch_axis(ax, batches) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    if batches:
        ax.set_xticks(batches)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.set_xlabel("total batch (examples per update, all groups)")
    ax.grid(alpha=0.3, which="both")


def _plot_updates(data: _Data, path: str) -> None:
    """Two panels against the total batch, one line per kind of arm (sync,
    codistillation with G groups; per optimizer), each at its best grid point:
    the updates to the target accuracy (over the seeds that reached it, with
    how many did) and the final test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    study, target = data.study, data.study["target_accuracy"]
    series = _target_series(data)
    batches = sorted({b for points in series.values() for b, _ in points})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    for i, (key, points) in enumerate(series.items()):
        name, style = _series_name(key), _series_style(key, i)
        reached, final = [], []
        for batch, label in points:
            runs = data.ok(label)
            got = _finite([data.updates_to(label, r["seed"], target) for r in runs])
            if got:
                reached.append((batch, *stats.mean_se(got), len(got), len(runs)))
            accs = _finite([100 * r["test_accuracy"] for r in runs])
            if accs:
                final.append((batch, *stats.mean_se(accs)))
        if reached:
            xs, ys, es, _, _ = zip(*reached)
            left.errorbar(xs, ys, yerr=es, capsize=3, label=name, **style)
            for x, y, _, got, seeds in reached:
                if got < seeds:  # not every seed reached it
                    left.annotate(
                        f"{got}/{seeds}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7
                    )
        if final:
            xs, ys, es = zip(*final)
            right.errorbar(xs, ys, yerr=es, capsize=3, label=name, **style)
    left.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    left.yaxis.set_major_formatter(plain)
    left.yaxis.set_minor_formatter(plain)
    left.set(
        ylabel=f"updates to {100 * target:g}% {selection.curve_split(study)} accuracy",
        title=f"Updates to {100 * target:g}% (seeds that reached it; n/m where not all did; none: no point)",
    )
    right.set(ylabel="final test accuracy, %", title="Final test accuracy")
    right.axhline(100 * target, color="grey", linewidth=0.8, linestyle=":")
    for ax in (left, right):
        _batch_axis(ax, batches)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(
        "\n".join(textwrap.wrap(f"{study['title']}: mean ± s.e. over seeds, best grid point per arm", 110))
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves_by_batch(data: _Data, path: str) -> None:
    """A target study's curves: one panel per total batch, test accuracy against
    updates, one line per kind of arm at its best grid point (mean ± s.e.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tf_codistill.report import curve_band

    series = _target_series(data)
    batches = sorted({b for points in series.values() for b, _ in points})
    fig, axes = plt.subplots(
        1, len(batches), figsize=(4 * len(batches), 4), layout="constrained", squeeze=False
    )
    target = data.study["target_accuracy"]
    for ax, batch in zip(axes[0], batches):
        for i, (key, points) in enumerate(series.items()):
            for b, label in points:
                if b != batch:
                    continue
                curves = [data.curves.get((label, r["seed"]), []) for r in data.ok(label)]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                mean, se = curve_band([[100 * c["val_accuracy"] for c in curve] for curve in curves])
                xs = [c["updates"] for c in curves[0][: len(mean)]]
                style = _series_style(key, i)
                ax.plot(xs, mean, color=style["color"], linestyle=style["linestyle"], label=_series_name(key))
                if se is not None:
                    ax.fill_between(xs, mean - se, mean + se, color=style["color"], alpha=0.2)
        ax.axhline(100 * target, color="grey", linewidth=0.8, linestyle=":")
        ax.set(title=f"total batch {batch:,}", xlabel="updates", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{selection.curve_split(data.study)} accuracy, % (mean ± s.e. over seeds)")
    handles = {}  # every line once, whichever panel has it (e.g. an optimizer at one batch only)
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    axes[0][0].legend(list(handles.values()), list(handles), fontsize=8, loc="lower right")
    fig.suptitle("\n".join(textwrap.wrap(f"{data.study['title']}: best grid point per arm", 110)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _minutes(runs) -> str:
    seconds = _finite([r["process_seconds"] for r in runs])
    return f"{_mean(seconds) / 60:.1f}" if seconds else "-"


def _comparison_table(items: list[dict], columns: str, scale: float, digits: int) -> list[str]:
    """The Markdown table of `_comparisons`' items: `columns` names the first
    two columns; differences and intervals are multiplied by `scale` (100:
    points) and shown with `digits` decimals."""
    lines = [
        f"| {columns} | 95% CI (Welch) | p (two-sided) | expected | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for item in items:
        res = item["result"]
        name = item["name"] if "formula" not in item else f"{item['name']}: {item['formula']}"
        if res is None:
            lines.append(f"| {name} | - | - | - | {item['expected'] or '-'} | {item['verdict']} |")
            continue
        diff, low, high = (f"{scale * v:+.{digits}f}" for v in (res.diff, res.low, res.high))
        lines.append(
            f"| {name} | {diff} | [{low}, {high}] | {res.p:.3f} | {item['expected'] or '-'} | {item['verdict']} |"
        )
    return lines


def _overfitting(data: _Data) -> list[str]:
    """Language models, one line per sync arm: where its mean validation NLL
    is lowest and how far the last epoch ends above that (the regime: a
    curve that passes a minimum and rises overfits)."""
    lines = []
    for base in _reported_arms(data.study):
        label = data.chosen[base]
        if _effective(data.study, data.by_label[label], "mode") != "sync":
            continue
        curves = [data.curves.get((label, r["seed"]), []) for r in data.ok(label)]
        curves = [c for c in curves if c and c[0]["val_loss"] is not None]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        mean = [_mean([c[i]["val_loss"] for c in curves]) for i in range(length)]
        low = min(range(length), key=mean.__getitem__)
        rise = mean[-1] - mean[low]
        regime = "overfits (passes a minimum and rises)" if rise > 0.01 else "does not overfit"
        lines.append(
            f"Regime of `{base}`: mean validation NLL lowest at epoch {low + 1} of {length} "
            f"(update {curves[0][low]['updates']:,}: {mean[low]:.4f}), final {mean[-1]:.4f} "
            f"({rise:+.4f}): it {regime}."
        )
    return lines


def _nll_lines(study: dict, data: _Data, image_dir: str) -> list[str]:
    """The language-model report: NLL table, comparisons on best and final
    validation NLL, generated text."""
    lines = _overfitting(data) + [""]
    header = (
        "| arm | flags | best val NLL | final val NLL | ensemble best | ensemble final | test NLL "
        "| train task loss | updates | bytes/step (equiv.) | minutes/run |"
    )
    lines += [header, "|" + "---|" * header.count(" |")]
    for base in _reported_arms(study):
        label = data.chosen[base]
        runs = data.ok(label)
        arm = data.by_label[label]
        if not runs:
            lines.append(f"| {base} | `{_arm_flags(arm)}` |" + " - |" * 9)
            continue
        steps = sorted({r["steps"] for r in runs})
        cells = [_num([r[k] for r in runs]) for k in ("best_val_loss", "val_loss")]
        cells += [_num([r[k] for r in runs]) for k in ("ensemble_best_val_loss", "ensemble_val_loss")]
        cells += [_num([r["test_loss"] for r in runs]), _num([r["train_loss"] for r in runs])]
        lines.append(
            f"| {base} | `{_arm_flags(arm)}` | {' | '.join(cells)} | {'/'.join(f'{s:,}' for s in steps)} | "
            f"{runs[0]['bytes_equivalent_per_step']:,.0f} | {_minutes(runs)} |"
        )
    lines += [
        "",
        "NLL in nats per character: mean of a run's groups, mean ± standard error over seeds; best: the "
        "lowest epoch's (validation split, as nanoGPT reports), final: the last epoch's; test NLL at the "
        "end of the run; ensemble: the members' mean probabilities.",
        "",
    ]
    for key, what in _NLL_OUTCOMES:
        items = _comparisons(data, key)
        if not items:
            continue
        lines += _comparison_table(items, f"comparison ({what}) | difference, nats", 1, 4)
        lines += ["", _finding(study, items).replace("Finding:", f"Finding ({what}):"), ""]
    lines += [f"![{study['name']}]({image_dir}curves.png)", ""]
    for base in _reported_arms(study):
        runs = [r for r in data.ok(data.chosen[base]) if r.get("sample")]
        if runs:
            lines += [f"Generated by `{base}` (group 0, seed {runs[0]['seed']}, 300 characters):", ""]
            lines += ["```", runs[0]["sample"].rstrip("\n"), "```", ""]
    return lines


def _study_lines(study: dict, data: _Data, image_dir: str, config_shown: str) -> list[str]:
    runs_all = [r for rows in data.runs.values() for r in rows]
    minutes = _finite([r["process_seconds"] for r in runs_all])
    lines = [
        f"## {study['title']}",
        "",
        f"`python -m tf_codistill.study --config={config_shown}` ({len(study['seeds'])} seeds: "
        f"{study['seeds']}; common flags: `{' '.join(_flags(study['common']))}`; {len(runs_all)} runs, "
        f"{sum(minutes) / 60:.1f} minutes of train.py processes)",
        "",
    ]
    if study.get("expect"):
        lines += [f"Expected (written before the run): {study['expect']}", ""]
    if study.get("metric") == "nll":
        return lines + _nll_lines(study, data, image_dir)
    lines += _convergence(data) + [""]
    target = study.get("target_accuracy")
    header = (
        "| arm | flags | test accuracy % | ensemble % | train task loss | updates | bytes/step (equiv.) "
        "| minutes/run |"
    )
    if target is not None:
        header += f" updates to {100 * target:g}% |"
    lines += [header, "|" + "---|" * header.count(" |")]
    for base in _reported_arms(study):
        label = data.chosen[base]
        runs = data.ok(label)
        arm = data.by_label[label]
        first = runs[0] if runs else {}
        steps = sorted({r["steps"] for r in runs})
        row = (
            f"| {base} | `{_arm_flags(arm)}` | {_pct([r['test_accuracy'] for r in runs])} | "
            f"{_pct([r['ensemble_test_accuracy'] for r in runs])} | {_num([r['train_loss'] for r in runs])} | "
            f"{'/'.join(f'{s:,}' for s in steps) or '-'} | "
            f"{first['bytes_equivalent_per_step']:,.0f} | {_minutes(runs)} |"
            if first
            else f"| {base} | `{_arm_flags(arm)}` | - | - | - | - | - | - |"
        )
        if target is not None:
            reached = [data.updates_to(label, r["seed"], target) for r in runs]
            got = _finite(reached)
            text = "-"
            if got:
                mean, se = stats.mean_se(got)
                text = f"{mean:,.0f} ± {se:,.0f}"
            row += f" {text} ({len(got)}/{len(runs)} seeds) |"
        lines.append(row)
    lines += [
        "",
        "Test accuracy: mean of a run's groups, in percent, mean ± standard error over seeds; "
        "train task loss: the last epoch's.",
        "",
    ]
    lost = []
    for base in _reported_arms(study):
        label = data.chosen[base]
        bad = [r for r in data.runs.get(label, []) if r["status"] != "ok"]
        if bad:
            seeds = ", ".join(f"{r['seed']} ({r['status']})" for r in bad)
            lost.append(f"{base}: {len(bad)} of {len(data.runs[label])} seeds, {seeds}")
    if lost:
        lines += [
            "Seeds left out of the means and comparisons (a diverged run stopped on NaN or Inf "
            "predictions): " + "; ".join(lost) + ".",
            "",
        ]
    items = _comparisons(data)
    if items:
        lines += _comparison_table(items, "comparison (test accuracy) | difference, points", 100, 2)
        lines += ["", _finding(study, items), ""]
    grids = [base for base, labels in data.points.items() if len(labels) > 1]
    lines += selection.report_lines(data, lambda label, key: _effective(study, data.by_label[label], key))
    if grids and study["select"] not in selection.SELECT:
        how = (
            "highest mean final test accuracy over seeds. That is the test set itself (train.py holds out "
            "no validation split), so the chosen point's accuracy is optimistic: it is the best of the grid"
            if study["select"] == "test_accuracy"
            else "lowest mean final training task loss over seeds (the test set plays no part)"
        )
        lines += [
            f"Grid: every arm is reported at its best point, chosen by the {how}. A point with a failed or "
            "non-finite seed is not chosen.",
            "",
            "| arm | point | test accuracy % | train task loss | failed seeds | chosen |",
            "|---|---|---|---|---|---|",
        ]
        for base in grids:
            for label in data.points[base]:
                point = data.by_label[label]["_point"]
                runs = data.ok(label)
                failed = len(data.runs.get(label, [])) - len(runs)
                lines.append(
                    f"| {base} | `{' '.join(f'--{k}={_value_text(v)}' for k, v in point.items())}` | "
                    f"{_pct([r['test_accuracy'] for r in runs])} | {_num([r['train_loss'] for r in runs])} | "
                    f"{failed} | {'yes' if data.chosen[base] == label else ''} |"
                )
        lines.append("")
    lines += [f"![{study['name']}]({image_dir}curves.png)", ""]
    if target is not None:
        lines += [f"![{study['name']}: updates to target]({image_dir}updates_to_target.png)", ""]
    return lines


def build_report(study: dict, study_dir: str, config_shown: str, plots: bool = True) -> list[str]:
    """Builds `<study_dir>/REPORT.md` (and the plots) from its two CSVs alone;
    returns the study's section for the combined report."""
    runs, curves = read_csvs(study, study_dir)
    data = _Data(study, runs, curves)
    own = _study_lines(study, data, "", config_shown)
    with open(os.path.join(study_dir, "REPORT.md"), "w") as f:
        f.write("\n".join(own) + "\n")
    if plots:
        if study.get("target_accuracy") is not None:
            _plot_curves_by_batch(data, os.path.join(study_dir, "curves.png"))
            _plot_updates(data, os.path.join(study_dir, "updates_to_target.png"))
        else:
            _plot_curves(data, os.path.join(study_dir, "curves.png"))
    return _study_lines(study, data, f"{study['name']}/", config_shown)


# --------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tf_codistill.study", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a study .toml file, or a folder of them")
    parser.add_argument("--out", default="runs/studies", help="where runs, CSVs, plots and REPORT.md go")
    parser.add_argument("--parallel", type=int, default=max(1, os.cpu_count() or 1), help="runs at a time")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    parser.add_argument("--seeds", default=None, help="override every study's seeds, e.g. 0 or 0,1")
    parser.add_argument("--set", action="append", default=[], help="override a common flag: key=value")
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="rebuild every REPORT.md and plot from <out>/<study>/runs.csv and curves.csv; train nothing",
    )
    parser.add_argument("--no_plots", action="store_true", help=argparse.SUPPRESS)  # tests: REPORT.md only
    args = parser.parse_args(argv)
    overrides = {}
    try:
        if args.parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {args.parallel}.")
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise ValueError(f"--timeout must be a finite number > 0 seconds, got {args.timeout:g}.")
        seeds = None
        if args.seeds:
            try:
                seeds = [int(s) for s in args.seeds.split(",")]
            except ValueError:
                raise ValueError(
                    f"--seeds={args.seeds!r}: give integers separated by commas, e.g. 0,1,2."
                ) from None
            if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
                raise ValueError(f"--seeds={args.seeds!r}: give distinct integers >= 0.")
        for item in args.set:
            key, eq, text = item.partition("=")
            if not eq or not key:
                raise ValueError(f"--set={item!r}: give key=value, e.g. --set steps=500.")
            if key not in config.SETTINGS or key in _RUNNER_FLAGS:
                raise ValueError(f"--set={item!r}: `{key}` is not a train.py flag the study can set.")
            try:
                value = config.parse_setting(key, text)
                config.check_setting(key, value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"--set={item!r}: {err}") from None
            overrides[key] = value
    except ValueError as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 2

    paths = (
        sorted(os.path.join(args.config, p) for p in os.listdir(args.config) if p.endswith(".toml"))
        if os.path.isdir(args.config)
        else [args.config]
    )
    try:
        studies = [load_study(p) for p in paths]
    except (OSError, ValueError) as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 2
    if not studies:
        print(f"study: error: no .toml studies in {args.config}", file=sys.stderr)
        return 2
    for study in studies:
        if seeds:
            study["seeds"] = seeds
        study["common"].update(overrides)
    not_run = []
    if args.report_only and os.path.isdir(args.config):
        # The summary covers the studies that have run and names the others.
        not_run = [s for s in studies if not os.path.exists(os.path.join(args.out, s["name"], "runs.csv"))]
        studies = [s for s in studies if s not in not_run]
        if not studies:
            print(
                f"study: error: no study of {args.config} has a runs.csv under {args.out}; run them first",
                file=sys.stderr,
            )
            return 2
    for study in studies:
        if args.report_only:
            continue
        try:
            run_study(study, args.out, args.parallel, args.timeout)
            write_csvs(os.path.join(args.out, study["name"]), *collect(study, args.out), study)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            print(f"study: error: {err}", file=sys.stderr)
            return 1
    command = (
        f"python -m tf_codistill.study --config={os.path.normpath(args.config)} --out={os.path.normpath(args.out)}"
        + (f" --seeds={args.seeds}" if args.seeds else "")
        + "".join(f" --set={item}" for item in args.set)
    )
    sections = []
    try:
        for study in studies:
            shown = os.path.normpath(study["path"])
            sections += build_report(study, os.path.join(args.out, study["name"]), shown, not args.no_plots)
    except (OSError, ValueError) as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 1
    header = [
        "# Study report",
        "",
        f"Generated from each study's `runs.csv` and `curves.csv` by `{command}`; the same command with "
        "`--report_only` rebuilds this file, every study's REPORT.md and the plots from those CSVs without "
        "training.",
        "",
        "Test accuracy is the mean over a run's groups (models), in percent: mean ± standard error over "
        "seeds. Each comparison is a difference of mean test accuracies in points with its 95% Welch "
        "confidence interval and two-sided p-value; the verdict reads the interval: it excludes 0 with the "
        "expected sign (held), with the other sign or where no difference was expected (failed), or it "
        "includes 0 (cannot be told apart at this number of seeds).",
        "",
    ]
    if not_run:
        names = ", ".join(f"`{os.path.normpath(s['path'])}`" for s in not_run)
        header += [f"Not run yet (no runs.csv under `{os.path.normpath(args.out)}`): {names}.", ""]
    with open(os.path.join(args.out, "REPORT.md"), "w") as f:
        f.write("\n".join(header + sections) + "\n")
    print(f"report: {os.path.join(args.out, 'REPORT.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
