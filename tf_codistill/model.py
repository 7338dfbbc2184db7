"""`CodistillModel`: G member models trained side by side with a distillation term.

Each member i minimises

    task_loss(y_i, f_i(x_i)) + alpha_k * D(f_i(x_i), stop_gradient(mean_{j != i} f_j(x_i)))

where the peers' predictions come from an `Exchange` (other members in this
process, other processes, or stale copies). With one group there is no peer
and the model is the plain synchronous baseline: both arms of a comparison run
through the same train step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_codistill.callbacks import PeerFailureError, training_callbacks
from tf_codistill.checks import check_int, check_number, is_int, is_number
from tf_codistill.exchange import Exchange, LocalExchange
from tf_codistill.losses import get_distance
from tf_codistill.schedules import AlphaSchedule, Schedule

__all__ = ["CodistillModel", "DATA_MODES", "PeerFailureError"]

#: Accepted `data_mode` values; "auto" is "independent" with several local
#: members and "shared" with one (what train.py's --data_mode=auto does).
DATA_MODES = ("auto", "shared", "independent")

_LOGIT_LOSSES = {
    "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy,
    "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
}

# Keras loss functions that expect probabilities unless told otherwise.
_PROBABILITY_FUNCTIONS = {
    keras.losses.sparse_categorical_crossentropy: "SparseCategoricalCrossentropy",
    keras.losses.categorical_crossentropy: "CategoricalCrossentropy",
    keras.losses.binary_crossentropy: "BinaryCrossentropy",
    keras.losses.categorical_focal_crossentropy: "CategoricalFocalCrossentropy",
    keras.losses.binary_focal_crossentropy: "BinaryFocalCrossentropy",
}


def _num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def _multi_worker(strategy) -> bool:
    """True under MultiWorkerMirroredStrategy with more than one worker (the
    same test Keras applies before its cross-worker reductions)."""
    in_multi_worker_mode = getattr(strategy.extended, "_in_multi_worker_mode", None)
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        in_multi_worker_mode and in_multi_worker_mode()
    )


def _local_value(value):
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


def _weighted_mean(values, sample_weight=None):
    """Batch mean of per-example values, scaled for the distribution strategy
    the way Keras scales its own losses (so SUM-reduced gradients average)."""
    if sample_weight is not None:
        sample_weight = ops.cast(ops.reshape(sample_weight, ops.shape(values)), values.dtype)
        values = values * sample_weight
    mean = ops.sum(values) / ops.cast(ops.shape(values)[0], values.dtype)
    replicas = _num_replicas()
    return mean / replicas if replicas > 1 else mean


class _FunctionLoss(keras.losses.Loss):
    """A function `(y_true, y_pred) -> per-example loss` as a `keras.losses.Loss`
    (sample weights and the batch mean are applied by `Loss.__call__`)."""

    def __init__(self, fn, name=None):
        super().__init__(name=name or getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _resolve_loss(loss) -> keras.losses.Loss:
    """The task loss as a `keras.losses.Loss` on logits.

    Raises:
        ValueError: a loss that expects probabilities (`from_logits=False`).
    """
    if loss is None:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if isinstance(loss, str) and loss in _LOGIT_LOSSES:
        return _LOGIT_LOSSES[loss](from_logits=True)
    resolved = keras.losses.get(loss)
    if resolved is None or not (isinstance(resolved, keras.losses.Loss) or callable(resolved)):
        raise ValueError(
            f"compile(loss={loss!r}): not a loss. Pass a keras.losses.Loss, the name of one, or a "
            "function (y_true, logits) -> per-example loss."
        )
    if isinstance(resolved, keras.losses.Loss):
        if getattr(resolved, "get_config", None) and resolved.get_config().get("from_logits") is False:
            raise ValueError(
                f"compile(loss={type(resolved).__name__}(from_logits=False)): CodistillModel's members "
                "return logits, so this loss would read them as probabilities. Pass "
                f"keras.losses.{type(resolved).__name__}(from_logits=True)."
            )
        return resolved
    if resolved in _PROBABILITY_FUNCTIONS:
        name = _PROBABILITY_FUNCTIONS[resolved]
        raise ValueError(
            f"compile(loss={loss!r}): keras.losses.{resolved.__name__} expects probabilities by default "
            f"but CodistillModel's members return logits. Pass keras.losses.{name}(from_logits=True)."
        )
    return _FunctionLoss(resolved)


def _softmax_output(member: keras.Model) -> bool:
    """True when the member's output layer is a softmax (probabilities, not logits)."""
    layers = getattr(member, "layers", None)
    if not layers:
        return False
    last = layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return activation is keras.activations.softmax or getattr(activation, "__name__", "") == "softmax"


