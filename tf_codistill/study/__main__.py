"""Study runner: arms x seeds of train.py, in parallel, resumable, with a report.

    python -m tf_codistill.study --config=experiments/sync_vs_codistill.toml
    python -m tf_codistill.study --config=experiments --out=docs/results     # every study
    python -m tf_codistill.study --config=experiments --out=docs/results --report_only

The command line: load the studies (`spec`), run them (`execute`), collect
their CSVs (`collect`, `tables`), and build every report from the CSVs
(`analysis`, `markdown`, `plots`). The package docstring describes a study.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

from tf_codistill import config
from tf_codistill.study.analysis import StudyData, comparisons
from tf_codistill.study.collect import collect
from tf_codistill.study.execute import run_study
from tf_codistill.study.markdown import NLL_OUTCOMES, study_lines, summary_lines
from tf_codistill.study.shared import Shared
from tf_codistill.study.spec import RUNNER_FLAGS, load_study
from tf_codistill.study.tables import read_csvs, write_csvs

__all__ = ["main", "build_report"]


def build_report(
    study: dict, study_dir: str, config_shown: str, plots: bool = True, shared: Shared | None = None
) -> list[str]:
    """Builds `<study_dir>/REPORT.md` (and the plots) from its two CSVs alone;
    returns the study's section for the combined report. `shared`: the runs and
    comparisons other studies report too (`shared_context`)."""
    runs, curves = read_csvs(study, study_dir)
    data = StudyData(study, runs, curves, shared)
    with open(os.path.join(study_dir, "REPORT.md"), "w") as f:
        f.write("\n".join(study_lines(study, data, "", config_shown)) + "\n")
    if plots:
        from tf_codistill.study import plots as plots_mod  # matplotlib and Keras: only when drawn

        plots_mod.draw(data, study_dir)
    return study_lines(study, data, f"{study['name']}/", config_shown)


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _check_args(args) -> tuple[list[int] | None, dict]:
    """(seeds to override with, common flags to override). Raises ValueError."""
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
    overrides = {}
    for item in args.set:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--set={item!r}: give key=value, e.g. --set steps=500.")
        if key not in config.SETTINGS or key in RUNNER_FLAGS:
            raise ValueError(f"--set={item!r}: `{key}` is not a train.py flag the study can set.")
        try:
            value = config.parse_setting(key, text)
            config.check_setting(key, value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--set={item!r}: {err}") from None
        overrides[key] = value
    return seeds, overrides


def _load_studies(path: str) -> list[dict]:
    """The study at `path`, or every .toml study in folder `path`, in name order."""
    if os.path.isdir(path):
        return [load_study(os.path.join(path, p)) for p in sorted(os.listdir(path)) if p.endswith(".toml")]
    return [load_study(path)]


def outcomes(study: dict) -> tuple[str, ...]:
    """The outcomes a study's comparisons are made on."""
    return tuple(key for key, _ in NLL_OUTCOMES) if study.get("metric") == "nll" else ("test_accuracy",)


def shared_context(
    studies: list[dict], out: str, seeds: list[int] | None = None, overrides: dict | None = None
) -> tuple[Shared, list[tuple[dict, StudyData]]]:
    """The studies beside `studies` (every study file in their folders, in run
    order, with the same `seeds` and `overrides`) that have runs under `out`:
    which of their runs and comparisons are the same, and each one's data."""
    given = {s["path"]: s for s in studies}
    siblings = []
    for folder in dict.fromkeys(os.path.dirname(s["path"]) or "." for s in studies):
        for other in _load_studies(folder):
            if other["path"] in given:
                other = given[other["path"]]
            else:
                if seeds:
                    other["seeds"] = seeds
                other["common"].update(overrides or {})
            siblings.append(other)
    ran = [s for s in siblings if os.path.exists(os.path.join(out, s["name"], "runs.csv"))]
    shared = Shared(ran)
    context = []
    for other in ran:
        data = StudyData(other, *read_csvs(other, os.path.join(out, other["name"])))
        for key in outcomes(other):
            shared.add(other, comparisons(data, key))
        context.append((other, data))
    return shared, context


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        seeds, overrides = _check_args(args)
        studies = _load_studies(args.config)
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
        shared, context = shared_context(studies, args.out, seeds, overrides)
        for study in studies:
            shown = os.path.normpath(study["path"])
            sections += build_report(
                study, os.path.join(args.out, study["name"]), shown, not args.no_plots, shared
            )
    except (OSError, ValueError) as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 1
    names = {s["name"] for s in studies}
    header = summary_lines(
        command,
        [os.path.normpath(s["path"]) for s in not_run],
        os.path.normpath(args.out),
        [(s, d) for s, d in context if s["name"] in names],
        shared,
    )
    with open(os.path.join(args.out, "REPORT.md"), "w") as f:
        f.write("\n".join(header + sections) + "\n")
    print(f"report: {os.path.join(args.out, 'REPORT.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
