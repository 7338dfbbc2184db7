"""Saving, loading and export of `CodistillModel` (a mixin: the model's
Keras serialisation in one place).

`get_config` holds everything but the weights and the exchange: a loaded
model uses the local exchange; code that trains across processes builds the
model with its exchange and calls `load_weights`.
"""

from __future__ import annotations

import copy

import keras


class SavingMixin:
    """`get_config` / `from_config`, the compile config, weights that bring
    the optimizer state back, and `export` of the ensemble or one member."""

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
            "data_mode": self._data_mode_arg,
            "weight_decay": wd if isinstance(wd, float) else serialize(wd),
            "num_classes": self.num_classes,
            "max_bad_peer_steps": self.max_bad_peer_steps,
            **({"clip_norm": self.clip_norm} if self.clip_norm is not None else {}),
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> SavingMixin:
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

    def export_member(self, index: int, path: str) -> None:
        """Saves member `index` as a standalone `.keras` model."""
        if not 0 <= index < self.num_local_members:
            raise ValueError(f"member index must be in [0, {self.num_local_members}), got {index}.")
        self.members[index].save(path)
