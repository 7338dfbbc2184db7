import numpy as np
import pytest

from tf_codistill import losses


def _softmax(z, t):
    z = z / t
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 5)).astype("float32") * 3, rng.normal(size=(6, 5)).astype("float32") * 3


def test_mse_matches_numpy(logits):
    teacher, student = logits
    got = np.asarray(losses.LogitMSE().per_example(teacher, student))
    np.testing.assert_allclose(got, ((student - teacher) ** 2).mean(-1), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_numpy(logits, temperature):
    teacher, student = logits
    p, q = _softmax(teacher, temperature), _softmax(student, temperature)
    want_kl = (p * (np.log(p) - np.log(q))).sum(-1) * temperature**2
    want_rkl = (q * (np.log(q) - np.log(p))).sum(-1) * temperature**2
    got_kl = np.asarray(losses.KLDivergence(temperature).per_example(teacher, student))
    got_rkl = np.asarray(losses.ReverseKLDivergence(temperature).per_example(teacher, student))
    np.testing.assert_allclose(got_kl, want_kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_rkl, want_rkl, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(losses.DISTANCES))
def test_zero_when_alike_and_positive_otherwise(logits, name):
    teacher, student = logits
    d = losses.get_distance(name, 2.0)
    np.testing.assert_allclose(np.asarray(d.per_example(teacher, teacher)), 0.0, atol=1e-6)
    assert np.all(np.asarray(d.per_example(teacher, student)) > 0)


def test_compute_loss_is_the_keras_distillation_interface(logits):
    import keras

    teacher, student = logits
    d = losses.get_distance("kl", 3.0)
    assert isinstance(d, keras.distillation.DistillationLoss)
    np.testing.assert_allclose(
        float(d.compute_loss(teacher, student)), np.asarray(d.per_example(teacher, student)).mean(), rtol=1e-5
    )


def test_kl_agrees_with_keras_logits_distillation(logits):
    """Our forward KL is keras.distillation.LogitsDistillation's KL (teacher first)."""
    import keras

    teacher, student = logits
    ours = float(losses.KLDivergence(2.0).compute_loss(teacher, student))
    reference = keras.distillation.LogitsDistillation(temperature=2.0, loss=keras.losses.KLDivergence())
    theirs = float(reference.compute_loss(teacher, student))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.get_distance("kl", temperature)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.get_distance("mse", temperature)


def test_unknown_distance():
    with pytest.raises(ValueError, match="Unknown distance 'l1'"):
        losses.get_distance("l1")


def test_validate_outputs_names_shapes():
    d = losses.LogitMSE()
    with pytest.raises(ValueError, match=r"teacher \(4, 10\) and student \(4, 3\)"):
        d.validate_outputs(np.zeros((4, 10)), np.zeros((4, 3)))


def test_any_keras_distillation_loss_is_a_distance(logits):
    import keras

    teacher, student = logits
    keras_loss = keras.distillation.LogitsDistillation(temperature=2.0, loss=keras.losses.KLDivergence())
    d = losses.get_distance(keras_loss)
    assert isinstance(d, losses.KerasDistillationDistance) and d.loss is keras_loss
    per_example = np.asarray(d.per_example(teacher, student))
    assert per_example.shape == (6,)
    np.testing.assert_allclose(
        per_example.mean(), float(keras_loss.compute_loss(teacher, student)), rtol=1e-5
    )
    # The same values as our forward KL at that temperature.
    np.testing.assert_allclose(
        per_example, np.asarray(losses.KLDivergence(2.0).per_example(teacher, student)), rtol=1e-4
    )


def test_distances_round_trip_through_keras_serialisation():
    import keras

    for d in [losses.KLDivergence(3.0), losses.LogitMSE(), losses.ReverseKLDivergence(0.5)]:
        again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(d))
        assert type(again) is type(d) and again.get_config() == d.get_config()
