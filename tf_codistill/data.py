"""Input pipelines through TensorFlow Datasets.

Any registered TFDS name works (`cifar10`, `imagenet2012`, ...), read from
`data_dir` (TFDS's default when `None`) once prepared there (`tfds build
<name> --data_dir=...`); an unprepared one fails at once, naming that
command. The project's own builders, `mnist1d` (also `mnist1d/n<samples>`
for other sizes) and `digits`, are generated offline on first use.

Training pipelines come in the two data modes of `CodistillModel`:
`train_batches` (every member sees the same batch) and `independent_batches`
(each member draws its own, differently shuffled, batches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import tf_codistill.datasets  # noqa: F401  (registers mnist1d and digits)
from tf_codistill import fresh_data, seeds, text_data
from tf_codistill.checks import check_int, is_int, is_number
from tf_codistill.datasets.mnist1d import Mnist1d, config_for

__all__ = [
    "DatasetSpec",
    "BUILTIN_DATASETS",
    "load_spec",
    "train_batches",
    "independent_batches",
    "eval_batches",
    "check_labels",
]

BUILTIN_DATASETS = ("mnist1d", "digits")


class _QuietUnprepared(logging.Filter):
    """Drops TFDS's warning that an unprepared dataset's folder holds no
    dataset_info.json: `_check_prepared` says what to do instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "has no dataset_info.json" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietUnprepared())


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_train: int
    num_test: int
    train_split: str
    test_split: str
    # Character-level text (tf_codistill.text_data): windows of `context`
    # characters over `vocabulary`; validation chooses, test reports.
    validation_split: str | None = None
    context: int | None = None
    vocabulary: str | None = None
    train_fraction: float = 1.0
    data_dir: str | None = None

    num_validation: int = 0

    @property
    def is_text(self) -> bool:
        return self.context is not None


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    match = re.fullmatch(r"mnist1d/n(\d+)", name)
    if name.startswith("mnist1d/") and not match and name[len("mnist1d/") :] != "default":
        raise ValueError(
            f"Unknown dataset {name!r}: MNIST-1D sizes are written mnist1d/n<samples>, "
            "e.g. mnist1d/n70000 (plain mnist1d: 5,000 samples)."
        )
    try:
        if match:
            config = config_for(int(match.group(1)))
            if config.name in {c.name for c in Mnist1d.BUILDER_CONFIGS}:
                return tfds.builder(f"mnist1d/{config.name}", data_dir=data_dir)
            return tfds.builder("mnist1d", config=config, data_dir=data_dir)
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ValueError(
            f"Unknown dataset {name!r}. Built in (offline): {', '.join(BUILTIN_DATASETS)} "
            "(and mnist1d/n<samples>); otherwise any TFDS name, e.g. cifar10, with its data "
            "in --data_dir or a network connection to prepare it."
        ) from err


@contextlib.contextmanager
def _prepare_lock(builder: tfds.core.DatasetBuilder, timeout_s: float = 600.0):
    """Serialises `download_and_prepare` across processes sharing a data_dir.

    The lock file lives in the system temp directory, keyed by the data
    directory, so that nothing but TFDS's own files is written to data_dir.
    """
    root = os.path.abspath(os.fspath(builder.data_dir_root))
    key = hashlib.sha1(f"{root}/{builder.name}".encode()).hexdigest()[:16]
    lock_dir = os.path.join(tempfile.gettempdir(), "tf_codistill-locks")
    os.makedirs(lock_dir, exist_ok=True)
    path = os.path.join(lock_dir, f"{builder.name}-{key}.lock")
    deadline = time.monotonic() + timeout_s
    with open(path, "w") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"waited {timeout_s:.0f}s for another process preparing {builder.name} "
                        f"in {root}; if none is running, remove {path}."
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# TFDS's own preparation; tfds.testing.mock_data replaces it (and prepares nothing).
_DOWNLOAD_AND_PREPARE = vars(tfds.core.DatasetBuilder)["download_and_prepare"]


