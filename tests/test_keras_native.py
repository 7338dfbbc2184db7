"""CodistillModel as a Keras model: saving, export, callbacks, any Keras
distillation loss as distance, loss safety, defaults and mixed precision.

Real Keras objects and files throughout; the saved model is loaded in a fresh
Python process (so registration, not this process's imports, must find the
classes)."""

import json
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, python_env

from models import build_model
from tf_codistill import (
    AlphaSchedule,
    CodistillModel,
    KLDivergence,
    StaleWeightsExchange,
    WarmupCosineDecay,
    callbacks,
    paper_weight_decay,
)

INPUT = (12,)
CLASSES = 5


def _members(n, seed=0):
    return [build_model("mlp", INPUT, CLASSES, seed=seed + i) for i in range(n)]


def _batch(seed, size=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(size, *INPUT)).astype("float32"), rng.integers(0, CLASSES, size=size)


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


def _saved_model_setup():
    model = CodistillModel(
        _members(2),
        distance="kl",
        temperature=2.0,
        alpha=AlphaSchedule(0.8, burn_in_steps=1, ramp_steps=2),
        data_mode="shared",
        weight_decay=paper_weight_decay([2, 4], (1e-3, 1e-4, 0.0)),
        num_classes=CLASSES,
        max_bad_peer_steps=7,
        name="saved",
    )
    lr = WarmupCosineDecay(0.2, total_steps=20, warmup_steps=2)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), metrics=["accuracy"])
    return model


# --------------------------------------------------------------------- saving
LOAD_SCRIPT = r"""
import json, sys
import numpy as np
import keras
import tf_codistill  # registers nothing by itself: load_model must find the classes

path, x_path, y_path, out = sys.argv[1:5]
model = keras.models.load_model(path)
x, y = np.load(x_path), np.load(y_path)
pred = model.predict(x, verbose=0)
np.save(out + "/pred.npy", pred)
info = {
    "type": type(model).__name__,
    "iterations_loaded": int(model.optimizer.iterations.numpy()),
    "distance": type(model.distance).__name__,
    "temperature": model.distance.temperature,
    "alpha": model.alpha_schedule.get_config(),
    "weight_decay": type(model.weight_decay).__name__,
    "data_mode": model.data_mode,
    "max_bad_peer_steps": model.max_bad_peer_steps,
    "num_classes": model.num_classes,
    "exchange": model.exchange.name,
    "lr": type(model.optimizer.learning_rate).__name__ if not hasattr(model.optimizer, "_learning_rate") else type(model.optimizer._learning_rate).__name__,
}
model.train_on_batch(x, y)
info["iterations_after_step"] = int(model.optimizer.iterations.numpy())
np.savez(out + "/after.npz", *[v.numpy() for v in model.trainable_variables])
print(json.dumps(info))
"""


def test_save_and_load_model_in_a_fresh_process_continues_training(tmp_path):
    model = _saved_model_setup()
    x, y = _batch(0, size=48)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # 3 steps
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.save(tmp_path / "x.npy", x[:16])
    np.save(tmp_path / "y.npy", y[:16])
    want = model.predict(x[:16], verbose=0)

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_SCRIPT,
            path,
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
            str(tmp_path),
        ],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(np.load(tmp_path / "pred.npy"), want)
    assert info == {
        "type": "CodistillModel",
        "iterations_loaded": 3,
        "distance": "KLDivergence",
        "temperature": 2.0,
        "alpha": {"alpha": 0.8, "burn_in_steps": 1, "ramp_steps": 2},
        "weight_decay": "PiecewiseConstant",
        "data_mode": "shared",
        "max_bad_peer_steps": 7,
        "num_classes": CLASSES,
        "exchange": "local",
        "lr": "WarmupCosineDecay",
        "iterations_after_step": 4,
    }
    # The loaded model's step is the step this model takes next: the
    # optimizer's momentum and step count came back with the weights.
    model.train_on_batch(x[:16], y[:16])
    after = np.load(tmp_path / "after.npz")
    for i, w in enumerate(_weights(model)):
        np.testing.assert_allclose(after[f"arr_{i}"], w, rtol=1e-6, atol=1e-7)


