"""Backup: whole backups only, checksums, pruning, and a resume equal to an
uninterrupted fit (in one process; tests/test_resume.py kills real jobs)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import build_model
from tf_codistill import AlphaSchedule, Backup, BackupError, CodistillModel
from tf_codistill import backup as backup_mod
from tf_codistill.exchange import StaleWeightsExchange

INPUT, CLASSES, STEPS = (12,), 5, 5


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, *INPUT)).astype("float32")
    y = rng.integers(0, CLASSES, size=200)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(20).repeat()


def _model(exchange=None):
    members = [build_model("mlp", INPUT, CLASSES, seed=i) for i in range(2)]
    model = CodistillModel(
        members,
        alpha=AlphaSchedule(1.0, burn_in_steps=3, ramp_steps=6),
        distance="mse",
        data_mode="shared",
        exchange=exchange,
    )
    lr = keras.optimizers.schedules.PiecewiseConstantDecay([7, 12], [0.2, 0.1, 0.05])
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), metrics=["accuracy"])
    return model


def _fit(model, epochs, backup=None, data=None):
    """`epochs` epochs of STEPS steps, with `backup` as the only callback."""
    callbacks = [backup] if backup is not None else []
    data = _data() if data is None else data
    return model.fit(data, epochs=epochs, steps_per_epoch=STEPS, verbose=0, callbacks=callbacks).history


def _backed_up(directory, epochs, model=None, **backup_args):
    """Trains `model` (a new one by default) for `epochs`, keeping its backups."""
    model = _model() if model is None else model
    _fit(model, epochs, Backup(directory, delete_on_finish=False, **backup_args))
    return model


def _weights(model):
    return [v.numpy() for v in model.weights] + [v.numpy() for v in model.optimizer.variables]


def test_resume_continues_exactly_where_training_stopped(tmp_path, capsys):
    straight = _model()
    full = _fit(straight, 4)

    directory = str(tmp_path / "backup")
    _backed_up(directory, 2)
    assert backup_mod.list_backups(directory) == [2, 1]

    resumed = _model()  # fresh weights and optimizer: everything comes from the backup
    backup = Backup(directory, delete_on_finish=False)
    assert backup.resume_epoch() == 2
    _fit(resumed, 4, backup, data=_data().skip(2 * STEPS))
    assert backup.restored_epoch == 2 and backup.restored_step == 2 * STEPS
    assert "[backup] resumed from epoch 2 (step 10)" in capsys.readouterr().out
    for a, b in zip(_weights(resumed), _weights(straight)):
        np.testing.assert_array_equal(a, b)
    assert int(resumed.optimizer.iterations.numpy()) == 4 * STEPS
    # backup.history holds every epoch, the restored ones included, as History would.
    assert backup.history.keys() == full.keys()
    for key in full:
        np.testing.assert_allclose(backup.history[key], full[key], rtol=1e-6)
    assert backup_mod.list_backups(directory) == [4, 3]  # keep=2


def test_partial_and_corrupt_backups_are_never_loaded(tmp_path, capsys):
    directory = str(tmp_path / "backup")
    _backed_up(directory, 2)
    # A kill mid-write leaves a temporary folder; a later one never renamed.
    os.makedirs(os.path.join(directory, ".tmp-000003-999"))
    with open(os.path.join(directory, ".tmp-000003-999", backup_mod.WEIGHTS), "wb") as f:
        f.write(b"half")
    # Bit rot in the newest backup.
    path = os.path.join(directory, "epoch-000002", backup_mod.WEIGHTS)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x00\x01\x02\x03")
    assert backup_mod.verify(directory, 2) and backup_mod.verify(directory, 1) is None

    backup = Backup(directory, delete_on_finish=False)
    assert backup.resume_epoch() == 1
    out = capsys.readouterr().out
    assert "skipping the backup of epoch 2" in out and "checksum" in out
    assert not any(n.startswith(".tmp-") for n in os.listdir(directory))  # cleaned up
    fresh = _model()
    _fit(fresh, 1, backup)
    assert backup.restored_epoch == 1 and int(fresh.optimizer.iterations.numpy()) == STEPS


def test_agreement_picks_the_step_every_process_holds(tmp_path):
    directory = str(tmp_path / "backup")
    _backed_up(directory, 3, keep=3)
    seen = []

    def agree(steps):  # as if another process held only the backups of epochs 1 and 2
        seen.append(list(steps))
        common = set(steps) & {STEPS, 2 * STEPS}
        return max(common) if common else None

    backup = Backup(directory, agree=agree, delete_on_finish=False)
    model = _model()
    _fit(model, 2, backup)
    assert seen == [[3 * STEPS, 2 * STEPS, STEPS]] and backup.restored_epoch == 2
    # Nothing in common: start afresh, with a message.
    afresh = Backup(directory, agree=lambda steps: None, delete_on_finish=False)
    assert afresh.resume_epoch() is None


def test_stale_weights_peer_copies_are_part_of_the_backup(tmp_path):
    directory = str(tmp_path / "backup")
    model = _backed_up(directory, 2, _model(StaleWeightsExchange(every=4)))
    meta = backup_mod.read_meta(directory, 2)
    assert meta["exchange_sha256"] and meta["step"] == 2 * STEPS
    copies = {g: [w.copy() for w in c.get_weights()] for g, c in model.exchange.copies.items()}

    resumed = _model(StaleWeightsExchange(every=4))
    backup = Backup(directory, delete_on_finish=False)
    backup.set_model(resumed)
    resumed.optimizer.build(resumed.trainable_variables)
    backup.on_train_begin()
    for g, weights in copies.items():
        for a, b in zip(resumed.exchange.copies[g].get_weights(), weights):
            np.testing.assert_array_equal(a, b)
    assert resumed.exchange._snapshot_step == model.exchange._snapshot_step == {0: 8, 1: 8}


def test_write_failures_are_clear_and_leave_earlier_backups_whole(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(BackupError, match="not writable"):
        Backup(str(not_a_dir / "backup")).check_writable()
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        Backup(str(tmp_path), keep=0)

    directory = str(tmp_path / "backup")
    model = _model()
    backup = Backup(directory, delete_on_finish=False)
    _fit(model, 1, backup)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    model.save_weights = full_disk
    with pytest.raises(BackupError, match=r"No space left on device.*backup of epoch 1 is intact"):
        backup.save(2)
    assert backup_mod.list_backups(directory) == [1] and backup_mod.verify(directory, 1) is None
    assert not any(n.startswith(".tmp-") for n in os.listdir(directory))


def test_a_backup_of_another_model_is_refused(tmp_path):
    directory = str(tmp_path / "backup")
    _backed_up(directory, 1)
    other = CodistillModel([build_model("cnn1d", (40, 1), CLASSES, seed=i) for i in range(2)])
    other.compile(optimizer=keras.optimizers.SGD(0.1))
    backup = Backup(directory, delete_on_finish=False)
    backup.set_model(other)
    with pytest.raises(BackupError, match="does not fit this model"):
        backup.on_train_begin()
    assert json.loads(open(os.path.join(directory, "epoch-000001", backup_mod.META)).read())["epoch"] == 1


class _StopAt(keras.callbacks.Callback):
    """Stands for a kill: raises between two steps once `step` updates are done."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_begin(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop", [13, 7])
