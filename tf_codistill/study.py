"""Study runner: arms x seeds of train.py, in parallel, resumable, with a report.

    python -m tf_codistill.study --config=experiments/sync_vs_codistill.toml
    python -m tf_codistill.study --config=experiments --out=docs/results     # every study

A study is a TOML file (comments allowed: each file starts with the command
that runs it and the outcome to expect):

    name = "sync_vs_codistill"
    title = "Sync vs codistillation out of the box"
    seeds = [0, 1, 2]
    [common]                 # train.py flags for every arm
    dataset = "mnist1d/n70000"
    steps = 2000
    [[arms]]
    label = "sync"
    mode = "sync"
    [[arms]]
    label = "codistill"
    mode = "codistill"

Every (arm, seed) is one `train.py` process writing to
`<out>/<study>/<arm>/seed<k>`; a run whose `results.json` exists is not run
again, so an interrupted study resumes. The report (`REPORT.md`), a CSV of
every run and PNG plots (test accuracy and training loss against epochs,
mean ± standard error across seeds) go to `<out>/<study>/`, and a combined
`<out>/REPORT.md` lists every study.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor

from tf_codistill import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["load_study", "run_study", "main"]

# Set by the runner for every run: a study gives `seeds` and `--out` instead.
_RUNNER_FLAGS = ("seed", "workdir", "verbose")


def _check_settings(path: str, where: str, settings: dict) -> None:
    """Each key must be a train.py setting the study may set, with a value that
    setting accepts (tf_codistill/config.py checks both)."""
    for key, value in settings.items():
        if key == "label" and where != "[common]":
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


def load_study(path: str) -> dict:
    """Reads and checks one study file. Raises ValueError naming the problem."""
    with open(path, "rb") as f:
        try:
            study = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from err
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
    for arm in arms:
        _check_settings(path, f"arm {arm['label']!r}", arm)
    study["path"] = path
    return study


def _flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        if key == "label":
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        out.append(f"--{key}={value}")
    return out


def _run_one(study: dict, arm: dict, seed: int, out: str, timeout: float, log) -> dict:
    workdir = os.path.join(out, study["name"], arm["label"], f"seed{seed}")
    results = os.path.join(workdir, "results.json")
    if os.path.exists(results):
        return {"arm": arm["label"], "seed": seed, "workdir": workdir, "skipped": True}
    settings = {**study["common"], **arm, "seed": seed, "workdir": workdir, "verbose": 0}
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
        raise RuntimeError(
            f"{study['name']}/{arm['label']} seed {seed} failed (exit {proc.returncode}); "
            f"see {os.path.join(workdir, 'train.log')}"
        )
    log(f"  {study['name']}/{arm['label']} seed {seed}: done in {seconds:.0f}s")
    return {"arm": arm["label"], "seed": seed, "workdir": workdir, "skipped": False}


def _summaries(study: dict, out: str) -> list[dict]:
    rows = []
    for arm in study["arms"]:
        for seed in study["seeds"]:
            workdir = os.path.join(out, study["name"], arm["label"], f"seed{seed}")
            with open(os.path.join(workdir, "results.json")) as f:
                run = json.load(f)["runs"][0]
            with open(os.path.join(workdir, run["arm"], "history.json")) as f:
                history = json.load(f)
            groups = run["groups"]
            rows.append(
                {
                    "study": study["name"],
                    "arm": arm["label"],
                    "seed": seed,
                    "mode": run["arm"],
                    "num_groups": run["num_groups"],
                    "steps": run["steps"],
                    "test_accuracy": statistics.mean(g["test_accuracy"] for g in groups),
                    "test_loss": statistics.mean(g["test_loss"] for g in groups),
                    "train_loss": statistics.mean(g["train_loss"] for g in groups),
                    "ensemble_test_accuracy": run["ensemble_test_accuracy"],
                    "bytes_equivalent_per_step": run["bytes_equivalent_per_step"],
                    "wall_seconds": run["wall_seconds"],
                    "history": history,
                }
            )
    return rows


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean, std, digits=4):
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _plot(study: dict, rows: list[dict], path: str) -> None:
    """Each arm's seeds: mean ± standard error per epoch (report.plot_runs)."""
    from tf_codistill.report import plot_runs  # loads Keras: only once the runs are done

    runs = {arm["label"]: [r["history"] for r in rows if r["arm"] == arm["label"]] for arm in study["arms"]}
    plot_runs(runs, path, title=study["title"])


