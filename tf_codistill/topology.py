"""World -> replica groups: who trains which model, and with whom.

With `world_size` processes and `num_groups` groups, group g holds the
contiguous ranks `[g * W, (g + 1) * W)` where `W = world_size / num_groups`.
Inside a group, workers are kept in lock-step by MultiWorkerMirroredStrategy.
Across groups, the workers with the same rank in group form a "pair" set
(one worker of every group); prediction exchange all-gathers over it.

Only this module, `tfjob.py` (a TFJob's workers made a Horovod job) and
`exchange/` touch Horovod or TF_CONFIG.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time

from tf_codistill.choices import COLLECTIVE_IMPLEMENTATIONS

__all__ = [
    "Topology",
    "init_horovod",
    "group_tf_config",
    "make_group_strategy",
    "collective_implementation_for",
    "make_tpu_strategy",
    "free_port",
    "multi_process_launch",
    "agree_on_epoch",
    "allreduce_max",
    "allgather_object",
]


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where this process sits. Pure arithmetic; no collectives."""

    rank: int
    world_size: int
    num_groups: int

    def __post_init__(self):
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}.")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"bad rank {self.rank} for world size {self.world_size}.")
        if self.world_size % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} does not divide the world size {self.world_size}: "
                f"every group needs the same number of workers. Launch a multiple of "
                f"{self.num_groups} processes, or choose num_groups among "
                f"{[g for g in range(1, self.world_size + 1) if self.world_size % g == 0]}."
            )

    @property
    def group_size(self) -> int:
        return self.world_size // self.num_groups

    @property
    def group(self) -> int:
        return self.rank // self.group_size

    @property
    def rank_in_group(self) -> int:
        return self.rank % self.group_size

    @property
    def is_group_chief(self) -> bool:
        return self.rank_in_group == 0

    def group_ranks(self, group: int | None = None) -> list[int]:
        g = self.group if group is None else group
        return list(range(g * self.group_size, (g + 1) * self.group_size))

    def pair_ranks(self, rank_in_group: int | None = None) -> list[int]:
        r = self.rank_in_group if rank_in_group is None else rank_in_group
        return [g * self.group_size + r for g in range(self.num_groups)]

    def all_group_ranks(self) -> list[list[int]]:
        return [self.group_ranks(g) for g in range(self.num_groups)]

    def all_pair_ranks(self) -> list[list[int]]:
        return [self.pair_ranks(r) for r in range(self.group_size)]


