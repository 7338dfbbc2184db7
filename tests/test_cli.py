"""train.py's command line, run for real: every mistake is one line on stderr
and exit status 2, and --help answers without loading TensorFlow."""

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, python_env


def _train(*argv, env=None, timeout=120):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "train.py", *argv],
        cwd=REPO,
        env=env or python_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - start


def _not_launched():
    env = python_env()
    env.pop("HOROVOD_RANK", None)
    env.pop("TF_CONFIG", None)
    return env


# (arguments, what the one error line says)
CLI_ERRORS = [
    (["--alpha=abc"], "--alpha=abc: could not convert string to float"),
    (["--num_groups=two"], "--num_groups=two"),
    (["--epoch=3"], "Unknown command line flag 'epoch'. Did you mean: epochs"),
    (["--mode=all"], "--mode=all: value should be one of <sync|codistill|both>"),
    (["extra"], "unexpected argument 'extra'"),
    (["--steps=10", "and", "more"], "unexpected argument 'and'"),
    (["--num_groups=0"], "--num_groups must be >= 1, got 0"),
    (["--verbose=7"], "--verbose must be 0, 1, 2 or 3"),
    (["--alpha=nan"], "--alpha must be a finite number, got nan"),
    (["--lr_milestones=0.9,0.1"], "--lr_milestones='0.9,0.1'"),
    (["--exchange=horovod"], "python -m tf_codistill.launch --np 4 --groups 2 -- train.py --mode=codistill"),
    (["--exchange=horovod", "--mode=sync"], "python -m tf_codistill.launch"),
]


@pytest.mark.parametrize("argv,message", CLI_ERRORS, ids=[" ".join(a) for a, _ in CLI_ERRORS])
def test_cli_error_is_one_line_and_exit_2(argv, message, tmp_path):
    proc, _ = _train(*argv, f"--workdir={tmp_path / 'run'}", env=_not_launched())
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("train.py: error: ") and message in lines[0], lines[0]
    assert not proc.stdout.strip()
    assert not (tmp_path / "run").exists()


def test_help_is_fast_and_lists_every_setting():
    from tf_codistill import config

    proc, seconds = _train("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in (*config.SETTINGS, "workdir"):
        assert f"--{name}:" in proc.stdout, name
    assert "<sync|codistill|both>" in proc.stdout  # string choices are enums
    assert seconds < 5.0, f"train.py --help took {seconds:.1f} s"  # 0.2 s on 2 idle cores


def test_the_program_runs_as_a_module_from_any_directory(tmp_path):
    """`python -m tf_codistill.train` (how the study runner starts runs) is the
    same program as `python train.py`: same flags, same one-line errors."""
    env = python_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)

    def run(*argv):
        return subprocess.run(
            [sys.executable, "-m", "tf_codistill.train", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    helped = run("--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "--workdir:" in helped.stdout and "<sync|codistill|both>" in helped.stdout
    wrong = run("--batch_size=0")
    assert wrong.returncode == 2 and wrong.stderr.startswith("train.py: error: "), wrong.stderr[-2000:]


def test_config_and_flags_load_no_tensorflow():
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from absl import flags\n"
        "from tf_codistill import config\n"
        "config.define_flags(flags.FlagValues())\n"
        "import train\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'tensorflow_datasets') if m in sys.modules))\n"
        "print(time.perf_counter() - t)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded, seconds = proc.stdout.split("\n")[:2]
    assert loaded == "[]"
    assert float(seconds) < 1.5


def test_unprepared_dataset_is_one_line_within_30_seconds(tmp_path):
    """A real TFDS name with nothing in --data_dir: no download is tried (this
    machine is offline: TFDS would retry for minutes), one line, exit 2."""
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    proc, seconds = _train(
        "--dataset=cifar10", f"--data_dir={data_dir}", f"--workdir={tmp_path / 'run'}", timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"--data_dir={data_dir}" in errors[0] and f"tfds build cifar10 --data_dir={data_dir}" in errors[0]
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr
    assert seconds < 30, f"took {seconds:.0f} s"
    assert not os.listdir(data_dir)


def test_every_exit_status_is_documented():
    """docs/operations.md's table lists exactly train.py's statuses (plus 1, a
    traceback, and the launcher's 124), so a new status cannot go unexplained."""
    import re

    from tf_codistill.config import ExitStatus

    text = open(os.path.join(REPO, "docs", "operations.md")).read()
    documented = {int(n) for n in re.findall(r"^\| (\d+) \| ", text, flags=re.M)}
    assert documented == {int(s) for s in ExitStatus} | {1, 124}, documented
