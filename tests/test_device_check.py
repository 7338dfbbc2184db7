"""bench/device_check.py on CPU: the smoke run gives one JSON with every part
(the GPU parts say "no GPU"), and a train.py without --precision is reported
as "skipped: flag missing", not a crash."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, python_env

sys.path.insert(0, os.path.join(REPO, "bench"))
import device_check  # noqa: E402


def _run(*args, timeout=240):
    proc = subprocess.run(
        [sys.executable, "bench/device_check.py", *args],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cpu_smoke_reports_every_part(data_dir):
    report = _run("--cpu_smoke", f"--data_dir={data_dir}")
    assert report["mode"] == "cpu_smoke" and report["gpus"] == []
    local = report["local"]
    assert local["model"] == "resnet20" and local["dataset"] == "digits"
    for arm, members in (("sync", 1), ("codistill", 2)):
        part = local[arm]
        assert part["status"] == "ok" and part["members"] == members, part
        assert part["steps_per_second"] > 0 and len(part["test_accuracy"]) == members
        assert all(0.0 <= a <= 1.0 for a in part["test_accuracy"])
    assert report["horovod"] == report["horovod_mixed_float16"] == {"status": "no GPU"}


def test_an_unknown_flag_is_detected_in_train_py_output():
    """The detection device_check relies on, against the real train.py and absl."""
    proc = subprocess.run(
        [sys.executable, "train.py", "--no_such_flag_for_device_check=1"],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert device_check.flag_missing(proc.stdout + proc.stderr, "no_such_flag_for_device_check")


def test_job_results_are_read_back(tmp_path):
    command = device_check.horovod_command(str(tmp_path), "/data", 7, 60, "mixed_float16")
    assert command[1:3] == ["-m", "tf_codistill.launch"] and "--precision=mixed_float16" in command
    assert "--exchange=horovod" in command and "--steps=7" in command
    assert "--precision=mixed_float16" not in device_check.horovod_command(str(tmp_path), "/d", 7, 60, None)

    missing = "FATAL Flags parsing error: Unknown command line flag 'precision'"
    assert (
        device_check.read_job(str(tmp_path), 1, missing, "mixed_float16")["status"] == "skipped: flag missing"
    )
    assert device_check.read_job(str(tmp_path), 1, "boom", None)["status"].startswith("failed: exit status 1")

    run = {
        "exchange": "horovod",
        "steps": 7,
        "groups": [{"test_accuracy": 0.5}, {"test_accuracy": 0.6}],
        "ranks": [{"rank": 0, "weights_checksum": 1.0}, {"rank": 1, "weights_checksum": 2.0}],
        "bytes_cross_group_per_step": 640.0,
        "examples_per_second": 100.0,
    }
    (tmp_path / "results.json").write_text(json.dumps({"runs": [run]}))
    (tmp_path / "codistill").mkdir()
    (tmp_path / "codistill" / "steps.jsonl").write_text('{"step": 7, "distill_loss": 0.25}\n')
    got = device_check.read_job(str(tmp_path), 0, "", None)
    assert got["status"] == "ok" and got["both_ranks_trained"] and got["exchange_ran"], got
    assert got["test_accuracy"] == [0.5, 0.6] and got["last_distill_loss"] == [0.25]
    run["ranks"][1]["weights_checksum"] = 1.0  # one model trained twice, or one rank idle
    (tmp_path / "results.json").write_text(json.dumps({"runs": [run]}))
    assert not device_check.read_job(str(tmp_path), 0, "", None)["both_ranks_trained"]


@pytest.mark.slow
@pytest.mark.usefixtures("horovod_installed")
def test_cpu_smoke_with_the_horovod_jobs(data_dir):
    """The GPU machine's 2-process jobs, run on CPU (about a minute here)."""
    report = _run("--cpu_smoke", "--horovod_on_cpu", f"--data_dir={data_dir}", timeout=400)
    assert report["horovod"]["status"] == "ok", report["horovod"]
    assert report["horovod"]["both_ranks_trained"] and report["horovod"]["exchange_ran"]
    assert report["horovod_mixed_float16"]["status"] in ("ok", "skipped: flag missing")
