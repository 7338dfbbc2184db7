"""Slow-network benchmark: sync training against codistillation when the
workers sit on different hosts joined by slow links.

    sudo .venv/bin/python bench/bench_slow_network.py [--rate_mbit=100] [--delay_ms=1]
        [--hosts=2] [--steps=300] [--model=mlp_wide] [--dataset=digits] [--timeout=1200]

Builds `--hosts` "hosts" on this machine: one Linux network namespace each
(`tfcd-host<i>`, address 10.77.0.<i+1>/24 on its `eth0`), joined through a
bridge in a `tfcd-switch` namespace by veth pairs. Every link is shaped to
`--rate_mbit` in both directions, and each host's egress also gets
`--delay_ms` of one-way delay (tc netem; where the kernel has no netem, the
rate is shaped with htb and the delay is not applied: the output says so).
Nothing is added to the root namespace's network. The hosts keep this
machine's /etc/hosts, where the host name may resolve to loopback: Gloo binds
to the interface that holds each worker's address (HOROVOD_GLOO_IFACE, set by
the TF_CONFIG bootstrap; tools/build_horovod.sh patches Horovod 0.28.1 so that
its process sets honour it, see tests/test_gloo_iface.py).

One worker per host, started as a TFJob-like set of plain processes
(`ip netns exec tfcd-host<i> python bench/bench_slow_network.py --_worker
HIDDEN train.py-flags...`, which registers `mlp_wide` and runs train.py as
__main__, with a cloud TF_CONFIG
naming the hosts' addresses: the workers make themselves a Horovod job,
tf_codistill.tfjob.bootstrap_from_tf_config). Arms one after the
other, same global batch, same steps, same per-worker batch:

* sync: one group of N workers (MultiWorkerMirroredStrategy across the
  hosts: a gradient all-reduce every step);
* codistill, predictions: N groups of one worker, logits all-gathered over
  Horovod (Gloo) every step (`--exchange=predictions --transport=horovod`);
* codistill, stale weights: N groups of one worker, flattened weights
  all-gathered over Horovod every `--exchange_every` steps (default 50);
* diloco / local_sgd (not in the default `--arms`): N groups of one worker
  that all-reduce their parameter deltas over Horovod every
  `--exchange_every` steps, with DiLoCo's outer Nesterov step (outer lr 0.7,
  momentum 0.9) or plain averaging (outer lr 1, no momentum).

Prints steps per second of each arm (from results.json), the bytes each
worker sends per step as train.py accounts them and as measured on the wire
(the hosts' `eth0` tx counters over the steady part of training, see
`WireCounters`), the test accuracy per epoch reached, the time to
`--target_accuracy` (measured: the `epoch_seconds` train.py records, summed
over the epochs up to the first whose test accuracy reaches the target;
evaluation time left out), and the throughput ratio of each codistillation
arm to sync with the issue's target (>= 1.5x at 100 Mbit/s).

`bench/sweep_network.py` runs this over link rates, models and host counts
and fits `bench/costmodel.py` to the points.

Model: `mlp_wide` (default) is models/mlp.py built with `--mlp_hidden`
units (1,000: 1,076,010 parameters on digits) registered for this benchmark
only, so the gradient all-reduce matters; any name in models.MODELS works
too (resnet20 has 272,474 parameters; cnn1d and mlp are far smaller).

Needs root (it creates network namespaces); without root it says so and
exits 0, and likewise where namespaces or traffic shaping cannot be set up
here (the message names the failing command and its error). Bounded by
`--timeout` (each arm also by `--run_timeout`; a few seconds more for
stopping the workers and the cleanup); the namespaces and every
process started in them are removed at exit, on SIGINT/SIGTERM/SIGHUP too,
and leftovers of an earlier, killed run are removed at start
(`--cleanup_only` does just that).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "tfcd-"
SWITCH_NS = f"{PREFIX}switch"
SUBNET = "10.77.0"
HOST_IFACE = "eth0"
NETNS_ETC = "/etc/netns"  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*
LOCK_PATH = os.path.join(tempfile.gettempdir(), "tfcd-bench-slow-network.lock")
WIDE_MLP = "mlp_wide"
WIDE_MLP_BASE = "mlp"  # the registry entry it widens (train.py validates --model against the registry)
NEEDS_ROOT = "bench_slow_network: needs root (creates network namespaces); skipping."


def host_ns(i: int) -> str:
    return f"{PREFIX}host{i}"


def host_addr(i: int) -> str:
    return f"{SUBNET}.{i + 1}"


class Skip(Exception):
    """This machine cannot run the benchmark (not a benchmark failure): exit 0."""


class Interrupted(BaseException):
    """SIGINT / SIGTERM / SIGHUP: unwind through every `finally` (cleanup)."""


# ------------------------------------------------------------------ commands
def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_namespaces(verbose: bool = False) -> list[str]:
    """Removes every namespace of this benchmark (name prefix `tfcd-`) and
    ends the processes still inside them (only this benchmark starts
    processes there). Deleting a namespace destroys its veths and bridge.
    Also removes their /etc/netns/tfcd-* files. Idempotent."""
    removed = []
    for ns in namespaces():
        if not ns.startswith(PREFIX):
            continue
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:  # let the kernel reap them
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            time.sleep(0.1)
        sh("ip", "netns", "del", ns, check=False)
        removed.append(ns)
    for name in os.listdir(NETNS_ETC) if os.path.isdir(NETNS_ETC) else []:
        if name.startswith(PREFIX):
            shutil.rmtree(os.path.join(NETNS_ETC, name), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(NETNS_ETC)  # only when empty
    if verbose and removed:
        print(f"removed namespaces: {', '.join(removed)}", flush=True)
    return removed


# ------------------------------------------------------------------- network
class SlowNetwork:
    """`hosts` namespaces on a bridge, links shaped to `rate_mbit` with
    `delay_ms` one-way delay on each host's egress."""

    def __init__(self, hosts: int, rate_mbit: float, delay_ms: float):
        self.hosts = hosts
        self.rate_mbit = rate_mbit
        self.delay_ms = delay_ms
        self.shaper = None  # "netem" or "htb"
        self.notes: list[str] = []

    def create(self) -> None:
        try:
            sh("ip", "netns", "add", SWITCH_NS)
        except RuntimeError as err:
            raise Skip(f"cannot create a network namespace here: {err}") from None
        try:
            sh("ip", "-n", SWITCH_NS, "link", "set", "lo", "up")
            sh("ip", "-n", SWITCH_NS, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", SWITCH_NS, "link", "set", "br0", "up")
            for i in range(self.hosts):
                ns, port = host_ns(i), f"port{i}"
                sh("ip", "netns", "add", ns)
                # Both ends created straight in their namespaces: nothing in the root namespace.
                sh(
                    "ip",
                    "-n",
                    ns,
                    "link",
                    "add",
                    HOST_IFACE,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    port,
                    "netns",
                    SWITCH_NS,
                )
                sh("ip", "-n", ns, "addr", "add", f"{host_addr(i)}/24", "dev", HOST_IFACE)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("ip", "-n", ns, "link", "set", HOST_IFACE, "up")
                sh("ip", "-n", SWITCH_NS, "link", "set", port, "master", "br0")
                sh("ip", "-n", SWITCH_NS, "link", "set", port, "up")
        except RuntimeError as err:
            raise Skip(f"cannot build the veth/bridge network: {err}") from None
        for i in range(self.hosts):
            self._shape(host_ns(i), HOST_IFACE, delay=True)  # host -> switch
            self._shape(SWITCH_NS, f"port{i}", delay=False)  # switch -> host (full duplex)

    def _shape(self, ns: str, dev: str, delay: bool) -> None:
        rate = f"{self.rate_mbit:g}mbit"
        if self.shaper in (None, "netem"):
            args = [
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "netem",
                "rate",
                rate,
                "limit",
                "100000",
            ]
            if delay and self.delay_ms > 0:
                args += ["delay", f"{self.delay_ms:g}ms"]
            proc = sh(*args, check=False)
            if proc.returncode == 0:
                self.shaper = "netem"
                return
            if self.shaper == "netem":
                raise RuntimeError(f"`{' '.join(args)}` failed: {proc.stderr.strip()}")
            self.notes.append(
                f"tc netem is not available in this kernel ({proc.stderr.strip()}; "
                "CONFIG_NET_SCH_NETEM): links shaped with htb"
                + (f", and the {self.delay_ms:g} ms delay is NOT applied" if self.delay_ms > 0 else "")
            )
            self.shaper = "htb"
        try:
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
            sh(
                "tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                "rate", rate, "ceil", rate, "quantum", "60000",
            )  # fmt: skip
        except RuntimeError as err:
            raise Skip(f"cannot shape the links (neither netem nor htb works here): {err}") from None

    def describe(self) -> str:
        delay = f"{self.delay_ms:g} ms one-way delay" if self.shaper == "netem" else "no added delay"
        return (
            f"{self.hosts} hosts (namespaces {', '.join(host_ns(i) for i in range(self.hosts))}; "
            f"{', '.join(host_addr(i) for i in range(self.hosts))}) on a bridge; every link "
            f"{self.rate_mbit:g} Mbit/s each way, {delay} ({self.shaper})"
        )


_LINK_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
while True:  # ping-pong until a 'B' byte, then swallow the bulk and acknowledge
    b = c.recv(1)
    if not b or b == b"B":
        break
    c.sendall(b)
n = int(sys.argv[3]); got = 0
while got < n:
    d = c.recv(1 << 20)
    if not d:
        break
    got += len(d)
c.sendall(b"k")
"""

_LINK_CLIENT = r"""
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(20):
    t = time.perf_counter(); c.sendall(b"p"); c.recv(1); rtts.append(time.perf_counter() - t)
n = int(sys.argv[3]); c.sendall(b"B")
t = time.perf_counter(); c.sendall(b"\0" * n); c.recv(1); dt = time.perf_counter() - t
print(json.dumps({"rtt_ms": 1000 * sorted(rtts)[len(rtts) // 2], "mbit_s": n * 8 / dt / 1e6}))
"""


def check_link(nbytes: int, timeout: float) -> dict:
    """Median RTT and bulk throughput host0 -> host1 (plain TCP)."""
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            host_ns(1),
            sys.executable,
            "-c",
            _LINK_SERVER,
            host_addr(1),
            "5001",
            str(nbytes),
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("link check: the server in host1 did not start")
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                host_ns(0),
                sys.executable,
                "-c",
                _LINK_CLIENT,
                host_addr(1),
                "5001",
                str(nbytes),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(f"link check failed: {out.stderr.strip()[-500:]}")
        return json.loads(out.stdout)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


# ------------------------------------------------------------ wire counters
_COUNTER = r"""
import sys, time
base = "/sys/class/net/%s/statistics/" % sys.argv[1]
period = float(sys.argv[2])
while True:
    with open(base + "tx_bytes") as t, open(base + "rx_bytes") as r:
        print(time.monotonic(), t.read().strip(), r.read().strip(), flush=True)
    time.sleep(period)
"""


class WireCounters:
    """Bytes on the wire per training step, from the hosts' interface counters.

    One small process per host namespace prints its `eth0` tx/rx byte
    counters (`/sys/class/net/eth0/statistics/`, read inside the namespace:
    Ethernet frames, so TCP/IP headers and ACKs included) every `period`
    seconds; a thread here pairs each sample with the steps the arm has
    logged so far (lines of rank 0's `steps.rank0.jsonl`, written and flushed
    after every step). `per_step()` is the bytes sent per worker per step
    over training: from the first sample at or after `skip` (1) steps to the
    first one after the final step (setup, the initial weight broadcast and
    refresh at step 0 left out; the per-epoch evaluations, the weights arm's
    later refreshes and at most one sampling period after the last step
    included). Read the weights arm's figure over runs of several refresh
    periods: it amortises the refreshes that fall inside the window."""

    def __init__(self, hosts: int, steps_file: str, period: float = 0.25):
        import threading

        self.hosts, self.steps_file, self.period = hosts, steps_file, period
        self.samples: list[list[tuple[float, int, int, int]]] = [[] for _ in range(hosts)]
        self.procs: list[subprocess.Popen] = []
        self._threads = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(hosts)]

    def _steps(self) -> int:
        try:
            with open(self.steps_file, "rb") as f:
                return f.read().count(b"\n")
        except OSError:
            return 0

    def _read(self, i: int) -> None:
        for line in self.procs[i].stdout:
            parts = line.split()
            if len(parts) == 3:
                self.samples[i].append((float(parts[0]), int(parts[1]), int(parts[2]), self._steps()))

    def start(self) -> None:
        for i in range(self.hosts):
            self.procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        host_ns(i),
                        sys.executable,
                        "-c",
                        _COUNTER,
                        HOST_IFACE,
                        str(self.period),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    start_new_session=True,
                    preexec_fn=_pdeathsig,
                )
            )
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for t in self._threads:
            t.join(timeout=2)

    def per_step(self, total_steps: int, skip: int | None = None) -> dict | None:
        """{'tx_bytes_per_step', 'rx_bytes_per_step' (per worker, mean of
        hosts), 'window_steps', 'window_seconds', 'window_steps_per_second'}
        or None when too few samples fell inside training."""
        skip = 1 if skip is None else skip
        tx = rx = 0.0
        steps = seconds = None
        for samples in self.samples:
            inside = [s for s in samples if skip <= s[3] < total_steps]
            # Through the last step: the first sample at the end too (at most
            # one period of what follows training: the final evaluation).
            inside += [s for s in samples if s[3] >= total_steps][:1]
            if len(inside) < 2 or inside[-1][3] <= inside[0][3]:
                return None
            a, b = inside[0], inside[-1]
            n = b[3] - a[3]
            tx += (b[1] - a[1]) / n
            rx += (b[2] - a[2]) / n
            steps, seconds = n, b[0] - a[0]
        return {
            "tx_bytes_per_step": tx / self.hosts,
            "rx_bytes_per_step": rx / self.hosts,
            "window_steps": steps,
            "window_seconds": seconds,
            "window_steps_per_second": steps / seconds if seconds else None,
        }


# --------------------------------------------------------------------- arms
ARMS = {  # name: (label, train.py flags, one group per host?)
    "sync": ("sync (MWMS across hosts)", ["--mode=sync"], False),
    "predictions": (
        "codistill, predictions every step",
        ["--mode=codistill", "--exchange=predictions", "--transport=horovod"],
        True,
    ),
    "weights": ("codistill, stale weights every {k}", ["--mode=codistill", "--exchange=weights"], True),
    # Parameter averaging every K steps: DiLoCo's outer Nesterov step at its defaults
    # (outer lr 0.7, momentum 0.9) and plain averaging (local SGD: outer lr 1, no momentum).
    "diloco": ("DiLoCo, averaging every {k}", ["--mode=codistill", "--exchange=average"], True),
    "local_sgd": (
        "local SGD, averaging every {k}",
        ["--mode=codistill", "--exchange=average", "--outer_lr=1", "--outer_momentum=0"],
        True,
    ),
    # Averaging islands that also codistil: averaging every K steps, and every step each island
    # distils toward the other island's predictions on its batch (an all-gather of the logits).
    "local_sgd_distill": (
        "local SGD every {k} + predictions",
        [
            "--mode=codistill", "--exchange=average", "--outer_lr=1", "--outer_momentum=0",
            "--alpha=1", "--average_teacher=peers",
        ],
        True,
    ),
}  # fmt: skip
PERIODIC = ("weights", "diloco", "local_sgd", "local_sgd_distill")  # exchange every --exchange_every
# The cost model's arm for each of this benchmark's (bench/costmodel.py).
COSTMODEL_ARM = {
    "sync": "sync",
    "predictions": "predictions",
    "weights": "weights",
    "diloco": "average",
    "local_sgd": "average",
    "local_sgd_distill": "average_predictions",
}
INPUT_VALUES = {"digits": 64, "mnist1d": 40}  # values per example (8 x 8 images; 40-sample signals)
COSTMODEL_JSON = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "docs",
    "results",
    "network",
    "costmodel.json",
)


def _pdeathsig():
    """Children die with this process even if it is SIGKILLed (preserved
    across `ip netns exec`'s exec)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def worker_env(tf_config: dict, threads: int) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HOROVOD_", "TF_CODISTILL_"))
        and k
        not in (
            "TF_CONFIG",
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
        )
    }
    env.update(
        TF_CONFIG=json.dumps(tf_config),
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        TF_NUM_INTRAOP_THREADS=str(threads),
        TF_NUM_INTEROP_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
    )
    return env


class Job:
    """One arm: a plain process per host, each in its namespace."""

    def __init__(self, arm: str, args, workdir: str, port: int):
        self.arm, self.args, self.workdir, self.port = arm, args, workdir, port
        self.procs: list[subprocess.Popen] = []
        self.logs: list[str] = []

    def train_args(self) -> list[str]:
        _, flags, grouped = ARMS[self.arm]
        out = [
            *flags,
            f"--model={self.args.model}",
            f"--dataset={self.args.dataset}",
            f"--batch_size={self.args.batch_size}",
            f"--steps={self.args.steps}",
            "--verbose=0",
            f"--collective_timeout={self.args.collective_timeout}",
            f"--seed={self.args.seed}",
            f"--workdir={self.workdir}",
        ]
        if grouped:
            out.append(f"--num_groups={self.args.hosts}")
        if self.arm in PERIODIC:
            out.append(f"--exchange_every={self.args.exchange_every}")
        if self.args.data_dir:
            out.append(f"--data_dir={self.args.data_dir}")
        return out + list(self.args.train_flag)

    def start(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        workers = [f"{host_addr(i)}:{self.port}" for i in range(self.args.hosts)]
        for i in range(self.args.hosts):
            config = {
                "cluster": {"worker": workers},
                "task": {"type": "worker", "index": i},
                "environment": "cloud",
            }
            cmd = [
                "ip", "netns", "exec", host_ns(i), sys.executable, os.path.abspath(__file__),
                "--_worker", str(self.args.mlp_hidden), *self.train_args(),
            ]  # fmt: skip
            log = os.path.join(self.workdir, f"worker{i}.log")
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=REPO,
                        env=worker_env(config, self.args.threads),
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        preexec_fn=_pdeathsig,
                    )
                )

    def wait(self, timeout: float) -> str | None:
        """None on success, else what went wrong. Ends every worker on a failure or the deadline."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    i, code = failed[0]
                    return f"worker {i} exited with status {code}:\n{self.tail(i)}"
                if all(c == 0 for c in codes):
                    return None
                if time.monotonic() > deadline:
                    return (
                        f"did not finish within {timeout:.0f} s (--run_timeout / --timeout)\n{self.tail(0)}"
                    )
                time.sleep(0.2)
        finally:
            self.stop()

    def tail(self, i: int, chars: int = 2500) -> str:
        with contextlib.suppress(OSError), open(self.logs[i]) as f:
            return "".join(f"    [worker {i}] {line}" for line in f.read()[-chars:].splitlines(True))
        return ""

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def results(self) -> dict:
        with open(os.path.join(self.workdir, "results.json")) as f:
            run = json.load(f)["runs"][0]
        curves, seconds = [], []
        for r in range(self.args.hosts):
            path = os.path.join(self.workdir, self.mode, f"history.rank{r}.json")
            if os.path.exists(path):  # group chiefs only
                with open(path) as f:
                    h = json.load(f)
                key = (
                    "val_accuracy"
                    if "val_accuracy" in h
                    else next(k for k in h if k.endswith("val_accuracy"))
                )
                curves.append(h[key])
                seconds.append(h.get("epoch_seconds", []))
        run["val_accuracy_curve"] = [sum(v) / len(v) for v in zip(*curves)] if curves else []
        # The job's epoch lasts as long as its slowest group chief's.
        run["epoch_seconds_curve"] = [max(v) for v in zip(*seconds)] if seconds else []
        run["steps_per_epoch"] = None
        with contextlib.suppress(OSError), open(self.logs[0]) as f:
            match = re.search(r"epochs of (\d+) steps", f.read())
            run["steps_per_epoch"] = int(match.group(1)) if match else None
        return run

    @property
    def mode(self) -> str:
        return "sync" if self.arm == "sync" else "codistill"

    def steps_file(self) -> str:
        return os.path.join(self.workdir, self.mode, "steps.rank0.jsonl")


def summarise(arm: str, run: dict, args) -> dict:
    steps_s = run["examples_per_second"] / args.batch_size
    curve = run["val_accuracy_curve"]
    epochs = run["epochs"]
    reached = next((e + 1 for e, acc in enumerate(curve) if acc >= args.target_accuracy), None)
    epoch_seconds = run.get("epoch_seconds_curve") or []
    if reached is None:
        to_target = None
    elif len(epoch_seconds) >= reached:
        # Measured: training seconds of the epochs up to the first one that
        # reaches the target (evaluation left out).
        to_target = sum(epoch_seconds[:reached])
    else:  # a train.py without epoch_seconds: the old equal-epochs estimate
        to_target = run["train_seconds"] * reached / epochs
    accs = [g["test_accuracy"] for g in run["groups"]]
    wire = run.get("wire") or {}
    # Steady state: the epochs after the first (which traces the step function).
    per_epoch = run.get("steps_per_epoch")
    steady = None
    if per_epoch and len(epoch_seconds) >= 2 and sum(epoch_seconds[1:]) > 0:
        steady = (run["steps"] - per_epoch) / sum(epoch_seconds[1:])
    return {
        "arm": arm,
        "steps_per_second": steps_s,
        "steady_steps_per_second": steady,
        "train_seconds": run["train_seconds"],
        "wall_seconds": run["wall_seconds"],
        "steps": run["steps"],
        "epochs": epochs,
        "epochs_to_target": reached,
        "steps_to_target": None if reached is None else reached * run["steps"] // epochs,
        "seconds_to_target": to_target,
        "epoch_seconds": epoch_seconds,
        "test_accuracy": sum(accs) / len(accs),
        "best_val_accuracy": max(curve) if curve else None,
        "ensemble_test_accuracy": run.get("ensemble_test_accuracy"),
        "val_accuracy_per_epoch": curve,
        "params": run["params_per_model"],
        "bytes_sent_per_step": run["bytes_sent_per_step"],
        "wire_tx_bytes_per_step": wire.get("tx_bytes_per_step"),
        "wire_rx_bytes_per_step": wire.get("rx_bytes_per_step"),
        "wire_window_steps": wire.get("window_steps"),
        "wire_window_steps_per_second": wire.get("window_steps_per_second"),
        "exchange": run["exchange"],
        "peer_refresh_seconds": run.get("peer_refresh_seconds"),
    }


def print_report(rows: list[dict], args, network: SlowNetwork, link: dict | None) -> dict:
    print()
    print(f"network: {network.describe()}")
    for note in network.notes:
        print(f"  note: {note}")
    if link:
        print(
            f"  measured host0 -> host1: {link['mbit_s']:.1f} Mbit/s bulk TCP, median RTT {link['rtt_ms']:.2f} ms"
        )
    params = rows[0]["params"] if rows else None
    if params is not None:
        verdict = "meets" if params >= 1_000_000 else "does NOT meet"
        print(
            f"model: {args.model} on {args.dataset}: {params:,} parameters ({verdict} the >= 1M requirement)"
        )
    print(
        f"global batch {args.batch_size} ({args.batch_size // args.hosts} per worker), {rows[0]['steps'] if rows else args.steps} "
        f"steps per model, one worker per host, target test accuracy {args.target_accuracy:g}"
    )
    print()
    head = (
        f"{'arm':40s} {'steps/s':>8s} {'bytes/step sent':>16s} {'on the wire':>12s} {'train s':>8s} {'test acc':>8s} "
        f"{'to target':>15s} {'ratio':>6s}"
    )
    print(head)
    print("-" * len(head))
    sync = next((r for r in rows if r["arm"] == "sync"), None)
    for r in rows:
        label = ARMS[r["arm"]][0].format(k=args.exchange_every)
        if r["seconds_to_target"] is None:
            target = "not reached"
        else:
            target = f"{r['seconds_to_target']:.1f} s/{r['steps_to_target']} st"
        ratio = f"{r['steps_per_second'] / sync['steps_per_second']:.2f}x" if sync else "-"
        print(
            f"{label:40s} {r['steps_per_second']:8.2f} {r['bytes_sent_per_step']:16,.0f} "
            f"{'-' if r['wire_tx_bytes_per_step'] is None else format(r['wire_tx_bytes_per_step'], '12,.0f'):>12s} "
            f"{r['train_seconds']:8.1f} {r['test_accuracy']:8.4f} {target:>15s} {ratio:>6s}"
        )
    print()
    print(
        "steps/s: examples_per_second / global batch from results.json (slowest worker); bytes/step sent: "
        "accounted by train.py; on the wire: eth0 tx bytes per worker per step from the namespaces' "
        "counters (frames: headers and ACKs included); time to target: measured training seconds "
        "(epoch_seconds of the slowest group chief) of the epochs up to the first whose test accuracy "
        "(mean of groups) reaches the target, evaluation left out."
    )
    verdicts = {}
    if sync:
        for r in rows:
            if r["arm"] == "sync":
                continue
            ratio = r["steps_per_second"] / sync["steps_per_second"]
            verdicts[r["arm"]] = ratio
            ok = "met" if ratio >= 1.5 else "NOT met"
            where = (
                ""
                if args.rate_mbit == 100
                else f" (measured at {args.rate_mbit:g} Mbit/s; the target is stated at 100)"
            )
            print(
                f"throughput {ARMS[r['arm']][0].format(k=args.exchange_every)} / sync: {ratio:.2f}x; "
                f"target >= 1.5x: {ok}{where}"
            )
            if r["seconds_to_target"] and sync["seconds_to_target"]:
                print(
                    f"  time to {args.target_accuracy:g} test accuracy, sync / this arm: "
                    f"{sync['seconds_to_target'] / r['seconds_to_target']:.2f}x"
                )
    print_costmodel_lines(rows, args)
    return verdicts


def costmodel_lines(rows: list[dict], args, fitted: dict) -> list[dict]:
    """Each arm's steady step time as the network sweep's fitted cost model
    predicts it (docs/results/network/costmodel.json) beside the measured one.
    Adds `predicted_step_ms` and `prediction_error` to each row it can price."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import costmodel  # noqa: PLC0415 - bench/ is not a package

    p = fitted["params"]
    compute = {tuple(k.split("/", 1)): v for k, v in p["compute_seconds"].items()}
    params = costmodel.Params(compute, efficiency=p["efficiency"], latency=p["latency_seconds"])
    out = []
    for r in rows:
        point = costmodel.Point(
            args.model, COSTMODEL_ARM[r["arm"]], args.hosts, args.rate_mbit, r["params"],
            args.classes, args.batch_size // args.hosts, every=args.exchange_every,
            inputs=INPUT_VALUES.get(args.dataset.split("/")[0], 0), cores=os.cpu_count() or 1,
        )  # fmt: skip
        try:
            predicted = params.step_seconds(point)
        except KeyError:
            continue
        measured = 1.0 / r["steady_steps_per_second"] if r.get("steady_steps_per_second") else None
        r["costmodel_arm"] = point.arm
        r["predicted_step_ms"] = predicted * 1e3
        r["predicted_comm_ms"] = params.comm_seconds(point) * 1e3
        r["measured_steady_step_ms"] = None if measured is None else measured * 1e3
        r["prediction_error"] = None if measured is None else costmodel.relative_error(predicted, measured)
        out.append(r)
    return out


def print_costmodel_lines(rows: list[dict], args) -> None:
    if not os.path.exists(COSTMODEL_JSON):
        return
    with open(COSTMODEL_JSON) as f:
        fitted = json.load(f)
    priced = costmodel_lines(rows, args, fitted)
    if not priced:
        print(f"cost model: no fitted compute for {args.model} in {COSTMODEL_JSON}")
        return
    print()
    print(
        f"cost model ({os.path.relpath(COSTMODEL_JSON)}: efficiency {fitted['params']['efficiency']:.3f}; "
        "compute per arm as fitted, averaging arms at the predictions arm's compute), steady step:"
    )
    for r in priced:
        label = ARMS[r["arm"]][0].format(k=args.exchange_every)
        measured = r["measured_steady_step_ms"]
        err = r["prediction_error"]
        print(
            f"  {label:40s} predicted {r['predicted_step_ms']:7.1f} ms ({r['predicted_comm_ms']:.1f} ms of it "
            f"network), measured {'-' if measured is None else format(measured, '.1f')} ms"
            f"{'' if err is None else f', error {err:+.0%}'}"
        )


# --------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate_mbit", type=float, default=100.0, help="link rate, each direction (Mbit/s)")
    p.add_argument(
        "--delay_ms", type=float, default=1.0, help="one-way delay added on each host's egress (ms)"
    )
    p.add_argument("--hosts", type=int, default=2, help="hosts (namespaces), one worker each")
    p.add_argument(
        "--arms", default="sync,predictions,weights", help="comma-separated subset of " + ",".join(ARMS)
    )
    p.add_argument(
        "--model",
        default=WIDE_MLP,
        help=f"{WIDE_MLP} (models/mlp.py, --mlp_hidden units) or a models.MODELS name",
    )
    p.add_argument("--mlp_hidden", type=int, default=1000, help=f"hidden units of {WIDE_MLP}")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--classes", type=int, default=10, help="outputs per example (the cost model's logits)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--batch_size", type=int, default=64, help="global batch (split over the workers)")
    p.add_argument("--steps", type=int, default=300, help="updates per model in every arm")
    p.add_argument(
        "--exchange_every",
        type=int,
        default=50,
        help="weights, diloco and local_sgd arms: exchange every K steps",
    )
    p.add_argument("--target_accuracy", type=float, default=0.95, help="test accuracy (mean of groups)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="TF/OpenMP threads per worker")
    p.add_argument("--collective_timeout", type=float, default=120.0)
    p.add_argument("--train_flag", action="append", default=[], help="extra train.py flag (repeatable)")
    p.add_argument("--timeout", type=float, default=1200.0, help="bound on the whole benchmark (s)")
    p.add_argument("--run_timeout", type=float, default=600.0, help="bound on one arm (s)")
    p.add_argument("--link_check_mb", type=float, default=4.0, help="bytes for the link check (0: skip)")
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the summary to this file")
    p.add_argument("--cleanup_only", action="store_true", help="remove leftover tfcd-* namespaces and exit")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms:
        p.error(f"--arms: unknown {bad}; choose from {list(ARMS)}")
    if args.hosts < 2 or args.hosts > 200:
        p.error("--hosts must be in [2, 200]")
    if args.batch_size % args.hosts:
        p.error(f"--batch_size={args.batch_size} must be divisible by --hosts={args.hosts}")
    if args.rate_mbit <= 0 or args.delay_ms < 0:
        p.error("--rate_mbit must be > 0 and --delay_ms >= 0")
    return args


def worker_main(argv: list[str]) -> None:
    """Inside a namespace: train.py's main with the wide MLP as the member builder."""
    import functools

    hidden, train_args = int(argv[0]), argv[1:]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)
    from absl import app

    import train

    model_fn = None
    if f"--model={WIDE_MLP}" in train_args:
        train_args = [f"--model={WIDE_MLP_BASE}" if a == f"--model={WIDE_MLP}" else a for a in train_args]

        def model_fn(spec, seed):
            import keras

            from models import mlp

            keras.utils.set_random_seed(seed)
            return mlp.build(spec.input_shape, spec.num_classes, hidden=hidden)

    main = functools.partial(train.main, model_fn=model_fn)
    app.run(main, argv=[os.path.join(REPO, "train.py"), *train_args], flags_parser=train.parse_flags)


def prepare_data(args, timeout: float) -> None:
    """Builds the dataset once, in this namespace, before the workers read it."""
    code = "import sys; from tf_codistill import data; data.load_spec(sys.argv[1], sys.argv[2] or None)"
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, args.dataset, args.data_dir or ""],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cannot prepare dataset {args.dataset!r}:\n{proc.stderr[-2000:]}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--_worker"]:
        worker_main(argv[1:])
        return 0
    args = parse_args(argv)
    if os.geteuid() != 0:
        print(NEEDS_ROOT, flush=True)
        return 0
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        print(f"bench_slow_network: {', '.join(missing)} not found (apt-get install iproute2); skipping.")
        return 0
    lock = open(LOCK_PATH, "w")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(
            f"bench_slow_network: another run holds {LOCK_PATH}; not touching its namespaces.",
            file=sys.stderr,
        )
        return 1

    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    start = time.monotonic()
    deadline = start + args.timeout
    cleanup_namespaces(verbose=True)  # leftovers of a killed run
    if args.cleanup_only:
        return 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="tfcd-slow-network-")
    network = SlowNetwork(args.hosts, args.rate_mbit, args.delay_ms)
    jobs: list[Job] = []
    rows, failures = [], []
    try:
        print(f"preparing {args.dataset} ...", flush=True)
        prepare_data(args, max(1.0, deadline - time.monotonic()))
        network.create()
        print(f"network up: {network.describe()}", flush=True)
        for note in network.notes:
            print(f"  note: {note}", flush=True)
        link = None
        if args.link_check_mb > 0:
            link = check_link(
                int(args.link_check_mb * 1e6), timeout=max(5.0, min(120.0, deadline - time.monotonic()))
            )
            print(
                f"  link check host0 -> host1: {link['mbit_s']:.1f} Mbit/s, median RTT {link['rtt_ms']:.2f} ms",
                flush=True,
            )
        for k, arm in enumerate(args.arms):
            remaining = deadline - time.monotonic()
            if remaining < 30:
                failures.append(f"{arm}: skipped, the --timeout of {args.timeout:.0f} s is spent")
                print(failures[-1], flush=True)
                continue
            job = Job(arm, args, os.path.join(workdir, arm), port=2222 + 10 * k)
            jobs.append(job)
            t0 = time.monotonic()
            print(
                f"[{arm}] {ARMS[arm][0].format(k=args.exchange_every)}: starting {args.hosts} workers ...",
                flush=True,
            )
            job.start()
            counters = WireCounters(args.hosts, job.steps_file())
            counters.start()
            try:
                error = job.wait(min(args.run_timeout, remaining))
            finally:
                counters.stop()
            if error:
                failures.append(f"{arm}: {error}")
                print(f"[{arm}] FAILED: {error}", flush=True)
                continue
            run = job.results()
            run["wire"] = counters.per_step(run["steps"])
            row = summarise(arm, run, args)
            rows.append(row)
            print(
                f"[{arm}] done in {time.monotonic() - t0:.0f} s: {row['steps_per_second']:.2f} steps/s, "
                f"test accuracy {row['test_accuracy']:.4f}",
                flush=True,
            )
        verdicts = print_report(rows, args, network, link) if rows else {}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "network": network.describe(),
                        "notes": network.notes,
                        "link_check": link,
                        "args": {k: v for k, v in vars(args).items()},
                        "arms": rows,
                        "ratio_to_sync": verdicts,
                        "failures": failures,
                    },
                    f,
                    indent=1,
                )
        print(f"\nruns and worker logs: {workdir}; total {time.monotonic() - start:.0f} s")
        for failure in failures:
            print(f"FAILED {failure.splitlines()[0]}", file=sys.stderr)
        return 1 if failures else 0
    except Skip as err:
        print(f"bench_slow_network: {err}; skipping.", flush=True)
        return 0
    except Interrupted as sig:
        print(f"\nbench_slow_network: interrupted ({sig}); cleaning up.", file=sys.stderr, flush=True)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the cleanup finish
        for job in jobs:
            job.stop()
        cleanup_namespaces()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
