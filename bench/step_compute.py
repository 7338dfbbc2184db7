"""Compute per update of one worker, for the scale-out decision's wall-time
table (experiments/scale_out/stage2b_decision.toml, `[walltime]`).

    python bench/step_compute.py [--model=cnn1d_norm] [--batch=64] [--steps=200] [--repeats=5]

Times `CodistillModel.fit` steps on in-memory data of `--batch` examples per
member, one thread: one member (a sync worker's step), and two members in
one process (a codistilled pair: each member's step plus its peer's forward
pass on its batch and the distillation term), whose time is halved to give
one member's share. Prints the median seconds per update of each and their
ratio. Run it on an otherwise idle machine; absolute times drift with load,
the ratio less so.
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("model", "cnn1d_norm", "Model name (models.MODELS).")
flags.DEFINE_integer("batch", 64, "Examples per member per update (one worker's batch).")
flags.DEFINE_integer("steps", 200, "Updates per timed fit call.")
flags.DEFINE_integer("repeats", 5, "Timed fit calls per arm (alternating).")
FLAGS = flags.FLAGS


def main(_):
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    from models import build_model
    from tf_codistill import CodistillModel

    rng = np.random.default_rng(0)
    x = rng.normal(size=(FLAGS.batch * 8, 40)).astype("float32")
    y = rng.integers(0, 10, size=len(x)).astype("int64")

    def make(members):
        built = [build_model(FLAGS.model, (40,), 10, seed=i) for i in range(members)]
        model = CodistillModel(built)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), metrics=["accuracy"])
        data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(FLAGS.batch * members)
        model.fit(data, steps_per_epoch=20, epochs=1, verbose=0)  # trace and warm up
        return model, data

    arms = {"sync (1 member)": make(1), "codistill (2 members, per member)": make(2)}
    times = {name: [] for name in arms}
    for _ in range(FLAGS.repeats):
        for name, (model, data) in arms.items():
            start = time.perf_counter()
            model.fit(data, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0)
            per_update = (time.perf_counter() - start) / FLAGS.steps
            times[name].append(per_update / (2 if name.startswith("codistill") else 1))
    medians = {name: statistics.median(v) for name, v in times.items()}
    for name, value in medians.items():
        print(f"{FLAGS.model}, batch {FLAGS.batch} per member, {name}: {value * 1e3:.2f} ms per update")
    sync, codistill = medians.values()
    print(f"ratio codistill / sync per member: {codistill / sync:.2f}")


if __name__ == "__main__":
    app.run(main)