def _check_prepared(name: str, builder: tfds.core.DatasetBuilder) -> None:
    """Raises ValueError at once for a dataset that would have to be
    downloaded: TFDS would retry for minutes offline, then fail with a long
    traceback. The project's own builders are generated here, offline."""
    own = type(builder).__module__.startswith("tf_codistill.datasets")
    mocked = vars(tfds.core.DatasetBuilder)["download_and_prepare"] is not _DOWNLOAD_AND_PREPARE
    if builder.is_prepared() or own or mocked:
        return
    root = os.fspath(builder.data_dir_root)
    raise ValueError(
        f"Dataset {name!r} is not prepared in --data_dir={root}: prepare it once with "
        f"`tfds build {name} --data_dir={root}` (it downloads the data; run it where there is a "
        f"network), then pass that --data_dir. Built in, offline: {', '.join(BUILTIN_DATASETS)}."
    )


def _prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    builder = _builder(name, data_dir)
    if not builder.is_prepared():
        _check_prepared(name, builder)
        with _prepare_lock(builder):
            builder = _builder(name, data_dir)
            if not builder.is_prepared():
                root = os.fspath(builder.data_dir_root)
                if os.path.isdir(root) and not os.access(root, os.W_OK | os.X_OK):
                    raise ValueError(
                        f"Dataset {name!r} is not prepared in {root}, and that directory is not "
                        "writable; prepare it there once, or pass a writable --data_dir."
                    )
                tfds.disable_progress_bar()
                try:
                    builder.download_and_prepare()
                except Exception as err:  # noqa: BLE001 - rewrap with advice
                    raise RuntimeError(
                        f"Could not prepare dataset {name!r} in {builder.data_dir_root}: {err}. "
                        "For datasets that are not built in, download them with "
                        f"`tfds build {name} --data_dir=...` on a machine with network access "
                        "and pass that --data_dir."
                    ) from err
    return builder


