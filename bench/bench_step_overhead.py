"""Step-time overhead of CodistillModel (one group, the sync baseline) against
a plain `keras.Model.fit` on the same model, data and optimizer.

    python bench/bench_step_overhead.py [--model=cnn1d] [--batch_size=128] [--steps=300] [--repeats=7]

Both are timed in the same process, alternating, and the ratio of median
step times is printed (target: at most 1.05). Absolute times drift on a
shared machine; the ratio from one run is what to compare.
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from models import build_model  # noqa: E402
from tf_codistill import CodistillModel, data  # noqa: E402

flags.DEFINE_string("model", "cnn1d", "Model name.")
flags.DEFINE_string("dataset", "mnist1d", "Dataset (only its shapes and first batches are used).")
flags.DEFINE_string("data_dir", None, "TFDS data dir.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("steps", 300, "Steps per timed fit call.")
flags.DEFINE_integer("repeats", 7, "Timed fit calls per model (alternating).")
FLAGS = flags.FLAGS


def _optimizer():
    return keras.optimizers.SGD(0.05, momentum=0.9)


def main(_):
    spec = data.load_spec(FLAGS.dataset, FLAGS.data_dir)
    batches = data.train_batches(spec, FLAGS.batch_size, 0, FLAGS.data_dir)
    batches = batches.take(32).cache().repeat()

    plain = build_model(FLAGS.model, spec.input_shape, spec.num_classes, seed=0)
    plain.compile(
        optimizer=_optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    codistill = CodistillModel([build_model(FLAGS.model, spec.input_shape, spec.num_classes, seed=0)])
    codistill.compile(optimizer=_optimizer(), metrics=["accuracy"])

    models = {"keras.Model": plain, "CodistillModel(1 group)": codistill}
    times = {name: [] for name in models}
    for model in models.values():  # trace and warm up
        model.fit(batches, epochs=1, steps_per_epoch=50, verbose=0)
    for _ in range(FLAGS.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(batches, epochs=1, steps_per_epoch=FLAGS.steps, verbose=0)
            times[name].append((time.perf_counter() - start) / FLAGS.steps)

    print(
        f"model={FLAGS.model} batch={FLAGS.batch_size} steps={FLAGS.steps} repeats={FLAGS.repeats} "
        f"tf={tf.__version__} keras={keras.__version__}"
    )
    for name, ts in times.items():
        print(
            f"  {name:26s} median {1e3 * statistics.median(ts):7.3f} ms/step  "
            f"(min {1e3 * min(ts):.3f}, max {1e3 * max(ts):.3f})"
        )
    ratio = statistics.median(times["CodistillModel(1 group)"]) / statistics.median(times["keras.Model"])
    print(f"ratio CodistillModel / keras.Model (median step time): {ratio:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    app.run(main)