def test_model_checkpoint_default_saves_a_loadable_model(tmp_path):
    model = _saved_model_setup()
    x, y = _batch(1, size=32)
    path = str(tmp_path / "ckpt.keras")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[keras.callbacks.ModelCheckpoint(path)])
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))
    assert int(restored.optimizer.iterations.numpy()) == 4


def test_a_model_with_another_exchange_is_restored_with_load_weights(tmp_path):
    """load_model gives the local exchange; code that binds its own exchange
    builds the model as before and restores weights and optimizer state."""
    trained = _stale_model(2)
    trained.fit(_independent_data(4), epochs=1, verbose=0)
    path = str(tmp_path / "stale.keras")
    trained.save(path)
    assert keras.models.load_model(path).exchange.name == "local"
    again = _stale_model(2)
    again.load_weights(path)
    assert int(again.optimizer.iterations.numpy()) == 4
    for u, v in zip(_weights(trained), _weights(again)):
        np.testing.assert_array_equal(u, v)
    one = CodistillModel(_members(1), exchange=StaleWeightsExchange(every=2, group=0, num_groups=2))
    one.compile(optimizer="sgd")
    one.save(str(tmp_path / "one.keras"))  # counts bad steps for 2 groups
    assert keras.models.load_model(str(tmp_path / "one.keras")).num_groups == 1


def test_get_config_from_config_and_clone_model():
    model = _saved_model_setup()
    config = model.get_config()
    json.dumps(config)  # plain JSON
    rebuilt = CodistillModel.from_config(config)
    again = rebuilt.get_config()
    assert {k: v for k, v in again.items() if k != "members"} == {
        k: v for k, v in config.items() if k != "members"
    }
    assert [m.count_params() for m in rebuilt.members] == [m.count_params() for m in model.members]
    clone = keras.models.clone_model(model)
    assert isinstance(clone, CodistillModel) and clone.num_local_members == 2
    assert isinstance(clone.distance, KLDivergence) and clone.distance.temperature == 2.0


