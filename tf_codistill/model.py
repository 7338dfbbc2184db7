"""`CodistillModel`: G member models trained side by side with a distillation term.

Each member i minimises

    task_loss(y_i, f_i(x_i)) + alpha_k * D(f_i(x_i), stop_gradient(mean_{j != i} f_j(x_i)))

where the peers' predictions come from an `Exchange` (other members in this
process, other processes, or stale copies). With one group there is no peer
and the model is the plain synchronous baseline: both arms of a comparison run
through the same train step.

Saving: `get_config` holds the members, distance, alpha and
weight-decay schedules, data mode, `num_classes` and
`max_bad_peer_steps`; `save` adds the weights and the compiled
optimizer's state, so `keras.models.load_model` gives a model that
continues training where it stopped (`ModelCheckpoint("x.keras")` works).
The exchange is not saved: a loaded model uses `LocalExchange`. For a
multi-process exchange (Horovod, stale weights between processes), the
code that loads builds the model with its exchange as before, compiles
it, and restores weights and optimizer state with
`model.load_weights("x.keras")`.

Mixed precision: under `keras.mixed_precision.set_dtype_policy(
"mixed_bfloat16")` or `"mixed_float16"` (set before building the
members and this model) the members compute in half precision, while
the task loss, the distillation term and the weight decay are computed
in float32 from float32-cast logits. With `"mixed_float16"`, `compile`
wraps the optimizer in `keras.optimizers.LossScaleOptimizer` (as Keras
does for any model) and the train step scales the loss through
`optimizer.scale_loss`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_codistill import keras_compat, model_inputs, model_terms, positions, task
from tf_codistill.callbacks import PeerFailureError, TrainingHooksMixin
from tf_codistill.checks import check_int, check_number, is_int, is_number
from tf_codistill.choices import DATA_MODES
from tf_codistill.exchange import Exchange, LocalExchange
from tf_codistill.losses import get_distance
from tf_codistill.model_metrics import MetricsBook
from tf_codistill.model_saving import SavingMixin
from tf_codistill.schedules import AlphaSchedule, Schedule

__all__ = ["CodistillModel", "DATA_MODES", "PeerFailureError"]


def _num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def _check_args(data_mode, weight_decay, num_classes, exchange, max_bad_peer_steps, clip_norm) -> None:
    """`CodistillModel`'s arguments that can be refused before anything is built."""
    if data_mode not in DATA_MODES:
        raise ValueError(f"data_mode must be one of {DATA_MODES}, got {data_mode!r}.")
    if not (is_number(weight_decay) or callable(weight_decay)):
        raise TypeError(f"weight_decay must be a number or a step schedule, got {weight_decay!r}.")
    if is_number(weight_decay):
        check_number("weight_decay", weight_decay)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    if num_classes is not None:
        if not is_int(num_classes):
            raise TypeError(f"num_classes must be an integer or None, got {num_classes!r}.")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if exchange is not None and not isinstance(exchange, Exchange):
        raise TypeError(
            f"exchange must be a tf_codistill Exchange (LocalExchange, StaleWeightsExchange, ...), "
            f"got {type(exchange).__name__}."
        )
    check_int("max_bad_peer_steps", max_bad_peer_steps)
    if max_bad_peer_steps < 1:
        raise ValueError(f"max_bad_peer_steps must be >= 1, got {max_bad_peer_steps}.")
    if clip_norm is not None and not (is_number(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a number > 0 or None, got {clip_norm!r}.")


@keras.saving.register_keras_serializable(package="tf_codistill")
class CodistillModel(SavingMixin, TrainingHooksMixin, keras.Model):
    """Trains several member models with codistillation (or one, synchronously).

    Use it like any Keras model::

        model = CodistillModel([build(seed=0), build(seed=1)], alpha=1.0)   # KL, independent data
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])
        model.fit(data.independent_batches(spec, 64, num_members=2), validation_data=test_ds, epochs=10)
        model.save("codistill.keras")            # keras.models.load_model(...) after import tf_codistill
        model.export("serving/")                 # a SavedModel serving the ensemble
        model.export_member(0, "member0.keras")  # one member as a plain Keras model

    Saving and mixed precision: see this module's docstring.

    Members must return logits of the same shape. Training logs `loss` (the
    objective, summed over local members and averaged), `task_loss`,
    `distill_loss`, `agreement` (fraction of examples whose argmax equals the
    peers'), `alpha`, and every compiled metric pooled over members and per
    member (`g0_accuracy`, ...). `evaluate` reports each member and, with more
    than one local member, the ensemble (mean of the softmaxes).

    Args:
        members: the member models, or a callable `index -> keras.Model`
            together with `num_groups`.
        num_groups: number of members to build when `members` is a callable.
        distance: name in `tf_codistill.losses.DISTANCES` (default
            ``"kl"``: KL(peers || own) of the tempered softmaxes; see
            docs/choosing.md for why not MSE) or any
            `keras.distillation.DistillationLoss` instance, called as
            `compute_loss(peers' mean logits, own logits)`.
        temperature: softmax temperature for the named KL distances.
        alpha: weight of the distillation term, a number or an `AlphaSchedule`
            (default: the exchange's `default_alpha`, 1; 0 when averaging).
        data_mode: ``"independent"`` (each member draws its own batch, the
            paper's protocol; the dataset yields `((x_0, ...), (y_0, ...))`,
            see `tf_codistill.data.independent_batches`), ``"shared"``
            (every member sees the same batch; the dataset yields `(x, y)`;
            what per-step prediction exchange needs), ``"split"`` (each
            `(x, y)` batch split across the local members, as `tf.distribute`
            splits a global batch across replicas), or ``"auto"`` (the
            default): nested per-member batches are independent, a plain
            batch is split; with one member, shared.
        exchange: how peer predictions arrive; defaults to `LocalExchange`.
        weight_decay: L2 coefficient on kernels (variables of rank >= 2),
            a number or a step schedule (e.g. `schedules.paper_weight_decay`).
            It is the coupled form used by the paper's SGD: its gradient is
            `weight_decay * w`.
        num_classes: if given, integer labels are checked to lie in
            `[0, num_classes)` at every step.
        max_bad_peer_steps: a peer group whose predictions contain NaN or
            Inf contributes no distillation term in that step (logged as
            `bad_peer_steps`); after this many such steps training stops
            with `PeerFailureError` naming the group.
        clip_norm: if given, each member's gradient is clipped to this
            global norm on its own (an optimizer's `global_clipnorm` would
            take the norm over every local member together).

    Raises:
        ValueError: on an empty member list, members whose outputs differ in
            shape, a negative alpha, a non-positive temperature, or an
            unknown distance or data mode; at `compile`, on a task loss that
            expects probabilities or members whose output layer is a softmax.
    """

    def __init__(
        self,
        members: Sequence[keras.Model] | Callable[[int], keras.Model],
        num_groups: int | None = None,
        *,
        distance: str | keras.distillation.DistillationLoss = "kl",
        temperature: float = 1.0,
        alpha: float | AlphaSchedule | None = None,
        data_mode: str = "auto",
        exchange: Exchange | None = None,
        weight_decay: float | Schedule = 0.0,
        num_classes: int | None = None,
        max_bad_peer_steps: int = 10,
        clip_norm: float | None = None,
        name: str = "codistill",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        members = _build_members(members, num_groups)
        _check_args(data_mode, weight_decay, num_classes, exchange, max_bad_peer_steps, clip_norm)
        self._data_mode_arg = data_mode
        self._split_plain = data_mode in ("auto", "split")
        if data_mode in ("auto", "split"):
            data_mode = "independent" if len(members) > 1 else "shared"
        if alpha is None:  # the exchange's default: 1, or 0 for parameter averaging (pure DiLoCo)
            alpha = getattr(exchange, "default_alpha", 1.0)
        if not isinstance(alpha, AlphaSchedule):
            alpha = AlphaSchedule(alpha)
        if is_number(weight_decay):
            weight_decay = float(weight_decay)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        # The terms `compute_loss` computed in the step being traced, for
        # `compute_metrics`: per thread, as MirroredStrategy traces each
        # replica's step in a thread of its own (a plain object: Keras does
        # not track it).
        self._step = threading.local()
        self.members = members
        self.distance = get_distance(distance, temperature)
        self.temperature = temperature
        self.alpha_schedule = alpha
        self.data_mode = data_mode
        self.exchange = exchange if exchange is not None else LocalExchange()
        self.weight_decay = weight_decay
        self.num_classes = num_classes
        self.exchange.bind(self)
        self.num_groups = self.exchange.num_groups(len(members))
        self.max_bad_peer_steps = int(max_bad_peer_steps)
        # Steps in which each group's predictions (or weights) were NaN/Inf.
        self.bad_peer_steps = keras.Variable(
            np.zeros(self.num_groups, "float32"),
            trainable=False,
            aggregation="only_first_replica",
            name="bad_peer_steps",
        )
        model_inputs.check_output_shapes(members)
        self._batch_hooks = None  # the callbacks train_on_batch runs (started at its first call)
        if all(m.built for m in members):
            self.built = True

    # ----------------------------------------------------------------- setup
    @property
    def num_local_members(self) -> int:
        return len(self.members)

    @property
    def codistilling(self) -> bool:
        """True when there is at least one peer (more than one group)."""
        return self.num_groups > 1

    def compile(self, optimizer="sgd", loss=None, metrics=None, **kwargs):
        """Like `keras.Model.compile`.

        Args:
            optimizer: as for Keras (wrapped in a `LossScaleOptimizer` under
                the ``"mixed_float16"`` policy).
            loss: the task loss on logits: `None` (the default,
                `SparseCategoricalCrossentropy(from_logits=True)`), the names
                ``"sparse_categorical_crossentropy"`` and
                ``"categorical_crossentropy"`` (taken on logits), any
                `keras.losses.Loss`, or a function
                `(y_true, logits) -> per-example loss`.
            metrics: metrics, reported pooled over members and per member.
            **kwargs: other `keras.Model.compile` arguments (`jit_compile`
                defaults to False).

        Raises:
            ValueError: a loss that expects probabilities (a Keras loss with
                `from_logits=False`, or the plain crossentropy functions),
                or a member whose output layer is a softmax.
        """
        for i, member in enumerate(self.members):
            if task.softmax_output(member):
                raise ValueError(
                    f"member {i} ({member.name}) ends in a softmax; CodistillModel needs logits (the "
                    "distance and the task loss take logits). Remove the softmax from its last layer "
                    "(e.g. Dense(classes) instead of Dense(classes, activation='softmax'))."
                )
        self.task_loss = task.resolve_loss(loss)
        optimizer = keras.optimizers.get(optimizer)
        self._codistill_compile_args = {"optimizer": optimizer, "loss": loss, "metrics": metrics, **kwargs}
        sparse = not isinstance(self.task_loss, keras.losses.CategoricalCrossentropy)
        ensemble = self.num_local_members > 1 or (self.codistilling and self.exchange.gathers_eval_logits)
        self._book = MetricsBook(metrics, sparse, self.num_local_members, self.codistilling, ensemble)
        kwargs.setdefault("jit_compile", False)
        self._codistill_compile_args["jit_compile"] = kwargs["jit_compile"]
        if kwargs["jit_compile"] is True and not self.exchange.allows_xla:
            raise ValueError(
                f"The {self.exchange.name} exchange runs collectives that must not be XLA-compiled; "
                "compile with jit_compile=False."
            )
        super().compile(optimizer=optimizer, loss=None, metrics=None, **kwargs)

    @property
    def metrics(self):
        return [self._loss_tracker, *self._book.metrics] if self.compiled else []

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.12-3.15 under multi-worker MWMS: see tf_codistill/keras_compat.py.
        parent = super()._maybe_symbolic_build
        return keras_compat.symbolic_build(self, parent, iterator=iterator, data_batch=data_batch)

    # --------------------------------------------------------------- forward
    def call(self, inputs, training=False):
        """Logits of the single member, or of the ensemble (log of the mean
        softmax) when this process holds several members."""
        if self.num_local_members == 1:
            return task.float32(self.members[0](inputs, training=training))
        raw = [m(inputs, training=training) for m in self.members]
        return keras_compat.with_mask(
            self._ensemble_logits([task.float32(r) for r in raw]), keras_compat.get_mask(raw[0])
        )

    @staticmethod
    def _ensemble_logits(logits):
        probs = ops.mean(ops.stack([ops.softmax(z, axis=-1) for z in logits]), axis=0)
        return ops.log(ops.maximum(probs, 1e-12))

    def member_scores(self, logs: dict, name: str = "accuracy") -> list[float]:
        """Metric `name` of every local member, in order, from the dict that
        `evaluate(..., return_dict=True)` (or `fit`'s logs) returned: `name`
        with one member, `g<i>_<name>` with several."""
        if self.num_local_members == 1:
            return [float(logs[name])]
        return [float(logs[f"g{i}_{name}"]) for i in range(self.num_local_members)]

    # ------------------------------------------------------------ train step
    def train_step(self, data):
        """Keras's step, kept thin: the members' forward passes, `compute_loss`
        (which reads the peers' logits through the exchange), the update, and
        `compute_metrics`. What Keras's own step cannot do is ordering every
        forward pass (peers' included) before any update."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        xs, ys, sws = model_inputs.split_data(
            x, y, sample_weight, self.num_local_members, self.data_mode, self._split_plain
        )
        checks = [c for yi in ys for c in model_inputs.label_checks(yi, self.num_classes)]
        with tf.control_dependencies(checks), tf.GradientTape() as tape:
            logits = self._forward(xs, training=True)
            model_inputs.check_fit(self.task_loss, ys, logits)
            total = self.compute_loss(x=xs, y=ys, y_pred=logits, sample_weight=sws)
            scaled = self.optimizer.scale_loss(total) if self.optimizer is not None else total
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        if self.clip_norm is not None:
            scale = self.optimizer.scale_loss(1.0) if self.optimizer is not None else 1.0
            grads = model_terms.clip_per_member(
                self.members, self.clip_norm, grads, variables, ops.cast(scale, "float32")
            )
        # Every forward pass (peers' included) must read the weights before any
        # update writes them: a peer's forward pass on another member's batch
        # is not upstream of that peer's own gradient, so order it explicitly.
        if self.codistilling:
            reads = [ops.convert_to_tensor(z) for z in logits + self._step.terms["teachers"] if z is not None]
            with tf.control_dependencies(reads):
                grads = [None if g is None else tf.identity(g) for g in grads]
        self.optimizer.apply_gradients(zip(grads, variables))
        return keras_compat.for_reduction(self.compute_metrics(xs, ys, logits, sws))

    def _forward(self, xs, training: bool) -> list:
        """Each member's float32 logits on its inputs, its Keras mask kept."""
        raw = [m(xi, training=training) for m, xi in zip(self.members, xs)]
        return [keras_compat.with_mask(task.float32(r), keras_compat.get_mask(r)) for r in raw]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The training loss of every local member, summed: its task loss,
        alpha x D(peers' mean logits, its logits), and the weight penalty,
        each averaged over the valid positions and scaled for the strategy
        the way Keras scales its losses. `x`, `y`, `y_pred` and
        `sample_weight` are per-member lists (`_split`); the terms are kept
        for `compute_metrics`."""
        xs, ys, logits, sws = x, y, y_pred, sample_weight
        masks = [keras_compat.get_mask(z) for z in logits]
        alpha = None
        if self.codistilling:
            alpha = self.alpha_schedule(self.optimizer.iterations)
            if self.exchange.alpha_scale() is not None:
                alpha = alpha * ops.cast(self.exchange.alpha_scale(), alpha.dtype)
            peer_maps = self.exchange.peer_logits(self.members, xs, logits, self.data_mode)
            teachers, usable = model_terms.teachers(peer_maps, self.num_groups, self.bad_peer_steps)
        else:
            teachers, usable = [None] * len(logits), [None] * len(logits)
        task_losses, distill_losses, total = [], [], 0.0
        for i, (zi, ti) in enumerate(zip(logits, teachers)):
            term = self.task_loss(ys[i], zi, sample_weight=sws[i])
            task_losses.append(term)
            total = total + term
            if ti is not None:
                if i == 0:
                    self.distance.validate_outputs(positions.rows(ti), positions.rows(zi))
                # A peer that sent NaN/Inf: no distillation term this step.
                distill = model_terms.distill_term(self.distance, ti, zi, sws[i], masks[i]) * usable[i]
                distill_losses.append(distill)
                total = total + alpha * distill
        decayed = [v for m in self.members for v in m.trainable_variables if len(v.shape) >= 2]
        penalty = model_terms.weight_penalty(self.weight_decay, decayed, self.optimizer.iterations)
        if penalty is not None:
            total = total + penalty
        self._step.terms = {
            "total": total,
            "task": task_losses,
            "distill": distill_losses,
            "teachers": teachers,
            "alpha": alpha,
        }
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """The step's logs: loss terms (unscaled, averaged over the local
        members), agreement with the peers, the pooled and per-member metrics."""
        ys, logits, sws = y, y_pred, sample_weight
        terms = self._step.terms
        replicas = _num_replicas()
        unscale = float(replicas) / float(len(logits))
        batch = ops.shape(logits[0])[0]
        self._loss_tracker.update_state(terms["total"] * unscale, sample_weight=batch)
        self._book.trackers["task_loss"].update_state(
            ops.sum(ops.stack(terms["task"])) * unscale, sample_weight=batch
        )
        for tracker, term in zip(self._book.member_task, terms["task"]):
            tracker.update_state(term * replicas, sample_weight=batch)
        if terms["distill"]:
            self._book.trackers["distill_loss"].update_state(
                ops.sum(ops.stack(terms["distill"])) * unscale, sample_weight=batch
            )
            agree = [
                positions.agreement(z, t, keras_compat.get_mask(z)) for z, t in zip(logits, terms["teachers"])
            ]
            self._book.trackers["agreement"].update_state(ops.mean(ops.stack(agree)), sample_weight=batch)
        self._book.update_members(ys, logits, sws)
        logs = self._book.results(self.metrics, train=True)
        if terms["alpha"] is not None:
            logs["alpha"] = terms["alpha"]
            logs["bad_peer_steps"] = ops.sum(self.bad_peer_steps.value)
            logs.update(self.exchange.step_logs())
        return logs

    # ------------------------------------------------------------- test step
    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        n = self.num_local_members
        logits = self._forward([x] * n, training=False)
        mask = keras_compat.get_mask(logits[0])
        replicas = _num_replicas()
        batch = ops.shape(logits[0])[0]
        losses = [self.task_loss(y, z, sample_weight=sample_weight) * replicas for z in logits]
        self._loss_tracker.update_state(ops.mean(ops.stack(losses)), sample_weight=batch)
        for tracker, loss in zip(self._book.member_eval_loss, losses):
            tracker.update_state(loss, sample_weight=batch)
        self._book.update_members([y] * n, logits, [sample_weight] * n)
        if n > 1:
            self._book.update_ensemble(
                self.task_loss, y, self._ensemble_logits(logits), sample_weight, replicas, mask
            )
            agree = [
                positions.agreement(logits[i], logits[j], mask) for i in range(n) for j in range(i + 1, n)
            ]
            self._book.trackers["agreement"].update_state(ops.mean(ops.stack(agree)), sample_weight=batch)
        elif self.codistilling and self.exchange.gathers_eval_logits:
            everyone = self.exchange.all_logits(logits[0])
            if everyone is not None:
                groups = range(self.num_groups)
                self._book.update_ensemble(
                    self.task_loss,
                    y,
                    self._ensemble_logits([everyone[g] for g in groups]),
                    sample_weight,
                    replicas,
                    mask,
                )
                agree = [
                    positions.agreement(logits[0], everyone[g], mask)
                    for g in groups
                    if g != self.exchange.group
                ]
                self._book.trackers["agreement"].update_state(ops.mean(ops.stack(agree)), sample_weight=batch)
        return keras_compat.for_reduction(self._book.results(self.metrics, train=False))


def _build_members(members, num_groups) -> list[keras.Model]:
    if callable(members) and not isinstance(members, keras.Model):
        if num_groups is None:
            raise ValueError("pass num_groups when members is a builder function.")
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}.")
        members = [members(i) for i in range(num_groups)]
    elif isinstance(members, keras.Model):
        members = [members]
    members = list(members)
    if not members:
        raise ValueError("CodistillModel needs at least one member model (num_groups >= 1).")
    if num_groups is not None and num_groups != len(members):
        raise ValueError(f"num_groups={num_groups} but {len(members)} member models were given.")
    for i, m in enumerate(members):
        if not isinstance(m, keras.Model):
            raise ValueError(f"member {i} is a {type(m).__name__}, not a keras.Model.")
    if len({id(m) for m in members}) != len(members):
        raise ValueError("The same model object was passed twice; every member needs its own weights.")
    return members