def init_horovod(num_groups: int, timeout_s: float = 120.0):
    """`hvd.init` with every group's and every pair's process set registered
    statically. Returns `(topology, group_set, pair_set)`.

    `timeout_s` bounds every wait: Horovod's Gloo timeout and its stall
    shutdown (a collective some rank never joins ends the job with an error
    instead of hanging). Values already in the environment win.

    Raises:
        RuntimeError: Horovod is not installed (says how to install it).
        ValueError: num_groups does not divide the world size.
    """
    try:
        import horovod.tensorflow as hvd
    except ImportError as err:
        raise RuntimeError(
            "Horovod is not installed in this environment, and multi-process codistillation "
            "needs it. Install it with `make horovod` (or tools/build_horovod.sh "
            "path/to/python): it builds Horovod 0.28.1 against the installed TensorFlow."
        ) from err

    size = int(os.environ.get("HOROVOD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    topo = Topology(rank=rank, world_size=size, num_groups=num_groups)  # validates before init
    seconds = str(max(1, int(timeout_s)))
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", seconds)
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, int(timeout_s) // 4)))
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", seconds)
    sets = {}
    wanted = []
    for ranks in topo.all_group_ranks() + topo.all_pair_ranks():
        key = tuple(ranks)
        if 1 < len(ranks) < size and key not in sets:
            sets[key] = hvd.ProcessSet(list(ranks))
            wanted.append(sets[key])
    hvd.init(process_sets=wanted)
    if hvd.size() != size or hvd.rank() != rank:
        raise RuntimeError(f"Horovod reports rank {hvd.rank()}/{hvd.size()}, environment {rank}/{size}.")

    def set_for(ranks):
        if len(ranks) == size:
            return hvd.global_process_set
        return sets.get(tuple(ranks))  # None for a set of one process

    return topo, set_for(topo.group_ranks()), set_for(topo.pair_ranks())


def free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _advertised_host() -> str:
    host = os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()
    return "127.0.0.1" if host in ("localhost", "127.0.0.1") else host


def group_tf_config(topo: Topology, timeout_s: float = 120.0, scope: str = "tf_codistill") -> dict:
    """Builds this group's TF_CONFIG: every worker publishes `host:free_port`
    to the Horovod Gloo rendezvous key-value store and reads its group's.

    The store (started by `horovodrun --gloo`, or by the TF_CONFIG bootstrap)
    is used instead of `hvd.allgather_object` because any TensorFlow op
    initialises the eager context, and MultiWorkerMirroredStrategy must be
    created before that ("Collective ops must be configured at program
    startup").

    Raises:
        RuntimeError: no rendezvous store in the environment.
        TimeoutError: a group member did not publish within `timeout_s`.
    """
    from horovod.runner.http.http_client import put_data_into_kvstore, read_data_from_kvstore

    addr = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR")
    port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
    if not addr or not port:
        raise RuntimeError(
            "No Horovod Gloo rendezvous in the environment (HOROVOD_GLOO_RENDEZVOUS_ADDR/PORT). "
            "Start multi-process jobs with `python -m tf_codistill.launch` or `horovodrun --gloo`."
        )
    mine = f"{_advertised_host()}:{free_port()}"
    put_data_into_kvstore(addr, port, scope, f"worker{topo.rank}", mine)
    workers = []
    deadline = time.monotonic() + timeout_s
    for r in topo.group_ranks():
        while True:
            try:
                workers.append(read_data_from_kvstore(addr, port, scope, f"worker{r}"))
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"worker {topo.rank} waited {timeout_s:.0f}s for rank {r} (group {topo.group}) "
                        "to publish its address; is that process running?"
                    ) from None
                time.sleep(0.1)
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": topo.rank_in_group}}


def set_tf_config(config: dict) -> None:
    os.environ["TF_CONFIG"] = json.dumps(config)


def collective_implementation_for(requested: str, num_gpus: int) -> str:
    """The all-reduce MultiWorkerMirroredStrategy should use inside a group:
    `"nccl"` on workers with GPUs, `"ring"` (gRPC, on the host) otherwise,
    unless `requested` names one. Pure: no TensorFlow call.

    Args:
        requested: "auto", "ring" or "nccl".
        num_gpus: GPUs this worker sees.

    Raises:
        ValueError: an unknown name, or "nccl" on a worker without a GPU.
    """
    if requested not in COLLECTIVE_IMPLEMENTATIONS:
        raise ValueError(
            f"collective_implementation must be one of {', '.join(COLLECTIVE_IMPLEMENTATIONS)}; "
            f"got {requested!r}."
        )
    if requested == "nccl" and num_gpus < 1:
        raise ValueError(
            "collective_implementation='nccl' needs GPUs and this worker sees none "
            "(tf.config.list_physical_devices('GPU') is empty): use 'auto' or 'ring'."
        )
    if requested == "auto":
        return "nccl" if num_gpus > 0 else "ring"
    return requested


def make_group_strategy(topo: Topology, timeout_s: float = 120.0, collective_implementation: str = "auto"):
    """The strategy that keeps a group's workers in lock-step: MWMS over the
    group (TF_CONFIG built by `group_tf_config`), or the default strategy for
    a group of one. Call it before any other TensorFlow op in the process.

    Args:
        topo: this process's place.
        timeout_s: how long to wait for the group's other workers to publish
            their addresses.
        collective_implementation: the group's all-reduce: "auto" (NCCL when
            this worker sees a GPU, RING otherwise), "ring" or "nccl".

    Raises:
        ValueError: a bad `collective_implementation` (before any network call).
    """
    import tensorflow as tf

    # Listing physical devices does not initialise the eager context, so it
    # may run before MultiWorkerMirroredStrategy is created.
    gpus = len(tf.config.list_physical_devices("GPU"))
    implementation = collective_implementation_for(collective_implementation, gpus)
    if topo.group_size == 1:
        return tf.distribute.get_strategy()
    set_tf_config(group_tf_config(topo, timeout_s))
    # No CommunicationOptions(timeout_seconds=...): on TF 2.21 (CPU) every
    # collective with a timeout starts a thread that lives until the timeout
    # expires (measured: +600 threads per worker for 300 all-reduces with a
    # 30 s timeout), so a long timeout exhausts the thread limit within a
    # minute of training and the process aborts. A dead group member is
    # detected by MWMS's own peer health check and by Horovod's timeouts.
    kinds = tf.distribute.experimental.CommunicationImplementation
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=kinds.NCCL if implementation == "nccl" else kinds.RING
    )
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def make_tpu_strategy(tpu: str, timeout_s: float = 30.0):
    """A TPUStrategy for one group on a Cloud TPU (TPUClusterResolver,
    connect, `tf.tpu.experimental.initialize_tpu_system`). TPU groups train
    with it and exchange stale weights through `tf.io.gfile` storage
    (`DirectoryTransport("gs://...")`): Horovod does not run on TPUs.

    Args:
        tpu: "local" on a TPU VM, the Cloud TPU's name, or "grpc://host:port"
            of a TPU worker.
        timeout_s: how long to try to reach a "grpc://" address before giving
            up (TensorFlow itself would retry for minutes).

    Returns:
        A `tf.distribute.TPUStrategy`.

    Raises:
        ValueError: `tpu` is empty or not a string.
        RuntimeError: no TPU is reachable there (the message says what was tried).
    """
    if not isinstance(tpu, str) or not tpu.strip():
        raise ValueError(
            f"tpu must name the TPU: 'local' on a TPU VM, the Cloud TPU's name, or "
            f"grpc://host:port; got {tpu!r}."
        )
    hint = (
        "Run on a TPU VM with tpu='local', or give the name (or grpc://host:port) of a TPU this "
        "machine can reach."
    )
    if tpu.startswith("grpc://"):
        host, _, port = tpu[len("grpc://") :].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"tpu={tpu!r}: expected grpc://host:port.")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, timeout_s)).close()
        except OSError as err:
            raise RuntimeError(f"no TPU reachable at tpu={tpu!r} ({err}). {hint}") from None
    import tensorflow as tf

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as err:  # ValueError, URLError, tf.errors.NotFoundError, ...: all mean "no TPU"
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(
            f"no TPU reachable at tpu={tpu!r} ({type(err).__name__}: {text[:200]}). {hint}"
        ) from err
    return tf.distribute.TPUStrategy(resolver)


