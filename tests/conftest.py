"""Shared fixtures. Tests run on CPU; TensorFlow's C++ logging is quietened."""

import os
import sys

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
