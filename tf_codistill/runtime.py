"""Join the job once; get the group's strategy, the exchange, the members and the data.

The same user script runs in one process (every group local), under
`python -m tf_codistill.launch --np 4 --groups 2 -- script.py`, under
`horovodrun --gloo`, in an MPIJob, and as a Kubeflow TFJob:

    import tf_codistill as tfc

    rt = tfc.runtime.init(num_groups=2, exchange="predictions")  # before any other TF op
    with rt.scope():
        model = tfc.CodistillModel(rt.members(build_model), exchange=rt.exchange(),
                                   data_mode=rt.data_mode)
        model.compile(optimizer="sgd", metrics=["accuracy"])
    model.fit(rt.dataset(train_fn), steps_per_epoch=100, epochs=3,
              validation_data=rt.eval_dataset(eval_fn))
    everyone = rt.gather({"group": rt.group, ...})      # every process's dict, in rank order
    if rt.is_chief: ...write results...

`init` reads the launch environment once and freezes every decision that
follows from it (which groups this process trains, the data mode, the
transport, the seeds); the `Runtime` it returns hands them out.

Exchange kinds (`tf_codistill.choices.EXCHANGE_KINDS`):
  * ``"predictions"``: every step the groups swap logits on the same
    examples. Paired workers of different groups read identical batches.
  * ``"weights"``: every `exchange_every` steps the groups swap frozen
    copies of their weights. Every group reads its own data order.
  * ``"average"``: the groups are islands that average their parameter
    deltas every `exchange_every` = H steps; an outer optimizer (SGD with
    `outer_learning_rate` and Nesterov `outer_momentum`) moves the shared
    weights every island continues from (DiLoCo; `outer_learning_rate=1,
    outer_momentum=0` is plain local SGD). In this process, or one Horovod
    all-reduce every H steps across processes. Every island reads its own
    data order; `CodistillModel`'s alpha defaults to 0 with it.

Transports (`tf_codistill.choices.TRANSPORTS`): ``"local"`` (every group in
this process), ``"horovod"`` (one process per worker: Horovod collectives
across groups) or ``"directory"`` (weights only: snapshots in the shared
directory `exchange_dir`, each job training group `group`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from tf_codistill import seeds
from tf_codistill.checks import check_int, is_number
from tf_codistill.choices import (
    AVERAGE_TEACHERS,
    COLLECTIVE_IMPLEMENTATIONS,
    DATA_ORDERS,
    EXCHANGE_KINDS,
    ON_STALE,
    PRECISIONS,
    TRANSPORTS,
)

__all__ = ["EXCHANGES", "TRANSPORTS", "PRECISIONS", "Runtime", "init"]

EXCHANGES = tuple(EXCHANGE_KINDS)
_JOINED: dict = {}  # the Horovod job this process joined (at most one per process)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """This process's place in a codistillation job. Made by `init`.

    Attributes:
        num_groups: groups (models) in the whole job; 1 is plain synchronous
            training with no exchange.
        exchange_kind: ``"predictions"``, ``"weights"`` or ``"average"``.
        transport: how it travels: ``"local"``, ``"horovod"`` or ``"directory"``.
        data_mode: what `CodistillModel` takes: ``"shared"`` (every local
            member sees the same batch; always so with one local member) or
            ``"independent"`` (each its own).
        data_orders: whether the groups read the same batches
            (``"shared"``) or each its own order (``"independent"``).
        local_groups: the groups this process trains (all of them in one
            process, its own group across processes).
        topology: the Horovod job's `Topology`, or None in one process.
        strategy: the group's `tf.distribute` strategy (MultiWorkerMirrored
            inside a group of several workers, else the default strategy).
        seed: the base seed; group g's data order uses
            `seeds.group_seed(seed, g, "data")` where each group reads its
            own order, `seed` where the groups read the same batches.
    """

    num_groups: int
    exchange_kind: str
    transport: str
    data_mode: str
    data_orders: str
    local_groups: tuple[int, ...]
    topology: Any = None
    strategy: Any = None
    seed: int = 0
    exchange_every: int = 50
    exchange_dir: str | None = None
    peer_timeout: float = 300.0
    on_stale: str = "keep"
    outer_learning_rate: float = 0.7
    outer_momentum: float = 0.9
    average_teacher: str = "shared"
    pair_set: Any = None
    group_set: Any = None

    # where this process sits ---------------------------------------------
    @property
    def distributed(self) -> bool:
        """True when this process is one of several (a Horovod job)."""
        return self.topology is not None

    @property
    def world_size(self) -> int:
        return self.topology.world_size if self.distributed else 1

    @property
    def rank(self) -> int:
        return self.topology.rank if self.distributed else 0

    @property
    def group(self) -> int:
        """This process's group (the first local group in one process)."""
        return self.local_groups[0]

    @property
    def group_size(self) -> int:
        """Workers in this process's group (kept in lock-step by the strategy)."""
        return self.topology.group_size if self.distributed else 1

    @property
    def rank_in_group(self) -> int:
        return self.topology.rank_in_group if self.distributed else 0

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the job's results (rank 0)."""
        return self.rank == 0

    @property
    def is_group_chief(self) -> bool:
        """Whether this process writes its group's logs (rank 0 in its group)."""
        return self.rank_in_group == 0

    @property
    def separate_group(self) -> bool:
        """This job trains one group and meets the others in `exchange_dir`."""
        return self.transport == "directory"

    def scope(self):
        """The group's strategy scope: build members, exchange and optimizer in it."""
        return self.strategy.scope()

    # what the user builds ------------------------------------------------
    def members(self, builder: Callable[[int], Any]) -> list:
        """`[builder(g) for g in local_groups]`: the models this process trains.
        Call it under `scope()`. `builder(g)` must give group g's model (seed
        it with g so that groups start from different weights)."""
        if not callable(builder):
            raise TypeError(f"builder must be a function group -> keras.Model, got {type(builder).__name__}.")
        return [builder(g) for g in self.local_groups]

    def exchange(self):
        """The exchange to pass to `CodistillModel` (None with one group or
        all groups in this process exchanging predictions: the model's own
        local exchange). Call it under `scope()`; one per model."""
        from tf_codistill.exchange import make_exchange

        return make_exchange(self)

    def dataset(self, dataset_fn: Callable[[int], Any]):
        """Training batches for this process, from the user's pipeline.

        Args:
            dataset_fn: `seed -> tf.data.Dataset` of endless `(x, y)` batches
                of one group's batch size, whose order depends only on `seed`
                (e.g. `shuffle(..., seed=seed)`). It is called once per group
                this process trains with that group's seed, after TensorFlow's
                global seed is set to the runtime's base seed.

        Returns:
            What `fit` takes: one process with independent data, a dataset of
            `((x_0, ..., x_{G-1}), (y_0, ..., y_{G-1}))`; else the group's
            stream, of which each of the group's workers takes its slice of
            every batch (together they see what one process would), under
            the group's strategy. Paired workers of different groups read the
            same examples under the predictions exchange.
        """
        import tensorflow as tf

        if not callable(dataset_fn):
            raise TypeError(f"dataset_fn must be a function seed -> tf.data.Dataset, got {dataset_fn!r}.")
        # tf.data shuffles depend on TensorFlow's global seed as well as their
        # own: fix it, so that the order depends on the seed alone and not on
        # what this process did before (e.g. seeding each member's weights).
        tf.random.set_seed(self.seed)
        if self.data_mode == "independent":
            streams = [_checked(dataset_fn(self.group_seed(g)), "dataset_fn") for g in self.local_groups]
            zipped = tf.data.Dataset.zip(tuple(streams))
            return zipped.map(lambda *pairs: (tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)))
        seed = self.group_seed(self.group)
        if self.group_size == 1:
            return _checked(dataset_fn(seed), "dataset_fn")
        index, count = self.rank_in_group, self.group_size

        def worker_fn(context):
            ds = _checked(dataset_fn(seed), "dataset_fn")
            return ds.map(lambda *element: _slice(element, index, count))

        return self.strategy.distribute_datasets_from_function(worker_fn)

    def eval_dataset(self, dataset_fn: Callable[[Any], Any]):
        """Evaluation batches: `dataset_fn(input_context)` as in
        `tf.distribute.Strategy.distribute_datasets_from_function`. Shard by
        `input_context.input_pipeline_id` of `num_input_pipelines` (the
        group's workers) to split the work, with the same number of batches
        on every worker; a function that ignores the context evaluates the
        whole set on every worker, which gives the same metrics."""
        import tensorflow as tf

        if not callable(dataset_fn):
            raise TypeError(
                f"dataset_fn must be a function input_context -> tf.data.Dataset, got {dataset_fn!r}."
            )
        if self.group_size == 1:
            return _checked(dataset_fn(tf.distribute.InputContext()), "dataset_fn")
        return self.strategy.distribute_datasets_from_function(
            lambda ctx: _checked(dataset_fn(ctx), "dataset_fn")
        )

    def group_seed(self, group: int) -> int:
        """The data seed of `group`: one for all under predictions (paired
        workers read the same batches), one per group under weights."""
        if self.data_orders == "independent":
            return seeds.group_seed(self.seed, group, "data")
        return self.seed

    # results ---------------------------------------------------------------
    def gather(self, obj) -> list:
        """Every process's `obj` (picklable), in rank order, on every process.
        Every process must call it at the same point."""
        if not self.distributed:
            return [obj]
        from tf_codistill import topology

        return topology.allgather_object(obj, name="tf_codistill_gather")

    def max_over_job(self, values) -> list[int]:
        """The element-wise maximum of every process's `values` (non-negative
        ints); every process must call it at the same point. In one process,
        `values` itself."""
        if not self.distributed:
            return [int(v) for v in values]
        from tf_codistill import topology

        return topology.allreduce_max(values, name="tf_codistill_preemption")

    def agree_on_epoch(self, epochs):
        """The newest epoch every process holds (for resuming in step), or
        None; in one process the newest of `epochs`."""
        if not self.distributed:
            return max(epochs) if epochs else None
        from tf_codistill import topology

        return topology.agree_on_epoch(epochs)


