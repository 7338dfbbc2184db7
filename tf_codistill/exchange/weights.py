"""Stale-weights exchange: the paper's protocol (and Anil et al., 2018).

Every `every` steps each group publishes its weights; the others refresh a
frozen copy of it and run an extra, inference-mode forward pass of that copy
on their own batch. The teacher is therefore up to `every` steps stale, and
the traffic is one model per `every` steps instead of a gradient every step.

Transports (where snapshots go):

* `LocalTransport`: all groups in one process (tests, the exact reference:
  with `every=1` it equals the local exchange in independent-data mode).
* `DirectoryTransport`: a shared directory, local or any `tf.io.gfile`
  filesystem (`gs://...`). Each group's chief writes
  `group<g>/step<step>.npz` atomically (temporary name, then rename); the
  others pick up the newest complete file in a background thread. No
  collectives between groups: groups can be separate jobs, and a dead group
  does not stop the others.
* `HorovodWeightsTransport`: group leaders all-gather their flattened
  weights over a Horovod process set; each leader broadcasts them in its
  group.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import threading
import time
import zipfile
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from tf_codistill import files, traffic
from tf_codistill.callbacks import StaleWeightsRefresh
from tf_codistill.checks import check_int, is_number
from tf_codistill.choices import ON_STALE
from tf_codistill.exchange.base import Exchange

__all__ = [
    "StaleWeightsExchange",
    "LocalTransport",
    "DirectoryTransport",
    "HorovodWeightsTransport",
    "Snapshot",
]

log = logging.getLogger("tf_codistill")

_SNAPSHOT = re.compile(r"^step\d+\.npz$")


class Snapshot:
    """One group's weights at one step."""

    def __init__(self, group: int, step: int, weights: list[np.ndarray]):
        self.group = group
        self.step = step
        self.weights = weights

    @property
    def nbytes(self) -> int:
        return int(sum(w.nbytes for w in self.weights))


def _shapes(weights) -> list[tuple[int, ...]]:
    return [tuple(w.shape) for w in weights]


# --------------------------------------------------------------------------- transports
class Transport:
    """Moves snapshots between groups."""

    name = "transport"
    #: Publishing and reading both happen on the training thread (collectives).
    synchronous = False

    def start(self, own_groups: Sequence[int], peer_groups: Sequence[int], shapes) -> None:
        """Called once before training with the expected weight shapes."""

    def publish(self, snapshots: Sequence[Snapshot]) -> None:
        raise NotImplementedError

    def latest(self, group: int) -> Snapshot | None:
        """The newest complete snapshot of `group` available now, or None."""
        raise NotImplementedError

    def finish(self, snapshots: Sequence[Snapshot]) -> None:
        """Training ended: publish the final weights and say so."""
        self.publish(snapshots)

    def finished(self, group: int) -> bool:
        """True when `group` finished training (so its silence is not staleness)."""
        return False

    def exchange(self, snapshots: Sequence[Snapshot], step: int) -> None:
        """Synchronous transports: publish and receive in one collective."""
        self.publish(snapshots)

    def close(self) -> None:
        pass


class LocalTransport(Transport):
    """In-process snapshots (all groups in one process)."""

    name = "local"

    def __init__(self):
        self._snapshots: dict[int, Snapshot] = {}

    def publish(self, snapshots):
        for s in snapshots:
            self._snapshots[s.group] = s

    def latest(self, group):
        return self._snapshots.get(group)


