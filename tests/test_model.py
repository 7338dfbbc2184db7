"""Invariants of CodistillModel on one process (local exchange)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import build_model
from tf_codistill import AlphaSchedule, CodistillModel, get_distance, paper_weight_decay

INPUT = (12,)
CLASSES = 5


def _members(n, seed=0):
    return [build_model("mlp", INPUT, CLASSES, seed=seed + i) for i in range(n)]


def _clone(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _batch(seed, size=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(size, *INPUT)).astype("float32"), rng.integers(0, CLASSES, size=size)


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


@pytest.mark.parametrize("data_mode", ["shared", "independent"])
@pytest.mark.parametrize("distance", ["mse", "kl", "reverse_kl"])
def test_update_is_own_loss_gradient_only(data_mode, distance):
    """One SGD step equals a hand computation where each member differentiates
    task + alpha * D(own, stop_gradient(peer)) with respect to its own weights
    only: gradients never reach the peer, and teacher/student are not swapped."""
    lr, alpha = 0.5, 0.7
    members = _members(2)
    refs = [_clone(m) for m in members]
    model = CodistillModel(members, alpha=alpha, distance=distance, temperature=2.0, data_mode=data_mode)
    model.compile(optimizer=keras.optimizers.SGD(lr))
    (x0, y0), (x1, y1) = _batch(1), _batch(2)
    if data_mode == "shared":
        xs, ys = [x0, x0], [y0, y0]
        model.train_on_batch(x0, y0)
    else:
        xs, ys = [x0, x1], [y0, y1]
        model.train_on_batch((x0, x1), (y0, y1))

    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dist = get_distance(distance, 2.0)
    for i, ref in enumerate(refs):
        peer = refs[1 - i]
        with tf.GradientTape() as tape:
            own = ref(xs[i], training=True)
            teacher = peer(xs[i], training=data_mode == "shared")
            loss = ce(ys[i], own) + alpha * dist.compute_loss(tf.stop_gradient(teacher), own)
        grads = tape.gradient(loss, ref.trainable_variables)
        want = [v.numpy() - lr * g.numpy() for v, g in zip(ref.trainable_variables, grads)]
        for got, exp in zip(_weights(members[i]), want):
            np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_exactly_the_sync_update():
    members = _members(2)
    sync_member = _clone(members[0])
    codistill = CodistillModel(members, alpha=0.0, distance="kl", data_mode="shared")
    sync = CodistillModel([sync_member])
    for m in (codistill, sync):
        m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])
    for step in range(5):
        x, y = _batch(step)
        codistill.train_on_batch(x, y)
        sync.train_on_batch(x, y)
    for a, b in zip(_weights(members[0]), _weights(sync_member)):
        np.testing.assert_array_equal(a, b)


def test_distillation_term_is_zero_when_members_agree():
    members = _members(2)
    members[1].set_weights(members[0].get_weights())
    model = CodistillModel(members, alpha=5.0, distance="kl", data_mode="shared")
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    x, y = _batch(0)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["distill_loss"] == pytest.approx(0.0, abs=1e-7)
    assert logs["agreement"] == pytest.approx(1.0)
    # Identical members given identical batches stay identical.
    for a, b in zip(_weights(members[0]), _weights(members[1])):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_members_stay_different_while_they_move_closer():
    members = _members(2)
    model = CodistillModel(members, alpha=1.0, distance="mse", data_mode="shared")
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    x, y = _batch(0, size=64)
    first = model.train_on_batch(x, y, return_dict=True)["distill_loss"]
    for _ in range(30):
        last = model.train_on_batch(x, y, return_dict=True)["distill_loss"]
    assert last < first
    diffs = [np.abs(a - b).max() for a, b in zip(_weights(members[0]), _weights(members[1]))]
    assert min(diffs) > 1e-3


def test_fit_evaluate_predict_and_export(tmp_path):
    members = _members(2)
    model = CodistillModel(
        members, alpha=AlphaSchedule(1.0, burn_in_steps=2), distance="kl", data_mode="shared"
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"])
    x, y = _batch(0, size=64)
    seen = []
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        verbose=0,
        validation_data=_batch(9, size=32),
        callbacks=[
            keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
            keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(logs["alpha"])),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=10),
        ],
    ).history
    for key in ("loss", "task_loss", "distill_loss", "agreement", "accuracy", "g0_accuracy", "g1_task_loss"):
        assert key in history, key
    for key in ("val_ensemble_accuracy", "val_g0_accuracy", "val_g1_loss", "val_agreement"):
        assert key in history, key
    assert seen == [1.0, 1.0, 1.0]
    assert (tmp_path / "log.csv").exists()

    result = model.evaluate(x, y, verbose=0, return_dict=True)
    assert {"loss", "accuracy", "g0_loss", "g1_loss", "g0_accuracy", "ensemble_accuracy"} <= set(result)
    assert "distill_loss" not in result
    assert model.predict(x, verbose=0).shape == (64, CLASSES)

    path = str(tmp_path / "member1.keras")
    model.export_member(1, path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(restored.predict(x, verbose=0), members[1].predict(x, verbose=0), rtol=1e-6)


def test_alpha_burn_in_logged_per_step():
    model = CodistillModel(_members(2), alpha=AlphaSchedule(0.5, burn_in_steps=2), data_mode="shared")
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    x, y = _batch(0)
    alphas = [float(model.train_on_batch(x, y, return_dict=True)["alpha"]) for _ in range(3)]
    assert alphas == [0.0, 0.0, 0.5]


def test_weight_decay_is_coupled_l2_on_kernels_and_follows_schedule():
    lr, wd = 0.1, 0.01
    x, y = _batch(0)
    plain, decayed = _members(1), [_clone(m) for m in _members(1)]
    a = CodistillModel(plain)
    b = CodistillModel(decayed, weight_decay=paper_weight_decay([1, 2], (wd, wd / 10, 0.0)))
    for m in (a, b):
        m.compile(optimizer=keras.optimizers.SGD(lr))
    for coeff in [wd, wd / 10, 0.0]:
        before = _weights(decayed[0])
        a.train_on_batch(x, y)
        b.train_on_batch(x, y)
        for v0, va, vb in zip(before, _weights(plain[0]), _weights(decayed[0])):
            expected_extra = -lr * coeff * v0 if v0.ndim >= 2 else 0.0
            np.testing.assert_allclose(vb - va, expected_extra, atol=2e-6)
        decayed[0].set_weights(plain[0].get_weights())


# ------------------------------------------------------------------ bad input
def test_members_with_different_output_shapes():
    a = build_model("mlp", INPUT, 5)
    b = build_model("mlp", INPUT, 7)
    with pytest.raises(ValueError, match=r"same shape.*member 0: \(5,\), member 1: \(7,\)"):
        CodistillModel([a, b])


def test_no_members_or_bad_group_count():
    with pytest.raises(ValueError, match="at least one member"):
        CodistillModel([])
    with pytest.raises(ValueError, match="num_groups must be an integer >= 1"):
        CodistillModel(lambda i: build_model("mlp", INPUT, CLASSES), num_groups=0)
    m = build_model("mlp", INPUT, CLASSES)
    with pytest.raises(ValueError, match="passed twice"):
        CodistillModel([m, m])


def test_negative_alpha_and_bad_temperature():
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        CodistillModel(_members(2), alpha=-1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        CodistillModel(_members(2), distance="kl", temperature=0.0)
    with pytest.raises(ValueError, match="data_mode must be one of"):
        CodistillModel(_members(2), data_mode="random")


def test_labels_out_of_range_fail_with_clear_message():
    model = CodistillModel(_members(2), num_classes=CLASSES, data_mode="shared")
    model.compile(optimizer="sgd")
    x, _ = _batch(0)
    y = np.full((16,), CLASSES + 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels out of range.*\[0, 5\)"):
        model.train_on_batch(x, y)


def test_independent_mode_needs_one_batch_per_member():
    model = CodistillModel(_members(2), data_mode="independent")
    model.compile(optimizer="sgd")
    x, y = _batch(0)
    with pytest.raises(ValueError, match="independent_batches"):
        model.train_on_batch(x, y)


# ------------------------------------------------------- 1 vs 2 replicas
REPLICA_SCRIPT = r"""
import sys
import numpy as np, tensorflow as tf, keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from models import build_model
from tf_codistill import CodistillModel