def _checked(ds, what: str):
    import tensorflow as tf

    if not isinstance(ds, tf.data.Dataset):
        raise TypeError(f"{what} must return a tf.data.Dataset, got {type(ds).__name__}.")
    return ds


def _slice(element, index: int, count: int):
    """Slice `index` of `count` equal slices of every tensor of a batch."""
    import tensorflow as tf

    element = element[0] if len(element) == 1 else element

    def part(t):
        size = tf.shape(t)[0]
        tf.debugging.assert_equal(
            size % count,
            0,
            message=f"a batch does not split into {count} equal slices for the group's workers; "
            "make the group's batch size a multiple of its workers",
        )
        n = size // count
        return t[index * n : (index + 1) * n]

    return tf.nest.map_structure(part, element)


def init(
    num_groups: int = 2,
    exchange: str = "predictions",
    *,
    transport: str = "auto",
    exchange_every: int = 50,
    exchange_dir: str | None = None,
    group: int | None = None,
    data_mode: str | None = None,
    seed: int = 0,
    peer_timeout: float = 300.0,
    on_stale: str = "keep",
    outer_learning_rate: float = 0.7,
    outer_momentum: float = 0.9,
    average_teacher: str = "shared",
    collective_timeout: float = 120.0,
    collective_implementation: str = "auto",
    precision: str = "float32",
    tpu: str | None = None,
) -> Runtime:
    """Reads the launch environment once and returns this process's `Runtime`.

    Call it before any other TensorFlow op: MultiWorkerMirroredStrategy must
    be created first. Nothing in the environment: one process training every
    group. `HOROVOD_RANK` (horovodrun, the project launcher, an MPIJob): this
    process joins the Horovod job, which is split into `num_groups` groups of
    equal size. A Kubeflow TFJob's `TF_CONFIG` of several tasks: the tasks
    become a Horovod job first (`tfjob.bootstrap_from_tf_config`).

    Args:
        num_groups: groups (models) in the job; 1 is the synchronous baseline.
        exchange: ``"predictions"`` (every step), ``"weights"`` (every
            `exchange_every` steps) or ``"average"`` (parameter averaging
            every `exchange_every` steps).
        transport: ``"local"`` (every group in this process), ``"horovod"``
            (a multi-process launch) or ``"directory"`` (weights through
            `exchange_dir`); ``"auto"``: directory with `exchange_dir`,
            horovod when launched as one of several processes, else local.
        exchange_every: weights: refresh the peers' copies every K steps (0:
            never); average: H, the steps between outer steps (>= 1).
        exchange_dir: weights through this shared directory (any
            `tf.io.gfile` path): this job trains group `group` only, and the
            others are separate jobs.
        group: with `exchange_dir`, the group this job trains.
        data_mode: override of the data mode in one process (``"shared"``
            or ``"independent"``); across processes it follows the exchange.
        seed: base seed of the data order.
        peer_timeout: weights: seconds without news before a peer is stale.
        on_stale: weights: ``"keep"`` a stale peer's copy, or ``"drop"`` alpha to 0.
        outer_learning_rate: average: the outer SGD's learning rate (DiLoCo: 0.7).
        outer_momentum: average: the outer SGD's Nesterov momentum (DiLoCo:
            0.9; 0 for none).
        average_teacher: average with alpha > 0: ``"shared"`` (distil toward
            the shared weights of the last outer step) or ``"peers"`` (toward
            the other islands' predictions every step; every island in this
            process).
        collective_timeout: seconds any collective or rendezvous may wait.
        collective_implementation: the all-reduce inside a group of several
            workers: ``"auto"`` (NCCL on GPU workers, RING otherwise),
            ``"ring"`` or ``"nccl"``.
        precision: ``"float32"``, ``"mixed_bfloat16"`` or ``"mixed_float16"``:
            sets Keras's global dtype policy, so call `init` before building
            the members. The task and distillation terms stay float32
            (float16 adds loss scaling).
        tpu: train this group on a Cloud TPU (``"local"`` on a TPU VM, a TPU
            name, or ``"grpc://host:port"``) with TPUStrategy. Horovod does
            not run on TPUs: one group per job, exchanging stale weights
            through `exchange_dir` (e.g. ``gs://...``); not run on a TPU here.

    Raises:
        ValueError / TypeError: a bad argument (the message names it), or a
            launch that does not fit (e.g. 3 processes for 2 groups).
    """
    check_int("num_groups", num_groups, 1)
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}.")
    check_int("exchange_every", exchange_every, 1 if exchange == "average" else 0)
    if (
        not is_number(outer_learning_rate)
        or not math.isfinite(outer_learning_rate)
        or outer_learning_rate <= 0
    ):
        raise ValueError(f"outer_learning_rate must be a finite number > 0, got {outer_learning_rate!r}.")
    if not is_number(outer_momentum) or not 0 <= outer_momentum < 1:
        raise ValueError(f"outer_momentum must be in [0, 1) (0: no momentum), got {outer_momentum!r}.")
    if average_teacher not in AVERAGE_TEACHERS:
        raise ValueError(f"average_teacher must be one of {AVERAGE_TEACHERS}, got {average_teacher!r}.")
    check_int("seed", seed, 0)
    if data_mode is not None and data_mode not in DATA_ORDERS:
        raise ValueError(f"data_mode must be one of {DATA_ORDERS} or None, got {data_mode!r}.")
    for name, value in (("peer_timeout", peer_timeout), ("collective_timeout", collective_timeout)):
        if not is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}.")
    if on_stale not in ON_STALE:
        raise ValueError(f"on_stale must be one of {ON_STALE}, got {on_stale!r}.")
    if collective_implementation not in COLLECTIVE_IMPLEMENTATIONS:
        raise ValueError(
            f"collective_implementation must be one of {COLLECTIVE_IMPLEMENTATIONS}, got {collective_implementation!r}."
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if tpu is not None:
        if not isinstance(tpu, str) or not tpu.strip():
            raise ValueError(f"tpu must be 'local', a TPU name or 'grpc://host:port', got {tpu!r}.")
        if num_groups > 1 and exchange_dir is None:
            raise ValueError(
                "tpu: Horovod does not run on TPUs, so TPU groups exchange stale weights through "
                "storage: pass exchange='weights' with exchange_dir (e.g. gs://bucket/exchange) and group."
            )
    if exchange_dir is not None:
        if exchange != "weights":
            raise ValueError("exchange_dir is for the weights exchange: pass exchange='weights'.")
        if not isinstance(exchange_dir, str) or not exchange_dir.strip():
            raise ValueError(f"exchange_dir must be a directory path, got {exchange_dir!r}.")
        if group is None or not (isinstance(group, int) and 0 <= group < num_groups):
            raise ValueError(
                f"group={group!r}: with exchange_dir each job trains one group; pass group in [0, {num_groups})."
            )
    elif group is not None:
        raise ValueError("group only applies with exchange_dir (each job trains one group).")
    if transport != "auto" and transport not in TRANSPORTS:
        raise ValueError(f"transport must be 'auto' or one of {TRANSPORTS}, got {transport!r}.")

    from tf_codistill import topology

    launched = topology.multi_process_launch()
    if transport == "auto":
        transport = "directory" if exchange_dir is not None else "horovod" if launched else "local"
    if (transport == "directory") != (exchange_dir is not None):
        raise ValueError(
            "transport='directory' and exchange_dir go together: the directory transport reads and "
            "writes the snapshots in exchange_dir."
        )
    if transport == "horovod" and not launched:
        raise ValueError(
            "transport='horovod' needs one process per worker: launch with `python -m tf_codistill.launch`, "
            "horovodrun, an MPIJob or a TFJob, or pass transport='auto'."
        )
    if transport == "local" and launched:
        raise ValueError(
            "transport='local' trains every group in this process, but it was launched as one of "
            "several: pass transport='auto' (horovod)."
        )

    # Data orders: under predictions every group reads the same batches (the
    # peers' logits are on the member's own examples); under weights each
    # group its own. One process may choose otherwise (the paper's
    # Algorithm 1: independent orders, peers run an extra forward pass).
    orders = EXCHANGE_KINDS[exchange] if num_groups > 1 else "shared"
    if launched:
        if data_mode is not None and data_mode != orders:
            raise ValueError(
                f"data_mode={data_mode!r} does not fit the {exchange} exchange across processes: "
                "predictions need every pair to read the same batches (shared), weights let every "
                "group read its own order (independent). Leave data_mode unset."
            )
        from tf_codistill import tfjob

        tfjob.bootstrap_from_tf_config(collective_timeout)  # a TFJob's tasks; no-op under horovodrun
        job_groups = 1 if exchange_dir is not None else num_groups
        if _JOINED and _JOINED["groups"] != job_groups:
            raise ValueError(
                f"this process already joined the job as {_JOINED['groups']} group(s); a process "
                "joins one job: launch each arm as its own job."
            )
        if tpu is not None:
            raise ValueError(
                "tpu: this process was launched as one of several (Horovod or a multi-worker TFJob); "
                "a TPU group is one process driving its TPU: start it on its own."
            )
        if not _JOINED:
            topo, group_set, pair_set = topology.init_horovod(job_groups, collective_timeout)
            strategy = topology.make_group_strategy(topo, collective_timeout, collective_implementation)
            _JOINED.update(groups=job_groups, parts=(topo, group_set, pair_set, strategy))
        topo, group_set, pair_set, strategy = _JOINED["parts"]
        local = (group,) if exchange_dir is not None else (topo.group,)
    else:
        import tensorflow as tf

        topo = group_set = pair_set = None
        if tpu is not None:
            strategy = topology.make_tpu_strategy(tpu)
        else:
            strategy = tf.distribute.get_strategy()
        local = (group,) if exchange_dir is not None else tuple(range(num_groups))
        orders = data_mode or orders
    _set_precision(precision)
    return Runtime(
        num_groups=num_groups,
        exchange_kind=exchange,
        transport=transport,
        data_mode=orders if len(local) > 1 else "shared",
        data_orders=orders,
        local_groups=tuple(local),
        topology=topo,
        strategy=strategy,
        seed=seed,
        exchange_every=exchange_every,
        exchange_dir=exchange_dir,
        peer_timeout=float(peer_timeout),
        on_stale=on_stale,
        outer_learning_rate=float(outer_learning_rate),
        outer_momentum=float(outer_momentum),
        average_teacher=average_teacher,
        pair_set=pair_set,
        group_set=group_set,
    )


def _set_precision(precision: str) -> None:
    import keras

    keras.mixed_precision.set_dtype_policy(precision)
