"""Step-time cost model for data-parallel sync training against
codistillation on a network of given bandwidth.

    step time = compute(model, arm) x oversubscription
              + messages x latency + bytes sent per worker x 8 / (efficiency x link rate)

Bytes each worker sends per step (float32, N workers or groups), from
`tf_codistill.traffic` (the formulas the library's own accounting uses):

* sync, ring all-reduce of the gradient:       2 (N - 1) / N x params x 4, in 2 (N - 1) messages
* codistillation, all-gather of the logits:    (N - 1) x batch x classes x 4, in N - 1 messages
* codistillation, stale weights every K steps: (N - 1) x params x 4 / K (each group's copy to each
  other group, amortised; for N = 2 that is params x 4 / K), in (N - 1) / K messages
* parameter averaging every H steps (local SGD, DiLoCo): the ring all-reduce of the parameter
  deltas, 2 (N - 1) / N x params x 4 / H, in 2 (N - 1) / H messages; averaging islands that also
  codistil every step (`average_predictions`) add, every step, their batch's inputs to the other
  islands (an all-gather) and those islands' logits on them back (an all-to-all): (N - 1) x batch
  x (input values + classes) x 4, in 2 (N - 1) messages

`compute` is per (model, arm): the weights arm adds a forward pass of the
peer copy, the prediction arm a distillation loss. `oversubscription` is
max(1, workers x threads per worker / cores): on the benchmark's one
machine, more workers than cores share them (1 on a real cluster).
`efficiency` (the share of the link rate a collective's payload gets:
framing, TCP, Gloo/gRPC, the shaper's burst handling) and `latency` (per
ring message: round trips, serialisation, scheduling) are fitted, as is
each compute time: see `fit`.

NumPy and `tf_codistill.traffic` only, no TensorFlow: the sweep (`bench/sweep_network.py`), the
projection (`projection`) and the fast tests (`tests/test_costmodel.py`)
import it. It lives in bench/ because its fitted constants describe the
benchmark's emulated network (veth + htb on one machine, CPU workers), not
a user's cluster; the formulas are general and `projection` shows how to
use them with published numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tf_codistill.traffic import allgather_bytes, allreduce_bytes, stale_weights_bytes

ARMS = ("sync", "predictions", "weights")  # the arms the network sweep measures and fits
# Arms the sweep does not fit. Their compute is taken as that of the fitted arm named here: an
# averaging island's step is one forward and backward pass on the worker's batch, as a
# predictions-exchange member's is (which adds a distillation loss, so this slightly over-counts
# plain averaging). `bench/bench_slow_network.py` prints the prediction beside the measurement.
COMPUTE_AS = {"average": "predictions", "average_predictions": "predictions"}
ALL_ARMS = ARMS + tuple(COMPUTE_AS)


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration: what the model needs to predict a step time."""

    model: str
    arm: str  # one of ARMS
    workers: int  # hosts: all-reduce ring size, or number of groups
    rate_mbit: float  # link rate, each direction
    params: int
    classes: int
    batch: int  # per worker
    every: int = 50  # stale-weights refresh period, or averaging period H
    inputs: int = 0  # values per example of the model's inputs (average_predictions sends them)
    threads: int = 1
    cores: int = 0  # 0: no oversubscription (a real cluster)

    def traffic(self) -> tuple[float, float]:
        """(bytes sent per worker per step, messages per step)."""
        n = self.workers
        if self.arm == "sync":
            return allreduce_bytes(self.params, n), 2.0 * (n - 1)
        if self.arm == "predictions":
            return allgather_bytes(self.batch, self.classes, n), float(n - 1)
        if self.arm == "weights":
            return stale_weights_bytes(self.params, n, self.every), (n - 1) / max(self.every, 1)
        if self.arm in ("average", "average_predictions"):
            sent = allreduce_bytes(self.params, n, max(self.every, 1))
            messages = 2.0 * (n - 1) / max(self.every, 1)
            if self.arm == "average_predictions":
                sent += allgather_bytes(self.batch, self.inputs + self.classes, n)
                messages += 2.0 * (n - 1)
            return sent, messages
        raise ValueError(f"unknown arm {self.arm!r}; choose from {ALL_ARMS}")

    def oversubscription(self) -> float:
        if self.cores <= 0:
            return 1.0
        return max(1.0, self.workers * self.threads / self.cores)


@dataclasses.dataclass
class Params:
    """Fitted constants. compute: seconds per step by (model, arm)."""

    compute: dict[tuple[str, str], float]
    efficiency: float = 1.0
    latency: float = 0.0  # seconds per ring message

    def comm_seconds(self, p: Point) -> float:
        sent, messages = p.traffic()
        return messages * self.latency + sent * 8 / (self.efficiency * p.rate_mbit * 1e6)

    def step_seconds(self, p: Point) -> float:
        key = (p.model, p.arm)
        if key not in self.compute and p.arm in COMPUTE_AS:
            key = (p.model, COMPUTE_AS[p.arm])
        if key not in self.compute:
            raise KeyError(f"no compute time fitted for model {p.model!r}, arm {p.arm!r}")
        return self.compute[key] * p.oversubscription() + self.comm_seconds(p)

    def to_dict(self) -> dict:
        return {
            "efficiency": self.efficiency,
            "latency_seconds": self.latency,
            "compute_seconds": {f"{m}/{a}": t for (m, a), t in sorted(self.compute.items())},
        }


