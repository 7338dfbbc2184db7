"""Bytes per training step, the one set of formulas.

What each worker sends per step, float32 everywhere (N workers in a ring, or
N groups):

* ring all-reduce of P parameters (a sync gradient, or averaging islands):
  2 (N - 1) / N x P x 4
* all-gather of each worker's (batch x outputs) logits to the other groups:
  (N - 1) x batch x outputs x 4
* a copy of the P weights to every other group every K steps, amortised:
  (N - 1) x P x 4 / K

The exchanges' `bytes_sent_per_step`, the results table (`report.py`) and
the benchmarks' cost model (`bench/costmodel.py`) all call these. NumPy-free
and TensorFlow-free.
"""

from __future__ import annotations

__all__ = ["BYTES_PER_FLOAT", "allreduce_bytes", "allgather_bytes", "stale_weights_bytes"]

BYTES_PER_FLOAT = 4  # float32 on the wire


def allreduce_bytes(params: int, workers: int, every: int = 1) -> float:
    """Bytes each worker sends per step in a ring all-reduce of `params`
    floats over `workers`, done every `every` steps (0 with fewer than 2)."""
    if workers < 2:
        return 0.0
    return 2 * (workers - 1) / workers * params * BYTES_PER_FLOAT / every


def allgather_bytes(batch: int, outputs: int, workers: int) -> float:
    """Bytes each worker sends per step in a ring all-gather of its
    (batch x outputs) logits to the other `workers - 1`."""
    return float(max(workers - 1, 0) * batch * outputs * BYTES_PER_FLOAT)


def stale_weights_bytes(params: int, workers: int, every: int) -> float:
    """Bytes each worker sends per step, amortised, sending its `params`
    floats to each of the other `workers - 1` every `every` steps (0: never)."""
    if every <= 0:
        return 0.0
    return float(max(workers - 1, 0) * params * BYTES_PER_FLOAT) / every
