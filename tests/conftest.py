"""Shared fixtures. Tests run on CPU; TensorFlow's C++ logging is quietened."""

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data directory private to the test session (datasets are built offline)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def mnist1d_spec(data_dir):
    from tf_codistill import data

    return data.load_spec("mnist1d", data_dir)


def python_env():
    """Environment for subprocesses: repo on the path, quiet TF."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def worker_env():
    """`python_env` for one of several workers sharing this machine's cores:
    one TF/OpenMP thread pool thread each."""
    env = python_env()
    env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
    return env


HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")


def horovodrun(processes: int, *argv) -> list[str]:
    """`horovodrun --gloo` of `argv` as `processes` local processes."""
    return [HOROVODRUN, "--gloo", "-np", str(processes), "-H", f"localhost:{processes}", *map(str, argv)]


def train_pid(marker: str, rank: int | None = None) -> int | None:
    """The `python train.py` process whose arguments carry `marker` (e.g. its
    workdir): Horovod rank `rank` of a job, or the only one when `rank` is
    None. Launchers and the shells between them and the workers (whose
    command lines carry the same arguments) are left out."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if len(argv) < 2 or "python" not in os.path.basename(argv[0]) or argv[1] != "train.py":
            continue
        if any(marker in arg for arg in argv) and (rank is None or f"HOROVOD_RANK={rank}" in environ):
            return int(pid)
    return None


@pytest.fixture(scope="module")
def horovod_installed():
    """Multi-process tests need Horovod; `make test` builds it first."""
    try:
        import horovod.tensorflow  # noqa: F401
    except ImportError:
        pytest.fail("Horovod is not installed: run `make horovod` (make test does it first).")


# A local TFJob stand-in: plain processes with TF_CONFIG as the Kubeflow
# Training Operator injects it; host names resolve to 127.0.0.1 through
# TF_CODISTILL_HOST_ALIASES.
def tfjob_env(job: str, num_workers: int, index: int, ports: list[int]) -> dict[str, str]:
    """What the Training Operator gives worker `index` of TFJob `job` (plus the aliases)."""
    hosts = [f"{job}-worker-{i}.ns.svc" for i in range(num_workers)]
    tf_config = {
        "cluster": {"worker": [f"{h}:{p}" for h, p in zip(hosts, ports)]},
        "task": {"type": "worker", "index": index},
        "environment": "cloud",
    }
    env = worker_env()
    for key in list(env):
        if key.startswith("HOROVOD_"):
            del env[key]
    env.update(
        TF_CONFIG=json.dumps(tf_config),
        TF_CODISTILL_HOST_ALIASES=",".join(f"{h}=127.0.0.1" for h in hosts),
    )
    return env


def run_tfjobs(
    jobs: list[tuple[str, int, list[str]]], timeout: float = 180, program: str = "train.py"
) -> list[tuple]:
    """Starts every worker of every job (name, workers, program args) at once;
    returns (job, index, returncode, output) per worker. All are killed at the deadline."""
    procs = []
    for job, n, args in jobs:
        from tf_codistill.topology import free_port

        ports = [free_port() for _ in range(n)]
        for i in range(n):
            proc = subprocess.Popen(
                [sys.executable, program, *args],
                cwd=REPO,
                env=tfjob_env(job, n, i, ports),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            procs.append((job, i, proc))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for job, i, proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                results.append((job, i, proc.returncode, out))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                results.append((job, i, "timeout", out))
    finally:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results