def test_a_mid_epoch_backup_resumes_mid_epoch_exactly(tmp_path, capsys, stop):
    """Backups every 3 steps in epochs of 5; stopped after `stop` updates,
    the rerun goes on from the newest backup (step 12: batch 2 of epoch 3;
    step 6: batch 1 of epoch 2) and every epoch's logs and the weights equal
    an uninterrupted run's."""
    straight = _model()
    full = _fit(straight, 4)

    directory = str(tmp_path / "backup")
    first = Backup(directory, delete_on_finish=False, every_steps=3)
    with pytest.raises(KeyboardInterrupt):
        _model().fit(_data(), epochs=4, steps_per_epoch=STEPS, verbose=0, callbacks=[first, _StopAt(stop)])
    newest = 3 * (stop // 3)
    assert f"step-{newest:06d}" in os.listdir(directory)
    meta = backup_mod.read_meta(directory, newest, "step")
    assert (meta["epoch"], meta["epoch_step"], meta["step"]) == (newest // STEPS, newest % STEPS, newest)
    assert meta["metrics_sha256"] and len(meta["history"]["loss"]) == newest // STEPS

    resumed = _model()
    backup = Backup(directory, delete_on_finish=False, every_steps=3)
    assert backup.resume_step() == newest and backup.resume_epoch() == newest // STEPS
    history = _fit(resumed, 4, backup, data=_data().skip(newest))
    out = capsys.readouterr().out
    assert f"resumed from step {newest} (batch {newest % STEPS} of epoch {newest // STEPS + 1})" in out
    for a, b in zip(_weights(resumed), _weights(straight)):
        np.testing.assert_array_equal(a, b)
    assert backup.history.keys() == full.keys()
    for key in full:  # the resumed epoch's means included: its metrics went on from their totals
        assert backup.history[key] == full[key], key
        assert history[key] == full[key][newest // STEPS :], key
    assert int(resumed.optimizer.iterations.numpy()) == 4 * STEPS


def test_every_steps_is_checked(tmp_path):
    with pytest.raises(ValueError, match="every_steps must be >= 0"):
        Backup(str(tmp_path), every_steps=-1)
    with pytest.raises(TypeError, match="every_steps must be an integer"):
        Backup(str(tmp_path), every_steps=2.5)
