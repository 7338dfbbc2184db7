"""Devices, on CPU: which all-reduce MultiWorkerMirroredStrategy gets inside a
group (NCCL with GPUs, RING without, or as asked), that the cross-group
Horovod collectives are pinned to the host (so a Gloo-only Horovod serves GPU
workers), and that asking for a TPU where there is none fails clearly and
quickly."""

import subprocess
import sys
import textwrap
import time

import pytest
import tensorflow as tf
from conftest import REPO, horovodrun, python_env, worker_env

from tf_codistill.topology import Topology, collective_implementation_for, free_port


# ----------------------------------------------------------------- MWMS inside a group
@pytest.mark.parametrize(
    "requested,gpus,chosen",
    [("auto", 0, "ring"), ("auto", 1, "nccl"), ("auto", 8, "nccl"), ("ring", 4, "ring"), ("nccl", 1, "nccl")],
)
def test_collective_implementation_choice(requested, gpus, chosen):
    assert collective_implementation_for(requested, gpus) == chosen


def test_collective_implementation_errors_are_one_clear_line():
    with pytest.raises(
        ValueError, match=r"^collective_implementation must be one of auto, ring, nccl; got 'NCCL'\.$"
    ):
        collective_implementation_for("NCCL", 1)
    with pytest.raises(
        ValueError, match=r"collective_implementation='nccl' needs GPUs.*use 'auto' or 'ring'"
    ):
        collective_implementation_for("nccl", 0)


# make_group_strategy in a fresh process (MWMS must come before any other TF
# op), with the rendezvous replaced by a one-worker cluster on a free port and,
# for the GPU cases, a device list that claims two GPUs.
STRATEGY_SCRIPT = r"""
import json, sys
import tensorflow as tf
from tf_codistill import topology

requested, fake_gpus, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
topology.group_tf_config = lambda topo, timeout_s: {
    "cluster": {"worker": [f"localhost:{port}"]}, "task": {"type": "worker", "index": 0}}
if fake_gpus:
    real = tf.config.list_physical_devices
    fake = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(fake_gpus)]
    tf.config.list_physical_devices = lambda kind=None: fake if kind == "GPU" else real(kind)
topo = topology.Topology(rank=0, world_size=2, num_groups=1)
try:
    strategy = topology.make_group_strategy(topo, 5, collective_implementation=requested)
except ValueError as err:
    print("ERROR:", err)
    sys.exit(3)
options = strategy.extended._communication_options
print("CHOSEN", type(strategy).__name__, options.implementation.name, options.timeout_seconds)
"""