class DirectoryTransport(Transport):
    """Snapshots as files in a shared directory; reading happens in a
    background thread so that training never waits for a peer's file.

    Args:
        path: the shared exchange directory (created if missing): a local
            or network-mounted path, or any `tf.io.gfile` URL (`gs://bucket/x`
            for TPU jobs, which have no shared disk).
        keep: snapshots to keep per group (older ones are deleted).
        poll_seconds: how often the reader looks for newer peer files.
        writer: False for workers that read but do not publish (only a
            group's chief writes).
    """

    name = "directory"

    def __init__(self, path: str, keep: int = 3, poll_seconds: float = 0.5, writer: bool = True):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a directory path or URL (gs://...), got {path!r}.")
        if not os.fspath(path).strip():
            raise ValueError("path is empty: give the shared exchange directory.")
        check_int("keep", keep)
        if keep < 1:
            raise ValueError(f"keep must be >= 1 snapshot per group, got {keep}.")
        if not is_number(poll_seconds):
            raise TypeError(f"poll_seconds must be a number, got {poll_seconds!r}.")
        if not (math.isfinite(poll_seconds) and poll_seconds > 0):
            raise ValueError(f"poll_seconds must be a finite number > 0, got {poll_seconds}.")
        self.path = files.absolute(path)
        self.keep = int(keep)
        self.poll_seconds = poll_seconds
        self.writer = writer
        self._latest: dict[int, Snapshot] = {}
        self._error: Exception | None = None
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_queue: list[list[Snapshot]] = []
        self._write_ready = threading.Condition(self._lock)
        self._writer_thread: threading.Thread | None = None
        self.check_writable()

    def check_writable(self) -> None:
        """Raises ValueError now (at start-up) if the directory is unusable."""
        try:
            files.probe_writable(self.path)
        except OSError as err:
            raise ValueError(
                f"exchange directory {self.path} is not writable ({err.strerror or err}); "
                "every group's chief writes its weights there. Point --exchange_dir at a shared, "
                "writable directory."
            ) from err

    # writing ---------------------------------------------------------------
    def _group_dir(self, group: int) -> str:
        return files.join(self.path, f"group{group}")

    def _snapshot_names(self, group: int) -> list[str]:
        """Complete snapshot files of `group`, oldest first (temporary names excluded)."""
        return sorted(n for n in files.listdir(self._group_dir(group)) if _SNAPSHOT.match(n))

    def write(self, snapshot: Snapshot) -> str:
        """Writes one snapshot atomically (a temporary name, then a rename:
        rename(2) on a local disk, copy+delete on Cloud Storage, where the
        final object still appears whole); returns its path."""
        folder = self._group_dir(snapshot.group)
        files.makedirs(folder)
        final = files.join(folder, f"step{snapshot.step:010d}.npz")
        tmp = files.join(folder, f".tmp-{os.getpid()}-{snapshot.step}.npz")
        meta = {"group": snapshot.group, "step": snapshot.step, "shapes": _shapes(snapshot.weights)}
        arrays = {f"w{i}": w for i, w in enumerate(snapshot.weights)}
        buffer = io.BytesIO()
        np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        files.write_bytes(tmp, buffer.getvalue())  # fsynced when local
        try:
            files.replace(tmp, final)
        except BaseException:
            files.remove(tmp)
            raise
        for old in self._snapshot_names(snapshot.group)[: -self.keep]:
            files.remove(files.join(folder, old))
        return final

    def _done_path(self, group: int) -> str:
        return files.join(self._group_dir(group), "DONE")

    def finish(self, snapshots):
        if not self.writer:
            return
        for snapshot in snapshots:
            self.write(snapshot)  # now, not queued: the job is about to exit
            files.write_bytes(self._done_path(snapshot.group), str(snapshot.step).encode())

    def finished(self, group):
        return files.exists(self._done_path(group))

    def publish(self, snapshots):
        if not self.writer:
            return
        for snapshot in snapshots:  # a (re)started group is not finished
            files.remove(self._done_path(snapshot.group))
        with self._lock:
            self._write_queue.append(list(snapshots))
            self._write_ready.notify()

    def _writer_loop(self):
        while True:
            with self._lock:
                while not self._write_queue and not self._stop.is_set():
                    self._write_ready.wait(0.5)
                if not self._write_queue and self._stop.is_set():
                    return
                batch = self._write_queue[-1]  # newest wins; older ones are moot
                self._write_queue.clear()
            for snapshot in batch:
                try:
                    self.write(snapshot)
                except OSError as err:
                    self._warn_once(f"write{snapshot.group}", f"could not write weights snapshot: {err}")

    # reading ---------------------------------------------------------------
    def read(self, path: str) -> Snapshot:
        """Loads one snapshot file (raises on a truncated or corrupt file)."""
        with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            weights = [np.array(data[f"w{i}"]) for i in range(len(meta["shapes"]))]
        return Snapshot(int(meta["group"]), int(meta["step"]), weights)

    def newest(self, group: int) -> Snapshot | None:
        """The newest readable snapshot of `group` in the directory; corrupt
        or truncated files are skipped with a warning."""
        for name in reversed(self._snapshot_names(group)):
            path = files.join(self._group_dir(group), name)
            try:
                return self.read(path)
            except FileNotFoundError:
                continue  # deleted by its writer meanwhile
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                self._warn_once(path, f"skipping unreadable peer snapshot {path}: {err}")
        return None

    def _warn_once(self, key: str, message: str):
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)
            print(f"WARNING: {message}", flush=True)

    def start(self, own_groups, peer_groups, shapes):
        self._stop.clear()
        self._peers = list(peer_groups)
        self._shapes = [tuple(s) for s in shapes]
        self._poll_once()
        self._thread = threading.Thread(target=self._reader_loop, name="codistill-peer-reader", daemon=True)
        self._thread.start()
        if self.writer:
            self._writer_thread = threading.Thread(
                target=self._writer_loop, name="codistill-weights-writer", daemon=True
            )
            self._writer_thread.start()

    def _poll_once(self):
        for group in self._peers:
            current = self._latest.get(group)
            snapshot = self.newest(group)
            if snapshot is None or (current is not None and snapshot.step == current.step):
                continue
            got = _shapes(snapshot.weights)
            if got != self._shapes:
                self._error = ValueError(
                    f"peer group {group}'s snapshot (step {snapshot.step}) comes from an incompatible "
                    f"model: its weight shapes are {got}, this model's are {self._shapes}. Every "
                    "group must train the same architecture with the same number of classes."
                )
                return
            with self._lock:
                self._latest[group] = snapshot

    def _reader_loop(self):
        while not self._stop.wait(self.poll_seconds):
            if self._error is None:
                self._poll_once()

    def latest(self, group):
        if self._error is not None:
            raise self._error
        with self._lock:
            return self._latest.get(group)

    def close(self):
        self._stop.set()
        with self._lock:
            self._write_ready.notify_all()
        for thread in (self._thread, self._writer_thread):
            if thread is not None:
                thread.join(timeout=30)