def test_export_serves_the_ensemble(tmp_path):
    model = CodistillModel(_members(2), data_mode="shared")
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    x, y = _batch(2, size=32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    got = served.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    ensemble = np.log(np.mean([tf.nn.softmax(m(x)).numpy() for m in model.members], axis=0))
    np.testing.assert_allclose(got, ensemble, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ callbacks
def _independent_data(steps, size=16):
    xs, ys = zip(*[_batch(100 + s, size) for s in range(2 * steps)])
    x = (np.concatenate(xs[0::2]), np.concatenate(xs[1::2]))
    y = (np.concatenate(ys[0::2]), np.concatenate(ys[1::2]))
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(size)


def _stale_model(every, members=None):
    exchange = StaleWeightsExchange(every=every)
    model = CodistillModel(members or _members(2), alpha=0.7, exchange=exchange)
    model.compile(optimizer=keras.optimizers.SGD(0.3))
    return model


def test_fit_does_not_double_callbacks_the_user_passed():
    plain, passed = _stale_model(2), _stale_model(2)
    plain.fit(_independent_data(6), epochs=1, verbose=0)
    hooks = passed.training_hooks()
    assert [type(h) for h in hooks] == [callbacks.StaleWeightsRefresh, callbacks.PeerHealthCheck]
    passed.fit(_independent_data(6), epochs=1, verbose=0, callbacks=hooks)
    # start + refreshes at steps 2 and 4 (+ cheap polls): the same count either way.
    assert passed.exchange.refreshes == plain.exchange.refreshes
    assert callbacks.training_callbacks(passed, hooks) == []
    assert [type(c) for c in callbacks.training_callbacks(passed, [callbacks.PeerHealthCheck()])] == [
        callbacks.StaleWeightsRefresh
    ]


def test_train_on_batch_refreshes_stale_copies_like_fit():
    """every=1 stale copies equal the local exchange; through train_on_batch
    too, with the distillation term on from the first step."""
    a = _members(2)
    b = [build_model("mlp", INPUT, CLASSES) for _ in a]
    for m, n in zip(a, b):
        n.set_weights(m.get_weights())
    local = CodistillModel(a, alpha=0.7)
    local.compile(optimizer=keras.optimizers.SGD(0.3))
    stale = _stale_model(1, b)
    for x, y in _independent_data(4):
        want = local.train_on_batch(x, y, return_dict=True)
        got = stale.train_on_batch(x, y, return_dict=True)
        assert got["peer_scale"] == 1.0
        assert got["distill_loss"] == pytest.approx(want["distill_loss"], abs=1e-6)
    for u, v in zip(_weights(local), _weights(stale)):
        np.testing.assert_allclose(u, v, atol=1e-6)
    stale.finish_batch_training()
    stale.finish_batch_training()  # a second call does nothing


def test_train_on_batch_stops_on_a_failing_peer():
    model = CodistillModel(_members(2), data_mode="shared", max_bad_peer_steps=2)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    bias = model.members[1].layers[-1].bias
    bias.assign(np.full(bias.shape, np.nan, "float32"))
    x, y = _batch(0)
    model.train_on_batch(x, y)
    with pytest.raises(callbacks.PeerFailureError, match="group 1 sent NaN or Inf predictions in 2 steps"):
        model.train_on_batch(x, y)


# ------------------------------------------------------------------ distances
def _dense_members(n):
    """Linear members (no hidden layer): logits are exactly x @ W + b."""
    out = []
    for i in range(n):
        inputs = keras.Input(INPUT)
        outputs = keras.layers.Dense(CLASSES, kernel_initializer=keras.initializers.RandomNormal(seed=i))(
            inputs
        )
        out.append(keras.Model(inputs, outputs))
    return out


def _keras_kl_of_clipped(teacher, student, temperature):
    """What keras.distillation.LogitsDistillation(temperature) computes with
    its default loss="kl_divergence" (a function, not a KLDivergence object):
    the KL formula on the tempered logits clipped to [1e-7, 1], no T^2."""
    t = np.clip(teacher / temperature, 1e-7, 1.0)
    s = np.clip(student / temperature, 1e-7, 1.0)
    return (t * np.log(t / s)).sum(-1)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl_of_softmax(teacher, student, temperature):
    p, q = _softmax(teacher / temperature), _softmax(student / temperature)
    return (p * np.log(p / q)).sum(-1) * temperature**2


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", ["default_loss", "kl_object"])
def test_keras_logits_distillation_is_d_with_the_peers_mean_as_teacher(kind, weighted):
    temperature = 2.0
    if kind == "default_loss":
        with pytest.warns(UserWarning, match="as if they were probabilities"):
            model = CodistillModel(
                _dense_members(3),
                distance=keras.distillation.LogitsDistillation(temperature=temperature),
                data_mode="shared",
            )
        hand = _keras_kl_of_clipped
    else:
        distance = keras.distillation.LogitsDistillation(
            temperature=temperature, loss=keras.losses.KLDivergence()
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = CodistillModel(_dense_members(3), distance=distance, data_mode="shared")
        hand = _kl_of_softmax
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    x, y = _batch(3, size=8)
    if kind == "default_loss":
        x = x * 0.3  # logits in (0, 1) for part of the batch: the clipping path matters
    weights = np.linspace(0.0, 2.0, 8).astype("float32") if weighted else None
    logits = [m(x).numpy() for m in model.members]
    want = []
    for i in range(3):
        teacher = np.mean([logits[j] for j in range(3) if j != i], axis=0)
        per_example = hand(teacher, logits[i], temperature)
        if weighted:
            want.append((per_example * weights).sum() / len(x))
        else:
            want.append(per_example.mean())
    logs = model.train_on_batch(x, y, sample_weight=weights, return_dict=True)
    assert logs["distill_loss"] == pytest.approx(np.mean(want), rel=1e-4)


def test_keras_distance_survives_saving(tmp_path):
    distance = keras.distillation.LogitsDistillation(temperature=3.0, loss=keras.losses.KLDivergence())
    model = CodistillModel(_members(2), distance=distance, data_mode="shared")
    model.compile(optimizer="sgd")
    model.save(str(tmp_path / "d.keras"))
    loaded = keras.models.load_model(str(tmp_path / "d.keras"))
    assert isinstance(loaded.distance.loss, keras.distillation.LogitsDistillation)
    assert loaded.distance.loss.temperature == 3.0
    assert isinstance(loaded.distance.loss.loss, keras.losses.KLDivergence)


# -------------------------------------------------------------- loss safety
def test_a_python_function_is_a_task_loss():
    def my_loss(y_true, logits):
        return keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)

    x, y = _batch(4)
    a = CodistillModel(_members(1))
    b = CodistillModel(_members(1))
    a.compile(optimizer=keras.optimizers.SGD(0.1), loss=my_loss)
    b.compile(optimizer=keras.optimizers.SGD(0.1))
    la = a.train_on_batch(x, y, return_dict=True)
    lb = b.train_on_batch(x, y, return_dict=True)
    assert la["task_loss"] == pytest.approx(lb["task_loss"], rel=1e-6)
    assert la["task_loss"] == pytest.approx(np.log(CLASSES), rel=0.3)  # about ln(classes) at init


@pytest.mark.parametrize(
    "loss,message",
    [
        (keras.losses.SparseCategoricalCrossentropy(), r"SparseCategoricalCrossentropy\(from_logits=False\)"),
        (keras.losses.CategoricalCrossentropy(), r"CategoricalCrossentropy\(from_logits=True\)"),
        (keras.losses.sparse_categorical_crossentropy, "expects probabilities"),
        ("binary_crossentropy", r"BinaryCrossentropy\(from_logits=True\)"),
    ],
)
def test_a_loss_on_probabilities_is_refused_at_compile(loss, message):
    model = CodistillModel(_members(2))
    with pytest.raises(ValueError, match=message):
        model.compile(optimizer="sgd", loss=loss)


def test_keras_losses_on_logits_are_accepted():
    model = CodistillModel(_members(1))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")  # taken on logits
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalHinge())  # no from_logits: any output


def test_members_ending_in_a_softmax_are_refused_at_compile():
    inputs = keras.Input(INPUT)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(inputs)
    probs = keras.Model(inputs, outputs, name="probs")
    model = CodistillModel([build_model("mlp", INPUT, CLASSES), probs])
    with pytest.raises(ValueError, match=r"member 1 \(probs\) ends in a softmax"):
        model.compile(optimizer="sgd")
    seq = keras.Sequential([keras.Input(INPUT), keras.layers.Dense(CLASSES), keras.layers.Softmax()])
    with pytest.raises(ValueError, match="member 0 .* ends in a softmax"):
        CodistillModel([seq]).compile(optimizer="sgd")


# ------------------------------------------------------------------- defaults
def test_defaults_are_kl_and_split_data():
    model = CodistillModel(_members(2))
    assert model.data_mode == "independent"  # nested per-member batches, or a plain batch split
    assert model.get_config()["data_mode"] == "auto"
    assert isinstance(model.distance, KLDivergence) and model.distance.temperature == 1.0
    assert CodistillModel(_members(1)).data_mode == "shared"
    model.compile(optimizer="sgd")
    x, y = _batch(0)
    logs = model.train_on_batch(x, y, return_dict=True)  # each member trains on half the batch
    assert np.isfinite(logs["loss"])


# ------------------------------------------------------------ mixed precision
@pytest.fixture
def policy():
    before = keras.mixed_precision.global_policy()
    yield keras.mixed_precision.set_dtype_policy
    keras.mixed_precision.set_dtype_policy(before)


def _one_step(policy_name, set_policy, init, alpha=1.0, weight_decay=1e-3):
    set_policy(policy_name)
    members = _members(2)
    for m, w in zip(members, init):
        m.set_weights(w)
    model = CodistillModel(members, alpha=alpha, data_mode="shared", weight_decay=weight_decay)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    x, y = _batch(5, size=64)
    logs = model.train_on_batch(x, y, return_dict=True)
    set_policy("float32")
    return model, logs


# Measured on CPU (TF 2.21): one SGD step under mixed_bfloat16 moves each
# weight matrix within 8.0% (L2 norm of the difference over the norm of the
# float32 update) of the float32 step; a plain keras.Model with the same loss
# differs by 8.4%, since bfloat16 keeps 8 bits of mantissa in the forward and
# backward passes. The losses agree within 2%.
BF16_UPDATE_TOLERANCE = 0.10


def test_mixed_bfloat16_step_matches_float32(policy):
    init = [m.get_weights() for m in _members(2)]
    ref, ref_logs = _one_step("float32", policy, init)
    half, half_logs = _one_step("mixed_bfloat16", policy, init)
    assert half.members[0].layers[-1].compute_dtype == "bfloat16"
    assert half.members[0].layers[-1].variable_dtype == "float32"
    for key in ("task_loss", "distill_loss", "loss"):
        assert half_logs[key] == pytest.approx(ref_logs[key], rel=0.02), key
    for w0, a, b in zip([w for ws in init for w in ws], _weights(ref), _weights(half)):
        error = np.linalg.norm((b - w0) - (a - w0)) / np.linalg.norm(a - w0)
        assert error < BF16_UPDATE_TOLERANCE, error


def test_mixed_bfloat16_alpha_zero_is_the_plain_keras_step(policy):
    """The codistillation step adds no precision loss of its own: with alpha=0
    it equals keras.Model.train_on_batch under the same policy."""
    init = [m.get_weights() for m in _members(2)]
    half, _ = _one_step("mixed_bfloat16", policy, init, alpha=0.0, weight_decay=0.0)
    policy("mixed_bfloat16")
    plain = build_model("mlp", INPUT, CLASSES)
    plain.set_weights(init[0])
    plain.compile(
        optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    plain.train_on_batch(*_batch(5, size=64))
    policy("float32")
    for a, b in zip(_weights(plain), _weights(half.members[0])):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_mixed_float16_scales_the_loss(policy):
    init = [m.get_weights() for m in _members(2)]
    ref, ref_logs = _one_step("float32", policy, init)
    half, half_logs = _one_step("mixed_float16", policy, init)
    assert isinstance(half.optimizer, keras.optimizers.LossScaleOptimizer)
    assert half_logs["task_loss"] == pytest.approx(ref_logs["task_loss"], rel=0.01)
    for a, b in zip(_weights(ref), _weights(half)):
        assert np.all(np.isfinite(b))
        np.testing.assert_allclose(b, a, atol=5e-3)


def test_mixed_bfloat16_learns(policy):
    policy("mixed_bfloat16")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, *INPUT)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(INPUT[0], CLASSES)), axis=-1)
    model = CodistillModel(_members(2), alpha=1.0, data_mode="shared")
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])
    model.fit(x[:1536], y[:1536], batch_size=32, epochs=6, verbose=0)  # 288 steps
    result = model.evaluate(x[1536:], y[1536:], verbose=0, return_dict=True)
    policy("float32")
    assert result["accuracy"] > 0.85, result


def test_schedules_round_trip_through_keras_serialisation():
    from tf_codistill import PiecewiseConstant, WarmupPiecewiseDecay

    for schedule in [
        AlphaSchedule(0.5, burn_in_steps=3, ramp_steps=4),
        PiecewiseConstant([2, 5], [1.0, 0.5, 0.1]),
        WarmupPiecewiseDecay(0.4, [10, 20], warmup_steps=5),
        WarmupCosineDecay(0.2, total_steps=30, warmup_steps=3),
    ]:
        again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
        assert type(again) is type(schedule) and again.get_config() == schedule.get_config()
        for step in (0, 4, 12, 25):
            assert float(again(step)) == float(schedule(step))