def _strategy(requested, fake_gpus):
    proc = subprocess.run(
        [sys.executable, "-c", STRATEGY_SCRIPT, requested, str(fake_gpus), str(free_port())],
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_the_chosen_implementation_reaches_the_strategy():
    for requested, gpus, expected in [("auto", 0, "RING"), ("auto", 2, "NCCL"), ("ring", 2, "RING")]:
        code, out = _strategy(requested, gpus)
        assert code == 0, out[-3000:]
        # No timeout_seconds: a collective with a timeout leaks a thread (see make_group_strategy).
        assert f"CHOSEN CollectiveAllReduceStrategy {expected} None" in out, out[-3000:]
    code, out = _strategy("nccl", 0)
    assert code == 3 and "ERROR: collective_implementation='nccl' needs GPUs" in out, out[-3000:]


# ------------------------------------------------------------ Horovod exchange on the host
def _horovod_ops(graph):
    return [op for op in graph.get_operations() if op.type.startswith("Horovod")]


def test_prediction_gather_is_traced_onto_the_cpu(horovod_installed):
    """Traced as a model on GPU 0 would trace it: the gather and the copy into
    it are pinned to the CPU, the result is copied back to the GPU. (Tracing
    needs no GPU; running it would.)"""
    import horovod.tensorflow as hvd

    from tf_codistill.exchange.horovod import HorovodExchange

    exchange = HorovodExchange(Topology(rank=0, world_size=2, num_groups=2), hvd.global_process_set)

    @tf.function(jit_compile=False, autograph=False)
    def step(logits):
        with tf.device("/gpu:0"):
            return exchange._gather(logits * 2.0, "codistill_train_logits")

    graph = step.get_concrete_function(tf.TensorSpec([4, 3], tf.float32)).graph
    gathers = _horovod_ops(graph)
    assert [op.type for op in gathers] == ["HorovodAllgather"]
    gather = gathers[0]
    assert "CPU:0" in gather.device, gather.device
    feeding = gather.inputs[0].op
    assert feeding.type == "Identity" and "CPU:0" in feeding.device  # the copy to the host
    assert "GPU:0" in feeding.inputs[0].op.device  # from the model's device
    consumers = [c for c in graph.get_operations() if c.type == "Identity" and "GPU:0" in c.device]
    assert any(gather.name in _ancestors(c) for c in consumers), "no copy back to the GPU"


def _ancestors(op, seen=None):
    """Names of every op `op` depends on."""
    seen = set() if seen is None else seen
    for tensor in op.inputs:
        if tensor.op.name not in seen:
            seen.add(tensor.op.name)
            _ancestors(tensor.op, seen)
    return seen


# Two real processes (horovodrun --gloo, two groups of one): the prediction
# gather inside a tf.function and the weights transport, each checked for
# values and for the device its Horovod ops ran on.
HOST_SCRIPT = r"""
import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd
from tf_codistill import topology
from tf_codistill.exchange.horovod import HorovodExchange
from tf_codistill.exchange.weights import HorovodWeightsTransport, Snapshot

topo, group_set, pair_set = topology.init_horovod(2, timeout_s=30)
rank = topo.rank
exchange = HorovodExchange(topo, pair_set)

@tf.function(jit_compile=False)
def gather(logits):
    return exchange._gather(logits, "codistill_train_logits")

logits = tf.fill([4, 3], float(rank + 1))
everyone = gather(logits).numpy()
assert everyone.shape == (2, 4, 3) and (everyone[0] == 1).all() and (everyone[1] == 2).all(), everyone
graph = gather.get_concrete_function(tf.TensorSpec([4, 3], tf.float32)).graph
devices = [op.device for op in graph.get_operations() if op.type.startswith("Horovod")]
assert devices and all("CPU:0" in d for d in devices), devices

seen = []
for verb in ("allgather", "broadcast"):
    real = getattr(hvd, verb)
    def spy(tensor, *args, _real=real, **kwargs):
        out = _real(tensor, *args, **kwargs)
        seen.append((tensor.device, out.device))
        return out
    setattr(hvd, verb, spy)
transport = HorovodWeightsTransport(topo, pair_set, group_set)
weights = [np.full((2, 3), rank + 1.0, np.float32), np.full((3,), -rank, np.float32)]
transport.start([topo.group], [1 - topo.group], [w.shape for w in weights])
transport.exchange([Snapshot(topo.group, 7, weights)], 7)
peer = transport.latest(1 - topo.group)
assert peer.step == 7 and (peer.weights[0] == 2 - rank).all() and (peer.weights[1] == -(1 - rank)).all()
assert seen and all("CPU:0" in a and "CPU:0" in b for a, b in seen), seen
print(f"HOST-OK rank {rank}", flush=True)
"""


def test_horovod_collectives_run_on_the_host_in_a_real_job(tmp_path, horovod_installed):
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    proc = subprocess.run(
        horovodrun(2, sys.executable, str(script)),
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "HOST-OK rank 0" in out and "HOST-OK rank 1" in out, out[-4000:]


# ------------------------------------------------------------------------------ TPU
TPU_SCRIPT = textwrap.dedent(
    r"""
    import sys, time
    from tf_codistill.topology import make_tpu_strategy
    for tpu in sys.argv[1:]:
        begin = time.monotonic()
        try:
            make_tpu_strategy(tpu, timeout_s=5)
            print("UNEXPECTED: a TPU at", tpu)
        except (RuntimeError, ValueError) as err:
            print(f"{type(err).__name__}|{time.monotonic() - begin:.1f}|{err}")
    """
)


def test_no_tpu_is_a_clear_error_in_bounded_time():
    closed = free_port("127.0.0.1")
    begin = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", TPU_SCRIPT, "", "local", f"grpc://127.0.0.1:{closed}"],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.monotonic() - begin < 120
    lines = [line for line in proc.stdout.splitlines() if "|" in line]
    assert proc.returncode == 0 and len(lines) == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    (kind0, _, msg0), (kind1, s1, msg1), (kind2, s2, msg2) = (line.split("|", 2) for line in lines)
    assert kind0 == "ValueError" and msg0.startswith("tpu must name the TPU: 'local' on a TPU VM")
    assert kind1 == "RuntimeError" and msg1.startswith("no TPU reachable at tpu='local'")
    assert kind2 == "RuntimeError" and msg2.startswith(f"no TPU reachable at tpu='grpc://127.0.0.1:{closed}'")
    assert "Run on a TPU VM with tpu='local'" in msg1 and "\n" not in msg1
    assert float(s1) < 30 and float(s2) < 10
