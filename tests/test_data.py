import numpy as np
import pytest
import tensorflow_datasets as tfds

from tf_codistill import data


def test_mnist1d_builds_offline_with_the_standard_split(mnist1d_spec):
    spec = mnist1d_spec
    assert (spec.num_train, spec.num_test, spec.num_classes, spec.input_shape) == (4000, 1000, 10, (40,))


def test_digits_builds_offline(data_dir):
    spec = data.load_spec("digits", data_dir)
    assert (spec.num_train, spec.num_test, spec.input_shape) == (1437, 360, (8, 8, 1))
    x, y = next(iter(data.eval_batches(spec, 360, data_dir)))
    assert x.shape == (360, 8, 8, 1) and 0.0 <= float(np.min(x)) and float(np.max(x)) <= 1.0
    assert set(np.unique(y.numpy())) <= set(range(10))


def test_mnist1d_size_is_configurable(data_dir):
    spec = data.load_spec("mnist1d/n1000", data_dir)
    assert (spec.num_train, spec.num_test) == (800, 200)
    # a size that is also a predefined config resolves to it
    assert data._builder("mnist1d/n70000", data_dir).builder_config.name == "n70000"


def test_train_fraction_uses_the_first_part(data_dir, mnist1d_spec):
    spec = data.load_spec("mnist1d", data_dir, train_fraction=0.125)
    assert spec.num_train == 500 and spec.train_split == "train[:500]"
    with pytest.raises(ValueError, match="train_fraction must be in"):
        data.load_spec("mnist1d", data_dir, train_fraction=0.0)


def test_validation_fraction_holds_out_the_end_of_the_training_split(data_dir):
    spec = data.load_spec("mnist1d", data_dir, validation_fraction=0.1)
    assert (spec.num_train, spec.num_validation, spec.num_test) == (3600, 400, 1000)
    assert (spec.train_split, spec.validation_split) == ("train[:3600]", "train[3600:]")
    (xv, yv), *_ = list(data.eval_batches(spec, 400, data_dir, split=spec.validation_split))
    every = np.stack([x.numpy() for x, _ in data._split(spec, "train", data_dir, None)])
    np.testing.assert_array_equal(xv.numpy(), every[3600:])  # the last 400, in order
    train = np.stack([x.numpy() for x, _ in data._split(spec, spec.train_split, data_dir, None)])
    assert len(train) == 3600 and not ({r.tobytes() for r in train} & {r.tobytes() for r in xv.numpy()})
    # train_fraction takes its first part of what is left
    assert data.load_spec("mnist1d", data_dir, 0.5, validation_fraction=0.1).train_split == "train[:1800]"
    with pytest.raises(ValueError, match="has its own validation split"):
        data.load_spec("mnist1d_fresh", data_dir, validation_fraction=0.1)
    with pytest.raises(ValueError, match="validation_fraction must be in"):
        data.load_spec("mnist1d", data_dir, validation_fraction=1.0)


def test_train_batches_are_seeded(mnist1d_spec, data_dir):
    a = next(iter(data.train_batches(mnist1d_spec, 32, seed=3, data_dir=data_dir)))
    b = next(iter(data.train_batches(mnist1d_spec, 32, seed=3, data_dir=data_dir)))
    c = next(iter(data.train_batches(mnist1d_spec, 32, seed=4, data_dir=data_dir)))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (32, 40) and a[1].dtype.name == "int64"


def test_independent_batches_give_each_member_its_own_order(mnist1d_spec, data_dir):
    (xs, ys) = next(iter(data.independent_batches(mnist1d_spec, 16, 3, seed=0, data_dir=data_dir)))
    assert len(xs) == len(ys) == 3
    assert all(x.shape == (16, 40) for x in xs)
    assert not np.array_equal(xs[0], xs[1]) and not np.array_equal(xs[1], xs[2])


def test_unknown_dataset_is_a_clear_error(data_dir):
    with pytest.raises(ValueError, match=r"Unknown dataset 'no_such_set'.*mnist1d, digits"):
        data.load_spec("no_such_set", data_dir)


def test_labels_out_of_range_are_caught_before_training(mnist1d_spec, data_dir):
    data.check_labels(mnist1d_spec, 10, data_dir)
    with pytest.raises(ValueError, match="10 classes but the model has 5 outputs"):
        data.check_labels(mnist1d_spec, 5, data_dir)


def test_any_registered_tfds_dataset_through_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
        spec = data.load_spec("cifar10", str(tmp_path))
        assert spec.input_shape == (32, 32, 3) and spec.num_classes == 10 and spec.num_train == 48
        x, y = next(iter(data.train_batches(spec, 8, 0, str(tmp_path))))
        assert x.shape == (8, 32, 32, 3) and x.dtype.name == "float32"
        assert float(np.max(x)) <= 1.0  # uint8 images are scaled to [0, 1]


def test_unprepared_dataset_fails_at_once_without_downloading(tmp_path, monkeypatch):
    """A TFDS dataset that is not in data_dir: one ValueError naming --data_dir and `tfds
    build`, before any download (offline, TFDS would retry for minutes)."""

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for name in ("download", "download_and_extract", "download_and_prepare"):
        monkeypatch.setattr(tfds.download.DownloadManager, name, no_download, raising=False)
    with pytest.raises(ValueError, match=r"not prepared in --data_dir=.*`tfds build cifar10 --data_dir="):
        data.load_spec("cifar10", str(tmp_path))
