"""Character-level language-modelling data through TFDS (`tiny_shakespeare`).

The text comes from TFDS's own builder and its 90/5/5 train/validation/test
split. Online, TFDS downloads the file as usual. Offline, the same builder
prepares from a local copy of the exact file (TFDS checks the sha256 it
registers for it): the first of `$TF_CODISTILL_DATA/tinyshakespeare/` and this
checkout's `../shared/data/tinyshakespeare/` that holds `input.txt`.

The vocabulary is the characters of the training split, in sorted order.
Training windows are `context + 1` characters at seeded random offsets
(`x` the first `context`, `y` the next character at every position): batch
`i` of seed `s` is a pure function of `(s, i)`, so a resumed run skips exactly
the batches already read. Evaluation reads the whole split in consecutive
windows, every character after the first predicted once.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_codistill.config import TEXT_DATASETS

__all__ = ["TEXT_DATASETS", "DATA_ENV", "local_copy_dirs", "load_spec", "train_windows", "eval_windows"]

#: Environment variable naming a folder of local copies (`<it>/tinyshakespeare/input.txt`).
DATA_ENV = "TF_CODISTILL_DATA"
_FILE = "input.txt"


def local_copy_dirs(name: str) -> list[str]:
    """Folders searched, in order, for a local copy of dataset `name`'s file."""
    folder = TEXT_DATASETS[name]
    roots = []
    if os.environ.get(DATA_ENV):
        roots.append(os.environ[DATA_ENV])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots.append(os.path.join(os.path.dirname(repo), "shared", "data"))
    return [os.path.join(root, folder) for root in roots]


def _prepare(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    from tf_codistill.data import _prepare_lock  # the lock shared with the other datasets

    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    with _prepare_lock(builder):
        builder = tfds.builder(name, data_dir=data_dir)
        if builder.is_prepared():
            return builder
        searched = local_copy_dirs(name)
        local = next((d for d in searched if os.path.isfile(os.path.join(d, _FILE))), None)
        tfds.disable_progress_bar()
        try:
            if local is not None:
                config = tfds.download.DownloadConfig(manual_dir=local)
                builder.download_and_prepare(download_config=config)
            else:
                builder.download_and_prepare()
        except Exception as err:  # noqa: BLE001 - one line naming both ways
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"Could not prepare {name!r} in {builder.data_dir_root}: "
                + (f"the local copy {os.path.join(local, _FILE)} failed ({first}); " if local else "")
                + f"TFDS downloads it when online, or put the exact {_FILE} (the sha256 TFDS registers) "
                f"in ${DATA_ENV}/{TEXT_DATASETS[name]}/ or {searched[-1]}/."
            ) from err
    return builder


@functools.lru_cache(maxsize=4)
def _texts(name: str, data_dir: str | None) -> dict[str, str]:
    builder = _prepare(name, data_dir)
    out = {}
    for split in ("train", "validation", "test"):
        (example,) = list(builder.as_dataset(split=split).take(2))
        out[split] = example["text"].numpy().decode("utf-8")
    return out


def _vocabulary(name: str, data_dir: str | None) -> str:
    """The training text's characters, sorted: symbol i of the model's output."""
    return "".join(sorted(set(_texts(name, data_dir)["train"])))


@functools.lru_cache(maxsize=16)
def _ids(name: str, data_dir: str | None, split: str, fraction: float) -> np.ndarray:
    index = {c: i for i, c in enumerate(_vocabulary(name, data_dir))}
    text = _texts(name, data_dir)[split]
    if split == "train" and fraction < 1.0:
        text = text[: int(len(text) * fraction)]
    # A character the training text never shows is read as the first symbol.
    return np.array([index.get(c, 0) for c in text], dtype=np.int32)


