"""mnist1d_fresh: the package's transform, a stream that never repeats, fixed
validation and test splits apart from it, and the normalised CNN on it."""

import numpy as np
import pytest

from tf_codistill import config, data, fresh_data


@pytest.fixture(scope="module")
def spec():
    return data.load_spec("mnist1d_fresh")


def _rows(x) -> set[bytes]:
    return {row.tobytes() for row in np.asarray(x)}


def test_transform_is_the_packages_sample_for_sample():
    from mnist1d.data import get_dataset_args, get_templates
    from mnist1d.transform import transform

    args, templates = get_dataset_args(), get_templates()
    for seed in range(20):
        label = seed % 10
        np.random.seed(seed)
        expected, _ = transform(templates["x"][label], templates["t"], args)
        np.random.seed(seed)  # the same random numbers, drawn in the package's order
        values = {
            "label": np.array([label]),
            "pad": np.array([np.random.rand()]),
            "scale": np.array([np.random.rand()]),
            "shift": np.array([np.random.choice(args.max_translation)]),
            "corr": np.random.randn(1, 72),
            "iid": np.random.randn(1, 72),
            "shear": np.array([np.random.rand()]),
        }
        np.testing.assert_allclose(fresh_data.transform_batch(values)[0], expected, rtol=0, atol=1e-12)


def test_the_stream_never_repeats_an_example_and_is_a_function_of_seed_and_batch(spec):
    batches = list(data.train_batches(spec, 64, seed=3).take(40))
    xs = np.concatenate([b[0].numpy() for b in batches])
    assert xs.shape == (40 * 64, 40) and len(_rows(xs)) == len(xs)  # 2,560 examples, none twice
    again = next(iter(data.train_batches(spec, 64, seed=3)))
    np.testing.assert_array_equal(again[0], batches[0][0])
    np.testing.assert_array_equal(again[1], batches[0][1])
    resumed = next(iter(data.train_batches(spec, 64, seed=3, skip_batches=7)))
    np.testing.assert_array_equal(resumed[0], batches[7][0])
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert set(labels) == set(range(10)) and labels.dtype == np.int64


def test_every_group_reads_its_own_stream(spec):
    (xs, _) = next(iter(data.independent_batches(spec, 32, 3, seed=0)))
    assert not (_rows(xs[0]) & _rows(xs[1])) and not (_rows(xs[1]) & _rows(xs[2]))
    other_seed = next(iter(data.train_batches(spec, 32, seed=1)))[0]
    assert not (_rows(xs[0]) & _rows(other_seed))


def test_validation_and_test_are_fixed_and_apart_from_training(spec):
    assert (spec.num_validation, spec.num_test, spec.validation_split, spec.test_split) == (
        5000,
        5000,
        "validation",
        "test",
    )
    val = np.concatenate([b[0].numpy() for b in data.eval_batches(spec, 1000, split="validation")])
    test = np.concatenate([b[0].numpy() for b in data.eval_batches(spec, 1000)])
    assert val.shape == test.shape == (5000, 40)
    fresh_data.split.cache_clear()  # drawn again from nothing: the same examples
    np.testing.assert_array_equal(fresh_data.split("validation")[0], val)
    assert not (_rows(val) & _rows(test))
    for seed in (0, 1):
        train = np.concatenate([b[0].numpy() for b in data.train_batches(spec, 256, seed=seed).take(4)])
        assert not (_rows(train) & (_rows(val) | _rows(test)))
    assert abs(float(val.mean())) < 1e-4 and abs(float(val.std()) - 1) < 1e-4  # standardised on validation


def test_a_stream_needs_a_length_and_an_evaluation_cadence():
    cfg = config.TrainConfig(dataset="mnist1d_fresh", model="cnn1d_norm", steps=100)
    with pytest.raises(ValueError, match="--steps_per_epoch"):
        cfg.validate()
    config.TrainConfig(dataset="mnist1d_fresh", model="cnn1d_norm", steps=100, steps_per_epoch=25).validate()
    with pytest.raises(ValueError, match="no training set to take a fraction of"):
        data.load_spec("mnist1d_fresh", train_fraction=0.5)


def test_the_normalised_cnn_trains_a_few_steps(spec):
    import keras

    from models import build_model

    model = build_model("cnn1d_norm", spec.input_shape, spec.num_classes, seed=0)
    assert any(isinstance(layer, keras.layers.GroupNormalization) for layer in model.layers)
    model.compile(
        optimizer=keras.optimizers.SGD(0.2, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x_val, y_val = fresh_data.split("validation")
    before = model.evaluate(x_val[:1000], y_val[:1000], verbose=0, return_dict=True)
    model.fit(data.train_batches(spec, 256, seed=0), steps_per_epoch=60, epochs=1, verbose=0)
    after = model.evaluate(x_val[:1000], y_val[:1000], verbose=0, return_dict=True)
    assert np.isfinite(after["loss"]) and after["loss"] < before["loss"]
    assert after["accuracy"] > 0.3  # chance is 0.1
