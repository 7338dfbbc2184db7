"""Language modelling: TFDS tiny_shakespeare as character windows, the
Transformer in models/, and train.py running both arms on them.

The text is prepared through TFDS's own builder from the local copy of the
exact file (../shared/data/tinyshakespeare/input.txt, checked by TFDS against
the sha256 it registers), so these tests run offline."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import train
from models import build_model, count_params
from tf_codistill import data, text_data

LOCAL_COPY = next(
    (
        d
        for d in text_data.local_copy_dirs("tiny_shakespeare")
        if os.path.isfile(os.path.join(d, "input.txt"))
    ),
    None,
)
needs_text = pytest.mark.skipif(LOCAL_COPY is None, reason="no local copy of tinyshakespeare/input.txt")
CONTEXT = 16


@pytest.fixture(scope="module")
def spec(data_dir):
    return data.load_spec("tiny_shakespeare", data_dir, 1.0, CONTEXT)


@needs_text
def test_the_split_and_vocabulary_are_tfds_s(spec, data_dir):
    texts = text_data._texts("tiny_shakespeare", data_dir)
    lengths = {k: len(v) for k, v in texts.items()}
    assert lengths == {"train": 1003854, "validation": 55770, "test": 55770}  # TFDS's 90/5/5
    assert spec.num_classes == 65 and spec.vocabulary == "".join(sorted(set(texts["train"])))
    assert spec.num_train == 1003854 // CONTEXT
    assert spec.num_test == spec.num_validation == (55770 - 1) // CONTEXT


@needs_text
def test_training_windows_are_next_character_pairs_and_resume_exactly(spec):
    batches = [b for b in data.train_batches(spec, 8, seed=3).take(4)]
    x, y = (t.numpy() for t in batches[0])
    assert x.shape == y.shape == (8, CONTEXT) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one character
    again = next(iter(data.train_batches(spec, 8, seed=3, skip_batches=3)))
    np.testing.assert_array_equal(again[0].numpy(), batches[3][0].numpy())
    other = next(iter(data.train_batches(spec, 8, seed=4)))
    assert not np.array_equal(other[0].numpy(), x)


@needs_text
def test_evaluation_reads_every_character_once(spec, data_dir):
    ys = np.concatenate([y.numpy() for _, y in data.eval_batches(spec, 100, split="validation")])
    ids = text_data._ids("tiny_shakespeare", data_dir, "validation", 1.0)
    assert ys.shape == (spec.num_validation, CONTEXT)
    np.testing.assert_array_equal(ys.reshape(-1), ids[1 : 1 + ys.size])


def test_a_wrong_local_copy_fails_in_one_line_naming_both_ways(tmp_path, monkeypatch):
    (tmp_path / "copies" / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / "copies" / "tinyshakespeare" / "input.txt").write_text("not the file\n")
    monkeypatch.setenv(text_data.DATA_ENV, str(tmp_path / "copies"))
    with pytest.raises(ValueError) as err:
        data.load_spec("tiny_shakespeare", str(tmp_path / "tfds"), 1.0, CONTEXT)
    message = str(err.value)
    assert "\n" not in message and "online" in message and text_data.DATA_ENV in message


def test_the_transformer_is_causal_and_float32_at_the_logits():
    model = build_model("transformer", (CONTEXT,), 11, seed=0, layers=2, heads=2, width=16)
    tokens = np.random.default_rng(0).integers(0, 11, size=(2, CONTEXT)).astype("int32")
    changed = tokens.copy()
    changed[:, 9] = (changed[:, 9] + 1) % 11
    a, b = np.asarray(model(tokens)), np.asarray(model(changed))
    assert a.shape == (2, CONTEXT, 11)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])  # no position sees a later one
    assert not np.allclose(a[:, 9:], b[:, 9:])
    before = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
        mixed = build_model("transformer", (CONTEXT,), 11, seed=0, layers=1, heads=2, width=16)
        assert mixed(tokens).dtype == tf.float32
    finally:
        keras.mixed_precision.set_dtype_policy(before)


def test_the_small_configuration_has_nanogpts_size():
    model = build_model("transformer", (64,), 65, layers=4, heads=4, width=128)
    # 4 blocks of 12 w^2 + 13 w, embeddings 65 w and 64 w, the head 65 (w + 1), the LayerNorms.
    assert 0.80e6 < count_params(model) < 0.82e6


def test_bad_transformer_settings_fail_at_start_up():
    with pytest.raises(ValueError, match="not divisible by --heads"):
        train.TrainConfig(dataset="tiny_shakespeare", model="transformer", width=30, heads=4).validate()
    with pytest.raises(ValueError, match="go with --model=transformer"):
        train.TrainConfig(dataset="tiny_shakespeare", model="cnn1d").validate()
    with pytest.raises(ValueError, match="go with --model=transformer"):
        train.TrainConfig(dataset="mnist1d", model="transformer").validate()
    with pytest.raises(ValueError, match="takes no option"):
        build_model("mlp", (4,), 3, layers=2)


@needs_text
def test_train_runs_both_arms_and_reports_validation_nll(tmp_path, data_dir):
    config = train.TrainConfig(
        dataset="tiny_shakespeare",
        model="transformer",
        context=CONTEXT,
        layers=1,
        heads=2,
        width=16,
        batch_size=8,
        steps=30,
        steps_per_epoch=10,
        optimizer="adamw",
        lr=3e-3,
        lr_schedule="cosine",
        lr_floor=0.1,
        warmup_epochs=0.5,
        weight_decay=0.1,
        clip_norm=1.0,
        data_dir=data_dir,
        verbose=0,
    )
    train.train_and_evaluate(config, str(tmp_path))
    runs = {r["arm"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    for arm in ("sync", "codistill"):
        for group in runs[arm]["groups"]:
            assert group["best_val_loss"] <= group["val_loss"] < np.log(65)  # learnt something
            assert group["test_perplexity"] == pytest.approx(np.exp(group["test_loss"]))
    codistill = runs["codistill"]
    assert codistill["ensemble_val_loss"] > 0 and codistill["ensemble_test_loss"] > 0
    # Predictions cost (groups - 1) x batch x positions x vocabulary floats.
    assert codistill["bytes_equivalent_per_step"] == 1 * 4 * CONTEXT * 65 * 4
    history = (tmp_path / "codistill" / "history.csv").read_text().splitlines()
    assert len(history) == 4 and "val_ensemble_loss" in history[0]


def _example(workdir, data_dir, processes=None):
    import subprocess
    import sys

    from conftest import REPO, python_env, worker_env

    argv = ["examples/own_transformer.py", "--steps=30", f"--workdir={workdir}", f"--data_dir={data_dir}"]
    if processes:
        argv = [sys.executable, "-m", "tf_codistill.launch", "--np", str(processes), "--groups", "2"]
        argv += ["--timeout", "280", "--", "examples/own_transformer.py", "--steps=30"]
        argv += [f"--workdir={workdir}", f"--data_dir={data_dir}"]
        env = worker_env()
    else:
        argv = [sys.executable, *argv]
        env = python_env()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((workdir / "results.json").read_text())["runs"][0]


@needs_text
def test_own_transformer_example_in_one_process(tmp_path, data_dir):
    run = _example(tmp_path, data_dir)
    assert [g["group"] for g in run["groups"]] == [0, 1]
    assert all(g["val_loss"] < np.log(65) for g in run["groups"])  # below the uniform guess


@needs_text
def test_own_transformer_example_as_a_two_process_horovod_job(tmp_path, data_dir, horovod_installed):
    run = _example(tmp_path, data_dir, processes=2)
    assert run["world_size"] == 2 and [g["group"] for g in run["groups"]] == [0, 1]
    assert all(g["val_loss"] < np.log(65) for g in run["groups"])
