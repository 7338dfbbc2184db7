"""World -> replica groups: who trains which model, and with whom.

With `world_size` processes and `num_groups` groups, group g holds the
contiguous ranks `[g * W, (g + 1) * W)` where `W = world_size / num_groups`.
Inside a group, workers are kept in lock-step by MultiWorkerMirroredStrategy.
Across groups, the workers with the same rank in group form a "pair" set
(one worker of every group); prediction exchange all-gathers over it.

Only this module and `exchange/` touch Horovod or TF_CONFIG.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.request

from tf_codistill.choices import COLLECTIVE_IMPLEMENTATIONS

__all__ = [
    "Topology",
    "init_horovod",
    "group_tf_config",
    "make_group_strategy",
    "collective_implementation_for",
    "make_tpu_strategy",
    "free_port",
    "TFJobCluster",
    "read_tfjob_config",
    "launched_by_tfjob",
    "multi_process_launch",
    "bootstrap_from_tf_config",
    "rendezvous_bind_address",
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


# ----------------------------------------------------------- TFJob -> Horovod
# A Kubeflow TFJob starts one plain process per replica and injects TF_CONFIG
# ("environment": "cloud"); nobody runs horovodrun. `bootstrap_from_tf_config`
# does horovodrun's part from inside the processes: the first training task
# serves Horovod's Gloo rendezvous (horovod.runner.http.http_server), and every
# task sets the environment that gloo_run.create_slot_env_vars and
# create_run_env_vars would have given it. Everything after that (init_horovod,
# group_tf_config, MultiWorkerMirroredStrategy) runs as under horovodrun.

RENDEZVOUS_PORT_ENV = "TF_CODISTILL_RENDEZVOUS_PORT"
RENDEZVOUS_BIND_ENV = "TF_CODISTILL_RENDEZVOUS_BIND"
HOST_ALIASES_ENV = "TF_CODISTILL_HOST_ALIASES"
_BOOTSTRAP_SCOPE = "tf_codistill_bootstrap"
_TRAINING_TYPES = ("chief", "master", "worker")  # Horovod rank order
_RENDEZVOUS: dict = {}  # the server, kept alive for the process lifetime (rank 0 only)


@dataclasses.dataclass(frozen=True)
class TFJobCluster:
    """The training tasks of a TFJob's TF_CONFIG, in Horovod rank order
    (chief first, then the workers by index), and where this process sits.
    Hosts have TF_CODISTILL_HOST_ALIASES applied."""

    hosts: tuple[str, ...]
    ports: tuple[int, ...]
    rank: int

    @property
    def size(self) -> int:
        return len(self.hosts)

    @property
    def host(self) -> str:
        return self.hosts[self.rank]

    def slots(self) -> list[dict]:
        """Horovod's slot layout (what `get_host_assignments` computes for
        horovodrun): `local_*` among the tasks on the same host, `cross_*`
        among the tasks with the same local rank."""
        local_rank = [self.hosts[:r].count(h) for r, h in enumerate(self.hosts)]
        slots = []
        for r, h in enumerate(self.hosts):
            cross = [q for q in range(self.size) if local_rank[q] == local_rank[r]]
            slots.append(
                dict(
                    hostname=h,
                    rank=r,
                    size=self.size,
                    local_rank=local_rank[r],
                    local_size=self.hosts.count(h),
                    cross_rank=cross.index(r),
                    cross_size=len(cross),
                )
            )
        return slots


def _host_aliases() -> dict[str, str]:
    text = os.environ.get(HOST_ALIASES_ENV, "").strip()
    aliases = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, address = item.partition("=")
        if not sep or not name.strip() or not address.strip():
            raise ValueError(
                f"{HOST_ALIASES_ENV}={text!r}: expected comma-separated name=address pairs, "
                f"e.g. tfjob-worker-0.ns.svc=127.0.0.1; got {item!r}."
            )
        aliases[name.strip()] = address.strip()
    return aliases


def _split_address(address, where: str) -> tuple[str, int]:
    if not isinstance(address, str):
        raise ValueError(f"TF_CONFIG: {where} must be a 'host:port' string, got {address!r}.")
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")  # [IPv6]:port
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"TF_CONFIG: {where} is {address!r}; expected 'host:port' with a port in 1-65535.")
    return host, int(port)


def read_tfjob_config() -> TFJobCluster | None:
    """The cluster a Kubeflow TFJob described in TF_CONFIG, or None when
    TF_CONFIG is unset or was not written by a cloud controller (no
    `"environment": "cloud"`; e.g. the per-group TF_CONFIG of group_tf_config).

    Raises:
        ValueError: TF_CONFIG is not JSON, or a cloud TF_CONFIG that train.py
            cannot run (parameter servers, an evaluator task, a task index out
            of range, a bad address); the message names the problem.
    """
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON ({err}): {text[:200]!r}") from None
    if not isinstance(config, dict) or config.get("environment") != "cloud":
        return None
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ValueError('TF_CONFIG: expected {"cluster": {...}, "task": {"type": ..., "index": ...}}.')
    if cluster.get("ps"):
        raise ValueError(
            "TF_CONFIG has parameter servers (ps); train.py trains with all-reduce and Horovod: "
            "remove the PS replicas from the TFJob."
        )
    names = {}
    for kind in _TRAINING_TYPES:
        tasks = cluster.get(kind, [])
        if not isinstance(tasks, list):
            raise ValueError(f"TF_CONFIG: cluster[{kind!r}] must be a list of 'host:port', got {tasks!r}.")
        names[kind] = tasks
    if len(names["chief"]) + len(names["master"]) > 1:
        raise ValueError("TF_CONFIG: at most one chief (or master) task; got more.")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in _TRAINING_TYPES:
        raise ValueError(
            f"TF_CONFIG: task type {kind!r} is not supported; train.py runs as chief or worker tasks "
            "(it evaluates at the end of training itself, so no evaluator is needed)."
        )
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(names[kind]):
        raise ValueError(
            f"TF_CONFIG: task index {index!r} is out of range for the {len(names[kind])} {kind} "
            f"task(s) in the cluster."
        )
    aliases = _host_aliases()
    hosts, ports, rank = [], [], None
    for kind_ in _TRAINING_TYPES:
        for i, address in enumerate(names[kind_]):
            if (kind_, i) == (kind, index):
                rank = len(hosts)
            host, port = _split_address(address, f"cluster[{kind_!r}][{i}]")
            hosts.append(aliases.get(host, host))
            ports.append(port)
    pairs = list(zip(hosts, ports))
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"TF_CONFIG: two tasks share an address: {pairs}.")
    return TFJobCluster(hosts=tuple(hosts), ports=tuple(ports), rank=rank)


def launched_by_tfjob() -> bool:
    """True when this process is one of several training tasks of a TFJob
    (a cloud TF_CONFIG) and Horovod's environment is not set yet. A TFJob of
    one task is a single process: it needs no Horovod and runs as one.

    Raises:
        ValueError: as `read_tfjob_config`.
    """
    if "HOROVOD_RANK" in os.environ:
        return False
    cluster = read_tfjob_config()
    return cluster is not None and cluster.size > 1


def multi_process_launch() -> bool:
    """True under horovodrun (or an MPIJob), and for a TFJob of several
    tasks, which `bootstrap_from_tf_config` turns into a Horovod job."""
    return "HOROVOD_RANK" in os.environ or launched_by_tfjob()


def _rendezvous_port(cluster: TFJobCluster) -> int:
    text = os.environ.get(RENDEZVOUS_PORT_ENV)
    if text is None or not text.strip():
        return cluster.ports[0]  # rank 0's own TF_CONFIG port: nothing else binds it
    if not text.strip().isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{RENDEZVOUS_PORT_ENV}={text!r}: expected a port in 1-65535.")
    return int(text)


def _gloo_iface(host: str) -> str | None:
    """The network interface holding the address `host` resolves to (what
    horovodrun's driver would have found), or None to let Gloo resolve this
    machine's hostname itself."""
    try:
        import psutil

        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET)}
        for iface, infos in psutil.net_if_addrs().items():
            if any(i.family == socket.AF_INET and i.address in addresses for i in infos):
                return iface
    except (ImportError, OSError):
        pass
    return None