# ---------------------------------------------------------------------- fit
def default_fit_role(p: Point, rates: list[float]) -> bool:
    """The points the sweep fits on: every arm at the fastest link with 2
    workers (compute), and sync at 100 Mbit/s with any number of workers
    (efficiency; latency needs two ring sizes, since with 2 workers a
    constant per-step cost cannot be told from compute). Everything else is
    held out."""
    if p.arm == "sync" and p.rate_mbit == 100:
        return True
    return p.workers == 2 and p.rate_mbit == max(rates)


def _lstsq_nonneg(a: np.ndarray, y: np.ndarray, nonneg: list[int]) -> np.ndarray:
    """Least squares a x = y with x[i] >= 0 for i in `nonneg`: a column whose
    solution is negative is pinned to 0 and the rest solved again."""
    free = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while True:
        sol, *_ = np.linalg.lstsq(a[:, free], y, rcond=None)
        bad = [free[j] for j, v in enumerate(sol) if free[j] in nonneg and v < 0]
        if not bad:
            x[:] = 0.0
            x[free] = sol
            return x
        worst = min(bad, key=lambda i: sol[free.index(i)])
        free.remove(worst)


def fit(points: list[Point], seconds: list[float], roles: list[bool]) -> Params:
    """Fits compute per (model, arm), latency and efficiency on the points
    whose role is True: one linear least-squares problem,

        measured = oversubscription x compute[model, arm] + messages x latency
                   + (bits / rate) x (1 / efficiency),

    with latency and 1 / efficiency kept >= 0 (pinned to 0 when the data
    would make them negative; efficiency is then 1, the link rate).
    Latency is identifiable only when the fitting points include a (model,
    arm) at two ring sizes; otherwise it is absorbed into compute (0)."""
    if len(points) != len(seconds) or len(points) != len(roles):
        raise ValueError("points, seconds and roles must have the same length")
    fitting = [(p, t) for p, t, r in zip(points, seconds, roles) if r]
    if not fitting:
        raise ValueError("no points to fit on")
    keys = sorted({(p.model, p.arm) for p, _ in fitting})
    a = np.zeros((len(fitting), len(keys) + 2))
    y = np.zeros(len(fitting))
    for i, (p, t) in enumerate(fitting):
        sent, messages = p.traffic()
        a[i, keys.index((p.model, p.arm))] = p.oversubscription()
        a[i, -2] = messages
        a[i, -1] = sent * 8 / (p.rate_mbit * 1e6)
        y[i] = t
    # Without two ring sizes of one (model, arm), messages is collinear with compute.
    sizes = {}
    for p, _ in fitting:
        sizes.setdefault((p.model, p.arm), set()).add(p.workers)
    x = _lstsq_nonneg(a, y, nonneg=[len(keys), len(keys) + 1])
    if not any(len(v) > 1 for v in sizes.values()):
        x = _lstsq_nonneg(np.delete(a, -2, axis=1), y, nonneg=[len(keys)])
        x = np.insert(x, len(keys), 0.0)
    compute = {k: max(float(v), 1e-6) for k, v in zip(keys, x[: len(keys)])}
    inverse = float(x[-1])
    return Params(compute=compute, efficiency=1.0 / inverse if inverse > 0 else 1.0, latency=float(x[-2]))


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured."""
    return (predicted - measured) / measured


# --------------------------------------------------------------- projection
def projection(
    params_count: int,
    classes: int,
    batch: int,
    workers: int,
    rates_gbit: list[float],
    compute_seconds: float,
    efficiency: float,
    latency: float,
    groups_of: int = 1,
    every: int = 50,
) -> list[dict]:
    """Per-step time of sync (one ring of `workers`) and codistillation with
    `workers // groups_of` groups of `groups_of` workers (an all-reduce of
    `groups_of` inside each group plus the cross-group exchange), per link
    rate, with compute taken as given (e.g. a published step time) and the
    network constants as given. Communication does not overlap compute
    here (an upper bound on the cost of communication)."""
    groups = workers // groups_of
    out = []
    for gbit in rates_gbit:
        rate = gbit * 1000.0

        def comm(arm, n, _rate=rate):
            p = Point("x", arm, n, _rate, params_count, classes, batch, every=every)
            return Params({}, efficiency, latency).comm_seconds(p)

        sync = compute_seconds + comm("sync", workers)
        in_group = comm("sync", groups_of) if groups_of > 1 else 0.0
        pred = compute_seconds + in_group + comm("predictions", groups)
        weights = compute_seconds + in_group + comm("weights", groups)
        out.append(
            {
                "rate_gbit": gbit,
                "sync_step_seconds": sync,
                "predictions_step_seconds": pred,
                "weights_step_seconds": weights,
                "predictions_speedup": sync / pred,
                "weights_speedup": sync / weights,
            }
        )
    return out
