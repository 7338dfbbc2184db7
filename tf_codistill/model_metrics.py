"""The metric bookkeeping of `CodistillModel`: loss terms, the metrics
`compile` was given (pooled over the local members, per member as
`g<i>_<name>`, and for the ensemble as `ensemble_<name>`), and agreement.

Training logs the loss terms and the pooled and per-member metrics;
evaluation logs each member's task loss (`g<i>_loss`), the metrics, the
ensemble's and the agreement between members (or with the peers' gathered
predictions).
"""

from __future__ import annotations

import keras
from keras import ops

from tf_codistill import keras_compat, task


class MetricsBook:
    """Every metric of one compiled `CodistillModel`, in the order Keras logs them.

    Args:
        metrics: `compile`'s `metrics` argument.
        sparse: integer labels (else one-hot).
        members: local members.
        codistilling: more than one group (distillation and agreement logged).
        ensemble: the ensemble is evaluated (several local members, or the
            peers' predictions gathered at evaluation).
    """

    def __init__(self, metrics, sparse: bool, members: int, codistilling: bool, ensemble: bool):
        factories = [task.metric_factory(spec, sparse) for spec in (metrics or [])]
        many = members > 1
        self.trackers = {"task_loss": keras.metrics.Mean(name="task_loss")}
        if codistilling:
            self.trackers["distill_loss"] = keras.metrics.Mean(name="distill_loss")
            self.trackers["agreement"] = keras.metrics.Mean(name="agreement")
        self.member_task = (
            [keras.metrics.Mean(name=f"g{i}_task_loss") for i in range(members)] if many else []
        )
        self.member_eval_loss = (
            [keras.metrics.Mean(name=f"g{i}_loss") for i in range(members)] if many else []
        )
        self.pooled = [make("") for make in factories]
        self.per_member = [[make(f"g{i}_") for make in factories] for i in range(members)] if many else []
        self.ensemble_loss = keras.metrics.Mean(name="ensemble_loss") if ensemble else None
        self.ensemble = [make("ensemble_") for make in factories] if ensemble else []

    @property
    def metrics(self) -> list:
        ms = [*self.trackers.values(), *self.member_task, *self.member_eval_loss, *self.pooled]
        for per_member in self.per_member:
            ms += per_member
        if self.ensemble_loss is not None:
            ms += [self.ensemble_loss, *self.ensemble]
        return ms

    def update_members(self, ys, logits, sws) -> None:
        """The compiled metrics, pooled and per member, of each member's logits."""
        for i, (yi, zi, swi) in enumerate(zip(ys, logits, sws)):
            for m in self.pooled:
                m.update_state(yi, zi, sample_weight=swi)
            if self.per_member:
                for m in self.per_member[i]:
                    m.update_state(yi, zi, sample_weight=swi)

    def update_ensemble(self, task_loss, y, ensemble_logits, sample_weight, replicas, mask=None) -> None:
        ens = keras_compat.with_mask(ensemble_logits, mask)
        ens_loss = task_loss(y, ens, sample_weight=sample_weight) * replicas
        self.ensemble_loss.update_state(ens_loss, sample_weight=ops.shape(ens)[0])
        for m in self.ensemble:
            m.update_state(y, ens, sample_weight=sample_weight)

    def results(self, all_metrics: list, train: bool) -> dict:
        """The logs of a training (or evaluation) step from `all_metrics`
        (the model's, its loss tracker first)."""
        if train:
            skip = set(self.member_eval_loss)
            if self.ensemble_loss is not None:
                skip |= {self.ensemble_loss, *self.ensemble}
        else:
            skip = {self.trackers["task_loss"], *self.member_task}
            if "distill_loss" in self.trackers:
                skip.add(self.trackers["distill_loss"])
        return {m.name: m.result() for m in all_metrics if m not in skip}
