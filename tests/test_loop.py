"""CodistillLoop: the custom training loop gives what `model.fit` gives."""

import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import HOROVODRUN, horovodrun

from models import build_model
from tf_codistill import (
    AlphaSchedule,
    CodistillModel,
    PeerFailureError,
    Preempted,
    PreemptionHandler,
    paper_weight_decay,
)
from tf_codistill.backup import BackupError, list_backups
from tf_codistill.loop import CodistillLoop

INPUT = (12,)
CLASSES = 5


def _data(num=80, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, *INPUT)).astype("float32")
    y = rng.integers(0, CLASSES, size=num)
    return x, y


def _dataset(batch=16):
    return tf.data.Dataset.from_tensor_slices(_data()).batch(batch).repeat()


def _initial_weights(seed=0):
    return [build_model("mlp", INPUT, CLASSES, seed=seed + i).get_weights() for i in range(2)]


def _model(weights, alpha=0.7, momentum=0.9):
    members = [build_model("mlp", INPUT, CLASSES) for _ in weights]
    for member, w in zip(members, weights):
        member.set_weights(w)
    model = CodistillModel(
        members,
        alpha=AlphaSchedule(alpha, burn_in_steps=2),
        distance="kl",
        temperature=2.0,
        data_mode="shared",
        weight_decay=paper_weight_decay([3, 7], (1e-3, 1e-4, 0.0)),
    )
    lr = keras.optimizers.schedules.PiecewiseConstantDecay([3, 7], [0.2, 0.1, 0.05])
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), metrics=["accuracy"])
    return model


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


def _assert_same(a, b, atol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def test_train_matches_fit():
    steps = 7
    init = _initial_weights()
    fitted = _model(init)
    history = fitted.fit(_dataset(), epochs=1, steps_per_epoch=steps, verbose=0).history
    looped = _model(init)
    logs = CodistillLoop(looped).train(_dataset(), steps)

    _assert_same(_weights(looped), _weights(fitted), atol=1e-6)
    assert int(looped.optimizer.iterations.numpy()) == steps
    for key in ("loss", "task_loss", "distill_loss", "agreement", "accuracy", "g1_accuracy", "alpha"):
        assert logs[key] == pytest.approx(history[key][-1], rel=1e-5), key
    assert logs["distill_loss"] > 0

    # evaluate() reports what model.evaluate reports.
    test_ds = tf.data.Dataset.from_tensor_slices(_data(48, seed=5)).batch(16)
    want = fitted.evaluate(test_ds, verbose=0, return_dict=True)
    got = CodistillLoop(looped).evaluate(test_ds)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert CodistillLoop(looped).evaluate(test_ds, steps=1)["loss"] != pytest.approx(got["loss"])


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, capsys):
    init = _initial_weights(seed=3)
    straight = _model(init)
    CodistillLoop(straight).train(_dataset(), 10)

    ckpt, tb = str(tmp_path / "ckpt"), str(tmp_path / "tb")
    first = _model(init)
    CodistillLoop(first, checkpoint_dir=ckpt, checkpoint_every=4).train(_dataset(), 6)
    assert list_backups(ckpt, "step") == [6, 4]

    resumed = _model(init)  # fresh weights and optimizer: everything comes from the checkpoint
    loop = CodistillLoop(resumed, checkpoint_dir=ckpt, summary_dir=tb)
    logs = loop.train(_dataset().skip(6), 10, log_every=2)  # the data order continues too
    assert int(resumed.optimizer.iterations.numpy()) == 10 == loop.step
    _assert_same(_weights(resumed), _weights(straight), atol=1e-6)
    assert logs["alpha"] == pytest.approx(0.7)
    assert list_backups(ckpt, "step")[0] == 10

    out = capsys.readouterr().out
    assert "restored" in out and "at step 6" in out
    assert "step 8/10: loss=" in out and "step 10/10: loss=" in out and "step 6/10" not in out
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))

    # A third run has nothing left to do.
    again = _model(init)
    assert CodistillLoop(again, checkpoint_dir=ckpt).train(_dataset(), 10) == {}
    _assert_same(_weights(again), _weights(straight), atol=0)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    init = _initial_weights(seed=4)
    ckpt = str(tmp_path / "ckpt")
    CodistillLoop(_model(init), checkpoint_dir=ckpt, checkpoint_every=4).train(_dataset(), 8)
    weights = os.path.join(ckpt, "step-000008", "state.weights.h5")
    assert os.path.exists(weights), os.listdir(ckpt)
    _flip_bytes(weights)
    capsys.readouterr()
    loop = CodistillLoop(_model(init), checkpoint_dir=ckpt)
    assert loop.restore() == 4
    out = capsys.readouterr().out
    assert "WARNING: skipping the backup of step 8" in out and "step-000004 at step 4" in out

    _flip_bytes(os.path.join(ckpt, "step-000004", "state.weights.h5"))
    with pytest.raises(BackupError, match=r"no backup in .* could be restored \(all corrupt\)"):
        CodistillLoop(_model(init), checkpoint_dir=ckpt).restore()


