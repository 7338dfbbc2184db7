"""The study runner on a smoke-sized study: arms x seeds, resume, report."""

import csv
import subprocess
import sys

from conftest import REPO, python_env

SMOKE = """
# python -m tf_codistill.study --config=smoke.toml
name = "smoke"
title = "Smoke"
expect = "it runs"
seeds = [0]

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
"""


def _study(config, out, *extra):
    cmd = [
        sys.executable,
        "-m",
        "tf_codistill.study",
        f"--config={config}",
        f"--out={out}",
        "--parallel=2",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)


def test_smoke_study_runs_resumes_and_reports(tmp_path, data_dir, mnist1d_spec):
    config = tmp_path / "smoke.toml"
    config.write_text(SMOKE.format(data_dir=data_dir))
    out = tmp_path / "out"
    first = _study(config, out)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("done in") == 2
    report = (out / "REPORT.md").read_text()
    assert "| sync |" in report and "| codistill |" in report and "± 0.0000" in report
    with open(out / "smoke" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["arm"] for r in rows) == ["codistill", "sync"]
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    assert (out / "smoke" / "curves.png").stat().st_size > 10_000
    again = _study(config, out)  # resumes: nothing left to run
    assert again.returncode == 0 and "done in" not in again.stdout


def test_bad_study_file_is_a_clear_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('name = "x"\nseeds = [0]\n[[arms]]\nmode = "sync"\n')
    proc = _study(config, tmp_path / "out")
    assert proc.returncode == 2 and "every arm needs a unique `label`" in proc.stderr
