"""MNIST-1D generated fresh: a training stream that never repeats an example.

`mnist1d_fresh` draws every training example anew from the MNIST-1D
generator (the `mnist1d` package's templates and `transform`, Greydanus
2020), as Anil et al. (2018) read each example once: a run of any length
sees no example twice, so batch-size questions are not confounded by
repeated epochs. Batch `i` of stream `seed` is a pure function of
`(seed, i)` (a resumed run skips exactly the batches it read; the workers of
a group slice the same batch), and every group draws its own stream (seed +
1000 x group, as `tf_codistill.data` seeds groups).

Two fixed splits, drawn once from their own seeds, never from a training
stream's: `validation` (every choice: grid points, targets, early stops) and
`test` (reported, chosen on by nothing). Both have `NUM_EVAL` examples.

The transform is the package's, vectorised over a batch: `transform_batch`
applied to the random numbers `mnist1d.transform.transform` would draw gives
its result (tests/test_fresh_data.py checks this sample for sample), about
a thousand times faster than the package's per-example loop. Signals are
standardised with the validation split's mean and standard deviation, as
`make_dataset` standardises with its whole set's.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "FRESH_DATASETS",
    "NUM_EVAL",
    "STREAM_SIZE",
    "draw",
    "transform_batch",
    "examples",
    "batch",
    "split",
    "load_spec",
    "train_stream",
    "eval_split",
]

from tf_codistill.config import FRESH_DATASETS

#: Examples in each fixed split (validation, test). At 95% accuracy one
#: evaluation's standard error is 0.3 points.
NUM_EVAL = 5000
NUM_CLASSES = 10
#: The training set's size as `DatasetSpec.num_train` reports it: unbounded.
STREAM_SIZE = 2**62
# The first word of every random stream's key: training, validation and test
# streams can never coincide, whatever the seed.
_TRAIN, _VALIDATION, _TEST = 1, 2, 3
_SPLIT_TAGS = {"validation": _VALIDATION, "test": _TEST}


@functools.lru_cache(maxsize=1)
def _package():
    """The generator's settings and digit templates, from the mnist1d package."""
    from mnist1d.data import get_dataset_args, get_templates

    return get_dataset_args(), get_templates()