class HorovodWeightsTransport(Transport):
    """Group leaders all-gather flattened weights every refresh; each leader
    broadcasts the result inside its group. Collective, so synchronous.

    Args:
        topology: `tf_codistill.topology.Topology`.
        leaders_set: process set of the group leaders (rank 0 of every group).
        group_set: this group's process set (None for a group of one).
    """

    name = "horovod"
    synchronous = True

    def __init__(self, topology, leaders_set, group_set):
        self.topology = topology
        self.leaders_set = leaders_set
        self.group_set = group_set
        self._latest: dict[int, Snapshot] = {}

    def start(self, own_groups, peer_groups, shapes):
        self._shapes = [tuple(s) for s in shapes]
        self._sizes = [int(np.prod(s)) for s in self._shapes]

    def exchange(self, snapshots, step):
        import horovod.tensorflow as hvd

        from tf_codistill.exchange.horovod import HOST_DEVICE, on_host

        topo = self.topology
        groups = topo.num_groups
        # On the host (on_host): the weights come from and go to NumPy, and a
        # Gloo-only Horovod has no GPU kernels.
        with tf.device(HOST_DEVICE):
            if topo.is_group_chief:
                flat = np.concatenate([w.reshape(-1) for w in snapshots[0].weights]).astype(np.float32)
                gathered = on_host(
                    hvd.allgather,
                    tf.constant(flat[None, :]),
                    name="codistill_weights",
                    process_set=self.leaders_set,
                )
            else:
                gathered = tf.zeros([groups, sum(self._sizes)], tf.float32)
            if topo.group_size > 1:
                leader = topo.group_ranks()[0]
                gathered = on_host(
                    hvd.broadcast,
                    gathered,
                    root_rank=leader,
                    name="codistill_weights_bcast",
                    process_set=self.group_set,
                )
        gathered = gathered.numpy()
        for g in range(groups):
            if g == topo.group:
                continue
            parts, offset = [], 0
            for shape, size in zip(self._shapes, self._sizes):
                parts.append(gathered[g, offset : offset + size].reshape(shape))
                offset += size
            self._latest[g] = Snapshot(g, step, parts)

    def latest(self, group):
        return self._latest.get(group)