def load_spec(name: str, data_dir: str | None, train_fraction: float, context: int):
    """A `DatasetSpec` of character windows: input `(context,)`, one class per
    vocabulary symbol; `num_train` counts the training text's windows
    (characters / context), `num_test` the test split's evaluation windows."""
    from tf_codistill.data import DatasetSpec

    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive integer (characters per window), got {context!r}.")
    vocabulary = _vocabulary(name, data_dir)
    train = _ids(name, data_dir, "train", train_fraction)
    if len(train) < context + 2:
        raise ValueError(
            f"{name}: {len(train)} training characters leave no window of context {context} + 1; "
            "use a shorter context or a larger train fraction."
        )
    return DatasetSpec(
        name=name,
        input_shape=(context,),
        num_classes=len(vocabulary),
        num_train=len(train) // context,
        num_test=_num_windows(len(_ids(name, data_dir, "test", 1.0)), context),
        train_split="train" if train_fraction == 1.0 else f"train[:{train_fraction:g}]",
        test_split="test",
        validation_split="validation",
        num_validation=_num_windows(len(_ids(name, data_dir, "validation", 1.0)), context),
        context=context,
        vocabulary=vocabulary,
        train_fraction=train_fraction,
        data_dir=data_dir,
    )


def _num_windows(length: int, context: int) -> int:
    return max(0, (length - 1) // context)


def train_windows(spec, batch_size: int, seed: int, skip_batches: int = 0) -> tf.data.Dataset:
    """Endless batches `(x, y)` of `batch_size` windows at random offsets:
    batch `i` depends only on `(seed, i)`."""
    ids = tf.constant(_ids(spec.name, spec.data_dir, "train", spec.train_fraction))
    context = spec.context
    last = int(ids.shape[0]) - context - 1  # the last offset that leaves context + 1 characters
    span = tf.range(context + 1, dtype=tf.int64)

    def batch(i):
        offsets = tf.random.stateless_uniform(
            [batch_size], seed=tf.stack([tf.constant(seed, tf.int64), i]), maxval=last + 1, dtype=tf.int64
        )
        windows = tf.gather(ids, offsets[:, None] + span[None, :])
        return windows[:, :-1], tf.cast(windows[:, 1:], tf.int64)

    ds = tf.data.Dataset.counter(start=skip_batches, dtype=tf.int64)
    return ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def eval_windows(
    spec, split: str, batch_size: int, shard: tuple[int, int] | None = None, limit: int | None = None
) -> tf.data.Dataset:
    """The whole `split` in consecutive windows (window k covers characters
    k x context .. (k + 1) x context), batched; `limit` windows at most."""
    ids = _ids(spec.name, spec.data_dir, split, 1.0)
    context = spec.context
    n = _num_windows(len(ids), context)
    if limit is not None:
        n = min(n, limit)
    starts = np.arange(n)[:, None] * context + np.arange(context + 1)[None, :]
    windows = ids[starts] if n else np.zeros((0, context + 1), np.int32)
    ds = tf.data.Dataset.from_tensor_slices((windows[:, :-1], windows[:, 1:].astype(np.int64)))
    if shard is not None:
        ds = ds.shard(shard[1], shard[0])
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def generate(model, spec, length: int = 300, seed: int = 0, prompt: str = "\n") -> str:
    """`length` characters sampled from `model`'s next-character distribution
    (temperature 1), continuing `prompt`; the model sees the last `context`
    characters (a shorter start is padded after its end, which a causal
    model does not read)."""
    index = {c: i for i, c in enumerate(spec.vocabulary)}
    ids = [index.get(c, 0) for c in prompt] or [0]
    context = spec.context
    rng = np.random.default_rng(seed)
    forward = tf.function(lambda window: model(window, training=False))
    for _ in range(length):
        window = ids[-context:]
        padded = np.zeros((1, context), np.int32)
        padded[0, : len(window)] = window
        logits = np.asarray(forward(tf.constant(padded)), np.float64)[0, len(window) - 1]
        p = np.exp(logits - logits.max())
        ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return "".join(spec.vocabulary[i] for i in ids[len(prompt) :])
