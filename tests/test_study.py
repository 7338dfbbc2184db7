"""The study runner: a smoke-sized study (arms x seeds, resume, CSVs, report),
and REPORT.md rebuilt from committed CSVs byte for byte."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, python_env

from tf_codistill import stats, study
from tf_codistill.study import execute, spec

FIXTURE = os.path.join(REPO, "tests", "fixtures", "study_report")

SMOKE = """
# python -m tf_codistill.study --config=smoke.toml
name = "smoke"
title = "Smoke"
expect = "it runs"
seeds = [0]
baseline = "sync"

[common]
dataset = "mnist1d"
model = "cnn1d"
batch_size = 64
steps = 31
warmup_epochs = 0.2
data_dir = "{data_dir}"

[[arms]]
label = "sync"
mode = "sync"

[[arms]]
label = "codistill"
mode = "codistill"
expected = "lower"
"""


def _study(config, out, *extra, cwd=REPO):
    cmd = [
        sys.executable,
        "-m",
        "tf_codistill.study",
        f"--config={config}",
        f"--out={out}",
        "--parallel=2",
        *extra,
    ]
    env = python_env()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_smoke_study_runs_resumes_and_reports(tmp_path, data_dir, mnist1d_spec):
    """Run from outside the repository (runs are `python -m tf_codistill.train`,
    --out relative to the caller's directory)."""
    config = tmp_path / "smoke.toml"
    config.write_text(SMOKE.format(data_dir=data_dir))
    out = tmp_path / "out"
    first = _study(config, "out", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("done in") == 2
    report = (out / "REPORT.md").read_text()
    assert "| sync |" in report and "| codistill |" in report and "± 0.00 |" in report
    assert "needs 2 or more seeds per arm" in report  # one seed: no interval
    assert "Convergence of `sync`: not assessable: fewer than 3 evaluations" in report  # one epoch
    with open(out / "smoke" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["arm"] for r in rows) == ["codistill", "sync"]
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 and r["status"] == "ok" for r in rows)
    assert all(int(r["steps"]) == 31 and float(r["process_seconds"]) > 0 for r in rows)
    with open(out / "smoke" / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert {(r["arm"], r["epoch"], r["updates"]) for r in curves} == {
        ("sync", "1", "31"),
        ("codistill", "1", "31"),
    }
    assert (out / "smoke" / "curves.png").stat().st_size > 10_000
    assert (out / "smoke" / "REPORT.md").read_text() in report.replace("(smoke/curves.png)", "(curves.png)")
    assert "[sync] 1 group(s) x batch 64" in (out / "smoke" / "sync" / "seed0" / "train.log").read_text()
    again = _study(config, "out", cwd=tmp_path)  # resumes: nothing left to run
    assert again.returncode == 0 and "done in" not in again.stdout
    assert (out / "REPORT.md").read_text() == report
    shutil.rmtree(out / "smoke" / "sync")  # the run folders are not needed to rebuild the report
    rebuilt = _study(config, "out", "--report_only", "--no_plots", cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (out / "REPORT.md").read_text() == report


def _copy_fixture(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(FIXTURE, tree)
    return tree


def test_report_only_rebuilds_the_committed_reports_byte_for_byte(tmp_path):
    tree = _copy_fixture(tmp_path)
    for path in [tree / "results" / "REPORT.md", *tree.glob("results/*/REPORT.md")]:
        path.unlink()
    proc = _study("experiments", "results", "--report_only", "--no_plots", cwd=tree)
    assert proc.returncode == 0, proc.stderr
    names = ["REPORT.md", "compare/REPORT.md", "grid/REPORT.md"]
    for name in names:
        assert (tree / "results" / name).read_bytes() == open(
            os.path.join(FIXTURE, "results", name), "rb"
        ).read()
    first = {name: (tree / "results" / name).read_bytes() for name in names}
    again = _study("experiments", "results", "--report_only", "--no_plots", cwd=tree)  # deterministic
    assert again.returncode == 0 and {n: (tree / "results" / n).read_bytes() for n in names} == first


def test_report_only_draws_the_plots(tmp_path):
    tree = _copy_fixture(tmp_path)
    proc = _study("experiments/grid.toml", "results", "--report_only", cwd=tree)
    assert proc.returncode == 0, proc.stderr
    assert (tree / "results" / "grid" / "curves.png").stat().st_size > 10_000
    assert (tree / "results" / "grid" / "updates_to_target.png").stat().st_size > 10_000


def test_report_only_draws_accuracy_against_bytes(tmp_path):
    """plot_bytes = true: the committed low-communication study's CSVs give curves_bytes.png, whose
    x axis is bytes sent (every arm's curve at its own bytes per step), and the report shows it."""
    tree = tmp_path / "tree"
    (tree / "experiments").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "experiments", "low_communication.toml"), tree / "experiments")
    committed = os.path.join(REPO, "docs", "results", "low_communication")
    (tree / "results" / "low_communication").mkdir(parents=True)
    for name in ("runs.csv", "curves.csv"):
        shutil.copy(os.path.join(committed, name), tree / "results" / "low_communication")
    proc = _study("experiments/low_communication.toml", "results", "--report_only", cwd=tree)
    assert proc.returncode == 0, proc.stderr
    png = tree / "results" / "low_communication" / "curves_bytes.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "(curves_bytes.png)" in (tree / "results" / "low_communication" / "REPORT.md").read_text()


def test_fixture_report_numbers_by_hand():
    """The comparison line of the fixture equals Welch's interval computed here
    from runs.csv, and the grid picks the point with the best mean."""
    with open(os.path.join(FIXTURE, "results", "compare", "runs.csv")) as f:
        rows = list(csv.DictReader(f))
    acc = {arm: [float(r["test_accuracy"]) for r in rows if r["arm"] == arm] for arm in ("sync", "codistill")}
    n = 3
    ma, mb = sum(acc["codistill"]) / n, sum(acc["sync"]) / n
    va = sum((x - ma) ** 2 for x in acc["codistill"]) / (n - 1)
    vb = sum((x - mb) ** 2 for x in acc["sync"]) / (n - 1)
    se = ((va + vb) / n) ** 0.5
    df = (va / n + vb / n) ** 2 / ((va / n) ** 2 / (n - 1) + (vb / n) ** 2 / (n - 1))
    q = stats.t_quantile(0.975, df)
    line = (
        f"| codistill - sync | {100 * (ma - mb):+.2f} | [{100 * (ma - mb - q * se):+.2f}, "
        f"{100 * (ma - mb + q * se):+.2f}] |"
    )
    report = open(os.path.join(FIXTURE, "results", "compare", "REPORT.md")).read()
    assert line in report
    assert (
        "| codistill2_b512 | `--base_lr=0.8` | 95.00 ± 0.00 | 0.0871 ± 0.0000 | 1 |  |"
        in open(os.path.join(FIXTURE, "results", "grid", "REPORT.md")).read()
    )


# Each folder of study files and where `make study` / `make study-large` write its results.
_STUDY_FOLDERS = (
    ("experiments", "docs/results"),
    ("experiments/large", "docs/results/large"),
    ("experiments/scale_out/probe", "docs/results/scale_out/probe"),
)


def _committed_studies(folder):
    experiments = os.path.join(REPO, folder)
    paths = sorted(p for p in os.listdir(experiments) if p.endswith(".toml"))
    return [(p, study.load_study(os.path.join(experiments, p))["name"]) for p in paths]


@pytest.mark.parametrize("folder,results", _STUDY_FOLDERS, ids=[f for f, _ in _STUDY_FOLDERS])
def test_committed_results_rebuild_byte_for_byte(tmp_path, folder, results):
    """docs/results: every study whose runs are committed (runs.csv, curves.csv)
    rebuilds its REPORT.md from them, byte for byte, and so does the summary
    REPORT.md (which names the studies not run yet)."""
    ran = [
        (p, n)
        for p, n in _committed_studies(folder)
        if os.path.exists(os.path.join(REPO, results, n, "runs.csv"))
    ]
    if not ran:
        pytest.skip(f"{results} holds no study's runs.csv yet (no study has run)")
    tree = tmp_path / "tree"
    shutil.copytree(os.path.join(REPO, folder), tree / folder, ignore=shutil.ignore_patterns("large"))
    for _, name in ran:  # all first: a report refers to the runs other studies share with it
        shutil.copytree(os.path.join(REPO, results, name), tree / results / name)
    for path, name in ran:
        out = tree / results / name / "REPORT.md"
        out.unlink()
        proc = _study(f"{folder}/{path}", results, "--report_only", "--no_plots", cwd=tree)
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == open(os.path.join(REPO, results, name, "REPORT.md"), "rb").read(), name
    proc = _study(folder, results, "--report_only", "--no_plots", cwd=tree)
    assert proc.returncode == 0, proc.stderr
    summary = os.path.join(REPO, results, "REPORT.md")
    assert (tree / results / "REPORT.md").read_bytes() == open(summary, "rb").read()


def test_grid_expands_and_bad_keys_are_clear_errors(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(
        'name = "g"\nseeds = [0]\n[[arms]]\nlabel = "s"\nmode = "sync"\n'
        "[arms.grid]\nbase_lr = [0.1, 0.2]\nwarmup_epochs = [2, 5]\n"
    )
    arms = study.load_study(str(good))["arms"]
    assert [a["label"] for a in arms] == [
        "s-base_lr0.1-warmup_epochs2",
        "s-base_lr0.1-warmup_epochs5",
        "s-base_lr0.2-warmup_epochs2",
        "s-base_lr0.2-warmup_epochs5",
    ]
    assert {a["_base"] for a in arms} == {"s"} and "grid" not in arms[0]
    cases = {
        'name = "x"\nseeds = [0]\nbaseline = "nope"\n[[arms]]\nlabel = "a"\nmode = "sync"\n': "`baseline`",
        'name = "x"\nseeds = [0]\n[[arms]]\nlabel = "a"\nmode = "sync"\nexpected = "up"\n': "`expected`",
        'name = "x"\nseeds = [0]\nbasline = "a"\n[[arms]]\nlabel = "a"\nmode = "sync"\n': "unknown top-level",
        'name = "x"\nseeds = [0]\n[[arms]]\nlabel = "a"\n[arms.grid]\nbase_lr = []\n': "non-empty list",
        'name = "x"\nseeds = [0]\n[[arms]]\nlabel = "a"\n[arms.grid]\nsteps = [-1]\n': "steps",
        'name = "x"\nseeds = [0]\nplot_bytes = "yes"\n[[arms]]\nlabel = "a"\nmode = "sync"\n': "`plot_bytes`",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            study.load_study(str(path))


def test_bad_study_file_is_a_clear_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('name = "x"\nseeds = [0]\n[[arms]]\nmode = "sync"\n')
    proc = _study(config, tmp_path / "out")
    assert proc.returncode == 2 and "every arm needs a unique `label`" in proc.stderr


def test_report_only_without_runs_is_a_clear_error(tmp_path):
    tree = _copy_fixture(tmp_path)
    proc = _study("experiments/compare.toml", "results", "--report_only", "--seeds=0,1,2,3", cwd=tree)
    assert proc.returncode == 1 and "lacks 3 run(s)" in proc.stderr


def test_a_run_shared_by_two_studies_is_found(tmp_path):
    settings = {"mode": "sync", "steps": 8740, "seed": 0, "workdir": "a", "verbose": 2}
    key = execute.run_key(settings)
    assert key == execute.run_key({**settings, "workdir": "b", "verbose": 0})
    assert key != execute.run_key({**settings, "steps": 13110})
    assert key == execute.run_key({**settings, "lr_schedule": "step", "alpha": 1})  # defaults, 1 == 1.0
    done = tmp_path / "out" / "schedules" / "sync_step" / "seed0"
    done.mkdir(parents=True)
    (done / "study_run.json").write_text(json.dumps({"seconds": 60.0, "key": key}))
    mine = str(tmp_path / "out" / "groups" / "sync" / "seed0")
    assert execute.find_same_run(str(tmp_path / "out"), key, mine) is None  # no results.json: unfinished
    (done / "results.json").write_text("{}")
    assert execute.find_same_run(str(tmp_path / "out"), key, mine) == str(done)
    assert execute.find_same_run(str(tmp_path / "out"), key, str(done)) is None  # not itself


def test_collect_takes_updates_per_epoch_from_results_json(tmp_path):
    """curves.csv's updates come from results.json's steps_per_epoch (a run cut
    mid-epoch ends at its last update); a file written before it was recorded
    assumes whole epochs."""
    path = tmp_path / "c.toml"
    path.write_text('name = "c"\nseeds = [0, 1]\n[[arms]]\nlabel = "sync"\nmode = "sync"\n')
    loaded = study.load_study(str(path))
    history = {"val_accuracy": [0.3, 0.5, 0.6, 0.7], "task_loss": [2.0, 1.5, 1.2, 1.1]}
    for seed, per_epoch in ((0, 10), (1, None)):
        workdir = tmp_path / "out" / "c" / "sync" / f"seed{seed}"
        (workdir / "sync").mkdir(parents=True)
        (workdir / "sync" / "history.json").write_text(json.dumps(history))
        group = {"group": 0, "test_accuracy": 0.7, "test_loss": 0.9, "train_loss": 1.1}
        run = {"arm": "sync", "num_groups": 1, "steps": 31, "groups": [group]}
        if per_epoch is not None:
            run["steps_per_epoch"] = per_epoch
        (workdir / "results.json").write_text(json.dumps({"runs": [run]}))
    runs, curves = study.collect(loaded, str(tmp_path / "out"))
    assert [r["steps_per_epoch"] for r in runs] == [10, 8]
    assert [c["updates"] for c in curves if c["seed"] == 0] == [10, 20, 30, 31]
    assert [c["updates"] for c in curves if c["seed"] == 1] == [8, 16, 24, 31]
    assert runs[0]["test_accuracy"] == 0.7 and runs[0]["process_seconds"] is None


def test_every_committed_study_arm_is_a_valid_train_config():
    """Every arm of experiments/ (grid points included) passes train.py's checks,
    those that depend on the run length too (e.g. a burn-in shorter than the run)."""
    from tf_codistill import config

    train_examples = {"mnist1d/n70000": 56_000, "digits": 1_437, "tiny_shakespeare": 1_003_854 // 64}
    experiments = os.path.join(REPO, "experiments")
    paths = [os.path.join(experiments, p) for p in sorted(os.listdir(experiments)) if p.endswith(".toml")]
    paths += [os.path.join(experiments, "large", "large_batch.toml")]
    paths += [os.path.join(experiments, "shakespeare", "shakespeare.toml")]
    checked = 0
    for path in paths:
        loaded = study.load_study(path)
        assert len(loaded["seeds"]) >= 3 and open(path).readline().startswith(
            "# python -m tf_codistill.study"
        )
        for arm in loaded["arms"]:
            settings = {**loaded["common"], **spec.train_settings(arm), "seed": max(loaded["seeds"])}
            train = config.TrainConfig(**settings)
            train.validate()
            assert train.check_run_length(int(train_examples[train.dataset] * train.train_fraction)) == []
            checked += 1
    assert checked >= 80


def test_a_diverged_run_is_recorded_not_fatal(tmp_path, data_dir, mnist1d_spec):
    """A run whose predictions go NaN (train.py exit 3) is an outcome: the
    study goes on, runs.csv says diverged, the report names the seed and
    leaves it out of the means."""
    config = tmp_path / "smoke.toml"
    text = SMOKE.format(data_dir=data_dir).replace('name = "smoke"', 'name = "diverge"')
    text += '\n[[arms]]\nlabel = "blowup"\nmode = "codistill"\nbase_lr = 1e6\nexpected = "lower"\n'
    config.write_text(text)
    out = tmp_path / "out"
    proc = _study(config, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(diverged: recorded as diverged)" in proc.stdout
    assert json.loads((out / "diverge" / "blowup" / "seed0" / "failed.json").read_text())["exit"] == 3
    with open(out / "diverge" / "runs.csv") as f:
        status = {r["arm"]: r["status"] for r in csv.DictReader(f)}
    assert status == {"sync": "ok", "codistill": "ok", "blowup": "diverged"}
    report = (out / "diverge" / "REPORT.md").read_text()
    assert "| blowup | `--mode=codistill --base_lr=1e+06` | - |" in report
    assert "blowup: 1 of 1 seeds, 0 (diverged)" in report
    again = _study(config, out)  # resumes: the diverged run is not tried again
    assert again.returncode == 0 and "blowup seed 0" not in again.stdout


LM_SMOKE = """
# python -m tf_codistill.study --config=lm.toml
name = "lm"
title = "LM smoke"
metric = "nll"
seeds = [0, 1]

[common]
dataset = "tiny_shakespeare"
model = "transformer"
context = 16
layers = 1
heads = 2
width = 16
batch_size = 8
steps = 20
steps_per_epoch = 10
optimizer = "adam"
lr = 0.003
warmup_epochs = 0.5
data_dir = "{data_dir}"

[[arms]]
label = "sync"
mode = "sync"

[[arms]]
label = "codistill"
mode = "codistill"
compare_to = "sync"
expected = "lower"
"""


def test_a_language_model_study_reports_validation_nll(tmp_path, data_dir):
    from test_text import needs_text

    if needs_text.args[0]:
        pytest.skip(needs_text.kwargs["reason"])
    config = tmp_path / "lm.toml"
    config.write_text(LM_SMOKE.format(data_dir=data_dir))
    out = tmp_path / "out"
    proc = _study(config, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (out / "lm" / "REPORT.md").read_text()
    assert "| sync |" in report and "best val NLL" in report and "Regime of `sync`" in report
    assert "| codistill - sync |" in report and "(best validation NLL)" in report
    assert "Generated by `codistill`" in report
    with open(out / "lm" / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == 8 and all(float(c["val_loss"]) > 0 for c in curves)
    (out / "lm" / "REPORT.md").unlink()
    rebuilt = _study(config, out, "--report_only", "--no_plots")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (out / "lm" / "REPORT.md").read_text() == report


def _synthetic(tmp_path, toml_arms: str, curves_of: dict, steps: int, per_epoch: int, seeds=(0, 1, 2)):
    """A StudyData from made-up rows: `curves_of[label](updates) -> accuracy`."""
    from tf_codistill.study.analysis import StudyData

    path = tmp_path / "s.toml"
    path.write_text(f'name = "s"\nseeds = {list(seeds)}\n[common]\nsteps = {steps}\n{toml_arms}')
    loaded = study.load_study(str(path))
    runs, curves = [], []
    for label, accuracy in curves_of.items():
        for seed in seeds:
            runs.append(
                {"arm": label, "seed": seed, "status": "ok", "steps": steps, "steps_per_epoch": per_epoch}
            )
            for epoch in range(1, -(-steps // per_epoch) + 1):
                updates = min(epoch * per_epoch, steps)
                curves.append(
                    {
                        "arm": label,
                        "seed": seed,
                        "epoch": epoch,
                        "updates": updates,
                        "val_accuracy": accuracy(updates) + 0.0001 * seed,
                        "task_loss": 2.0 / epoch,
                    }
                )
    return StudyData(loaded, runs, curves)


def test_convergence_is_not_read_where_the_rate_has_decayed(tmp_path):
    """A curve that flattens only once the step schedule has taken the rate to
    1/100 of its peak fails (the old criterion, over the last 20% of updates,
    passed it); a plateau at a constant rate holds; a window with too few
    evaluations is not assessable."""
    from tf_codistill.study import analysis, markdown

    steps, per_epoch = 9000, 300  # goyal: x0.1 at 3,000, x0.01 at 6,000, x0.001 at 8,000

    def decayed(updates):  # climbs while the rate is >= 1/10 of peak, frozen after
        return 0.5 + 0.4 * min(updates, 6000) / 6000

    def plateau(updates):  # reaches its level at a third of the run, at a healthy rate
        return 0.5 + 0.4 * min(updates, 3000) / 3000

    step_data = _synthetic(
        tmp_path, '[[arms]]\nlabel = "sync"\nmode = "sync"\n', {"sync": decayed}, steps, per_epoch
    )
    (found,) = analysis.convergence(step_data)
    assert found.cutoff == 6000 and found.total == steps and abs(found.tail_rate - 0.01) < 1e-12
    assert found.end_updates <= 6000 and found.start_updates <= 0.8 * 6000
    assert found.status == "fails" and found.change_points > 5
    last_tail = decayed(steps) - decayed(0.8 * steps)
    assert last_tail == 0  # what the old criterion read: flat, so it "held"
    text = "\n".join(markdown._convergence_lines(step_data))
    assert "): fails. The last 33% of the run (updates 6,000 -> 9,000) is at 1/100 of the peak rate" in text

    constant = _synthetic(
        tmp_path,
        '[[arms]]\nlabel = "sync"\nmode = "sync"\nlr_schedule = "constant"\n',
        {"sync": plateau},
        steps,
        per_epoch,
    )
    (found,) = analysis.convergence(constant)
    assert found.cutoff == steps and found.status == "holds" and abs(found.change_points) < 0.1

    coarse = _synthetic(
        tmp_path,
        '[[arms]]\nlabel = "sync"\nmode = "sync"\nlr_schedule = "constant"\n',
        {"sync": plateau},
        steps,
        3000,
    )
    (found,) = analysis.convergence(coarse)
    assert found.status == "not assessable" and not found.holds and "evaluations" in found.why_not
    assert (
        "Convergence of `sync`: not assessable: fewer than 3 evaluations"
        in markdown._convergence_lines(coarse)[2]
    )


def test_the_rate_schedule_read_from_flags_matches_train_pys():
    """analysis.rate_fraction is the schedule runner._arm_schedules builds, as a
    fraction of its peak (step with warmup, cosine with a floor, constant)."""
    from tf_codistill import runner
    from tf_codistill.config import TrainConfig
    from tf_codistill.study import analysis

    total, per_epoch = 900, 30
    for extra in ({}, {"lr_schedule": "cosine", "lr_floor": 0.05}, {"lr_schedule": "constant"}):
        arm = {"label": "sync", "mode": "sync", "_base": "sync", "_point": {}, **extra}
        loaded = {"common": {"steps": total}, "arms": [arm]}
        rate = analysis.rate_fraction(loaded, arm, total, per_epoch)
        cfg = TrainConfig(mode="sync", steps=total, **extra)
        lr, _, _ = runner._arm_schedules(cfg, "sync", 128, total, per_epoch)
        peak = 0.4 * 128 / 256
        for step in (0, 10, 59, 60, 299, 300, 301, 599, 600, 700, 800, 899):
            assert abs(rate(step) - float(lr(step)) / peak) < 1e-5, (extra, step)


def test_planned_names_comparisons_and_an_unknown_one_is_refused(tmp_path):
    base = 'name = "x"\nseeds = [0, 1]\nbaseline = "a"\n[[arms]]\nlabel = "a"\nmode = "sync"\n'
    base += '[[arms]]\nlabel = "b"\nmode = "codistill"\n'
    path = tmp_path / "p.toml"
    path.write_text('planned = ["b"]\n' + base)
    assert study.load_study(str(path))["planned"] == ["b"]
    for planned, message in (
        ('["c"]', "names 'c', which is no comparison"),
        ('["a"]', "names 'a'"),
        ('"b"', "a list"),
    ):
        path.write_text(f"planned = {planned}\n" + base)
        with pytest.raises(ValueError, match=message):
            study.load_study(str(path))


def test_shared_runs_are_marked_and_their_comparisons_are_repeats():
    """docs/results: the arms whose flags and seeds equal an earlier study's
    are marked with it, hold the very same numbers, and a comparison of the
    same two run sets is a repeat of the first, not counted again."""
    from tf_codistill.study import __main__ as main_mod
    from tf_codistill.study import analysis

    studies = main_mod._load_studies(os.path.join(REPO, "experiments"))
    shared, context = main_mod.shared_context(studies, os.path.join(REPO, "docs", "results"))
    data = dict((s["name"], d) for s, d in context)
    groups = data["groups"].study
    assert shared.same_runs(groups, "sync") == "distance/sync"
    assert shared.same_runs(groups, "groups_2") == "distance/kl"
    assert shared.same_runs(groups, "groups_4") is None
    assert shared.same_runs(data["distance"].study, "sync") is None
    for name, label, first in (
        ("groups", "groups_2", ("distance", "kl")),
        ("schedules", "sync_step", ("distance", "sync")),
    ):
        assert data[name].accuracies(label) == data[first[0]].accuracies(first[1])  # the very same runs
    items = analysis.comparisons(analysis.StudyData(groups, *_rows_of(data["groups"]), shared))
    assert [i.repeat_of for i in items] == ["distance: sync - kl", None]
    report = open(os.path.join(REPO, "docs", "results", "groups", "REPORT.md")).read()
    assert "| groups_2 (the same runs as distance/kl) |" in report
    assert "groups_2 - sync (a repeat of distance: sync - kl)" in report


def _rows_of(data):
    return [r for rows in data.runs.values() for r in rows], [
        c for rows in data.curves.values() for c in rows
    ]


def test_curves_with_epochs_of_different_lengths_are_drawn_against_updates():
    """sync_small's epochs are 875 updates, the other arms' 437: curves.png
    draws every arm against updates (what plot_runs is given as x)."""
    from tf_codistill.study import __main__ as main_mod
    from tf_codistill.study import plots

    studies = main_mod._load_studies(os.path.join(REPO, "experiments"))
    _, context = main_mod.shared_context(studies, os.path.join(REPO, "docs", "results"))
    data = dict((s["name"], d) for s, d in context)
    runs, x_key, xlabel = plots.curve_runs(data["sync_vs_codistill"])
    assert x_key == "updates" and xlabel.startswith("updates")
    assert runs["sync_small"][0]["updates"][:2] == [875, 1750] and runs["sync"][0]["updates"][:2] == [
        437,
        874,
    ]
    assert runs["sync_small"][0]["updates"][-1] == runs["sync"][0]["updates"][-1] == 13110
    _, x_key, xlabel = plots.curve_runs(data["groups"])  # every epoch 437 updates: epochs, so labelled
    assert x_key is None and xlabel == "epoch (437 updates each)"
    lm = study.load_study(os.path.join(REPO, "experiments", "shakespeare", "shakespeare.toml"))
    lm_dir = os.path.join(REPO, "docs", "results", "shakespeare", "shakespeare")
    lm_data = main_mod.StudyData(lm, *study.read_csvs(lm, lm_dir))
    runs, x_key, xlabel = plots.curve_runs(lm_data)  # an "epoch" there is 100 updates
    assert x_key == "updates" and runs["sync"][0]["updates"][:2] == [100, 200]
