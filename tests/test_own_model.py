"""examples/own_model.py: a model and a pipeline of the user's own, through the
public runtime API, in one process, under the launcher (2 x 1 predictions,
2 x 2 stale weights) and as a TFJob's plain processes."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, python_env, run_tfjobs, worker_env

EXAMPLE = "examples/own_model.py"
STEPS = 200


def _results(workdir):
    return json.loads((workdir / "results.json").read_text())["runs"][0]


def _steps(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _launch(np_, groups, *args, timeout=300):
    cmd = [
        sys.executable,
        "-m",
        "tf_codistill.launch",
        "--np",
        str(np_),
        "--groups",
        str(groups),
        "--timeout",
        "280",
    ]
    cmd += ["--", EXAMPLE, f"--steps={STEPS}", *args]
    return subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("own_local")
    proc = subprocess.run(
        [sys.executable, EXAMPLE, f"--steps={STEPS}", f"--workdir={workdir}"],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    _ok(proc)
    return workdir


def test_one_process_trains_every_group(one_process):
    run = _results(one_process)
    assert (run["num_groups"], run["world_size"], run["exchange"]) == (2, 1, "predictions")
    assert [g["group"] for g in run["groups"]] == [0, 1]
    assert all(g["test_accuracy"] > 0.8 for g in run["groups"]), run  # 4 classes: chance is 0.25


@pytest.mark.usefixtures("horovod_installed")
def test_two_processes_reproduce_the_one_process_run(one_process, tmp_path):
    _ok(_launch(2, 2, f"--workdir={tmp_path}"))
    run = _results(tmp_path)
    assert (run["num_groups"], run["world_size"]) == (2, 2)
    local = _steps(one_process / "steps.rank0.jsonl")
    ranks = [_steps(tmp_path / f"steps.rank{r}.jsonl") for r in (0, 1)]
    assert len(local) == len(ranks[0]) == len(ranks[1]) == STEPS
    for k in range(STEPS):
        for g in (0, 1):
            assert ranks[g][k]["task_loss"] == pytest.approx(local[k][f"g{g}_task_loss"], abs=1e-5)
        distill = (ranks[0][k]["distill_loss"] + ranks[1][k]["distill_loss"]) / 2
        assert distill == pytest.approx(local[k]["distill_loss"], abs=1e-5)
    for mine, theirs in zip(run["groups"], _results(one_process)["groups"], strict=True):
        assert mine["test_accuracy"] == pytest.approx(theirs["test_accuracy"], abs=1e-6)


@pytest.mark.usefixtures("horovod_installed")
def test_two_groups_of_two_workers_exchange_stale_weights(tmp_path):
    _ok(_launch(4, 2, "--exchange=weights", f"--workdir={tmp_path}"))
    run = _results(tmp_path)
    assert (run["num_groups"], run["world_size"], run["exchange"]) == (2, 4, "weights")
    assert [g["group"] for g in run["groups"]] == [0, 1]
    assert all(g["test_accuracy"] > 0.7 for g in run["groups"]), run
    last = _steps(tmp_path / "steps.rank2.jsonl")[-1]  # a worker of group 1 saw its peer's copy
    assert last["peer_scale"] == 1.0 and last["distill_loss"] > 0


@pytest.mark.usefixtures("horovod_installed")
def test_as_a_tfjob(tmp_path):
    args = [f"--steps={STEPS}", f"--workdir={tmp_path}", "--num_groups=2", "--collective_timeout=60"]
    outcomes = run_tfjobs([("own", 2, args)], program=EXAMPLE)
    for job, index, code, out in outcomes:
        assert code == 0, f"{job} worker {index}: {code}\n{out[-3000:]}"
    run = _results(tmp_path)
    assert (run["num_groups"], run["world_size"]) == (2, 2)
    assert all(g["test_accuracy"] > 0.8 for g in run["groups"]), run