def load_spec(
    name: str,
    data_dir: str | None = None,
    train_fraction: float = 1.0,
    context: int = 64,
    validation_fraction: float = 0.0,
) -> DatasetSpec:
    """Prepares the dataset if needed and describes it.

    Args:
        name: TFDS name.
        data_dir: TFDS data directory.
        train_fraction: use the first `train_fraction` of the training split
            (the paper's less-data study), in (0, 1].
        context: characters per window, for the text datasets
            (`tf_codistill.text_data.TEXT_DATASETS`).
        validation_fraction: hold out the last `validation_fraction` of the
            training split as a validation split (as Keras's
            `fit(validation_split=...)` holds out the last fraction of its
            arrays), in [0, 1): choices are made on it, the test split is
            only reported. `train_fraction` then takes the first part of the
            rest. For TFDS datasets; the text and fresh datasets have their own.

    Raises:
        ValueError: unknown dataset, no supervised keys, bad fraction.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a dataset name (str), got {name!r}.")
    if not name.strip():
        raise ValueError("The dataset name is empty: give one such as mnist1d, digits or cifar10.")
    if not is_number(train_fraction):
        raise TypeError(f"train_fraction must be a number, got {train_fraction!r}.")
    if not 0.0 < train_fraction <= 1.0:  # also rejects nan
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}.")
    if not is_number(validation_fraction) or not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}.")
    if validation_fraction and (name in text_data.TEXT_DATASETS or name in fresh_data.FRESH_DATASETS):
        raise ValueError(
            f"{name} has its own validation split; validation_fraction holds one out of a TFDS "
            "dataset's training split: leave it at 0."
        )
    if data_dir is not None:
        path = os.path.expanduser(os.fspath(data_dir))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"data_dir {path} is an existing file, not a directory.")
    if name in text_data.TEXT_DATASETS:
        return text_data.load_spec(name, data_dir, train_fraction, context)
    if name in fresh_data.FRESH_DATASETS:
        return fresh_data.load_spec(name, train_fraction)
    builder = _prepared_builder(name, data_dir)
    info = builder.info
    if not info.supervised_keys:
        raise ValueError(f"Dataset {name!r} has no (input, label) supervised keys.")
    x_key, y_key = info.supervised_keys[:2]
    label = info.features[y_key]
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(f"Dataset {name!r}: label {y_key!r} is not a class label.")
    if not info.splits:
        # Split sizes unknown (e.g. under tfds.testing.mock_data): count them.
        def count(split):
            return int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))

        test_split, num_train_all, num_test = "test", count("train"), count("test")
    else:
        if "train" not in info.splits:
            raise ValueError(f"Dataset {name!r} has no train split; has {sorted(info.splits.keys())}.")
        test_split = next((s for s in ("test", "validation") if s in info.splits), None)
        if test_split is None:
            raise ValueError(
                f"Dataset {name!r} needs a test or validation split; has {sorted(info.splits.keys())}."
            )
        num_train_all = info.splits["train"].num_examples
        num_test = info.splits[test_split].num_examples
    num_validation = int(round(num_train_all * validation_fraction))
    if validation_fraction and not 1 <= num_validation < num_train_all:
        raise ValueError(
            f"validation_fraction={validation_fraction:g} of {name}'s {num_train_all} training examples "
            f"is {num_validation}: pick a fraction that leaves at least one example on each side."
        )
    rest = num_train_all - num_validation  # the validation split is the last num_validation
    num_train = max(1, int(rest * train_fraction))
    train_split = "train" if num_train == num_train_all else f"train[:{num_train}]"
    return DatasetSpec(
        name=name,
        input_shape=tuple(info.features[x_key].shape),
        num_classes=label.num_classes,
        num_train=num_train,
        num_test=num_test,
        train_split=train_split,
        test_split=test_split,
        validation_split=f"train[{rest}:]" if num_validation else None,
        num_validation=num_validation,
    )


def _check_batch_size(batch_size) -> None:
    check_int("batch_size", batch_size, 1)


def _check_part(name: str, part) -> None:
    """`shard`: None or (index, count) with 0 <= index < count."""
    if part is None:
        return
    try:
        index, count = part
        ok = all(is_int(v) for v in part)
    except (TypeError, ValueError):
        ok = False
    if not ok or not 0 <= index < count:
        raise ValueError(f"{name} must be (index, count) with 0 <= index < count, got {part!r}.")


def _normalise(x, y):
    if x.dtype == tf.uint8:
        x = tf.cast(x, tf.float32) / 255.0
    return tf.cast(x, tf.float32), tf.cast(y, tf.int64)


def _split(spec: DatasetSpec, split: str, data_dir: str | None, shard: tuple[int, int] | None):
    builder = _prepared_builder(spec.name, data_dir)
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    if shard is not None:
        ds = ds.shard(shard[1], shard[0])
    return ds.map(_normalise, num_parallel_calls=tf.data.AUTOTUNE).cache()


def train_batches(
    spec: DatasetSpec,
    batch_size: int,
    seed: int,
    data_dir: str | None = None,
    skip_batches: int = 0,
) -> tf.data.Dataset:
    """Endless shuffled training batches `(x, y)` of exactly `batch_size`.

    The order depends on `seed` and on TensorFlow's global seed (as every
    tf.data shuffle does): set the global seed (`keras.utils.set_random_seed`)
    to the same value before building pipelines that must match.

    A group's workers split each batch among themselves with
    `Runtime.dataset`, which slices the stream this function gives.

    Args:
        skip_batches: start after this many batches of the stream (a resumed
            run continues the uninterrupted run's data order).
    """
    _check_batch_size(batch_size)
    if not (is_int(skip_batches) and skip_batches >= 0):
        raise ValueError(f"skip_batches must be an integer >= 0, got {skip_batches!r}.")
    if spec.is_text:
        return text_data.train_windows(spec, batch_size, seed, skip_batches)
    if spec.name in fresh_data.FRESH_DATASETS:
        ds = fresh_data.train_stream(batch_size, seed, skip_batches)
        skip_batches = 0  # the stream starts there: nothing is generated only to be skipped
    else:
        ds = _split(spec, spec.train_split, data_dir, None)
        ds = ds.shuffle(min(spec.num_train, 50_000), seed=seed, reshuffle_each_iteration=True)
        ds = ds.repeat().batch(batch_size, drop_remainder=True)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.prefetch(tf.data.AUTOTUNE)


def independent_batches(
    spec: DatasetSpec,
    batch_size: int,
    num_members: int,
    seed: int,
    data_dir: str | None = None,
    skip_batches: int = 0,
) -> tf.data.Dataset:
    """Endless `((x_0, ..., x_{n-1}), (y_0, ..., y_{n-1}))`: each member its own
    data order (`seeds.group_seed(seed, i, "data")`, as `Runtime.dataset` gives group i)."""
    streams = [
        train_batches(
            spec, batch_size, seeds.group_seed(seed, i, "data"), data_dir, skip_batches=skip_batches
        )
        for i in range(num_members)
    ]
    zipped = tf.data.Dataset.zip(tuple(streams))
    return zipped.map(lambda *pairs: (tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))).prefetch(
        tf.data.AUTOTUNE
    )


def eval_batches(
    spec: DatasetSpec,
    batch_size: int = 1000,
    data_dir: str | None = None,
    shard: tuple[int, int] | None = None,
    limit: int | None = None,
    split: str | None = None,
):
    """The test split (or `split`), in order, batched.

    Args:
        shard: `(index, count)` to read only every count-th example.
        limit: use only the first `limit` examples (before sharding).
        split: another split than `spec.test_split`: `spec.validation_split`.
    """
    _check_batch_size(batch_size)
    _check_part("shard", shard)
    if limit is not None and not (is_int(limit) and limit >= 0):
        raise ValueError(f"limit must be an integer >= 0 or None, got {limit!r}.")
    if spec.is_text:
        return text_data.eval_windows(spec, split or spec.test_split, batch_size, shard, limit)
    if spec.name in fresh_data.FRESH_DATASETS:
        return fresh_data.eval_split(split or spec.test_split, batch_size, shard, limit)
    if split not in (None, spec.test_split, spec.validation_split):
        held_out = f" and its validation split {spec.validation_split}" if spec.validation_split else ""
        raise ValueError(f"Dataset {spec.name!r} is evaluated on its {spec.test_split} split{held_out} only.")
    builder = _prepared_builder(spec.name, data_dir)
    ds = builder.as_dataset(split=split or spec.test_split, as_supervised=True, shuffle_files=False)
    if limit is not None:
        ds = ds.take(limit)
    if shard is not None:
        ds = ds.shard(shard[1], shard[0])
    ds = ds.map(_normalise, num_parallel_calls=tf.data.AUTOTUNE).cache()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def check_labels(
    spec: DatasetSpec, num_outputs: int, data_dir: str | None = None, max_examples: int = 100_000
) -> None:
    """Checks that labels fit the model's outputs before training starts.

    Reads up to `max_examples` training labels.

    Raises:
        ValueError: a label outside `[0, num_outputs)`.
    """
    if spec.num_classes > num_outputs:
        raise ValueError(
            f"Dataset {spec.name!r} has {spec.num_classes} classes but the model has "
            f"{num_outputs} outputs; build the model with num_classes={spec.num_classes}."
        )
    if spec.is_text or spec.name in fresh_data.FRESH_DATASETS:  # symbols of the vocabulary / 10 digits
        return
    ds = _split(spec, spec.train_split, data_dir, None).take(max_examples).map(lambda x, y: y)
    labels = np.concatenate([b.numpy() for b in ds.batch(10_000)]) if spec.num_train else np.array([])
    if labels.size and (labels.min() < 0 or labels.max() >= num_outputs):
        raise ValueError(
            f"Dataset {spec.name!r} has labels in [{labels.min()}, {labels.max()}] but the model "
            f"has {num_outputs} outputs: labels must lie in [0, {num_outputs})."
        )
