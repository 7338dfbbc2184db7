"""Remote storage: the stale-weights directory and the backups through
`tf.io.gfile`, end to end on TensorFlow's in-memory `ram://` filesystem (the
stand-in for `gs://`: no POSIX calls reach it, and it renames files, not
folders, as an object store does). `ram://` lives in this process, so the two
groups here are two models in one process."""

import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_model import _batch, _members

from tf_codistill import Backup, CodistillModel, files
from tf_codistill import backup as backup_mod
from tf_codistill.exchange.weights import DirectoryTransport, Snapshot, StaleWeightsExchange


@pytest.fixture
def ram():
    """A fresh `ram://` directory, deleted afterwards."""
    root = f"ram://tf_codistill_test/{uuid.uuid4().hex}"
    yield root
    files.rmtree(root)


def _dataset(seed, steps, size=16):
    batches = [_batch(seed + i, size) for i in range(steps)]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(size)


def _group(group, exchange_dir, every=2):
    transport = DirectoryTransport(exchange_dir, poll_seconds=0.05)
    exchange = StaleWeightsExchange(every=every, transport=transport, group=group, num_groups=2)
    model = CodistillModel(_members(1, seed=10 * group), alpha=0.5, exchange=exchange)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model


def test_files_helpers_on_ram(ram):
    assert files.is_local("/tmp/x") and files.is_local("file:///tmp/x") and files.is_local("x")
    assert not files.is_local(ram) and not files.is_local("gs://bucket/x")
    assert files.absolute("gs://bucket/x/") == "gs://bucket/x"
    files.probe_writable(ram)
    assert files.listdir(ram) == []  # the probe is gone
    files.write_atomic(files.join(ram, "a.json"), b"one")
    files.write_atomic(files.join(ram, "a.json"), b"two")  # replaces
    assert files.read_bytes(files.join(ram, "a.json")) == b"two"
    assert files.listdir(ram) == ["a.json"]  # no temporary name left
    with pytest.raises(FileNotFoundError):
        files.read_bytes(files.join(ram, "missing"))
    files.remove(files.join(ram, "missing"))  # already gone: fine
    assert files.listdir(files.join(ram, "nowhere")) == []


def test_directory_transport_on_ram(ram):
    transport = DirectoryTransport(files.join(ram, "x"), keep=2)
    assert transport.path == files.join(ram, "x")
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
    for step in (100, 200, 300):
        transport.write(Snapshot(1, step, weights))
    names = files.listdir(files.join(ram, "x", "group1"))
    assert sorted(names) == ["step0000000200.npz", "step0000000300.npz"]  # pruned, no .tmp-
    # A corrupt newer file (a torn copy) is skipped for the newest intact one.
    files.write_bytes(files.join(ram, "x", "group1", "step0000000400.npz"), b"PK\x03\x04 torn")
    got = transport.newest(1)
    assert got.step == 300 and all(np.array_equal(a, b) for a, b in zip(got.weights, weights))
    assert not transport.finished(1)
    transport.finish([Snapshot(1, 500, weights)])
    assert transport.finished(1) and transport.newest(1).step == 500


def test_two_groups_exchange_stale_weights_through_ram(ram):
    """Group 0 trains and publishes; group 1 starts, takes group 0's final
    weights as its teacher and publishes its own; group 0 resumes and takes
    group 1's. Each teacher copy equals the peer's trained weights exactly."""
    exchange_dir = files.join(ram, "exchange")
    g0, g1 = _group(0, exchange_dir), _group(1, exchange_dir)

    g0.fit(_dataset(0, 4), epochs=1, verbose=0)
    assert g0.exchange.transport.finished(0)
    assert sorted(files.listdir(exchange_dir)) == ["group0"]
    assert "step0000000004.npz" in files.listdir(files.join(exchange_dir, "group0"))

    g1.fit(_dataset(100, 4), epochs=1, verbose=0)
    copy = g1.exchange.copies[0]
    for a, b in zip(copy.get_weights(), g0.members[0].get_weights()):
        np.testing.assert_array_equal(a, b)
    assert g1.exchange._snapshot_step == {0: 4} and float(g1.exchange.alpha_scale().numpy()) == 1.0
    assert g1.exchange.bytes_received > 0

    g0.fit(_dataset(200, 2), epochs=1, verbose=0)
    for a, b in zip(g0.exchange.copies[1].get_weights(), g1.members[0].get_weights()):
        np.testing.assert_array_equal(a, b)
    assert g0.exchange._snapshot_step == {1: 4}
    for group in ("group0", "group1"):
        names = files.listdir(files.join(exchange_dir, group))
        assert not [n for n in names if n.startswith(".tmp-")], names


def _backup_model():
    model = CodistillModel(_members(2), alpha=0.5, data_mode="shared")
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def _state(model):
    return [v.numpy() for v in model.weights] + [v.numpy() for v in model.optimizer.variables]


def test_backup_save_and_restore_on_ram(ram, capsys):
    directory = files.join(ram, "backup")
    trained = _backup_model()
    backup = Backup(directory, keep=2, delete_on_finish=False, extra=lambda: {"note": "ram"})
    trained.fit(_dataset(0, 6).repeat(), epochs=3, steps_per_epoch=2, verbose=0, callbacks=[backup])
    assert backup_mod.list_backups(directory) == [3, 2]  # keep=2 pruned epoch 1
    assert backup_mod.verify(directory, 3) is None
    assert not [n for n in files.listdir(directory) if n.startswith(".tmp-")]

    resumed = _backup_model()
    restore = Backup(directory, delete_on_finish=False)
    restore.set_model(resumed)
    resumed.optimizer.build(resumed.trainable_variables)
    restore.on_train_begin()
    assert restore.restored_epoch == 3 and restore.restored_step == 6
    assert restore.restored_extra == {"note": "ram"}
    for a, b in zip(_state(resumed), _state(trained)):
        np.testing.assert_array_equal(a, b)

    # Bit rot in the newest backup, and an epoch left without meta.json by a
    # kill mid-save: the first is skipped by its checksum, the second deleted.
    weights = files.join(directory, "epoch-000003", backup_mod.WEIGHTS)
    data = bytearray(files.read_bytes(weights))
    data[len(data) // 2] ^= 0xFF
    files.write_bytes(weights, bytes(data))
    files.makedirs(files.join(directory, "epoch-000004"))
    files.write_bytes(files.join(directory, "epoch-000004", backup_mod.WEIGHTS), b"half")
    again = Backup(directory, delete_on_finish=False)
    assert again.resume_epoch() == 2
    assert "skipping the backup of epoch 3" in capsys.readouterr().out
    assert "epoch-000004" not in files.listdir(directory)

    # Saving over an existing epoch (a rerun after resuming from an older one) replaces it whole.
    again.set_model(resumed)
    again.save(3)
    assert backup_mod.verify(directory, 3) is None
    again.remove()
    assert not files.exists(directory)
