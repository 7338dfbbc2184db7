"""One-shot accelerator check: prints one JSON object describing what ran.

On a GPU machine (about 5 minutes, bounded by --budget_s, default 480 s):

    python bench/device_check.py

On CPU, in seconds (what tests/test_device_check.py runs; add
--horovod_on_cpu to run the 2-process parts on CPU as well, about a minute):

    python bench/device_check.py --cpu_smoke

The JSON holds:

* `gpus`: the GPUs TensorFlow sees (name, compute capability), and whether
  TensorFlow was built with CUDA.
* `local`: ResNet-20 on `digits`, the sync baseline (one model) against
  2-member local codistillation (both models in this process, same batch),
  through the library itself (`models.build_model`, `tf_codistill.data`,
  `CodistillModel`): steps per second after warm-up and test accuracy of each.
* `horovod` and `horovod_mixed_float16`: a real 2-process job on one GPU
  (`python -m tf_codistill.launch --np 2 --groups 2 -- train.py
  --mode=codistill --exchange=horovod ...`, GPU memory growth on so that
  both fit), read back from its results.json: both ranks trained (two
  groups, two weight checksums that differ), the prediction exchange ran
  (exchange "horovod", bytes crossing groups). The second passes
  `--precision=mixed_float16`; when train.py does not know that flag yet the
  entry says "skipped: flag missing". Without a GPU both say "no GPU".

Every part reports `"status": "ok"` or why not; the script itself exits 0
unless its own arguments are wrong, so one run always gives the whole picture.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

#: How the full run and the smoke run differ (steps are per model).
SIZES = {
    "full": {"warmup_steps": 20, "steps": 300, "batch_size": 128, "hvd_steps": 200, "job_timeout_s": 150},
    "smoke": {"warmup_steps": 2, "steps": 3, "batch_size": 16, "hvd_steps": 4, "job_timeout_s": 120},
}


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu_smoke", action="store_true", help="a few steps, seconds on CPU")
    parser.add_argument("--data_dir", default=None, help="TFDS data directory (default: a temporary one)")
    parser.add_argument("--budget_s", type=float, default=480.0, help="stop starting new parts after this")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument(
        "--horovod_on_cpu",
        action="store_true",
        help="run the 2-process Horovod parts without a GPU too (to test this script)",
    )
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget_s must be > 0 seconds, got {args.budget_s}.")
    return args


def _gpus() -> tuple[list, dict]:
    """Turns on memory growth (before any other TensorFlow op) and describes the GPUs."""
    import tensorflow as tf

    found = tf.config.list_physical_devices("GPU")
    for gpu in found:
        tf.config.experimental.set_memory_growth(gpu, True)
    described = []
    for gpu in found:
        details = tf.config.experimental.get_device_details(gpu)
        described.append(
            {
                "device": gpu.name,
                "name": details.get("device_name"),
                "compute_capability": list(details.get("compute_capability") or []) or None,
            }
        )
    build = tf.sysconfig.get_build_info()
    return described, {
        "tensorflow": tf.__version__,
        "built_with_cuda": bool(tf.test.is_built_with_cuda()),
        "cuda_version": build.get("cuda_version"),
        "cudnn_version": build.get("cudnn_version"),
    }


def _train_local(spec, data_dir, members: int, size: dict) -> dict:
    """Sync (members=1) or local codistillation (members=2) of ResNet-20."""
    import keras

    from models import build_model
    from tf_codistill import CodistillModel, data

    keras.utils.set_random_seed(0)
    train = data.train_batches(spec, size["batch_size"], seed=0, data_dir=data_dir)
    test = data.eval_batches(spec, batch_size=360, data_dir=data_dir)
    model = CodistillModel(
        [build_model("resnet20", spec.input_shape, spec.num_classes, seed=i) for i in range(members)],
        alpha=1.0 if members > 1 else 0.0,
        distance="kl",
        data_mode="shared",
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), metrics=["accuracy"])
    model.fit(train, epochs=1, steps_per_epoch=size["warmup_steps"], verbose=0)  # tracing, autotuning
    begin = time.perf_counter()
    model.fit(train, epochs=1, steps_per_epoch=size["steps"], verbose=0)
    seconds = time.perf_counter() - begin
    final = model.evaluate(test, verbose=0, return_dict=True)
    accuracy = (
        [float(final["accuracy"])]
        if members == 1
        else [float(final[f"g{i}_accuracy"]) for i in range(members)]
    )
    return {
        "status": "ok",
        "members": members,
        "steps": size["warmup_steps"] + size["steps"],
        "steps_per_second": size["steps"] / max(seconds, 1e-9),
        "test_accuracy": accuracy,
    }


def local_comparison(data_dir, size: dict) -> dict:
    from tf_codistill import data

    spec = data.load_spec("digits", data_dir)
    out = {"dataset": "digits", "model": "resnet20", "batch_size_per_model": size["batch_size"]}
    for name, members in (("sync", 1), ("codistill", 2)):
        try:
            out[name] = _train_local(spec, data_dir, members, size)
        except Exception as err:  # reported, not raised: the other parts still run
            out[name] = {"status": f"failed: {type(err).__name__}: {str(err)[:300]}"}
    if out["sync"].get("status") == "ok" and out["codistill"].get("status") == "ok":
        out["codistill_step_time_ratio"] = (
            out["sync"]["steps_per_second"] / out["codistill"]["steps_per_second"]
        )
    return out


def horovod_command(
    workdir: str, data_dir: str, steps: int, timeout_s: float, precision: str | None
) -> list[str]:
    """The 2-process prediction-exchange job (two groups of one, on one GPU)."""
    command = [
        sys.executable,
        "-m",
        "tf_codistill.launch",
        "--np",
        "2",
        "--groups",
        "2",
        "--timeout",
        str(int(timeout_s)),
        "--",
        "train.py",
        "--mode=codistill",
        "--exchange=horovod",
        "--dataset=digits",
        "--model=resnet20",
        f"--steps={steps}",
        "--batch_size=128",
        "--warmup_epochs=0.2",
        "--verbose=2",
        f"--data_dir={data_dir}",
        f"--workdir={workdir}",
    ]
    if precision is not None:
        command.append(f"--precision={precision}")
    return command


def flag_missing(output: str, flag: str) -> bool:
    """True when absl rejected `--flag` as unknown (train.py predates it)."""
    return f"Unknown command line flag '{flag}'" in output


def read_job(workdir: str, returncode: int, output: str, precision: str | None) -> dict:
    """What the job's results.json (and exit status, output) says about it."""
    if precision is not None and returncode != 0 and flag_missing(output, "precision"):
        return {"status": "skipped: flag missing", "flag": f"--precision={precision}"}
    if returncode != 0:
        return {"status": f"failed: exit status {returncode}", "output_tail": output[-2000:]}
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            run = json.load(f)["runs"][0]
    except (OSError, ValueError, KeyError, IndexError) as err:
        return {"status": f"failed: no results.json ({err})", "output_tail": output[-2000:]}
    ranks = run.get("ranks", [])
    checksums = {r.get("weights_checksum") for r in ranks}
    distill = []
    for path in sorted(glob.glob(os.path.join(workdir, "**", "steps*.jsonl"), recursive=True)):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        distill += [row["distill_loss"] for row in rows[-1:] if "distill_loss" in row]
    both_trained = len(ranks) == 2 and len(checksums) == 2 and len(run.get("groups", [])) == 2
    exchanged = run.get("exchange") == "horovod" and run.get("bytes_cross_group_per_step", 0) > 0
    return {
        "status": "ok" if both_trained and exchanged else "failed: see fields",
        "both_ranks_trained": both_trained,
        "exchange_ran": exchanged,
        "exchange": run.get("exchange"),
        "steps": run.get("steps"),
        "test_accuracy": [g.get("test_accuracy") for g in run.get("groups", [])],
        "examples_per_second": run.get("examples_per_second"),
        "bytes_cross_group_per_step": run.get("bytes_cross_group_per_step"),
        "last_distill_loss": distill,
        "precision": precision or "float32",
    }