def agree_on_epoch(epochs) -> int | None:
    """The newest epoch in every process's `epochs` (its intact backups), or
    None when they share none. Every process of the Horovod job must call it
    at the same point (it all-gathers over the global process set): the
    groups of a prediction exchange must resume in step, and the workers of a
    group from the same weights."""
    import horovod.tensorflow as hvd

    everyone = hvd.allgather_object(sorted(int(e) for e in epochs), name="tf_codistill_backup_epochs")
    common = set(everyone[0]).intersection(*map(set, everyone[1:]))
    return max(common) if common else None


def allreduce_max(values, name: str = "tf_codistill_max") -> list[int]:
    """The element-wise maximum of every process's `values` (non-negative
    ints), on every process; all must call it at the same point. On the host:
    a Gloo-only Horovod has no GPU kernels. Bounded by Horovod's Gloo timeout."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    with tf.device("/cpu:0"):
        out = hvd.allreduce(tf.constant(list(values), dtype=tf.int64), op=hvd.Max, name=name)
    return [int(v) for v in out.numpy()]


def multi_process_launch() -> bool:
    """True under horovodrun (or an MPIJob), and for a TFJob of several
    tasks, which `bootstrap_from_tf_config` turns into a Horovod job."""
    from tf_codistill.tfjob import launched_by_tfjob

    return "HOROVOD_RANK" in os.environ or launched_by_tfjob()


def allgather_object(obj, name: str = "tf_codistill_gather") -> list:
    """Every process's picklable `obj`, in rank order, on every process
    (Horovod's global process set). Every process must call it at the same point."""
    import horovod.tensorflow as hvd

    return hvd.allgather_object(obj, name=name)