# --------------------------------------------------------------------------- exchange
class StaleWeightsExchange(Exchange):
    """Teachers are frozen copies of the peers, refreshed every `every` steps.

    Args:
        every: refresh period in steps (the paper: 2,500 on ImageNet; Anil et
            al.: 50). 0 refreshes never after the first copy.
        transport: a `Transport`; `LocalTransport` for all groups in one
            process.
        group: this process's group when it holds one member (ignored with
            several local members, which are groups 0..n-1).
        num_groups: total number of groups (defaults to the local members).
        peer_timeout: seconds without a newer peer snapshot after which the
            peer counts as stale (warned once).
        on_stale: ``"keep"`` the last copy, or ``"drop"`` alpha to 0 while
            any peer is stale.
    """

    name = "weights"

    def __init__(
        self,
        every: int,
        transport: Transport | None = None,
        group: int = 0,
        num_groups: int | None = None,
        peer_timeout: float = 300.0,
        on_stale: str = "keep",
    ):
        check_int("every", every)
        check_int("group", group)
        if num_groups is not None:
            check_int("num_groups", num_groups)
        if every < 0:
            raise ValueError(f"exchange every must be >= 0 steps (0: never refresh), got {every}.")
        if num_groups is not None and num_groups < 1:
            raise ValueError(f"num_groups must be >= 1 (or None: the local members), got {num_groups}.")
        if transport is not None and not isinstance(transport, Transport):
            raise TypeError(
                "transport must be a Transport (LocalTransport, DirectoryTransport, "
                f"HorovodWeightsTransport), got {type(transport).__name__}."
            )
        if on_stale not in ON_STALE:
            raise ValueError(f"on_stale must be one of {ON_STALE}, got {on_stale!r}.")
        if not is_number(peer_timeout):
            raise TypeError(f"peer_timeout must be a number of seconds, got {peer_timeout!r}.")
        if not math.isfinite(peer_timeout):
            raise ValueError(f"peer_timeout must be a finite number of seconds, got {peer_timeout}.")
        if peer_timeout <= 0:
            raise ValueError(f"peer_timeout must be > 0 seconds, got {peer_timeout}.")
        self.every = every
        self.transport = transport if transport is not None else LocalTransport()
        self.group = group
        self._num_groups = num_groups
        self.peer_timeout = peer_timeout
        self.on_stale = on_stale
        self.bytes_received = 0
        self.refresh_seconds = 0.0
        self.refreshes = 0

    # setup -----------------------------------------------------------------
    def num_groups(self, num_local_members: int) -> int:
        return self._num_groups or num_local_members

    def bind(self, model) -> None:
        n = model.num_local_members
        total = self.num_groups(n)
        if n > 1:
            if total != n:
                raise ValueError(f"with {n} local members num_groups must be {n}, got {total}.")
            self.own_groups = list(range(n))
            self.peer_groups = list(range(n))
        else:
            if not 0 <= self.group < total:
                raise ValueError(f"group must be in [0, {total}), got {self.group}.")
            self.own_groups = [self.group]
            self.peer_groups = [g for g in range(total) if g != self.group]
        self._model = model
        template = model.members[0]
        self.copies = {}
        for g in self.peer_groups:
            copy = keras.models.clone_model(template)
            copy.trainable = False
            self.copies[g] = copy
        self._snapshot_step = {g: None for g in self.peer_groups}
        self._last_new = {g: time.monotonic() for g in self.peer_groups}
        self._stale_warned: set[int] = set()
        self._restored = False
        self._scale = keras.Variable(0.0, trainable=False, name="codistill_peer_scale")
        self._staleness = keras.Variable(0.0, trainable=False, name="codistill_staleness")
        self._shapes = [tuple(w.shape) for w in template.get_weights()]

    def alpha_scale(self):
        return self._scale

    def step_logs(self) -> dict:
        return {"staleness": self._staleness.value, "peer_scale": self._scale.value}

    def peer_logits(self, members, inputs, logits, data_mode):
        return [
            {g: self.copies[g](x, training=False) for g in self.peer_groups if g != self.own_groups[i]}
            for i, x in enumerate(inputs)
        ]

    def bytes_sent_per_step(self, batch_size: int, num_classes: int, num_params: int) -> float:
        # One model (float32) to each other group every `every` steps.
        return traffic.stale_weights_bytes(num_params, self.num_groups(1), self.every)

    # refresh (between steps, on the training thread) -------------------------
    def _own_snapshots(self, step: int) -> list[Snapshot]:
        return [
            Snapshot(g, step, [np.array(w) for w in m.get_weights()])
            for g, m in zip(self.own_groups, self._model.members)
        ]

    def start(self, step: int) -> None:
        self.transport.start(
            self.own_groups, [g for g in self.peer_groups if g not in self.own_groups], self._shapes
        )
        if self._restored:
            # Resumed from a backup: the copies are the ones the uninterrupted
            # run held at this step; the next refresh is at the next multiple
            # of `every`, as it would have been.
            self._restored = False
            self._update_scale(step, time.monotonic())
            return
        self.refresh(step, publish=True)

    def state_dict(self) -> dict:
        state = {}
        for g in self.peer_groups:
            if self._snapshot_step[g] is None:
                continue
            state[f"step{g}"] = np.array(self._snapshot_step[g], np.int64)
            for i, w in enumerate(self.copies[g].get_weights()):
                state[f"copy{g}_{i}"] = np.asarray(w)
        return state

    def load_state_dict(self, state: dict) -> None:
        now = time.monotonic()
        for g in self.peer_groups:
            if f"step{g}" not in state:
                continue
            weights = [state[f"copy{g}_{i}"] for i in range(len(self._shapes))]
            if _shapes(weights) != self._shapes:
                raise ValueError(
                    f"the backup's copy of group {g} has shapes {_shapes(weights)}, not {self._shapes}."
                )
            self.copies[g].set_weights(weights)
            self._snapshot_step[g] = int(state[f"step{g}"])
            self._last_new[g] = now
        self._restored = any(f"step{g}" in state for g in self.peer_groups)

    def refresh(self, step: int, publish: bool) -> None:
        begin = time.perf_counter()
        if self.transport.synchronous:
            self.transport.exchange(self._own_snapshots(step), step)
        elif publish:
            self.transport.publish(self._own_snapshots(step))
        now = time.monotonic()
        for g in self.peer_groups:
            snapshot = self.transport.latest(g)
            if snapshot is None:
                continue
            if snapshot.step != self._snapshot_step[g]:
                if _shapes(snapshot.weights) != self._shapes:
                    raise ValueError(
                        f"peer group {g}'s weights have shapes {_shapes(snapshot.weights)}, this "
                        f"model's are {self._shapes}: the groups train incompatible models."
                    )
                self.copies[g].set_weights(snapshot.weights)
                self._snapshot_step[g] = snapshot.step
                self._last_new[g] = now
                self.bytes_received += snapshot.nbytes
                if g in self._stale_warned:
                    self._stale_warned.discard(g)
                    print(f"peer group {g} is back (snapshot of step {snapshot.step}).", flush=True)
        self._update_scale(step, now)
        self.refresh_seconds += time.perf_counter() - begin
        self.refreshes += 1

    def _update_scale(self, step: int, now: float) -> None:
        seen = all(s is not None for s in self._snapshot_step.values())
        stale = [
            g
            for g in self.peer_groups
            if now - self._last_new[g] > self.peer_timeout and not self.transport.finished(g)
        ]
        for g in stale:
            if g not in self._stale_warned:
                self._stale_warned.add(g)
                policy = "dropping alpha to 0" if self.on_stale == "drop" else "keeping its last copy"
                print(
                    f"WARNING: peer group {g} is stale: no new snapshot for {self.peer_timeout:.0f}s "
                    f"(last from step {self._snapshot_step[g]}); {policy} until it is back.",
                    flush=True,
                )
        active = seen and not (stale and self.on_stale == "drop")
        self._scale.assign(1.0 if active else 0.0)
        self.tick(step)

    def tick(self, step: int) -> None:
        """Between refreshes: only the staleness (steps since the copies were taken) moves."""
        steps = [step - s for s in self._snapshot_step.values() if s is not None]
        self._staleness.assign(float(max(steps)) if steps else 0.0)

    def callbacks(self) -> list:
        # Public, so that a loop can run it and `fit` can tell it was passed.
        return [StaleWeightsRefresh(self)]

    def close(self) -> None:
        self.transport.close()
