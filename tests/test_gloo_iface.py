"""A Horovod job across three hosts whose host name resolves to loopback.

Three network namespaces stand for three machines (the slow-network benchmark's
`SlowNetwork`, at 1,000 Mbit/s): each has its own address on its `eth0`, and
both keep this machine's /etc/hosts, where the host name maps to 127.0.0.1,
as in many containers and VMs. The workers make themselves a Horovod job from
a cloud TF_CONFIG (`tfjob.bootstrap_from_tf_config`, which sets
HOROVOD_GLOO_IFACE to the interface holding the worker's address) and run a
collective on the global process set and on an added one (ranks 0 and 2).

Horovod 0.28.1 as released ignores HOROVOD_GLOO_IFACE for process sets (the
global one included) and advertises the host name's address, 127.0.0.1: the
first collective fails. `tools/build_horovod.sh` patches that (source fix 4);
this test fails on an unpatched build.

Needs root and `ip netns` (skipped otherwise, saying so); about 15 s.
"""

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))

import bench_slow_network as bench  # noqa: E402

HOSTS = 3

WORKER = r"""
import json, os, sys
from tf_codistill import tfjob
assert tfjob.bootstrap_from_tf_config(timeout_s=60)
import horovod.tensorflow as hvd
import tensorflow as tf
pair = hvd.ProcessSet([0, 2])
hvd.init(process_sets=[pair])
rank = hvd.rank()
total = hvd.allreduce(tf.constant([float(rank + 1)]), op=hvd.Sum).numpy().tolist()
gathered = hvd.allgather(tf.constant([rank * 10]), process_set=pair).numpy().tolist() if rank != 1 else None
hvd.allreduce(tf.constant([0.0]), op=hvd.Sum)  # nobody shuts down while the pair is still at work
print("RESULT " + json.dumps({"rank": rank, "iface": os.environ.get("HOROVOD_GLOO_IFACE"),
                              "sum": total, "gathered": gathered}), flush=True)
hvd.shutdown()
"""


@pytest.fixture
def two_hosts(horovod_installed):
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs root and iproute2 (ip, tc) to build network namespaces")
    lock = open(bench.LOCK_PATH, "w")  # noqa: SIM115 - the benchmark's lock: one user of tfcd-* at a time
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        pytest.skip(f"the slow-network benchmark holds {bench.LOCK_PATH}")
    bench.cleanup_namespaces()
    net = bench.SlowNetwork(HOSTS, rate_mbit=1000, delay_ms=0)
    try:
        net.create()
    except bench.Skip as err:
        bench.cleanup_namespaces()
        lock.close()
        pytest.skip(str(err))
    try:
        yield net
    finally:
        bench.cleanup_namespaces()
        lock.close()


def test_process_sets_bind_the_gloo_interface_not_the_host_name(two_hosts, tmp_path):
    hostname = socket.gethostname()
    # The case the patch is for: inside each namespace the host name is loopback.
    probe = subprocess.run(
        ["ip", "netns", "exec", bench.host_ns(0), sys.executable, "-c",
         "import socket; print(socket.gethostbyname(socket.gethostname()))"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    if not probe.stdout.strip().startswith("127."):
        pytest.skip(f"{hostname} resolves to {probe.stdout.strip()} here, not to loopback")
    assert not os.path.exists(
        os.path.join(bench.NETNS_ETC, bench.host_ns(0))
    )  # no hosts file over /etc/hosts

    port = 23456
    workers = [f"{bench.host_addr(i)}:{port}" for i in range(HOSTS)]
    procs, logs = [], []
    for i in range(HOSTS):
        config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": i},
            "environment": "cloud",
        }
        env = bench.worker_env(config, threads=1)
        env["PYTHONPATH"] = REPO
        log = tmp_path / f"worker{i}.log"
        logs.append(log)
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", bench.host_ns(i), sys.executable, "-c", WORKER],
                    cwd=REPO,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
    deadline = time.monotonic() + 120
    try:  # until both exit, one fails (the other would wait on it), or the deadline
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=30)
    outputs = [log.read_text() for log in logs]
    detail = "\n".join(f"--- worker {i}\n{text[-3000:]}" for i, text in enumerate(outputs))
    assert [p.returncode for p in procs] == [0] * HOSTS, detail
    results = sorted(
        (json.loads(line.split(" ", 1)[1]) for text in outputs for line in text.splitlines() if line.startswith("RESULT ")),
        key=lambda r: r["rank"],
    )  # fmt: skip
    assert [r["rank"] for r in results] == list(range(HOSTS)), detail
    for r in results:
        assert r["iface"] == bench.HOST_IFACE
        assert r["sum"] == [6.0]
        assert r["gathered"] == (None if r["rank"] == 1 else [0, 20])