def _study_report(study: dict, rows: list[dict], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "runs.csv"), "w", newline="") as f:
        fields = [k for k in rows[0] if k != "history"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in fields})
    _plot(study, rows, os.path.join(out_dir, "curves.png"))
    lines = [
        f"## {study['title']}",
        "",
        f"`python -m tf_codistill.study --config={os.path.relpath(study['path'], REPO)}` "
        f"({len(study['seeds'])} seeds: {study['seeds']}; common flags: "
        f"`{' '.join(_flags(study['common']))}`)",
        "",
    ]
    if study.get("expect"):
        lines += [f"Expected: {study['expect']}", ""]
    lines += [
        "| arm | flags | test accuracy (mean of groups) | ensemble | train task loss | bytes/step (equiv.) |",
        "|---|---|---|---|---|---|",
    ]
    for arm in study["arms"]:
        runs = [r for r in rows if r["arm"] == arm["label"]]
        acc = _mean_std([r["test_accuracy"] for r in runs])
        ens = _mean_std([r["ensemble_test_accuracy"] for r in runs])
        loss = _mean_std([r["train_loss"] for r in runs])
        flags = " ".join(_flags({k: v for k, v in arm.items()}))
        lines.append(
            f"| {arm['label']} | `{flags}` | {_fmt(*acc)} | {_fmt(*ens)} | {_fmt(*loss)} | "
            f"{runs[0]['bytes_equivalent_per_step']:,.0f} |"
        )
    lines += ["", f"![{study['name']}]({study['name']}/curves.png)", ""]
    return lines


def run_study(study: dict, out: str, parallel: int, timeout: float, log=print) -> list[dict]:
    """Runs every missing (arm, seed) of `study` and returns one row per run."""
    jobs = [(arm, seed) for arm in study["arms"] for seed in study["seeds"]]
    log(f"{study['name']}: {len(jobs)} runs ({parallel} at a time)")
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(_run_one, study, arm, seed, out, timeout, log) for arm, seed in jobs]
        for future in futures:
            future.result()
    return _summaries(study, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tf_codistill.study", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a study .toml file, or a folder of them")
    parser.add_argument("--out", default="runs/studies", help="where runs, CSVs, plots and REPORT.md go")
    parser.add_argument("--parallel", type=int, default=max(1, os.cpu_count() or 1), help="runs at a time")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    parser.add_argument("--seeds", default=None, help="override every study's seeds, e.g. 0 or 0,1")
    parser.add_argument("--set", action="append", default=[], help="override a common flag: key=value")
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
    started = time.monotonic()
    sections = []
    for study in studies:
        try:
            rows = run_study(study, args.out, args.parallel, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            print(f"study: error: {err}", file=sys.stderr)
            return 1
        sections += _study_report(study, rows, os.path.join(args.out, study["name"]))
    header = [
        "# Study report",
        "",
        f"Generated {datetime.date.today().isoformat()} by `python -m tf_codistill.study "
        f"--config={args.config} --out={args.out}`"
        + (f" --seeds={args.seeds}" if args.seeds else "")
        + f" in {time.monotonic() - started:.0f} s (resumed runs are not re-timed).",
        "",
        "Values are mean ± standard deviation over seeds; accuracy is the mean over a run's groups.",
        "",
    ]
    with open(os.path.join(args.out, "REPORT.md"), "w") as f:
        f.write("\n".join(header + sections) + "\n")
    print(f"report: {os.path.join(args.out, 'REPORT.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