def horovod_job(data_dir: str, size: dict, precision: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="device-check-") as workdir:
        env = dict(os.environ, TF_FORCE_GPU_ALLOW_GROWTH="true", TF_CPP_MIN_LOG_LEVEL="2")
        command = horovod_command(workdir, data_dir, size["hvd_steps"], size["job_timeout_s"], precision)
        begin = time.monotonic()
        try:
            proc = subprocess.run(
                command,
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=size["job_timeout_s"] + 30,
            )
        except subprocess.TimeoutExpired:
            return {"status": f"failed: no result within {size['job_timeout_s'] + 30} s"}
        result = read_job(workdir, proc.returncode, proc.stdout + proc.stderr, precision)
        result["wall_seconds"] = time.monotonic() - begin
        return result


def main(argv=None) -> int:
    args = _parse(argv)
    begin = time.monotonic()
    size = SIZES["smoke" if args.cpu_smoke else "full"]
    if args.cpu_smoke:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    gpus, build = _gpus()
    report = {"mode": "cpu_smoke" if args.cpu_smoke else "full", **build, "gpus": gpus}
    with tempfile.TemporaryDirectory(prefix="device-check-tfds-") as scratch:
        data_dir = args.data_dir or scratch
        report["local"] = local_comparison(data_dir, size)
        for key, precision in (("horovod", None), ("horovod_mixed_float16", "mixed_float16")):
            if not gpus and not args.horovod_on_cpu:
                report[key] = {"status": "no GPU"}
            elif time.monotonic() - begin > args.budget_s - size["job_timeout_s"]:
                report[key] = {"status": f"skipped: --budget_s={args.budget_s:.0f} would be exceeded"}
            else:
                report[key] = horovod_job(data_dir, size, precision)
    report["wall_seconds"] = time.monotonic() - begin
    text = json.dumps(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
