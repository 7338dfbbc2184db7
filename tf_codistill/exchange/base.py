"""The interface every exchange transport implements."""

from __future__ import annotations

from collections.abc import Sequence

import keras


class Exchange:
    """Supplies each local member with its peers' predictions.

    A transport decides where the peers live: in this process
    (`LocalExchange`), in other processes reached over collectives, or in
    stale copies refreshed now and then. The model calls `peer_logits`
    inside the traced train step and forms the teacher itself (the mean of
    the finite peers, under `stop_gradient`).
    """

    #: Name reported in `results.json` (`"exchange"`).
    name = "exchange"
    #: Index of this process's group among all groups.
    group = 0
    #: Whether the train step may be XLA-compiled with this transport.
    allows_xla = True
    #: Whether `all_logits` gives every group's evaluation logits.
    gathers_eval_logits = False
    #: The distillation weight `CodistillModel` takes when given no alpha.
    default_alpha = 1.0

    def bind(self, model) -> None:
        """Called once by `CodistillModel.__init__`; validate the pairing here."""

    def num_groups(self, num_local_members: int) -> int:
        """Number of groups (models) taking part in the whole job."""
        return num_local_members

    def peer_logits(
        self,
        members: Sequence[keras.Model],
        inputs: Sequence,
        logits: Sequence,
        data_mode: str,
    ) -> list[dict]:
        """Per local member, `{group: that peer's logits on the member's batch}`."""
        raise NotImplementedError

    def all_logits(self, logits):
        """Every group's logits on this process's evaluation batch, shape
        `[groups, batch, classes]`, or `None` when the transport cannot
        provide them (then `evaluate` reports no cross-process ensemble)."""
        return None

    def alpha_scale(self):
        """A variable multiplying alpha (e.g. 0 while no peer copy exists), or None."""
        return None

    def step_logs(self) -> dict:
        """Extra values to log every training step (e.g. staleness)."""
        return {}

    def callbacks(self) -> list:
        """New instances of the callbacks every training loop must run for
        this transport (e.g. `tf_codistill.callbacks.StaleWeightsRefresh`).

        `CodistillModel.fit` and `train_on_batch` add them; custom loops get
        them through `tf_codistill.callbacks.training_callbacks(model)`.
        Use public callback classes with an `exchange` attribute, so that
        `fit` recognises one the user passed and does not add a second.
        """
        return []

    def bytes_sent_per_step(self, batch_size: int, num_classes: int, num_params: int) -> float:
        """Bytes this process sends to other processes per training step."""
        return 0.0

    def state_dict(self) -> dict:
        """State a backup must keep beyond the model's weights (arrays by
        name), e.g. stale peer copies. Empty for exchanges without state."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores what `state_dict` returned (called by `Backup` before training)."""
