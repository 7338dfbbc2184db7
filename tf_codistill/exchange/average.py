"""Parameter averaging every H steps: local SGD, and DiLoCo's outer step.

Every group is an island that trains on its own data order (with
MultiWorkerMirroredStrategy inside it, as in the other exchanges). All
islands start from the same weights (group 0's). Every `every` = H updates
each island's delta from the shared weights it last started from,
`shared - own`, is averaged over the islands, and an outer optimizer takes
that mean delta as its gradient and moves the shared weights (Douillard et
al. 2023, arXiv 2311.08105: Nesterov momentum 0.9, learning rate 0.7). Every
island then continues from the new shared weights; its inner optimizer keeps
its own state. Outer SGD with learning rate 1 and no momentum is plain
parameter averaging (local SGD): the shared weights become the islands' mean.

Where the islands live:

* all in this process (`topology=None`): the mean is taken here;
* one per Horovod group: every worker all-reduces its flattened deltas over
  its pair's process set (the workers with its rank in group, one per
  group), on the host, as a ring all-reduce of the parameters every H steps.
  The workers of a group hold the same weights, so every pair gets the same
  mean and no broadcast inside the group is needed.

Non-trainable float weights (batch-norm statistics) are averaged plainly;
integer ones (random-seed states) stay each island's own.

With alpha > 0 the islands also codistil. With `teacher="shared"` each
one's teacher is the model every peer island held at the last outer step,
i.e. the shared weights (a frozen copy, refreshed at each outer step, so the
term costs no traffic). With `teacher="peers"` it is the other islands'
current predictions on its own batch at every step, as in codistillation.
The islands read different batches, so across processes each worker sends
its batch's inputs to its pair (an all-gather), runs its own model on the
others' inputs, and sends those predictions back to their owners (an
all-to-all): per step (G - 1) x batch x (input values + classes) floats.
In one process the others' models run on the island's batch directly; the
byte accounting is the same in both.
With alpha = 0 (the default with this exchange: pure DiLoCo) the teacher is
the member's own prediction and costs nothing.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from tf_codistill import traffic
from tf_codistill.callbacks import ParameterAveraging
from tf_codistill.checks import check_int
from tf_codistill.choices import AVERAGE_TEACHERS
from tf_codistill.exchange.base import Exchange

__all__ = ["AveragingExchange", "outer_sgd"]

#: DiLoCo's outer optimizer (Douillard et al. 2023, section 3).
DEFAULT_OUTER_LEARNING_RATE = 0.7
DEFAULT_OUTER_MOMENTUM = 0.9


def outer_sgd(
    learning_rate: float = DEFAULT_OUTER_LEARNING_RATE, momentum: float = DEFAULT_OUTER_MOMENTUM
) -> keras.optimizers.SGD:
    """The outer optimizer: SGD with Nesterov momentum (none when
    `momentum` is 0; `outer_sgd(1.0, 0.0)` is plain averaging)."""
    if not (isinstance(learning_rate, (int, float)) and np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"outer learning rate must be a finite number > 0, got {learning_rate!r}.")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"outer momentum must be in [0, 1) (0: no momentum), got {momentum!r}.")
    return keras.optimizers.SGD(
        float(learning_rate), momentum=float(momentum), nesterov=momentum > 0, name="outer_sgd"
    )


def _is_float(variable) -> bool:
    return tf.as_dtype(variable.dtype).is_floating


class AveragingExchange(Exchange):
    """Islands that average their parameter deltas every `every` steps.

    Args:
        every: H, the inner steps between outer steps (>= 1).
        outer_optimizer: a Keras optimizer for the shared weights (default
            `outer_sgd()`: Nesterov momentum 0.9, learning rate 0.7). It
            receives the islands' mean delta `shared - own` as its gradient.
        topology: this process's `Topology` in a Horovod job (one island per
            process group); None when every island is in this process.
        pair_set: the Horovod process set of this worker's pair.
        teacher: with alpha > 0, ``"shared"`` (the default: the shared
            weights of the last outer step) or ``"peers"`` (the other
            islands' predictions on this island's batch, every step).
    """

    name = "average"
    default_alpha = 0.0

    def __init__(
        self, every: int, outer_optimizer=None, topology=None, pair_set=None, teacher: str = "shared"
    ):
        check_int("every", every)
        if teacher not in AVERAGE_TEACHERS:
            raise ValueError(f"teacher must be one of {AVERAGE_TEACHERS}, got {teacher!r}.")
        self.teacher = teacher
        self._input_values = 0  # values per example of the inputs, known at the first step
        if every < 1:
            raise ValueError(
                f"averaging every must be >= 1 step (H, the inner steps per outer step), got {every}."
            )
        if outer_optimizer is None:
            outer_optimizer = outer_sgd()
        if not isinstance(outer_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                f"outer_optimizer must be a keras.optimizers.Optimizer (e.g. tf_codistill.exchange.average."
                f"outer_sgd(0.7, 0.9)), got {type(outer_optimizer).__name__}."
            )
        self.every = every
        self.outer_optimizer = outer_optimizer
        self.topology = topology
        self.pair_set = pair_set
        self.group = topology.group if topology is not None else 0
        self.outer_steps = 0
        self.outer_seconds = 0.0
        self._shared = None  # the shared trainable weights (keras.Variables), made on first use
        self._started = False
        self._last_step = 0

    # setup -----------------------------------------------------------------
    def num_groups(self, num_local_members: int) -> int:
        return self.topology.num_groups if self.topology is not None else num_local_members

    def bind(self, model) -> None:
        n = model.num_local_members
        if self.topology is not None and n != 1:
            raise ValueError(f"across processes every process trains one island; got {n} members.")
        if self.num_groups(n) > 1 and model.data_mode == "shared" and n > 1:
            raise ValueError(
                "parameter averaging needs every island to read its own batches: with data_mode='shared' "
                "the islands stay identical and averaging does nothing. Use data_mode='independent'."
            )
        self._model = model
        self._islands = self.num_groups(n)
        alpha = getattr(getattr(model, "alpha_schedule", None), "alpha", 1.0)
        self._distill = alpha > 0
        self._teacher = None
        if self._distill and self.teacher == "shared":
            self._teacher = keras.models.clone_model(model.members[0])
            self._teacher.trainable = False
        own = [self.group] if self.topology is not None else list(range(n))
        self._peers = [[g for g in range(self.num_groups(n)) if g != o] for o in own]
        self._check_shapes_match()

    def _check_shapes_match(self) -> None:
        """Fails at start-up, on every rank, when the islands' models differ
        (the all-reduce would fail later, less clearly)."""
        if self.topology is None or self.topology.num_groups == 1:
            return
        import horovod.tensorflow as hvd

        shapes = [tuple(v.shape) for v in _state(self._members()[0])]
        everyone = hvd.allgather_object(
            (self.group, shapes), name="codistill_average_shapes", process_set=self.pair_set
        )
        if len({tuple(s) for _, s in everyone}) > 1:
            listing = "; ".join(
                f"group {g}: {len(s)} weights, {sum(int(np.prod(x)) for x in s):,} values"
                for g, s in sorted(everyone)
            )
            raise ValueError(
                f"parameter averaging needs every group to train the same architecture; got {listing}. "
                "Build every group's model with the same layers and number of classes."
            )

    def _members(self):
        return self._model.members

    def _ensure_built(self) -> None:
        """The shared weights and the outer optimizer's state, built from
        member 0's trainable weights (every island holds those at the start)."""
        if self._shared is not None:
            return
        member = self._members()[0]
        # Under the strategy the optimizer was made in (the group's, when the
        # exchange is made under `Runtime.scope()`), which its build requires.
        # The outer step runs between train steps, in cross-replica context:
        # each worker updates its own copies, with no collective in its group.
        strategy = (
            getattr(self.outer_optimizer, "_distribution_strategy", None) or tf.distribute.get_strategy()
        )
        with strategy.scope():
            self._shared = [
                keras.Variable(np.array(v.numpy()), trainable=True, name=f"shared_{i}")
                for i, v in enumerate(member.trainable_weights)
            ]
            self.outer_optimizer.build(self._shared)

    # the train step ----------------------------------------------------------
    def peer_logits(self, members, inputs, logits, data_mode):
        if self._distill and self.teacher == "peers":
            self._input_values = sum(
                int(np.prod(t.shape[1:])) for t in tf.nest.flatten(inputs[0]) if t.shape.rank
            )
            if self.topology is not None:
                return [self._peer_logits_across(members[0], inputs[0])]
            return [  # every island here: the others' predictions on each island's batch
                {j: members[j](inputs[i], training=False) for j in peers}
                for i, peers in enumerate(self._peers)
            ]
        out = []
        for i, peers in enumerate(self._peers):
            teacher = (
                self._teacher(inputs[i], training=False) if self._distill else tf.stop_gradient(logits[i])
            )
            out.append({g: teacher for g in peers})
        return out

    def _peer_logits_across(self, member, inputs) -> dict:
        """The other islands' predictions on this worker's batch, one island
        per process: all-gather the inputs over the pair, predict on every
        island's batch with this island's model, and all-to-all the
        predictions back (block g of what arrives is island g's)."""
        import horovod.tensorflow as hvd

        from tf_codistill.exchange.horovod import on_host

        if self._islands == 1:
            return {}
        flat = tf.nest.flatten(inputs)
        everyone = [
            tf.identity(on_host(hvd.allgather, t, name=f"codistill_average_inputs_{k}", process_set=self.pair_set))
            for k, t in enumerate(flat)
        ]  # fmt: skip
        theirs = tf.stop_gradient(member(tf.nest.pack_sequence_as(inputs, everyone), training=False))
        # splits=None: the first axis in equal blocks, one per island, and a tensor back (no splits).
        back = on_host(hvd.alltoall, theirs, name="codistill_average_peer_logits", process_set=self.pair_set)
        back = tf.identity(back)
        per_island = tf.reshape(back, tf.concat([[self._islands, -1], tf.shape(back)[1:]], 0))
        return {g: per_island[g] for g in self._peers[0]}

    def callbacks(self) -> list:
        return [ParameterAveraging(self)]

    def bytes_sent_per_step(self, batch_size: int, num_classes: int, num_params: int) -> float:
        # A ring all-reduce of the parameters (float32) over the islands every H steps, and with
        # teacher="peers" every step this island's inputs out and the others' predictions on them
        # back (in one process too: the accounting is the across-process protocol's).
        sent = traffic.allreduce_bytes(num_params, self._islands, self.every)
        if self._distill and self.teacher == "peers":
            sent += traffic.allgather_bytes(batch_size, self._input_values + num_classes, self._islands)
        return sent

    # between steps -----------------------------------------------------------
    def start(self, step: int) -> None:
        """Training begins: every island takes group 0's weights, the shared
        weights are those, and the outer optimizer starts afresh. Only the
        first time: a later `fit` goes on, and a run resumed from a backup
        holds the islands' and the shared state already."""
        self._last_step = step
        if self._started:
            return
        self._started = True
        members = self._members()
        state = _state(members[0])
        values = [v.numpy() for v in state]
        if self.topology is not None:
            values = self._broadcast_from_group0(values)
        for m in members:
            _assign(_state(m), values)
        self._ensure_built()
        _assign(self._shared, [v.numpy() for v in members[0].trainable_weights])
        self._refresh_teacher()

    def after_step(self, step: int) -> bool:
        """Runs the outer step when the updates so far (`step`) reached the
        next multiple of H (with `steps_per_execution` > 1, steps come in
        blocks). Returns whether it ran."""
        due = step // self.every > self._last_step // self.every
        self._last_step = step
        if not due:
            return False
        begin = time.perf_counter()
        self.outer_step()
        self.outer_seconds += time.perf_counter() - begin
        return True

    def outer_step(self) -> None:
        """Averages the islands' deltas (and their non-trainable float
        weights), applies the outer optimizer, and puts every island at the
        new shared weights."""
        self._ensure_built()
        members = self._members()
        shared = [v.numpy() for v in self._shared]
        rows = []
        for m in members:
            deltas = [s - v.numpy() for s, v in zip(shared, m.trainable_weights)]
            rows.append(_flat(deltas + [v.numpy() for v in _statistics(m)]))
        mean = self._mean(np.stack(rows))
        shapes = [s.shape for s in shared] + [tuple(v.shape) for v in _statistics(members[0])]
        chunks = _split(mean, shapes)
        grads, statistics = chunks[: len(shared)], chunks[len(shared) :]
        self.outer_optimizer.apply_gradients(
            [(tf.constant(g, dtype=v.dtype), v) for g, v in zip(grads, self._shared)]
        )
        new_shared = [v.numpy() for v in self._shared]
        for m in members:
            _assign(m.trainable_weights, new_shared)
            _assign(_statistics(m), statistics)
        self.outer_steps += 1
        self._refresh_teacher()

    def _mean(self, rows: np.ndarray) -> np.ndarray:
        """The mean over every island of `rows` (one row per local island)."""
        if self.topology is None or self.topology.num_groups == 1:
            return rows.mean(axis=0)
        import horovod.tensorflow as hvd

        from tf_codistill.exchange.horovod import HOST_DEVICE, on_host

        with tf.device(HOST_DEVICE):
            mean = on_host(
                hvd.allreduce,
                tf.constant(rows[0]),
                op=hvd.Average,
                name="codistill_average",
                process_set=self.pair_set,
            )
        return mean.numpy()

    def _broadcast_from_group0(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        import horovod.tensorflow as hvd

        from tf_codistill.exchange.horovod import HOST_DEVICE, on_host

        with tf.device(HOST_DEVICE):
            got = on_host(
                hvd.broadcast,
                tf.constant(_flat(weights)),
                root_rank=self.topology.pair_ranks()[0],
                name="codistill_average_init",
                process_set=self.pair_set,
            )
        return _split(got.numpy(), [w.shape for w in weights])

    def _refresh_teacher(self) -> None:
        if self._teacher is not None:
            self._teacher.set_weights(self._members()[0].get_weights())

    # backups -----------------------------------------------------------------
    def state_dict(self) -> dict:
        self._ensure_built()
        state = {f"shared{i}": np.array(v.numpy()) for i, v in enumerate(self._shared)}
        for i, v in enumerate(self.outer_optimizer.variables):
            state[f"outer{i}"] = np.array(v.numpy())
        if self._teacher is not None:
            for i, w in enumerate(self._teacher.get_weights()):
                state[f"teacher{i}"] = np.asarray(w)
        state["outer_steps"] = np.array(self.outer_steps, np.int64)
        return state

    def load_state_dict(self, state: dict) -> None:
        self._ensure_built()
        pairs = [(f"shared{i}", v) for i, v in enumerate(self._shared)]
        pairs += [(f"outer{i}", v) for i, v in enumerate(self.outer_optimizer.variables)]
        for key, variable in pairs:
            if key not in state or tuple(state[key].shape) != tuple(variable.shape):
                raise ValueError(
                    f"the backup's averaging state {key} does not fit this model and outer optimizer; "
                    "it was written by another configuration."
                )
            variable.assign(state[key])
        if self._teacher is not None:
            keys = [f"teacher{i}" for i in range(len(self._teacher.weights))]
            if any(k not in state for k in keys):
                raise ValueError("the backup holds no teacher copy: it was written with alpha = 0.")
            self._teacher.set_weights([state[k] for k in keys])
        self.outer_steps = int(state.get("outer_steps", 0))
        self._started = True


def _statistics(member) -> list:
    """The non-trainable float weights (batch-norm statistics), averaged plainly."""
    return [v for v in member.non_trainable_weights if _is_float(v)]


def _state(member) -> list:
    """What every island shares: trainable weights and float statistics
    (not the integer random-seed states: each island draws its own)."""
    return list(member.trainable_weights) + _statistics(member)


def _flat(arrays) -> np.ndarray:
    if not arrays:
        return np.zeros([0], np.float32)
    return np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays])


def _split(flat: np.ndarray, shapes) -> list[np.ndarray]:
    out, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return out


def _assign(variables, values) -> None:
    for variable, value in zip(variables, values):
        variable.assign(np.asarray(value).astype(tf.as_dtype(variable.dtype).as_numpy_dtype))