def _float32(x):
    """Logits as float32: under a mixed precision policy members emit
    float16/bfloat16, and every loss here is computed in float32."""
    return ops.cast(x, "float32") if x is not None else None


def _metric_factory(spec, sparse: bool) -> Callable[[str | None], keras.metrics.Metric]:
    """Returns make(prefix) that builds a fresh copy of one metric spec."""
    if isinstance(spec, str) and spec in ("accuracy", "acc"):
        cls = keras.metrics.SparseCategoricalAccuracy if sparse else keras.metrics.CategoricalAccuracy
        return lambda prefix: cls(name=f"{prefix}accuracy")
    if isinstance(spec, keras.metrics.Metric):
        config = spec.get_config()
        return lambda prefix: type(spec).from_config({**config, "name": prefix + config["name"]})
    resolved = keras.metrics.get(spec)
    if isinstance(resolved, keras.metrics.Metric):
        return _metric_factory(resolved, sparse)
    name = spec if isinstance(spec, str) else getattr(resolved, "__name__", "metric")
    return lambda prefix: keras.metrics.MeanMetricWrapper(resolved, name=prefix + name)


@keras.saving.register_keras_serializable(package="tf_codistill")
class CodistillModel(keras.Model):
    """Trains several member models with codistillation (or one, synchronously).

    Use it like any Keras model::

        model = CodistillModel([build(seed=0), build(seed=1)], alpha=1.0)   # KL, independent data
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])
        model.fit(data.independent_batches(spec, 64, num_members=2), validation_data=test_ds, epochs=10)
        model.save("codistill.keras")            # keras.models.load_model(...) after import tf_codistill
        model.export("serving/")                 # a SavedModel serving the ensemble
        model.export_member(0, "member0.keras")  # one member as a plain Keras model

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
            what per-step prediction exchange needs), or ``"auto"`` (the
            default): independent with several local members, shared with
            one (where the mode only matters to the exchange).
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
        name: str = "codistill",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        members = _build_members(members, num_groups)
        if data_mode not in DATA_MODES:
            raise ValueError(f"data_mode must be one of {DATA_MODES}, got {data_mode!r}.")
        if data_mode == "auto":
            data_mode = "independent" if len(members) > 1 else "shared"
        if alpha is None:  # the exchange's default: 1, or 0 for parameter averaging (pure DiLoCo)
            alpha = getattr(exchange, "default_alpha", 1.0)
        if not isinstance(alpha, AlphaSchedule):
            alpha = AlphaSchedule(alpha)
        if not (is_number(weight_decay) or callable(weight_decay)):
            raise TypeError(f"weight_decay must be a number or a step schedule, got {weight_decay!r}.")
        if is_number(weight_decay):
            check_number("weight_decay", weight_decay)
            if weight_decay < 0:
                raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
            weight_decay = float(weight_decay)
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
        if max_bad_peer_steps < 1:
            raise ValueError(f"max_bad_peer_steps must be >= 1, got {max_bad_peer_steps}.")
        self.max_bad_peer_steps = int(max_bad_peer_steps)
        # Steps in which each group's predictions (or weights) were NaN/Inf.
        self.bad_peer_steps = keras.Variable(
            np.zeros(self.num_groups, "float32"),
            trainable=False,
            aggregation="only_first_replica",
            name="bad_peer_steps",
        )
        self._check_output_shapes()
        self._batch_hooks = None  # the callbacks train_on_batch runs (started at its first call)
        if all(m.built for m in members):
            self.built = True

    # ---------------------------------------------------------------- saving
    def get_config(self) -> dict:
        """Everything but the weights and the exchange (see the class docstring)."""
        serialize = keras.saving.serialize_keras_object
        wd = self.weight_decay
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": serialize(self.dtype_policy),
            "members": [serialize(m) for m in self.members],
            "distance": serialize(self.distance),
            "temperature": self.temperature,
            "alpha": serialize(self.alpha_schedule),
            "data_mode": self.data_mode,
            "weight_decay": wd if isinstance(wd, float) else serialize(wd),
            "num_classes": self.num_classes,
            "max_bad_peer_steps": self.max_bad_peer_steps,
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> CodistillModel:
        """Rebuilds the model with `LocalExchange` (see the class docstring)."""
        config = copy.deepcopy(config)  # Keras's deserialisation consumes the dicts it reads

        def deserialize(value):
            return keras.saving.deserialize_keras_object(value, custom_objects=custom_objects)

        config["members"] = [deserialize(m) for m in config["members"]]
        for key in ("distance", "alpha"):
            config[key] = deserialize(config[key])
        if isinstance(config["weight_decay"], dict):
            config["weight_decay"] = deserialize(config["weight_decay"])
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = deserialize(config["dtype"])
        return cls(**config)

    def get_compile_config(self) -> dict:
        """What `compile` was given, for `keras.models.load_model`."""
        if not self.compiled or not hasattr(self, "_codistill_compile_args"):
            return {}
        return {k: keras.saving.serialize_keras_object(v) for k, v in self._codistill_compile_args.items()}

    def compile_from_config(self, config: dict) -> None:
        """Compiles as saved and builds the optimizer, so that its saved
        state (step count, momentum, ...) can be loaded into it."""
        config = {k: keras.saving.deserialize_keras_object(v) for k, v in config.items()}
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def load_weights(self, filepath, *args, **kwargs):
        """`keras.Model.load_weights`; a compiled model's optimizer is built
        first, so that the saved optimizer state (step count, momentum) is
        loaded too instead of skipped. This is how a model saved with a
        multi-process exchange is restored with that exchange bound again."""
        if self.compiled and self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        return super().load_weights(filepath, *args, **kwargs)

    def load_own_variables(self, store) -> None:
        # A model saved by one group of a multi-process job counts bad steps
        # for all its groups; loaded with the local exchange it has fewer.
        # The counter is the exchange's business: it restarts at 0 then.
        if "0" in store and tuple(store["0"].shape) != tuple(self.bad_peer_steps.shape):
            return
        super().load_own_variables(store)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """`keras.Model.export`: an inference artifact whose default
        endpoint (`serve`) returns the logits `call` returns (the ensemble's
        with several local members). `input_signature` defaults to the
        members' inputs; `export_member` exports one member."""
        if input_signature is None:
            input_signature = self._input_signature()
        return super().export(
            filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs
        )

    def _input_signature(self) -> list:
        member = self.members[0]
        try:
            inputs = member.input
        except (AttributeError, ValueError):
            inputs = None
        if inputs is None:
            raise ValueError(
                "export(): the members have no symbolic inputs (subclassed models); pass "
                "input_signature=[keras.InputSpec(shape=(None, ...), dtype=...)]."
            )
        return [
            keras.tree.map_structure(
                lambda t: keras.InputSpec(shape=(None, *t.shape[1:]), dtype=t.dtype), inputs
            )
        ]

    # ----------------------------------------------------------------- setup
    @property
    def num_local_members(self) -> int:
        return len(self.members)

    @property
    def codistilling(self) -> bool:
        """True when there is at least one peer (more than one group)."""
        return self.num_groups > 1

    def _check_output_shapes(self) -> None:
        shapes = []
        for m in self.members:
            try:
                shapes.append(tuple(m.outputs[0].shape[1:]) if m.outputs else None)
            except (AttributeError, ValueError):
                shapes.append(None)
        known = {s for s in shapes if s is not None}
        if len(known) > 1:
            listing = ", ".join(f"member {i}: {s}" for i, s in enumerate(shapes))
            raise ValueError(
                "All members must produce logits of the same shape; got "
                f"{listing}. Build every member for the same number of classes."
            )
        for i, s in enumerate(shapes):
            if s is not None and len(s) != 1:
                raise ValueError(
                    f"Member {i} outputs shape {s} per example; CodistillModel needs "
                    "logits of shape [batch, classes]."
                )

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
            if _softmax_output(member):
                raise ValueError(
                    f"member {i} ({member.name}) ends in a softmax; CodistillModel needs logits (the "
                    "distance and the task loss take logits). Remove the softmax from its last layer "
                    "(e.g. Dense(classes) instead of Dense(classes, activation='softmax'))."
                )
        self.task_loss = _resolve_loss(loss)
        optimizer = keras.optimizers.get(optimizer)
        self._codistill_compile_args = {"optimizer": optimizer, "loss": loss, "metrics": metrics, **kwargs}
        sparse = not isinstance(self.task_loss, keras.losses.CategoricalCrossentropy)
        factories = [_metric_factory(spec, sparse) for spec in (metrics or [])]
        n = self.num_local_members
        many = n > 1
        self._trackers = {"task_loss": keras.metrics.Mean(name="task_loss")}
        if self.codistilling:
            self._trackers["distill_loss"] = keras.metrics.Mean(name="distill_loss")
            self._trackers["agreement"] = keras.metrics.Mean(name="agreement")
        self._member_task = [keras.metrics.Mean(name=f"g{i}_task_loss") for i in range(n)] if many else []
        self._member_eval_loss = [keras.metrics.Mean(name=f"g{i}_loss") for i in range(n)] if many else []
        self._pooled_metrics = [make("") for make in factories]
        self._member_metrics = [[make(f"g{i}_") for make in factories] for i in range(n)] if many else []
        ensemble = many or (self.codistilling and self.exchange.gathers_eval_logits)
        self._ensemble_loss = keras.metrics.Mean(name="ensemble_loss") if ensemble else None
        self._ensemble_metrics = [make("ensemble_") for make in factories] if ensemble else []
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
        if not self.compiled:
            return []
        ms = [self._loss_tracker, *self._trackers.values(), *self._member_task, *self._member_eval_loss]
        ms += self._pooled_metrics
        for per_member in self._member_metrics:
            ms += per_member
        if self._ensemble_loss is not None:
            ms += [self._ensemble_loss, *self._ensemble_metrics]
        return ms

    # ------------------------------------------- Keras 3 multi-worker fixes
    # Keras 3.12-3.15 `fit`/`evaluate` fail under MultiWorkerMirroredStrategy
    # with more than one worker (tensorflow#72388, keras#20585):
    #  1. `_maybe_symbolic_build` calls `strategy.reduce("MEAN", batch)` on the
    #     whole (x, y) structure of PerReplica values, which MWMS rejects.
    #     The build only needs shapes, so it is given this worker's batch, or
    #     none at all when the members are built.
    #  2. Step logs are reduced with `strategy.reduce("MEAN", v, axis=0)`,
    #     which fails on scalars. Under multi-worker MWMS the steps return
    #     shape-[1] logs, which that reduction averages to a scalar.
    # Both overrides only act in that case, so the pinned Keras range
    # (keras>=3.12,<3.16) keeps its behaviour everywhere else.
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        built = all(layer.built for layer in self._flatten_layers())
        if built:
            # Only the optimizer is left to build, which needs no data: do not
            # draw a batch (the restarted iterator would reshuffle, so the run
            # would not see the data order a single process sees).
            data_batch, iterator = None, None
        elif not _multi_worker(strategy):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        elif iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(_local_value, next(it))
                break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    @staticmethod
    def _for_reduction(logs: dict) -> dict:
        if _multi_worker(tf.distribute.get_strategy()):
            return {k: ops.reshape(v, (1,)) for k, v in logs.items()}
        return logs

    # --------------------------------------------------------------- forward
    def call(self, inputs, training=False):
        """Logits of the single member, or of the ensemble (log of the mean
        softmax) when this process holds several members."""
        if self.num_local_members == 1:
            return _float32(self.members[0](inputs, training=training))
        return self._ensemble_logits([_float32(m(inputs, training=training)) for m in self.members])

    def predict_members(self, inputs):
        """List of every local member's logits on `inputs` (inference mode)."""
        return [m(inputs, training=False) for m in self.members]

    @staticmethod
    def _ensemble_logits(logits):
        probs = ops.mean(ops.stack([ops.softmax(z, axis=-1) for z in logits]), axis=0)
        return ops.log(ops.maximum(probs, 1e-12))

    def export_member(self, index: int, path: str) -> None:
        """Saves member `index` as a standalone `.keras` model."""
        if not 0 <= index < self.num_local_members:
            raise ValueError(f"member index must be in [0, {self.num_local_members}), got {index}.")
        self.members[index].save(path)

    def member_scores(self, logs: dict, name: str = "accuracy") -> list[float]:
        """Metric `name` of every local member, in order, from the dict that
        `evaluate(..., return_dict=True)` (or `fit`'s logs) returned: `name`
        with one member, `g<i>_<name>` with several."""
        if self.num_local_members == 1:
            return [float(logs[name])]
        return [float(logs[f"g{i}_{name}"]) for i in range(self.num_local_members)]

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, plus the callbacks of `training_callbacks`
        that `callbacks` lacks (the stale-weights refresh, the peer-health
        check); one the caller passed is never added a second time."""
        self._end_batch_hooks()
        callbacks = list(callbacks or [])
        callbacks += training_callbacks(self, callbacks)
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        """`keras.Model.train_on_batch`, running `training_callbacks` around
        the step as `fit` does: the first call starts them (e.g. takes the
        first stale peer copies, so the distillation term is on from the
        first step), every call runs their batch hooks (refreshing every
        `every` steps), and a `PeerFailureError` stops it as it stops `fit`.
        A later `fit` (or `finish_batch_training()`) ends them, which
        publishes the final weights of a shared-directory exchange."""
        if self._batch_hooks is None:
            hooks = training_callbacks(self)
            for hook in hooks:
                hook.set_model(self)
                hook.on_train_begin()
            self._batch_hooks = hooks
        step = int(ops.convert_to_numpy(self.optimizer.iterations)) if self.optimizer is not None else 0
        for hook in self._batch_hooks:
            hook.on_train_batch_begin(step)
        logs = super().train_on_batch(*args, **kwargs)
        for hook in self._batch_hooks:
            hook.on_train_batch_end(step, logs if isinstance(logs, dict) else None)
        return logs

    def finish_batch_training(self) -> None:
        """Ends the callbacks `train_on_batch` started (their `on_train_end`:
        final publish, transport closed). Calling it again does nothing."""
        self._end_batch_hooks()

    def _end_batch_hooks(self) -> None:
        hooks, self._batch_hooks = self._batch_hooks, None
        for hook in hooks or []:
            hook.on_train_end()

    # ------------------------------------------------------------ train step
    def _split(self, x, y, sample_weight):
        n = self.num_local_members
        if self.data_mode == "shared" or n == 1 and not isinstance(x, (tuple, list)):
            return [x] * n, [y] * n, [sample_weight] * n
        if not isinstance(x, (tuple, list)) or len(x) != n or not isinstance(y, (tuple, list)):
            raise ValueError(
                f"data_mode='independent' expects every element of the training data to be "
                f"((x_0, ..., x_{n - 1}), (y_0, ..., y_{n - 1})), one batch per member; got x of "
                f"type {type(x).__name__}. Build the dataset with "
                "tf_codistill.data.independent_batches(...), or pass data_mode='shared' to give every "
                "member the same (x, y) (the default, data_mode='auto', is independent with several "
                "local members)."
            )
        sws = list(sample_weight) if isinstance(sample_weight, (tuple, list)) else [sample_weight] * n
        return list(x), list(y), sws

    def _check_labels(self, y):
        if self.num_classes is None or y.dtype.is_floating:
            return []
        return [
            tf.debugging.assert_non_negative(y, message="labels must be >= 0"),
            tf.debugging.assert_less(
                y,
                tf.cast(self.num_classes, y.dtype),
                message=f"labels out of range: every label must be in [0, {self.num_classes})",
            ),
        ]

    def _decayed_variables(self):
        return [v for m in self.members for v in m.trainable_variables if len(v.shape) >= 2]

    def _teachers(self, peer_maps):
        """Mean peer logits per local member, with non-finite peers made
        harmless: returns (teachers, usable) where usable[i] is 0.0 when any
        of member i's peers sent NaN or Inf this step. Counts such steps per
        peer group in `bad_peer_steps`."""
        teachers, usable = [], []
        bad = [0.0] * self.num_groups
        for peers in peer_maps:
            values = [ops.stop_gradient(_float32(v)) for v in peers.values()]
            finite = [ops.all(ops.isfinite(v)) for v in values]
            safe = [ops.where(ops.isfinite(v), v, ops.zeros_like(v)) for v in values]
            teachers.append(safe[0] if len(safe) == 1 else ops.mean(ops.stack(safe), axis=0))
            usable.append(ops.cast(ops.all(ops.stack(finite)), "float32"))
            for g, ok in zip(peers.keys(), finite):
                bad[g] = ops.maximum(bad[g], 1.0 - ops.cast(ok, "float32"))
        self.bad_peer_steps.assign_add(ops.stack([ops.convert_to_tensor(b, "float32") for b in bad]))
        return teachers, usable

    def training_hooks(self) -> list:
        """New instances of the callbacks every training loop must run:
        `tf_codistill.callbacks.training_callbacks(self)` (`fit` and
        `train_on_batch` add them themselves; `CodistillLoop` runs them)."""
        return training_callbacks(self)

    def _distill_term(self, teacher, student, sample_weight):
        """D(teacher, student) averaged over the batch (weighted per example
        when there are sample weights), scaled for the strategy like Keras
        scales its losses."""
        if sample_weight is None:
            value = ops.cast(self.distance.compute_loss(teacher, student), "float32")
            replicas = _num_replicas()
            return value / replicas if replicas > 1 else value
        return _weighted_mean(ops.cast(self.distance.per_example(teacher, student), "float32"), sample_weight)

    def _weight_penalty(self):
        wd = self.weight_decay
        if isinstance(wd, float):
            if wd == 0.0:
                return None
            coeff = wd
        else:
            coeff = wd(self.optimizer.iterations)
        squares = ops.sum(ops.stack([ops.sum(ops.square(v)) for v in self._decayed_variables()]))
        penalty = 0.5 * coeff * squares
        replicas = _num_replicas()
        return penalty / replicas if replicas > 1 else penalty

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        xs, ys, sws = self._split(x, y, sample_weight)
        checks = [c for yi in ys for c in self._check_labels(yi)]
        alpha = self.alpha_schedule(self.optimizer.iterations) if self.codistilling else None
        if alpha is not None and self.exchange.alpha_scale() is not None:
            alpha = alpha * ops.cast(self.exchange.alpha_scale(), alpha.dtype)
        with tf.control_dependencies(checks), tf.GradientTape() as tape:
            logits = [_float32(m(xi, training=True)) for m, xi in zip(self.members, xs)]
            if self.codistilling:
                peer_maps = self.exchange.peer_logits(self.members, xs, logits, self.data_mode)
                teachers, usable = self._teachers(peer_maps)
            else:
                teachers, usable = [None] * len(logits), [None] * len(logits)
            task_losses, distill_losses, total = [], [], 0.0
            for i, (zi, ti) in enumerate(zip(logits, teachers)):
                task = self.task_loss(ys[i], zi, sample_weight=sws[i])
                task_losses.append(task)
                total = total + task
                if ti is not None:
                    if i == 0:
                        self.distance.validate_outputs(ti, zi)
                    distill = self._distill_term(ti, zi, sws[i])
                    # A peer that sent NaN/Inf: no distillation term this step.
                    distill = distill * usable[i]
                    distill_losses.append(distill)
                    total = total + alpha * distill
            penalty = self._weight_penalty()
            if penalty is not None:
                total = total + penalty
            scaled = self.optimizer.scale_loss(total) if self.optimizer is not None else total
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        # Every forward pass (peers' included) must read the weights before any
        # update writes them: a peer's forward pass on another member's batch
        # is not upstream of that peer's own gradient, so order it explicitly.
        if self.codistilling:
            reads = [ops.convert_to_tensor(z) for z in logits + teachers if z is not None]
            with tf.control_dependencies(reads):
                grads = [None if g is None else tf.identity(g) for g in grads]
        self.optimizer.apply_gradients(zip(grads, variables))

        # Metrics, on unscaled values and averaged over local members.
        replicas = _num_replicas()
        n = float(len(logits))
        unscale = float(replicas) / n
        batch = ops.shape(logits[0])[0]
        self._loss_tracker.update_state(total * unscale, sample_weight=batch)
        self._trackers["task_loss"].update_state(
            ops.sum(ops.stack(task_losses)) * unscale, sample_weight=batch
        )
        for tracker, task in zip(self._member_task, task_losses):
            tracker.update_state(task * replicas, sample_weight=batch)
        if distill_losses:
            self._trackers["distill_loss"].update_state(
                ops.sum(ops.stack(distill_losses)) * unscale, sample_weight=batch
            )
            agree = [
                ops.mean(ops.cast(ops.argmax(z, -1) == ops.argmax(t, -1), "float32"))
                for z, t in zip(logits, teachers)
            ]
            self._trackers["agreement"].update_state(ops.mean(ops.stack(agree)), sample_weight=batch)
        self._update_metrics(ys, logits, sws)
        logs = self._results(train=True)
        if alpha is not None:
            logs["alpha"] = alpha
            logs["bad_peer_steps"] = ops.sum(self.bad_peer_steps.value)
            logs.update(self.exchange.step_logs())
        return self._for_reduction(logs)

    def _update_metrics(self, ys, logits, sws):
        for i, (yi, zi, swi) in enumerate(zip(ys, logits, sws)):
            for m in self._pooled_metrics:
                m.update_state(yi, zi, sample_weight=swi)
            if self._member_metrics:
                for m in self._member_metrics[i]:
                    m.update_state(yi, zi, sample_weight=swi)

    # ------------------------------------------------------------- test step
    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        n = self.num_local_members
        logits = [_float32(m(x, training=False)) for m in self.members]
        replicas = _num_replicas()
        batch = ops.shape(logits[0])[0]
        losses = [self.task_loss(y, z, sample_weight=sample_weight) * replicas for z in logits]
        self._loss_tracker.update_state(ops.mean(ops.stack(losses)), sample_weight=batch)
        for tracker, loss in zip(self._member_eval_loss, losses):
            tracker.update_state(loss, sample_weight=batch)
        self._update_metrics([y] * n, logits, [sample_weight] * n)
        if n > 1:
            self._update_ensemble(y, logits, sample_weight, replicas)
            agree = [
                ops.mean(ops.cast(ops.argmax(logits[i], -1) == ops.argmax(logits[j], -1), "float32"))
                for i in range(n)
                for j in range(i + 1, n)
            ]
            self._trackers["agreement"].update_state(ops.mean(ops.stack(agree)), sample_weight=batch)
        elif self.codistilling and self.exchange.gathers_eval_logits:
            everyone = self.exchange.all_logits(logits[0])
            if everyone is not None:
                groups = self.num_groups
                self._update_ensemble(y, [everyone[g] for g in range(groups)], sample_weight, replicas)
                own = ops.argmax(logits[0], -1)
                agree = [
                    ops.mean(ops.cast(own == ops.argmax(everyone[g], -1), "float32"))
                    for g in range(groups)
                    if g != self.exchange.group
                ]
                self._trackers["agreement"].update_state(ops.mean(ops.stack(agree)), sample_weight=batch)
        return self._for_reduction(self._results(train=False))

    def _update_ensemble(self, y, logits, sample_weight, replicas):
        ens = self._ensemble_logits(logits)
        ens_loss = self.task_loss(y, ens, sample_weight=sample_weight) * replicas
        self._ensemble_loss.update_state(ens_loss, sample_weight=ops.shape(ens)[0])
        for m in self._ensemble_metrics:
            m.update_state(y, ens, sample_weight=sample_weight)

    def _results(self, train: bool) -> dict:
        if train:
            skip = set(self._member_eval_loss)
            if self._ensemble_loss is not None:
                skip |= {self._ensemble_loss, *self._ensemble_metrics}
        else:
            skip = {self._trackers["task_loss"], *self._member_task}
            if "distill_loss" in self._trackers:
                skip.add(self._trackers["distill_loss"])
        return {m.name: m.result() for m in self.metrics if m not in skip}


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
