"""Codistillation of your own Keras model on your own tf.data pipeline.

Nothing here comes from the project's model registry or from TFDS: a
functional model with BatchNorm and Dropout, and data made with NumPy. The
same script runs in one process and across processes:

    python examples/own_model.py --workdir=/tmp/own                       # every group here
    python -m tf_codistill.launch --np 2 --groups 2 -- examples/own_model.py --workdir=/tmp/own
    python -m tf_codistill.launch --np 4 --groups 2 -- examples/own_model.py --exchange=weights
    horovodrun --gloo -np 2 -H localhost:2 python examples/own_model.py   # or as a TFJob's workers

It writes <workdir>/results.json (runs[].groups[].test_accuracy, as train.py).
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_codistill as tfc  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=300, help="updates per model")
p.add_argument("--workdir", default="runs/own_model")
p.add_argument("--exchange", choices=tfc.runtime.EXCHANGES, default="predictions")
p.add_argument("--exchange_every", type=int, default=25, help="weights: refresh every K steps; average: H")
p.add_argument("--num_groups", type=int, default=2, help="1: plain synchronous training")
p.add_argument("--batch_size", type=int, default=64, help="examples per group per step")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--collective_timeout", type=float, default=120.0, help="seconds any wait may last")
args = p.parse_args()

# 1. Join the job: before any other TensorFlow op.
rt = tfc.runtime.init(
    args.num_groups,
    args.exchange,
    exchange_every=args.exchange_every,
    seed=args.seed,
    collective_timeout=args.collective_timeout,
)

# 2. Your data: 16 features, 4 classes, labels from a fixed random linear map.
rng = np.random.default_rng(1234)
w = rng.normal(size=(16, 4))
x_all = rng.normal(size=(5000, 16)).astype("float32")
y_all = np.argmax(x_all @ w + 0.5 * rng.normal(size=(5000, 4)), axis=1)
x_train, y_train, x_test, y_test = x_all[:4000], y_all[:4000], x_all[4000:], y_all[4000:]


def train_fn(seed):  # endless batches of one group's size; the order depends on seed only
    ds = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    return ds.shuffle(4000, seed=seed).repeat().batch(args.batch_size, drop_remainder=True)


def eval_fn(context):  # each of a group's workers evaluates its shard
    ds = tf.data.Dataset.from_tensor_slices((x_test, y_test))
    return ds.shard(context.num_input_pipelines, context.input_pipeline_id).batch(250)


# 3. Your model: group g's copy starts from its own seed.
def build(group):
    keras.utils.set_random_seed(tfc.seeds.group_seed(args.seed, group, "init"))
    inputs = keras.Input((16,))
    h = keras.layers.Dense(64, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(0.1, seed=group)(h)
    return keras.Model(inputs, keras.layers.Dense(4)(h), name=f"mlp_{group}")  # logits


with rt.scope():
    model = tfc.CodistillModel(rt.members(build), exchange=rt.exchange(), data_mode=rt.data_mode)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), metrics=["accuracy"])

# 4. Train with Keras; per-step losses go to a JSON-lines file per process.
os.makedirs(args.workdir, exist_ok=True)
log = open(os.path.join(args.workdir, f"steps.rank{rt.rank}.jsonl"), "w")  # noqa: SIM115
per_step = keras.callbacks.LambdaCallback(
    on_train_batch_end=lambda batch, logs: log.write(
        json.dumps({k: float(v) for k, v in logs.items()}) + "\n"
    )
)
model.fit(
    rt.dataset(train_fn),
    steps_per_epoch=args.steps,
    epochs=1,
    callbacks=[per_step],
    verbose=2 if rt.is_chief else 0,
)
log.close()

# 5. Evaluate every local member; the chief gathers the groups and writes results.json.
scores = model.evaluate(rt.eval_dataset(eval_fn), return_dict=True, verbose=0)
mine = [
    {"group": g, "test_accuracy": float(acc)} for g, acc in zip(rt.local_groups, model.member_scores(scores))
]
everyone = rt.gather(mine if rt.is_group_chief else [])
if rt.is_chief:
    run = {
        "arm": "codistill" if args.num_groups > 1 else "sync",
        "num_groups": args.num_groups,
        "world_size": rt.world_size,
        "exchange": args.exchange,
        "steps": args.steps,
        "groups": sorted((g for part in everyone for g in part), key=lambda g: g["group"]),
    }
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"runs": [run]}, f, indent=1)
    print(" ".join(f"group {g['group']}: {g['test_accuracy']:.4f}" for g in run["groups"]))
