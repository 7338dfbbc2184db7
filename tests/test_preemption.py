"""PreemptionHandler in one process: real signals to this process during a
real `fit` (tests/test_resume.py signals real train.py jobs, Horovod ones
included, and checks their resumes bit for bit)."""

import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_codistill import Backup, Preempted, PreemptionHandler
from tf_codistill import backup as backup_mod

STEPS = 5


def _model():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)).astype("float32")
    y = rng.integers(0, 3, size=60)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(6).repeat()


class _SignalAt(keras.callbacks.Callback):
    """Sends `signum` to this process at the end of step `step` (once)."""

    def __init__(self, step, signum=signal.SIGTERM, times=1):
        super().__init__()
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def _fit(model, callbacks):
    model.fit(_data(), epochs=4, steps_per_epoch=STEPS, verbose=0, callbacks=callbacks)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_and_backs_it_up(tmp_path, signum):
    directory = str(tmp_path / "backup")
    backup = Backup(directory, delete_on_finish=False, verbose=False)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Preempted) as stopped:
        _fit(
            _model(),
            [
                backup,
                _SignalAt(7, signum, times=1 if signum == signal.SIGINT else 3),
                PreemptionHandler(backup),
            ],
        )
    assert stopped.value.step == 7 and stopped.value.signal_name == signal.Signals(signum).name
    assert stopped.value.folder.endswith("step-000007") and stopped.value.seconds < 30
    assert (
        backup_mod.list_backups(directory, "step") == [7] and backup_mod.verify(directory, 7, "step") is None
    )
    assert {s: signal.getsignal(s) for s in before} == before  # handlers given back
    assert "stopped after step 7" in str(stopped.value)


def test_a_signal_at_an_epoch_end_needs_no_new_backup(tmp_path):
    directory = str(tmp_path / "backup")
    backup = Backup(directory, delete_on_finish=False, verbose=False)
    with pytest.raises(Preempted) as stopped:
        _fit(_model(), [backup, _SignalAt(2 * STEPS), PreemptionHandler(backup)])
    assert stopped.value.step == 2 * STEPS and stopped.value.folder is None  # epoch 2's backup holds it
    assert backup_mod.list_backups(directory) == [2, 1] and not backup_mod.list_backups(directory, "step")


def test_every_process_stops_at_the_step_the_agreement_gives(tmp_path):
    """`agree` stands for the all-reduce: it sees every check, and once it
    reports another process's flag this one stops without a signal of its own."""
    calls = []

    def agree(values):
        step = int(model.optimizer.iterations.numpy())
        calls.append((step, list(values)))
        return [1 if step >= 9 else values[0], 2]  # another process was signalled before step 9

    model = _model()
    backup = Backup(str(tmp_path / "backup"), delete_on_finish=False, verbose=False)
    with pytest.raises(Preempted) as stopped:
        _fit(model, [backup, PreemptionHandler(backup, agree=agree)])
    checks = [step for step, values in calls if values != [0, 0]]
    assert checks == [0, 2, 4, 6, 8, 10]  # every 2 steps, as agreed; the flag first came back at 10
    assert stopped.value.step == 10 and stopped.value.signal_name is None
    assert calls[-1] == (10, [0, 0])  # the closing barrier: every process has written its backup


def test_a_failed_agreement_still_backs_up_the_signalled_process(tmp_path):
    def agree(values):
        if values[0]:
            raise RuntimeError("Horovod has been shut down")
        return [values[0], 1]  # a check at every step

    directory = str(tmp_path / "backup")
    backup = Backup(directory, delete_on_finish=False, verbose=False)
    with pytest.raises(RuntimeError, match="shut down"):
        _fit(_model(), [backup, _SignalAt(3), PreemptionHandler(backup, agree=agree)])
    assert backup_mod.list_backups(directory, "step") == [3]


def test_a_second_ctrl_c_interrupts_at_once(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), [_SignalAt(3, signal.SIGINT, times=2), PreemptionHandler()])


def test_bad_arguments():
    with pytest.raises(ValueError, match="check_seconds must be a finite number > 0"):
        PreemptionHandler(check_seconds=0)