def draw(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """The random numbers of `n` examples, in the roles `transform` uses them
    (the noise in float32: drawing it is most of the cost)."""
    args, _ = _package()
    length = args.template_len + args.padding[-1]
    return {
        "label": rng.integers(0, NUM_CLASSES, n),
        "pad": rng.random(n),
        "scale": rng.random(n),
        "shift": rng.integers(0, args.max_translation, n),
        "corr": rng.standard_normal((n, length), dtype=np.float32),
        "iid": rng.standard_normal((n, length), dtype=np.float32),
        "shear": rng.random(n),
    }


def _resample_matrix(length: int, size: int) -> np.ndarray:
    """`(length, size)`: a signal of `length` values times it is the signal
    linearly interpolated onto `size` evenly spaced points over the same [0, 1]
    (`mnist1d.transform.interpolate`)."""
    where = np.linspace(0.0, 1.0, size) * (length - 1)
    low = np.minimum(np.floor(where).astype(np.int64), length - 2)
    frac = where - low
    matrix = np.zeros((length, size))
    matrix[low, np.arange(size)] = 1 - frac
    matrix[low + 1, np.arange(size)] += frac
    return matrix


@functools.lru_cache(maxsize=1)
def _placed() -> np.ndarray:
    """`[label, pad - padding[0], shift]`: each digit's template padded with
    that many zeros, dilated to the common width and rolled right by `shift`
    (the package's pad, dilate and translate, which depend on these three
    draws alone; the scale, a factor, commutes with the roll)."""
    args, templates = _package()
    template, (low, high) = args.template_len, args.padding
    width = template + high
    out = np.zeros((NUM_CLASSES, high - low + 1, args.max_translation, width))
    for j, pad in enumerate(range(low, high + 1)):
        dilated = (templates["x"] + 1e-8) @ _resample_matrix(template + pad, width)[:template]
        for shift in range(args.max_translation):
            out[:, j, shift] = np.roll(dilated, shift, axis=-1)
    return out


def transform_batch(values: dict[str, np.ndarray]) -> np.ndarray:
    """Signals `(n, 40)` (before standardisation) from the draws of `draw`:
    the package's pad, dilate, scale, translate, noise, shear and subsample."""
    from scipy.ndimage import gaussian_filter1d

    args, _ = _package()
    low, high = args.padding
    width = args.template_len + high
    pads = (values["pad"] * (high - low + 1)).astype(np.int64)  # pad - low
    x = _placed()[values["label"], pads, values["shift"]]
    x *= (1 + args.scale_coeff * (values["scale"] - 0.5))[:, None]
    corr = gaussian_filter1d(args.corr_noise_scale * values["corr"], 2, axis=-1)
    x = np.where(x != 0, x, corr)  # the package's mask * x + (1 - mask) * noise
    x += args.iid_noise_scale * values["iid"]
    x -= (args.shear_scale * (values["shear"] - 0.5))[:, None] * np.linspace(-0.5, 0.5, width)[None, :]
    return x @ _resample_matrix(width, args.final_seq_length)


def examples(key: tuple[int, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` raw examples `(signals, labels)` from the random stream `key`."""
    values = draw(np.random.default_rng(list(key)), n)
    return transform_batch(values), values["label"].astype(np.int64)


@functools.lru_cache(maxsize=2)
def _standardisation() -> tuple[float, float]:
    x, _ = examples((_VALIDATION, 0), NUM_EVAL)
    return float(x.mean()), float(x.std())


def _standardise(x: np.ndarray) -> np.ndarray:
    mean, std = _standardisation()
    return ((x - mean) / std).astype(np.float32)


def batch(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Training batch `index` of stream `seed`: `(float32 (size, 40), int64 (size,))`."""
    x, y = examples((_TRAIN, int(seed), int(index)), size)
    return _standardise(x), y


@functools.lru_cache(maxsize=2)
def split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed `validation` or `test` split (`NUM_EVAL` examples)."""
    if name not in _SPLIT_TAGS:
        raise ValueError(
            f"mnist1d_fresh has the splits validation and test (and a training stream), not {name!r}."
        )
    x, y = examples((_SPLIT_TAGS[name], 0), NUM_EVAL)
    return _standardise(x), y


def load_spec(name: str, train_fraction: float):
    """The `DatasetSpec` of a fresh dataset. The stream has no size:
    `num_train` is `STREAM_SIZE`, and train.py asks for --steps and
    --steps_per_epoch instead of counting epochs of it."""
    from tf_codistill.data import DatasetSpec

    if train_fraction != 1.0:
        raise ValueError(
            f"--train_fraction={train_fraction:g}: {name} draws every training example fresh, so there is "
            "no training set to take a fraction of; leave it at 1 (use mnist1d/n<samples> for a finite set)."
        )
    args, _ = _package()
    return DatasetSpec(
        name=name,
        input_shape=(args.final_seq_length,),
        num_classes=NUM_CLASSES,
        num_train=STREAM_SIZE,
        num_test=NUM_EVAL,
        train_split="stream",
        test_split="test",
        validation_split="validation",
        num_validation=NUM_EVAL,
    )


def train_stream(batch_size: int, seed: int, skip_batches: int = 0):
    """Endless `tf.data` batches of stream `seed`, from batch `skip_batches` on."""
    import tensorflow as tf

    def make(index):
        return batch(seed, int(index), batch_size)

    def generate(index):
        x, y = tf.numpy_function(make, [index], (tf.float32, tf.int64), stateful=False)
        x.set_shape((batch_size, _package()[0].final_seq_length))
        y.set_shape((batch_size,))
        return x, y

    return tf.data.Dataset.counter(start=skip_batches, dtype=tf.int64).map(generate)


def eval_split(name: str, batch_size: int, shard=None, limit=None):
    """The fixed split `name`, in order, batched (`limit` examples at most)."""
    import tensorflow as tf

    x, y = split(name)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shard is not None:
        ds = ds.shard(shard[1], shard[0])
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
