"""Every choice list of the library, declared once.

The settings (`tf_codistill.config`, hence train.py's flags and the study
checks), `tf_codistill.runtime.init`, `CodistillModel`, the exchanges and the
losses import their allowed values from here. No TensorFlow: the settings
load this module to answer `train.py --help` at once.
"""

from __future__ import annotations

__all__ = [
    "EXCHANGE_KINDS",
    "AVERAGE_TEACHERS",
    "TRANSPORTS",
    "DATA_ORDERS",
    "DATA_MODES",
    "ON_STALE",
    "PRECISIONS",
    "COLLECTIVE_IMPLEMENTATIONS",
    "DISTANCES",
]

#: What the groups exchange, each with the data orders its groups read:
#: "predictions" every step (paired workers read the same batches: the peers'
#: logits are on the member's own examples); "weights", a frozen copy of each
#: peer every K steps (each group reads its own order); "average", islands
#: averaging their parameters every H steps (local SGD, DiLoCo: each its own).
EXCHANGE_KINDS = {"predictions": "shared", "weights": "independent", "average": "independent"}

#: How an exchange travels: inside this process (every group here), over
#: Horovod collectives (one process per worker), or through a shared
#: directory of snapshots (each group a separate job; weights only).
TRANSPORTS = ("local", "horovod", "directory")
#: Averaging islands that codistil: toward the shared weights of the last outer step, or toward
#: the other islands' predictions on this island's batch at every step (in one process).
AVERAGE_TEACHERS = ("shared", "peers")

#: Whether the groups read the same batches or each its own order.
DATA_ORDERS = ("shared", "independent")

#: `CodistillModel`'s data_mode: "auto" reads nested per-member batches as
#: "independent" and splits a plain `(x, y)` batch across the local members
#: ("split"); with one member it is "shared".
DATA_MODES = ("auto", *DATA_ORDERS, "split")

#: A stale peer under the weights exchange: keep its last copy, or drop alpha to 0.
ON_STALE = ("keep", "drop")

#: Keras dtype policies a run may set for its members.
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")

#: The all-reduce inside a group of several workers ("auto": NCCL on GPU workers, RING otherwise).
COLLECTIVE_IMPLEMENTATIONS = ("auto", "ring", "nccl")

#: Distances by name (`tf_codistill.losses.DISTANCES` maps each to its class).
DISTANCES = ("mse", "kl", "reverse_kl")
