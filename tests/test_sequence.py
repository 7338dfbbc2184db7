"""Sequence outputs: members that return per-token logits [batch, time, vocab].

The task loss, every distance, the metrics and the ensemble are per position
and averaged over the valid positions; Keras masks (Embedding(mask_zero=True))
and per-position sample weights count; shape mistakes fail at the first step
with one line."""

import keras
import numpy as np
import pytest

from tf_codistill import CodistillModel

VOCAB, TIME, BATCH = 7, 6, 8


def _member(seed, vocab=VOCAB, mask_zero=True):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((TIME,), dtype="int32")
    h = keras.layers.Embedding(vocab, 8, mask_zero=mask_zero)(tokens)
    h = keras.layers.Dense(16, activation="tanh")(h)
    return keras.Model(tokens, keras.layers.Dense(vocab)(h))


def _data(seed=0, pad=True):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, size=(BATCH, TIME)).astype("int32")
    if pad:  # each row ends in 0 to 3 padding tokens
        for row, n in enumerate(rng.integers(0, 4, size=BATCH)):
            x[row, TIME - n :] = 0
    y = rng.integers(0, VOCAB, size=(BATCH, TIME))
    return x, y


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _model(distance="kl", alpha=1.0, **kwargs):
    model = CodistillModel(
        [_member(0), _member(1)], alpha=alpha, distance=distance, data_mode="shared", **kwargs
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), metrics=["accuracy"])
    return model


def test_task_loss_and_kl_are_means_over_the_valid_positions():
    x, y = _data()
    model = _model()
    logs = model.train_on_batch(x, y, return_dict=True)
    valid = x != 0
    z = [np.asarray(m(x)) for m in model.members]
    lp = [_log_softmax(zi) for zi in z]
    task = [-np.take_along_axis(lpi, y[..., None], -1)[..., 0][valid].mean() for lpi in lp]
    kl = [(np.exp(lp[1 - i]) * (lp[1 - i] - lp[i])).sum(-1)[valid].mean() for i in range(2)]
    assert logs["task_loss"] == pytest.approx(np.mean(task), rel=1e-4)  # logs average the members
    assert logs["distill_loss"] == pytest.approx(np.mean(kl), rel=1e-4)
    agree = np.mean([(z[0].argmax(-1) == z[1].argmax(-1))[valid].mean()])
    assert logs["agreement"] == pytest.approx(agree, rel=1e-5)


def test_labels_at_masked_positions_do_not_count():
    x, y = _data()
    other = y.copy()
    other[x == 0] = (other[x == 0] + 1) % VOCAB
    a = _model().train_on_batch(x, y, return_dict=True)
    b = _model().train_on_batch(x, other, return_dict=True)
    for key in ("task_loss", "distill_loss", "accuracy"):
        assert a[key] == pytest.approx(b[key], rel=1e-6)


def test_per_position_sample_weights_act_like_a_mask():
    """0/1 weights on the positions of an unmasked model give the masked
    model's terms, scaled by the valid fraction: like Keras's own losses,
    weighted values are averaged over every position, masked ones over the
    valid positions."""
    x, y = _data()
    masked = _model()
    unmasked = CodistillModel(
        [_member(0, mask_zero=False), _member(1, mask_zero=False)], alpha=1.0, data_mode="shared"
    )
    unmasked.compile(optimizer=keras.optimizers.SGD(0.0))
    weights = (x != 0).astype("float32")
    a = masked.train_on_batch(x, y, return_dict=True)
    b = unmasked.train_on_batch(x, y, sample_weight=weights, return_dict=True)
    valid = weights.mean()
    assert 0.5 < valid < 1
    assert b["distill_loss"] == pytest.approx(a["distill_loss"] * valid, rel=1e-5)
    assert b["task_loss"] == pytest.approx(a["task_loss"] * valid, rel=1e-5)


@pytest.mark.parametrize("distance", ["kl", "reverse_kl", "mse", "logits_distillation"])
def test_every_distance_trains_a_sequence_model(distance):
    if distance == "logits_distillation":
        distance = keras.distillation.LogitsDistillation(temperature=2.0)
    x, y = _data(pad=False)
    model = CodistillModel([_member(0), _member(1)], alpha=1.0, distance=distance, data_mode="shared")
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    first = model.train_on_batch(x, y, return_dict=True)
    for _ in range(30):
        last = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(last["loss"]) and last["task_loss"] < first["task_loss"]


def test_fit_and_evaluate_with_the_ensemble():
    x, y = _data()
    model = CodistillModel([_member(0), _member(1)], alpha=0.5)
    model.compile(optimizer="adam")
    model.fit(np.concatenate([x, x]), np.concatenate([y, y]), batch_size=BATCH, epochs=2, verbose=0)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    z = np.stack([np.asarray(m(x)) for m in model.members])
    ensemble = np.log(np.exp(_log_softmax(z)).mean(0))
    nll = -np.take_along_axis(ensemble, y[..., None], -1)[..., 0][x != 0].mean()
    assert logs["ensemble_loss"] == pytest.approx(nll, rel=1e-4)
    assert model.predict(x, verbose=0).shape == (BATCH, TIME, VOCAB)


def test_labels_that_do_not_fit_fail_with_one_line():
    x, y = _data()
    model = _model()
    with pytest.raises(ValueError, match=r"labels of shape \(8,\) do not fit logits of shape \(8, 6, 7\)"):
        model.train_on_batch(x, y[:, 0])


def test_members_with_different_vocabularies_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        CodistillModel([_member(0), _member(1, vocab=VOCAB + 1)])


def test_clip_norm_clips_each_member_on_its_own():
    """With clip_norm, each member's SGD step equals a lone Keras model's step
    with `global_clipnorm` (the norm of its own gradient, not of all members')."""
    x, y = _data(pad=False)
    model = CodistillModel([_member(0), _member(1)], alpha=0.0, data_mode="shared", clip_norm=0.01)
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    before = model.members[0].get_weights()
    model.train_on_batch(x, y)
    for i in range(2):
        alone = _member(i)
        alone.compile(
            optimizer=keras.optimizers.SGD(1.0, global_clipnorm=0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        alone.train_on_batch(x, y)
        for a, b in zip(model.members[i].get_weights(), alone.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    step = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(model.members[0].get_weights(), before)))
    assert step < 0.012  # about lr x clip_norm (the embedding's sparse rows are counted apart)
