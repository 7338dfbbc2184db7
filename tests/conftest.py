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
