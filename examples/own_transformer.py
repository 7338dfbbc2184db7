"""Codistillation of your own Transformer language model, through the runtime.

A small decoder-only Transformer written here with Keras layers (nothing from
the project's model registry), trained on characters of TFDS's tiny_shakespeare
(prepared offline from a local copy of the exact file when there is one; see
tf_codistill/text_data.py). Members output next-character logits
[batch, context, vocabulary]; the groups exchange those every step
(predictions) or their weights every K steps:

    python examples/own_transformer.py --workdir=/tmp/lm                      # every group here
    python -m tf_codistill.launch --np 2 --groups 2 -- examples/own_transformer.py --workdir=/tmp/lm
    python -m tf_codistill.launch --np 2 --groups 2 -- examples/own_transformer.py --exchange=weights

It writes <workdir>/results.json: each group's validation NLL (nats per
character) and perplexity.
"""

import argparse
import json
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_codistill as tfc  # noqa: E402
from tf_codistill import data  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=300, help="updates per model")
p.add_argument("--workdir", default="runs/own_transformer")
p.add_argument("--exchange", choices=tfc.runtime.EXCHANGES, default="predictions")
p.add_argument("--exchange_every", type=int, default=25, help="weights: refresh every K steps")
p.add_argument("--num_groups", type=int, default=2, help="1: plain synchronous training")
p.add_argument("--batch_size", type=int, default=16, help="windows per group per step")
p.add_argument("--context", type=int, default=32, help="characters per window")
p.add_argument("--width", type=int, default=64)
p.add_argument("--data_dir", default=None, help="TFDS data directory")
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

# 2. The text, as windows of characters: x the window, y the next character at every position.
spec = data.load_spec("tiny_shakespeare", args.data_dir, context=args.context)


def train_fn(seed):  # endless batches of one group's size; the order depends on seed only
    return data.train_batches(spec, args.batch_size, seed)


def eval_fn(context):  # each of a group's workers evaluates its shard of the validation text
    shard = (context.input_pipeline_id, context.num_input_pipelines)
    return data.eval_batches(spec, 128, shard=shard, split="validation")


# 3. Your model: two pre-LayerNorm blocks of causal self-attention and a GELU MLP.
def build(group):
    keras.utils.set_random_seed(tfc.seeds.group_seed(args.seed, group, "init"))
    tokens = keras.Input((args.context,), dtype="int32")
    h = keras.layers.Embedding(spec.num_classes, args.width)(tokens)
    positions = keras.layers.Embedding(args.context, args.width)(tf.range(args.context)[None])
    h = h + positions
    for _ in range(2):
        a = keras.layers.LayerNormalization()(h)
        h = h + keras.layers.MultiHeadAttention(4, args.width // 4)(a, a, use_causal_mask=True)
        m = keras.layers.LayerNormalization()(h)
        h = h + keras.layers.Dense(args.width)(keras.layers.Dense(4 * args.width, activation="gelu")(m))
    logits = keras.layers.Dense(spec.num_classes)(keras.layers.LayerNormalization()(h))
    return keras.Model(tokens, logits, name=f"lm_{group}")


with rt.scope():
    model = tfc.CodistillModel(rt.members(build), exchange=rt.exchange(), data_mode=rt.data_mode, alpha=1.0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"])

# 4. Train with Keras.
model.fit(rt.dataset(train_fn), steps_per_epoch=args.steps, epochs=1, verbose=2 if rt.is_chief else 0)

# 5. Validation NLL of every local member; the chief gathers the groups and writes results.json.
scores = model.evaluate(rt.eval_dataset(eval_fn), return_dict=True, verbose=0)
mine = [
    {"group": g, "val_loss": float(nll), "val_perplexity": math.exp(float(nll))}
    for g, nll in zip(rt.local_groups, model.member_scores(scores, "loss"))
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
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"runs": [run]}, f, indent=1)
    print(" ".join(f"group {g['group']}: val NLL {g['val_loss']:.4f}" for g in run["groups"]))