rng = np.random.default_rng(0)
x = rng.normal(size=(16, 12)).astype("float32"); y = rng.integers(0, 5, size=16)

def one_step(strategy):
    with strategy.scope():
        members = [build_model("mlp", (12,), 5, seed=s) for s in (0, 1)]
        model = CodistillModel(members, alpha=0.8, distance="kl", weight_decay=1e-3, data_mode="shared")
        model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    logs = model.fit(ds, epochs=2, verbose=0).history
    return [v.numpy() for v in model.trainable_variables], logs

w1, l1 = one_step(tf.distribute.get_strategy())
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
w2, l2 = one_step(strategy)
worst = max(float(np.abs(a - b).max()) for a, b in zip(w1, w2))
print("max weight difference", worst)
for key in ("loss", "task_loss", "distill_loss"):
    np.testing.assert_allclose(l1[key], l2[key], rtol=1e-4, err_msg=key)
assert worst < 1e-5, worst
print("OK")
"""


def test_one_and_two_replicas_give_the_same_update():
    import subprocess
    import sys

    from conftest import REPO, python_env

    proc = subprocess.run(
        [sys.executable, "-c", REPLICA_SCRIPT],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_nan_from_a_peer_is_skipped_counted_and_stops_the_run():
    from tf_codistill.model import PeerFailureError

    members = _members(2)
    model = CodistillModel(members, alpha=1.0, distance="kl", max_bad_peer_steps=3, data_mode="shared")
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    x, y = _batch(0)
    model.train_on_batch(x, y)
    bias = members[1].layers[-1].bias
    bias.assign(np.full(bias.shape, np.nan, "float32"))  # group 1 now emits NaN logits
    before = _weights(members[0])
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["bad_peer_steps"] == 1.0
    # Group 0 took a plain task-loss step: finite, and exactly the sync update.
    reference = CodistillModel([_clone(members[0])])
    reference.members[0].set_weights([w for w in before])
    reference.compile(optimizer=keras.optimizers.SGD(0.1))
    reference.train_on_batch(x, y)
    for got, want in zip(_weights(members[0]), _weights(reference)):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(model.bad_peer_steps.numpy(), [0.0, 1.0])
    with pytest.raises(PeerFailureError, match=r"group 1 sent NaN or Inf predictions in 3 steps"):
        model.fit(x, y, batch_size=16, epochs=5, verbose=0)
