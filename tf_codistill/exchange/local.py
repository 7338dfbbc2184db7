"""All groups' models in one process: the exact reference semantics."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tf_codistill.exchange.base import Exchange


class LocalExchange(Exchange):
    """Peers are the other members held by the same `CodistillModel`.

    With ``data_mode="shared"`` every member trains on the same batch and the
    teacher of member i is the mean of the other members' training-mode logits
    on that batch (what per-step prediction exchange computes). With
    ``data_mode="independent"`` each member draws its own batch and the peers
    run an extra inference-mode forward pass on member i's batch (the paper's
    Algorithm 1, with peers that are never stale).
    """

    name = "local"

    def peer_logits(
        self,
        members: Sequence[keras.Model],
        inputs: Sequence,
        logits: Sequence,
        data_mode: str,
    ) -> list[dict]:
        n = len(members)
        out = []
        for i in range(n):
            if data_mode == "shared":
                out.append({j: logits[j] for j in range(n) if j != i})
            else:
                out.append({j: members[j](inputs[i], training=False) for j in range(n) if j != i})
        return out
