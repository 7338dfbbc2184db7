"""The callbacks a codistillation training loop runs between steps, and the
one driver that runs them outside `fit`.

`CodistillModel.fit` adds the ones a model needs by itself, so most users
never name them. `train_on_batch` and `CodistillLoop` run them, with any
callbacks of their caller, through `CallbackDriver`, which calls the hooks
Keras's `fit` calls, in its order; a custom loop uses it the same way::

    driver = tf_codistill.callbacks.CallbackDriver(model, [my_callback])
    driver.begin()                      # on_train_begin, reset metrics, on_epoch_begin(0)
    for batch in dataset:
        logs = driver.step(lambda: model.train_on_batch(*batch, return_dict=True))
        if model.stop_training:
            break
    driver.end()                        # on_epoch_end(0, logs), on_train_end(logs)

Passing one of them to `fit` yourself is allowed: `fit` then does not add a
second one of the same kind (for the same exchange).

This module imports nothing from the rest of the library, so the exchanges
and the model can both use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

__all__ = [
    "CallbackDriver",
    "ParameterAveraging",
    "PeerFailureError",
    "PeerHealthCheck",
    "StaleWeightsRefresh",
    "training_callbacks",
]


class PeerFailureError(RuntimeError):
    """A peer group kept sending non-finite predictions or weights."""


class PeerHealthCheck(keras.callbacks.Callback):
    """Stops training once a peer group has sent NaN/Inf in too many steps.

    `CodistillModel` skips the distillation term of a step in which a peer's
    predictions are not finite and counts such steps per group in
    `model.bad_peer_steps`; this callback turns a count that reaches the
    limit into an error naming the group.

    Args:
        max_bad_peer_steps: steps with non-finite predictions a group may
            send before training stops; `None` takes the model's
            `max_bad_peer_steps`.

    Raises:
        PeerFailureError: (during training) when a group reaches the limit.
    """

    def __init__(self, max_bad_peer_steps: int | None = None):
        super().__init__()
        if max_bad_peer_steps is not None and (
            isinstance(max_bad_peer_steps, bool) or not isinstance(max_bad_peer_steps, int)
        ):
            raise TypeError(f"max_bad_peer_steps must be an integer or None, got {max_bad_peer_steps!r}.")
        if max_bad_peer_steps is not None and max_bad_peer_steps < 1:
            raise ValueError(f"max_bad_peer_steps must be >= 1, got {max_bad_peer_steps}.")
        self.max_bad_peer_steps = max_bad_peer_steps

    @property
    def limit(self) -> int:
        if self.max_bad_peer_steps is not None:
            return self.max_bad_peer_steps
        return int(self.model.max_bad_peer_steps)

    def check(self) -> None:
        """Raises `PeerFailureError` if a group has reached the limit."""
        counts = np.asarray(keras.ops.convert_to_numpy(self.model.bad_peer_steps.value))
        worst = int(np.argmax(counts))
        limit = self.limit
        if counts[worst] >= limit:
            raise PeerFailureError(
                f"group {worst} sent NaN or Inf predictions in {int(counts[worst])} steps (limit "
                f"max_bad_peer_steps={limit}); its distillation term was skipped each time. "
                f"Group {worst} has diverged: check its learning rate and inputs, or restart it "
                "from its last checkpoint."
            )

    def on_train_batch_end(self, batch, logs=None):
        self.check()


class _ExchangeCallback(keras.callbacks.Callback):
    """A callback that drives `exchange` at the model's optimizer step,
    starting it when training begins."""

    def __init__(self, exchange):
        super().__init__()
        self.exchange = exchange

    def _step(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_train_begin(self, logs=None):
        self.exchange.start(self._step())


class StaleWeightsRefresh(_ExchangeCallback):
    """Publishes this process's weights and refreshes the stale peer copies.

    The stale-weights exchange (`StaleWeightsExchange`) needs it: at the
    start of training it publishes the first snapshot and takes the first
    peer copies (until then the distillation term is off: `peer_scale` is
    0); every `exchange.every` steps it publishes and refreshes again;
    between refreshes it applies newer snapshots a background reader found;
    at the end it publishes the final weights and closes the transport.

    Args:
        exchange: the model's `StaleWeightsExchange`.
    """

    def on_train_batch_begin(self, batch, logs=None):
        exchange = self.exchange
        every = exchange.every
        step = self._step()
        if every > 0 and step % every == 0 and step > 0:
            exchange.refresh(step, publish=True)
        elif not exchange.transport.synchronous and every > 0 and step % max(1, every // 5) == 0:
            # Cheap check between refreshes: apply a newer peer snapshot if the
            # background reader has one, and notice stale peers.
            exchange.refresh(step, publish=False)
        else:
            exchange.tick(step)

    def on_train_end(self, logs=None):
        exchange = self.exchange
        if not exchange.transport.synchronous:
            exchange.transport.finish(exchange._own_snapshots(self._step()))
        exchange.close()


class ParameterAveraging(_ExchangeCallback):
    """Runs the averaging exchange's outer step (`AveragingExchange`).

    At the start of training every island takes group 0's weights; after
    every `exchange.every` updates the islands average their deltas and the
    outer optimizer moves the shared weights they all continue from.

    Args:
        exchange: the model's `AveragingExchange`.
    """

    def on_train_batch_end(self, batch, logs=None):
        self.exchange.after_step(self._step())


def _same_kind(a: keras.callbacks.Callback, b: keras.callbacks.Callback) -> bool:
    if type(a) is not type(b):
        return False
    return getattr(a, "exchange", None) is getattr(b, "exchange", None)


def training_callbacks(model, callbacks: Sequence[keras.callbacks.Callback] | None = None) -> list:
    """The callbacks `model`'s training loop must run and `callbacks` lacks.

    Args:
        model: a `CodistillModel`.
        callbacks: callbacks the caller already runs; a needed callback of
            the same type (and, for the refresh, the same exchange) counts as
            present and is not returned again.

    Returns:
        A new list: the exchange's callbacks (e.g. `StaleWeightsRefresh`),
        then `PeerHealthCheck` when the model has peers.
    """
    given = list(callbacks or [])
    needed = list(model.exchange.callbacks())
    if model.codistilling:
        needed.append(PeerHealthCheck())
    return [c for c in needed if not any(_same_kind(c, g) for g in given)]


class CallbackDriver:
    """Runs callbacks around training steps the way `model.fit` runs them.

    One driver stands for one `fit` call of one epoch: `begin()` calls
    `on_train_begin`, resets the model's metrics and calls
    `on_epoch_begin(0)`; each `step(run)` calls `on_train_batch_begin`,
    `run()` and `on_train_batch_end` with its logs; `end()` calls
    `on_epoch_end(0, logs)` and `on_train_end(logs)` with the last step's
    logs. The hooks go through a `keras.callbacks.CallbackList`, as in `fit`
    (logs reach the callbacks as Python numbers). `begin()` clears
    `model.stop_training`, as `fit` does; a loop reads it after each step.

    Args:
        model: the model the callbacks are bound to.
        callbacks: the caller's callbacks; the ones `training_callbacks`
            adds (the exchange's, the peer-health check) run after them.
        steps: the steps the loop means to run (`params["steps"]` of the
            callbacks), or None.
    """

    def __init__(self, model, callbacks: Sequence[keras.callbacks.Callback] | None = None, steps=None):
        given = list(callbacks or [])
        self.model = model
        self.callbacks = keras.callbacks.CallbackList(
            given + training_callbacks(model, given), model=model, verbose=0, epochs=1, steps=steps
        )
        self.batch = 0  # steps run since begin()
        self.logs: dict = {}

    def __bool__(self) -> bool:
        return bool(self.callbacks.callbacks)

    def begin(self) -> None:
        self.model.stop_training = False
        self.callbacks.on_train_begin()
        self.model.reset_metrics()
        self.callbacks.on_epoch_begin(0)

    def step(self, run):
        """Calls `run()` (one training step) between the batch hooks.

        Returns:
            What `run()` returned; the batch-end hooks get it when it is a
            dict of logs.
        """
        self.callbacks.on_train_batch_begin(self.batch)
        result = run()
        self.logs = result if isinstance(result, dict) else {}
        self.callbacks.on_train_batch_end(self.batch, self.logs or None)
        self.batch += 1
        return result

    def end(self) -> None:
        self.callbacks.on_epoch_end(0, self.logs)
        self.callbacks.on_train_end(self.logs)


class TrainingHooksMixin:
    """Runs `training_callbacks` wherever a Keras model trains: `fit` adds
    the ones the caller lacks, `train_on_batch` runs them through a
    `CallbackDriver` (`CodistillModel` takes this mixin; `CodistillLoop`
    runs its own driver)."""

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
        train = super().train_on_batch
        if self._batch_hooks is None:
            driver = CallbackDriver(self)
            if not driver:  # nothing to run: no hook, no thread pool
                return train(*args, **kwargs)
            driver.begin()
            self._batch_hooks = driver
        return self._batch_hooks.step(lambda: train(*args, **kwargs))

    def finish_batch_training(self) -> None:
        """Ends the callbacks `train_on_batch` started (their `on_epoch_end`
        and `on_train_end`: final publish, transport closed). Calling it
        again does nothing."""
        self._end_batch_hooks()

    def _end_batch_hooks(self) -> None:
        driver, self._batch_hooks = self._batch_hooks, None
        if driver is not None:
            driver.end()

    def training_hooks(self) -> list:
        """New instances of the callbacks every training loop must run:
        `tf_codistill.callbacks.training_callbacks(self)` (`fit`,
        `train_on_batch` and `CodistillLoop` add them themselves)."""
        return training_callbacks(self)