def _flip_bytes(path):
    with open(path, "r+b") as f:  # flip bytes in the middle of the tensors
        f.seek(os.path.getsize(f.name) // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_uncompiled_model_is_rejected():
    model = CodistillModel([build_model("mlp", INPUT, CLASSES, seed=i) for i in range(2)])
    with pytest.raises(ValueError, match=r"not compiled.*model\.compile\(optimizer="):
        CodistillLoop(model)
    with pytest.raises(ValueError, match="CodistillModel"):
        CodistillLoop(build_model("mlp", INPUT, CLASSES))


def test_short_dataset_warns_and_stops():
    model = _model(_initial_weights())
    ds = tf.data.Dataset.from_tensor_slices(_data(32)).batch(16)
    with pytest.warns(UserWarning, match="ran out after 2 batches"):
        logs = CodistillLoop(model).train(ds, 5)
    assert "loss" in logs and int(model.optimizer.iterations.numpy()) == 2


def _run(args, timeout):
    from conftest import REPO, python_env

    proc = subprocess.run(args, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=timeout)
    return proc, proc.stdout[-4000:] + proc.stderr[-4000:]


MIRRORED_SCRIPT = r"""
import numpy as np, tensorflow as tf, keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from models import build_model
from tf_codistill import CodistillModel
from tf_codistill.loop import CodistillLoop

rng = np.random.default_rng(0)
x = rng.normal(size=(48, 12)).astype("float32"); y = rng.integers(0, 5, size=48)
init = [build_model("mlp", (12,), 5, seed=s).get_weights() for s in (0, 1)]

def train(strategy):
    with strategy.scope():
        members = [build_model("mlp", (12,), 5) for _ in init]
        for m, w in zip(members, init):
            m.set_weights(w)
        model = CodistillModel(members, alpha=0.8, distance="kl", weight_decay=1e-3, data_mode="shared")
        model.compile(optimizer=keras.optimizers.SGD(0.3, momentum=0.9), metrics=["accuracy"])
    loop = CodistillLoop(model, strategy)
    logs = loop.train(tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat(), 5)
    return [v.numpy() for v in model.trainable_variables], logs

w1, l1 = train(tf.distribute.get_strategy())
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
w2, l2 = train(strategy)
worst = max(float(np.abs(a - b).max()) for a, b in zip(w1, w2))
print("max weight difference", worst)
assert worst < 1e-5, worst
for key in ("loss", "task_loss", "distill_loss", "accuracy", "agreement"):
    np.testing.assert_allclose(l1[key], l2[key], rtol=1e-4, err_msg=key)
print("OK")
"""


def test_mirrored_two_replicas_match_one():
    proc, tail = _run([sys.executable, "-c", MIRRORED_SCRIPT], timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, tail


HOROVOD_SCRIPT = r"""
import sys
import numpy as np
from tf_codistill.topology import init_horovod, make_group_strategy

topo, _, pair_set = init_horovod(num_groups=2, timeout_s=60)
strategy = make_group_strategy(topo, timeout_s=60)

import horovod.tensorflow as hvd
import keras
import tensorflow as tf
from models import build_model
from tf_codistill import CodistillModel
from tf_codistill.exchange.horovod import HorovodExchange
from tf_codistill.loop import CodistillLoop

rng = np.random.default_rng(0)  # the same data in both processes
x = rng.normal(size=(32, 12)).astype("float32"); y = rng.integers(0, 5, size=32)
with strategy.scope():
    member = build_model("mlp", (12,), 5, seed=100 + topo.group)
    model = CodistillModel([member], exchange=HorovodExchange(topo, pair_set), data_mode="shared", alpha=1.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
loop = CodistillLoop(model, strategy, checkpoint_dir=sys.argv[1])
logs = loop.train(tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat(), 4, log_every=2)
weights = np.concatenate([v.numpy().ravel() for v in member.trainable_variables])
everyone = hvd.allgather_object(weights)
print(f"RANK {topo.rank} GROUP {topo.group} distill_loss={logs['distill_loss']!r} "
      f"weight_diff={float(np.abs(everyone[0] - everyone[1]).max())!r}", flush=True)
"""


def test_horovod_two_groups(tmp_path):
    if not os.path.exists(HOROVODRUN):
        pytest.skip("horovodrun is not installed in this environment")
    try:
        import horovod.tensorflow  # noqa: F401
    except ImportError:
        pytest.skip("Horovod is not installed")
    script = tmp_path / "hvd_loop.py"
    script.write_text(textwrap.dedent(HOROVOD_SCRIPT))
    ckpt = str(tmp_path / "ckpt")
    args = horovodrun(2, sys.executable, script, ckpt)
    proc, tail = _run(args, timeout=180)
    assert proc.returncode == 0, tail
    lines = [line.split("RANK", 1)[1] for line in proc.stdout.splitlines() if "RANK" in line]
    assert len(lines) == 2, tail
    for rank in (0, 1):
        (line,) = [entry for entry in lines if entry.startswith(f" {rank} ")]
        fields = dict(item.split("=") for item in line.split() if "=" in item)
        distill = float(fields["distill_loss"])
        assert np.isfinite(distill) and distill > 0, line
        assert float(fields["weight_diff"]) > 1e-3, line
    # Each group writes its own checkpoints.
    for group in (0, 1):
        assert list_backups(os.path.join(ckpt, f"group{group}"), "step")[0] == 4


def test_resume_keeps_the_stale_peer_copies(tmp_path):
    """The exchange's state is checkpointed with the weights: resumed at step 6
    with copies taken at step 4 (every=4), the run goes on exactly as an
    uninterrupted one; copies re-taken at step 6 would change the teacher."""
    from tf_codistill import StaleWeightsExchange

    def model(init):
        members = [build_model("mlp", INPUT, CLASSES) for _ in init]
        for member, w in zip(members, init):
            member.set_weights(w)
        m = CodistillModel(
            members, alpha=0.7, distance="kl", data_mode="shared", exchange=StaleWeightsExchange(every=4)
        )
        m.compile(optimizer=keras.optimizers.SGD(0.2, momentum=0.9))
        return m

    init = _initial_weights(seed=5)
    straight = model(init)
    CodistillLoop(straight).train(_dataset(), 10)
    ckpt = str(tmp_path / "ckpt")
    CodistillLoop(model(init), checkpoint_dir=ckpt, checkpoint_every=3).train(_dataset(), 6)
    assert os.path.exists(os.path.join(ckpt, "step-000006", "exchange.npz"))
    resumed = model(init)
    CodistillLoop(resumed, checkpoint_dir=ckpt).train(_dataset().skip(6), 10)
    assert resumed.exchange.state_dict().keys() == straight.exchange.state_dict().keys()
    _assert_same(_weights(resumed), _weights(straight), atol=1e-6)


# ------------------------------------------------------------------ callbacks
HOOKS = sorted(name for name in dir(keras.callbacks.Callback) if name.startswith("on_"))


class _Recorder(keras.callbacks.Callback):
    """Records every hook Keras's Callback has: (hook, index, logs)."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.calls, self.stop_after = [], stop_after
        for name in HOOKS:
            setattr(self, name, self._recording(name))

    def _recording(self, name):
        def hook(*args, **kwargs):
            logs = kwargs.get("logs", args[-1] if args and isinstance(args[-1], dict) else None)
            index = args[0] if args and isinstance(args[0], int) else None
            self.calls.append((name, index, dict(logs) if logs else None))
            if name == "on_train_batch_end" and index == self.stop_after:
                self.model.stop_training = True

        return hook


def _sequence(calls):
    return [(name, index, sorted(logs) if logs else None) for name, index, logs in calls]


def test_train_calls_every_hook_fit_calls_in_its_order():
    steps = 5
    init = _initial_weights(seed=6)
    fitted, by_fit = _model(init), _Recorder()
    fitted.fit(_dataset(), epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[by_fit])
    looped, by_loop = _model(init), _Recorder()
    CodistillLoop(looped).train(_dataset(), steps, callbacks=[by_loop])

    assert _sequence(by_loop.calls) == _sequence(by_fit.calls)
    names = [name for name, _, _ in by_loop.calls]
    assert names.count("on_train_batch_end") == steps and names[0] == "on_train_begin"
    assert names[-2:] == ["on_epoch_end", "on_train_end"]
    for (name, _, got), (_, _, want) in zip(by_loop.calls, by_fit.calls):
        for key in want or {}:  # the same logs, as Python numbers
            assert isinstance(got[key], float) and got[key] == pytest.approx(want[key], rel=1e-5), (name, key)

    # A callback stops the loop as it stops fit: after the batch that set model.stop_training.
    stopped = _model(init)
    CodistillLoop(stopped).train(_dataset(), steps, callbacks=[_Recorder(stop_after=1)])
    assert int(stopped.optimizer.iterations.numpy()) == 2


def test_a_failing_peer_stops_the_loop_at_the_limit():
    model = CodistillModel(
        [build_model("mlp", INPUT, CLASSES, seed=i) for i in range(2)],
        data_mode="shared",
        max_bad_peer_steps=3,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    bias = model.members[1].layers[-1].bias
    bias.assign(np.full(bias.shape, np.nan, "float32"))  # group 1 emits NaN logits from the start
    with pytest.raises(PeerFailureError, match="group 1 sent NaN or Inf predictions in 3 steps"):
        CodistillLoop(model).train(_dataset(), 10)
    assert int(model.optimizer.iterations.numpy()) == 3  # checked at each batch end


class _SignalAt(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_the_loop_at_a_saved_step_and_the_rerun_ends_identically(tmp_path):
    init = _initial_weights(seed=7)
    straight = _model(init)
    CodistillLoop(straight).train(_dataset(), 8)

    ckpt = str(tmp_path / "ckpt")
    loop = CodistillLoop(_model(init), checkpoint_dir=ckpt, checkpoint_every=4)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="SIGTERM received: stopped after step 5") as stopped:
        loop.train(_dataset(), 8, callbacks=[_SignalAt(5), PreemptionHandler(loop)])
    assert stopped.value.folder.endswith("step-000005") and signal.getsignal(signal.SIGTERM) == before
    assert list_backups(ckpt, "step") == [5, 4]

    resumed = _model(init)
    rerun = CodistillLoop(resumed, checkpoint_dir=ckpt)
    rerun.train(_dataset().skip(rerun.restore()), 8)
    _assert_same(_weights(resumed), _weights(straight), atol=0)


class _TFCheckpoints:
    """A checkpoint manager of another kind: TensorFlow's own checkpoints."""

    def __init__(self, model, directory):
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=2)
        self.calls = []

    def restore(self):
        self.calls.append("restore")
        if self.manager.latest_checkpoint is None:
            return None
        self.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        return int(self.checkpoint.optimizer.iterations.numpy())

    def save(self, step):
        self.calls.append(f"save {step}")
        return self.manager.save(checkpoint_number=step)


def test_a_checkpoint_manager_of_another_kind(tmp_path):
    init = _initial_weights(seed=8)
    straight = _model(init)
    CodistillLoop(straight).train(_dataset(), 6)

    first = _model(init)
    manager = _TFCheckpoints(first, str(tmp_path))
    CodistillLoop(first, checkpoints=manager, checkpoint_every=2).train(_dataset(), 3)
    assert manager.calls == ["restore", "save 2", "save 3"]
    resumed = _model(init)
    resumed.optimizer.build(resumed.trainable_variables)
    manager = _TFCheckpoints(resumed, str(tmp_path))
    CodistillLoop(resumed, checkpoints=manager).train(_dataset().skip(3), 6)
    assert manager.calls == ["restore", "save 6"]
    _assert_same(_weights(resumed), _weights(straight), atol=0)

    with pytest.raises(ValueError, match="checkpoint_dir or checkpoints"):
        CodistillLoop(resumed, checkpoint_dir=str(tmp_path), checkpoints=manager)
    with pytest.raises(TypeError, match=r"checkpoints must have restore\(\) and save\(step\)"):
        CodistillLoop(resumed, checkpoints=str(tmp_path))
