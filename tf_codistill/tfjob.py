"""A Kubeflow TFJob's workers made a Horovod (Gloo) job, without horovodrun.

A TFJob starts one plain process per replica and injects TF_CONFIG
("environment": "cloud"); nobody runs horovodrun. `bootstrap_from_tf_config`
does horovodrun's part from inside the processes: the first training task
serves Horovod's Gloo rendezvous (`python -m tf_codistill.rendezvous_server`,
a child process), and every task sets the environment that
gloo_run.create_slot_env_vars and create_run_env_vars would have given it.
Everything after that (`topology.init_horovod`, `group_tf_config`,
MultiWorkerMirroredStrategy) runs as under horovodrun. No TensorFlow.
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

__all__ = [
    "TFJobCluster",
    "read_tfjob_config",
    "launched_by_tfjob",
    "bootstrap_from_tf_config",
    "rendezvous_bind_address",
]

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
            [
                sys.executable,
                "-m",
                "tf_codistill.rendezvous_server",
                str(port),
                _BOOTSTRAP_SCOPE,
                "cluster",
                plan,
                host,
            ],
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
