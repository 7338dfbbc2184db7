"""train.py end to end on a tiny configuration, and its start-up errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, python_env

import train
from tf_codistill import runner
from tf_codistill.results import read_results, results_json

TINY = dict(dataset="mnist1d", model="cnn1d", batch_size=64, steps=40, warmup_epochs=0.1, verbose=0)


def test_both_arms_end_to_end(tmp_path, data_dir):
    config = train.TrainConfig(**TINY, data_dir=data_dir, num_groups=2, seed=1)
    results = train.train_and_evaluate(config, str(tmp_path))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    # The file is what its schema writes, key for key and byte for byte.
    assert results_json(read_results(str(tmp_path))) == (tmp_path / "results.json").read_text()
    runs = {r["arm"]: r for r in on_disk["runs"]}
    assert set(runs) == {"sync", "codistill"}
    for arm, groups in (("sync", 1), ("codistill", 2)):
        run = runs[arm]
        for key in (
            "arm",
            "num_groups",
            "world_size",
            "exchange",
            "dataset",
            "model",
            "seed",
            "steps",
            "groups",
            "ensemble_test_accuracy",
            "bytes_sent_per_step",
            "examples_per_second",
            "wall_seconds",
        ):
            assert key in run, key
        assert run["num_groups"] == groups and run["steps"] == 40 and run["seed"] == 1
        assert [g["group"] for g in run["groups"]] == list(range(groups))
        for g in run["groups"]:
            assert 0.0 <= g["test_accuracy"] <= 1.0 and g["test_loss"] > 0 and g["train_loss"] > 0
        assert run["examples_per_second"] > 0 and run["wall_seconds"] > 0
        assert os.listdir(tmp_path / arm / "tensorboard")
        assert (tmp_path / arm / "history.csv").exists()
    assert runs["sync"]["ensemble_test_accuracy"] is None
    assert 0.0 <= runs["codistill"]["ensemble_test_accuracy"] <= 1.0
    assert runs["codistill"]["batch_size_per_group"] == 32 and runs["sync"]["batch_size_per_group"] == 64
    # The tiny run still learns something (chance is 0.1).
    assert runs["sync"]["groups"][0]["test_accuracy"] > 0.2
    assert (tmp_path / "comparison.png").stat().st_size > 10_000


def test_paper_fix_settings_apply_to_the_codistillation_arm_only():
    config = train.TrainConfig(
        **TINY, lr_milestones="goyal", codistill_lr_milestones="delayed", codistill_wd_schedule="paper"
    )
    lr_sync, wd_sync, _ = runner._arm_schedules(config, "sync", 64, 450, 10)
    lr_co, wd_co, _ = runner._arm_schedules(config, "codistill", 32, 450, 10)
    assert lr_sync.boundaries == [150, 300, 400] and lr_co.boundaries == [180, 380, 440]
    assert wd_sync == pytest.approx(1e-4)
    assert [float(wd_co(s)) for s in (0, 180, 380)] == pytest.approx([1e-4, 1e-5, 0.0])
    assert lr_sync.peak_lr == pytest.approx(0.4 * 64 / 256) and lr_co.peak_lr == pytest.approx(0.4 * 32 / 256)


BAD = [
    (dict(num_groups=0), "--num_groups must be >= 1"),
    (dict(alpha=-0.5), "--alpha must be >= 0"),
    (dict(distance="kl", temperature=0.0), "temperature must be > 0"),
    (dict(batch_size=65, num_groups=2), "not divisible by --num_groups=2"),
    (dict(model="vgg"), "Unknown model 'vgg'"),
    (dict(lr_milestones="0.9,0.2"), "increasing fractions"),
    (dict(wd_schedule="paper", lr_schedule="cosine"), "use --lr_schedule=step"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m for _, m in BAD])
def test_bad_settings_fail_before_training(overrides, message, tmp_path):
    config = dataclasses.replace(train.TrainConfig(**TINY), **overrides)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "results.json").exists()


def test_unknown_dataset_fails_before_training(tmp_path, data_dir):
    config = train.TrainConfig(**{**TINY, "dataset": "no_such_set"}, data_dir=data_dir)
    with pytest.raises(ValueError, match="Unknown dataset 'no_such_set'"):
        train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
    "flag,message",
    [("--num_groups=0", "--num_groups must be >= 1"), ("--dataset=no_such_set", "Unknown dataset")],
)
def test_command_line_errors_are_one_clear_line(flag, message, tmp_path, data_dir):
    proc = subprocess.run(
        [sys.executable, "train.py", flag, f"--workdir={tmp_path}", f"--data_dir={data_dir}"],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "train.py: error:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_same_seed_gives_bit_identical_runs(tmp_path, data_dir):
    config = train.TrainConfig(**{**TINY, "steps": 20}, data_dir=data_dir, mode="codistill", seed=3)
    for name in ("a", "b"):
        train.train_and_evaluate(config, str(tmp_path / name))
    first = (tmp_path / "a" / "codistill" / "steps.jsonl").read_bytes()
    assert first == (tmp_path / "b" / "codistill" / "steps.jsonl").read_bytes()
    histories = [json.loads((tmp_path / n / "codistill" / "history.json").read_text()) for n in "ab"]
    for history in histories:
        history.pop("epoch_seconds", None)  # wall time: the one log that differs
    assert histories[0] == histories[1]


def test_steps_is_the_exact_number_of_updates(tmp_path, data_dir):
    """--steps=45 with 31 steps per epoch (4,000 examples, batch 128): 45 updates,
    not two whole epochs (62)."""
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--mode=sync",
            "--steps=45",
            "--batch_size=128",
            "--warmup_epochs=0.1",
            "--verbose=0",
            f"--data_dir={data_dir}",
            f"--workdir={tmp_path}",
        ],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["steps"] == 45 and run["epochs"] == 2
    updates = [
        json.loads(line)["step"] for line in (tmp_path / "sync" / "steps.jsonl").read_text().splitlines()
    ]
    assert updates == list(range(1, 46))  # one line per optimizer update


def test_a_run_on_a_tensorflow_filesystem(data_dir):
    """--workdir and --exchange_dir on any tf.io.gfile filesystem (gs:// in a
    real job; TensorFlow's in-memory ram:// here): results, logs, backups and
    the stale-weights exchange all go through it."""
    import tensorflow as tf

    workdir, exchange_dir = "ram://tfc-train/work", "ram://tfc-train/exchange"
    config = train.TrainConfig(
        **{**TINY, "steps": 45},
        data_dir=data_dir,
        mode="codistill",
        exchange="weights",
        exchange_dir=exchange_dir,
        group=0,
        exchange_every=10,
        peer_timeout=5.0,
        backup_keep=1,
    )
    train.train_and_evaluate(config, workdir)
    with tf.io.gfile.GFile(f"{workdir}/results.json") as f:
        run = json.load(f)["runs"][0]
    assert run["steps"] == 45 and run["exchange"] == "weights/directory" and run["groups"][0]["group"] == 0
    with tf.io.gfile.GFile(f"{workdir}/codistill/history.csv") as f:
        rows = f.read().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 1 + run["epochs"]
    with tf.io.gfile.GFile(f"{workdir}/codistill/steps.jsonl") as f:
        assert len(f.read().splitlines()) == 45
    assert tf.io.gfile.exists(f"{workdir}/comparison.png")
    assert tf.io.gfile.glob(f"{exchange_dir}/group0/step*.npz")  # this group published its weights


def test_mixed_bfloat16_run_learns(tmp_path, data_dir):
    config = train.TrainConfig(
        **{**TINY, "steps": 150, "batch_size": 128},
        data_dir=data_dir,
        mode="codistill",
        precision="mixed_bfloat16",
        seed=2,
    )
    try:
        run = train.train_and_evaluate(config, str(tmp_path))["runs"][0]
    finally:
        import keras

        keras.mixed_precision.set_dtype_policy("float32")
    assert run["precision"] == "mixed_bfloat16"
    assert all(g["test_accuracy"] > 0.3 for g in run["groups"]), run["groups"]  # 10 classes: chance 0.1


def test_optimizer_lamb_is_keras_lamb():
    config = train.TrainConfig(
        **{**TINY, "batch_size": 1024}, mode="codistill", optimizer="lamb", base_lr=0.05
    )
    assert type(runner._optimizer(config, 0.01)).__name__ == "Lamb"


@pytest.mark.slow  # about a minute; make test keeps the check above (run it: pytest -m slow tests/test_train.py)
def test_lamb_run_learns_at_a_large_batch(tmp_path, data_dir):
    """--optimizer=lamb is Keras's Lamb, and a short run at batch 1,024 learns."""
    config = train.TrainConfig(
        **{**TINY, "steps": 40, "batch_size": 1024, "warmup_epochs": 0.5},
        data_dir=data_dir,
        mode="codistill",
        optimizer="lamb",
        base_lr=0.05,
        seed=3,
    )
    assert type(runner._optimizer(config, 0.01)).__name__ == "Lamb"
    run = train.train_and_evaluate(config, str(tmp_path))["runs"][0]
    # 40 steps of 1,024 on mnist1d (measured 0.29 / 0.26, losses 1.7); chance is 0.1 and ln 10 = 2.30
    assert all(g["test_accuracy"] > 0.2 and g["train_loss"] < 2.0 for g in run["groups"]), run["groups"]


def test_validation_fraction_evaluates_on_the_held_out_end_of_the_training_split(tmp_path, data_dir):
    """--validation_fraction=0.1 on mnist1d (4,000 training examples): training
    reads the first 3,600 (56 steps of 64 per epoch, not 62), the epochs are
    evaluated on the last 400, the test split at the end."""
    tiny = {**TINY, "steps": 60, "mode": "sync", "target_accuracy": 0.05}
    config = train.TrainConfig(**tiny, data_dir=data_dir, validation_fraction=0.1)
    (run,) = train.train_and_evaluate(config, str(tmp_path))["runs"]
    assert run["steps_per_epoch"] == 56
    val = run["final_val_accuracy"]
    assert abs(val * 400 - round(val * 400)) < 1e-3  # a fraction of the 400 validation examples
    assert run["updates_to_target"] == 56  # the first evaluation
    with pytest.raises(ValueError, match="has its own validation split"):
        train.TrainConfig(
            **{**tiny, "dataset": "mnist1d_fresh", "steps_per_epoch": 25}, validation_fraction=0.1
        ).validate()
