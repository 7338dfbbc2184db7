"""Runs a study's (arm, seed) pairs: one `python -m tf_codistill.train`
process each, several at a time, each bounded by a timeout; resumable.

A run folder with `results.json` (or `failed.json`) is done and is not run
again. A run whose flags and seed equal a finished run of another study under
the same `--out` is copied from it instead of trained twice.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import tf_codistill
from tf_codistill import config
from tf_codistill.study.spec import flags, run_dir, train_settings

__all__ = ["run_study", "run_key", "find_same_run", "train_command"]

# The folder that holds the tf_codistill package (and models/ beside it, in a
# clone or an install): runs import the same code as this process, whatever
# their working directory.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tf_codistill.__file__)))


def train_command(settings: dict) -> list[str]:
    """The command that trains one run with `settings` (train.py flags)."""
    return [sys.executable, "-m", "tf_codistill.train", *flags(settings)]


def _run_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # One thread per op: `--parallel` runs share the cores instead of each taking all of them.
    env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


def _canonical(settings: dict) -> dict:
    """Every train.py setting (defaults filled in, numbers compared as numbers,
    older spellings in their current form) but the workdir and the console
    output. Names no setting has any more are left out, so that a key written
    before a setting existed (at its default) still matches."""
    values = {}
    for name, spec in sorted(config.SETTINGS.items()):
        if name in ("workdir", "verbose"):
            continue
        value = settings.get(name, spec.default)
        if spec.kind == "float" and value is not None:
            value = float(value)
        values[name] = value
    legacy = config.LEGACY_EXCHANGES.get(values.get("exchange"))
    if legacy is not None:  # --exchange=auto|local|horovod: predictions over that transport
        values["exchange"] = "predictions"
        if values.get("transport") == "auto":
            values["transport"] = legacy
    if values.get("alpha") is None:  # its default depends on the exchange
        values["alpha"] = float(config.default_alpha(values["exchange"]))
    return values


def run_key(settings: dict) -> str:
    """What makes two runs the same run (see `_canonical`), as JSON."""
    return json.dumps(_canonical(settings))


def find_same_run(out: str, key: str, workdir: str) -> str | None:
    """Another study's finished run of exactly these flags and seed, if any."""
    want = _canonical(json.loads(key))
    for path in sorted(glob.glob(os.path.join(glob.escape(out), "*", "*", "seed*", "study_run.json"))):
        other = os.path.dirname(path)
        if os.path.abspath(other) == os.path.abspath(workdir):
            continue
        try:
            with open(path) as f:
                stored = json.load(f).get("key")
            if stored is None or not os.path.exists(os.path.join(other, "results.json")):
                continue
            if _canonical(json.loads(stored)) == want:
                return other
        except (OSError, ValueError, TypeError):
            continue
    return None


def _run_one(study: dict, arm: dict, seed: int, out: str, timeout: float, log) -> None:
    workdir = run_dir(study, arm, seed, out)
    failed = os.path.join(workdir, "failed.json")
    if os.path.exists(os.path.join(workdir, "results.json")) or os.path.exists(failed):
        return
    settings = {**study["common"], **train_settings(arm), "seed": seed, "workdir": workdir, "verbose": 2}
    key = run_key(settings)
    same = find_same_run(out, key, workdir)
    if same is not None:  # identical flags and seed in another study: the same run, not trained twice
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.copytree(same, workdir)
        log(f"  {study['name']}/{arm['label']} seed {seed}: the same run as {same}, copied")
        return
    os.makedirs(workdir, exist_ok=True)
    start = time.monotonic()
    with open(os.path.join(workdir, "train.log"), "w") as out_log:
        proc = subprocess.run(
            train_command(settings), env=_run_env(), stdout=out_log, stderr=subprocess.STDOUT, timeout=timeout
        )
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        message = (
            f"{study['name']}/{arm['label']} seed {seed} failed (exit {proc.returncode}); "
            f"see {os.path.join(workdir, 'train.log')}"
        )
        diverged = proc.returncode == config.ExitStatus.DIVERGED
        if not (arm["_point"] or diverged):
            raise RuntimeError(message)
        # A run that diverged is an outcome, and a grid point may fail: record
        # it and go on (the report names it and leaves it out of the means).
        with open(failed, "w") as f:
            json.dump({"exit": proc.returncode, "seconds": seconds}, f)
        why = "diverged" if diverged else "a grid point"
        log(f"  {message} ({why}: recorded as {'diverged' if diverged else 'failed'})")
        return
    with open(os.path.join(workdir, "study_run.json"), "w") as f:
        json.dump({"seconds": seconds, "key": key}, f)  # seconds: the whole process, start-up included
    log(f"  {study['name']}/{arm['label']} seed {seed}: done in {seconds:.0f}s")


def run_study(study: dict, out: str, parallel: int, timeout: float, log=print) -> None:
    """Runs every missing (arm, seed) of `study`, `parallel` at a time.

    Raises:
        RuntimeError: a run failed (a diverged run, or a failed grid point, is
            recorded instead).
        subprocess.TimeoutExpired: a run took longer than `timeout` seconds.
    """
    # Seed by seed: an interrupted study has whole seeds of every arm.
    jobs = [(arm, seed) for seed in study["seeds"] for arm in study["arms"]]
    log(f"{study['name']}: {len(jobs)} runs ({parallel} at a time)")
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(_run_one, study, arm, seed, out, timeout, log) for arm, seed in jobs]
        for future in futures:
            future.result()
