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
`<label>-<flag><value>...`) and is reported at its best one. `planned`
(a list of arm labels and contrast names): the comparisons declared before
the runs, confirmatory; the report marks every other comparison exploratory
(arm label: that arm against its `compare_to` or `baseline`). `plot_bytes =
true`: a second plot, `curves_bytes.png`, draws each arm's curve against the
bytes one worker has sent (updates x its bytes per step, log scale), for
studies that compare ways to communicate less.

Every (arm, seed) is one `python -m tf_codistill.train` process writing to
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

One module per stage, joined by the two CSVs: `spec` (the study file),
`execute` (the runs), `collect` (results.json -> rows), `tables` (the CSVs),
`analysis` (the numbers, pure), `plots` and `markdown` (the report), and
`__main__` (the command line).
"""

from __future__ import annotations

from tf_codistill.study.collect import collect
from tf_codistill.study.execute import run_study
from tf_codistill.study.spec import load_study
from tf_codistill.study.tables import read_csvs, write_csvs

__all__ = ["load_study", "run_study", "collect", "write_csvs", "read_csvs", "build_report", "main"]


def __getattr__(name):
    # The command line lives in __main__.py; importing it here would make
    # `python -m tf_codistill.study` find it already loaded (runpy warns).
    if name in ("main", "build_report"):
        from tf_codistill.study import __main__ as cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