# The rendezvous runs in a child process of rank 0, as it does in horovodrun's
# own process: rank 0's main thread holds the GIL while TensorFlow blocks in
# MultiWorkerMirroredStrategy's start-up (TFE_EnableCollectiveOps waits for
# the group's other workers), so a server thread in rank 0 would stop
# answering the workers that still need the store, and the job would hang.
_SERVER_SCRIPT = r"""
import json, sys, threading
from horovod.runner.common.util.hosts import SlotInfo
from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

port, scope, key, host = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[5]
plan = json.loads(sys.argv[4])
try:
    httpd = RendezvousHTTPServer((host, port), RendezvousHandler, False)
except OSError as err:
    print(f"error: {err}", flush=True)
    sys.exit(1)
httpd.init([SlotInfo(**slot) for slot in plan["slots"]])  # scope sizes, as gloo_run does
httpd.cache[scope] = {key: json.dumps(plan["cluster"]).encode()}
threading.Thread(target=lambda: (sys.stdin.read(), httpd.shutdown()), daemon=True).start()
print("ready", flush=True)
httpd.serve_forever()  # until rank 0 closes our stdin (it exited, or at its exit)
httpd.server_close()
"""


def _local_address(address: str) -> bool:
    """True when `address` (an IP) belongs to this machine: a socket binds it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


def rendezvous_bind_address(cluster: TFJobCluster) -> str:
    """Where rank 0 serves the rendezvous: this pod's own address, not every
    interface. In order: TF_CODISTILL_RENDEZVOUS_BIND (as given; "" or
    0.0.0.0 for every interface), POD_IP (the Kubernetes downward API, set by
    the manifests in deploy/k8s), the IPv4 address rank 0's TF_CONFIG host
    resolves to when it is one of this machine's. "" (every interface) only
    when none of these is known, with a note on stdout."""
    if RENDEZVOUS_BIND_ENV in os.environ:
        return os.environ[RENDEZVOUS_BIND_ENV].strip()
    pod_ip = os.environ.get("POD_IP", "").strip()
    if pod_ip:
        return pod_ip
    try:
        infos = socket.getaddrinfo(cluster.host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        infos = []
    for info in infos:
        if _local_address(info[4][0]):
            return info[4][0]
    print(
        f"note: serving the Horovod rendezvous on every interface: {cluster.host!r} does not resolve "
        f"to an address of this machine and neither POD_IP nor {RENDEZVOUS_BIND_ENV} is set.",
        flush=True,
    )
    return ""


class _RendezvousProcess:
    """Horovod's Gloo rendezvous server (RendezvousHTTPServer, initialised with
    the slot plan as horovodrun's RendezvousServer.init does) on a fixed port
    of one address (`host`; "" for every interface), in a child process that
    ends when this process closes its stdin or dies."""

    def __init__(self, port: int, slots: list[dict], cluster: dict, timeout_s: float, host: str = ""):
        plan = json.dumps({"slots": slots, "cluster": cluster})
        self.port = port
        self.host = host
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER_SCRIPT, str(port), _BOOTSTRAP_SCOPE, "cluster", plan, host],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], max(1.0, timeout_s))
        line = self.proc.stdout.readline().strip() if ready else ""
        if line != "ready":
            self.stop()
            if line.startswith("error:"):
                where = f"{host}:{port}" if host else f"port {port}"
                raise RuntimeError(
                    f"cannot serve the Horovod rendezvous on port {port} ({where}: {line[6:].strip()}); "
                    f"another process holds it, or the address is not this machine's. Choose a free "
                    f"port for every worker with {RENDEZVOUS_PORT_ENV} (and the address with "
                    f"{RENDEZVOUS_BIND_ENV} or POD_IP)."
                )
            raise RuntimeError(
                f"the Horovod rendezvous server (port {port}) did not start within {timeout_s:.0f}s "
                f"(exit status {self.proc.poll()})."
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _kv_url(addr: str, port: int, key: str) -> str:
    return f"http://{addr}:{port}/{_BOOTSTRAP_SCOPE}/{key}"


# Straight to the rendezvous: an http_proxy in a pod's environment must not reroute it.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_for_rendezvous(cluster: TFJobCluster, port: int, timeout_s: float) -> str:
    """Waits (bounded) until rank 0's rendezvous answers with the same
    cluster as ours; returns its IPv4 address."""
    host = cluster.hosts[0]
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while True:
        remaining = deadline - time.monotonic()
        try:
            addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
            with _OPENER.open(_kv_url(addr, port, "cluster"), timeout=max(0.5, min(5.0, remaining))) as r:
                theirs = json.loads(r.read().decode())
            mine = {"hosts": list(cluster.hosts), "ports": list(cluster.ports)}
            if theirs != mine:
                raise RuntimeError(
                    f"worker {cluster.rank}'s TF_CONFIG cluster {mine} differs from worker 0's {theirs}; "
                    "every task of a TFJob must see the same cluster."
                )
            return addr
        except (OSError, ValueError) as err:  # unresolvable, refused, 404 until ready, timeout
            last = str(err)
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"worker {cluster.rank} waited {timeout_s:.0f}s for the Horovod rendezvous that worker 0 "
                f"serves at {host}:{port} ({last}); is worker 0 running, and is the port reachable? "
                f"(--collective_timeout bounds the wait; {RENDEZVOUS_PORT_ENV} sets the port.)"
            )
        time.sleep(0.25)


def bootstrap_from_tf_config(timeout_s: float = 120.0) -> bool:
    """Makes a TFJob's workers a Horovod (Gloo) job without horovodrun.

    With a cloud TF_CONFIG of several training tasks and no Horovod
    environment yet: rank 0 (the chief, else worker 0) serves Horovod's Gloo
    rendezvous on its own address (see `rendezvous_bind_address`), on port
    TF_CODISTILL_RENDEZVOUS_PORT (default: its own
    TF_CONFIG port, which nothing else binds: group_tf_config gives
    MultiWorkerMirroredStrategy fresh ports), every task waits for it (at
    most `timeout_s`) and sets HOROVOD_RANK/SIZE, LOCAL_RANK/SIZE,
    CROSS_RANK/SIZE, HOSTNAME, CONTROLLER=gloo, CPU_OPERATIONS=gloo,
    GLOO_RENDEZVOUS_ADDR/PORT and, where found, GLOO_IFACE and
    NCCL_SOCKET_IFNAME, as horovodrun --gloo would. Creates no TensorFlow op.

    TF_CODISTILL_HOST_ALIASES="name=address,..." rewrites TF_CONFIG's host
    names (for tests on one machine, or a port-forward).

    Returns:
        True when it set Horovod up; False when there is nothing to do
        (Horovod already launched, no cloud TF_CONFIG, or a single task).

    Raises:
        ValueError: a cloud TF_CONFIG train.py cannot run (see read_tfjob_config).
        RuntimeError: rank 0 cannot bind the rendezvous port; the tasks disagree on the cluster.
        TimeoutError: the rendezvous did not answer within `timeout_s`.
    """
    if not launched_by_tfjob():
        return False
    cluster = read_tfjob_config()
    port = _rendezvous_port(cluster)
    slots = cluster.slots()
    if cluster.rank == 0 and "server" not in _RENDEZVOUS:
        described = {"hosts": list(cluster.hosts), "ports": list(cluster.ports)}
        server = _RendezvousProcess(port, slots, described, timeout_s, rendezvous_bind_address(cluster))
        _RENDEZVOUS["server"] = server  # alive for this process's lifetime
        atexit.register(server.stop)
    addr = _wait_for_rendezvous(cluster, port, timeout_s)
    slot = slots[cluster.rank]
    env = {
        "HOROVOD_HOSTNAME": cluster.host,
        "HOROVOD_RANK": slot["rank"],
        "HOROVOD_SIZE": slot["size"],
        "HOROVOD_LOCAL_RANK": slot["local_rank"],
        "HOROVOD_LOCAL_SIZE": slot["local_size"],
        "HOROVOD_CROSS_RANK": slot["cross_rank"],
        "HOROVOD_CROSS_SIZE": slot["cross_size"],
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": port,
    }
    os.environ.update({k: str(v) for k, v in env.items()})
    iface = _gloo_iface(cluster.host)
    if iface is not None:  # values the user set win
        os.environ.setdefault("HOROVOD_GLOO_IFACE", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    return True


def allgather_object(obj, name: str = "tf_codistill_gather") -> list:
    """Every process's picklable `obj`, in rank order, on every process
    (Horovod's global process set). Every process must call it at the same point."""
    import horovod.tensorflow as hvd

    return hvd.allgather_object(obj, name=name)
