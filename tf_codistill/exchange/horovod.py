"""Per-step prediction exchange over Horovod process sets.

Each worker trains its group's model on a batch that its paired workers (same
rank in group, one per group) also read. Every step it all-gathers its logits
over the pair's process set, so it receives every group's predictions on the
same examples; the peers' mean is the teacher.

The collectives are named and run un-compiled (`jit_compile=False`), with the
same traced program on every rank, as Horovod requires.

They run on this process's CPU (`on_host`): the logits are copied to host
memory, gathered over Gloo, and the result is copied back to where the model
runs. A batch x classes block is small, so a Horovod built with Gloo only
(no NCCL) serves GPU workers, while MultiWorkerMirroredStrategy moves the
gradients inside a group over NCCL.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from tf_codistill import traffic
from tf_codistill.exchange.base import Exchange
from tf_codistill.topology import Topology

#: Where the cross-group collectives run: this process's CPU (in a
#: distributed function, the CPU of this worker's task).
HOST_DEVICE = "/cpu:0"


def on_host(collective, tensor, **kwargs):
    """Runs the Horovod `collective` (e.g. `hvd.allgather`) on this process's
    CPU: `tensor` is copied to host memory first, and the result stays there
    (the caller's next op, placed as usual, copies it back to a GPU). A
    Horovod built with Gloo has CPU kernels only; pinning the op keeps
    TensorFlow from placing it next to GPU inputs, or from failing to."""
    with tf.device(HOST_DEVICE):
        return collective(tf.identity(tensor), **kwargs)


class HorovodExchange(Exchange):
    """Prediction exchange across groups; one member per process.

    Args:
        topology: this process's place (`topology.init_horovod`).
        pair_set: the Horovod process set of this worker's pair (the global
            set when every group has one worker).
    """

    name = "horovod"
    allows_xla = False
    gathers_eval_logits = True

    def __init__(self, topology: Topology, pair_set):
        self.topology = topology
        self.pair_set = pair_set
        self.group = topology.group
        self._peers = [g for g in range(topology.num_groups) if g != topology.group]

    def bind(self, model) -> None:
        if model.num_local_members != 1:
            raise ValueError(
                f"HorovodExchange trains one group's model per process; got "
                f"{model.num_local_members} members. Use LocalExchange for several in one process."
            )
        if model.data_mode != "shared":
            raise ValueError(
                "Per-step prediction exchange needs paired workers to read the same batch: use "
                "data_mode='shared' (and shard data by rank in group only). For independent data "
                "orders use the stale-weights exchange."
            )
        self._check_shapes_match(model)

    def _check_shapes_match(self, model) -> None:
        """Fails at start-up, on every rank, when groups' models differ in
        output shape (the all-gather would fail later, less clearly)."""
        if self.topology.num_groups == 1:
            return
        import horovod.tensorflow as hvd

        member = model.members[0]
        shape = tuple(member.outputs[0].shape[1:]) if member.outputs else None
        shapes = hvd.allgather_object(
            (self.topology.group, shape), name="codistill_output_shapes", process_set=self.pair_set
        )
        if len({s for _, s in shapes}) > 1:
            listing = ", ".join(f"group {g}: {s}" for g, s in sorted(shapes))
            raise ValueError(
                "Every group's model must produce logits of the same shape for prediction "
                f"exchange; got {listing}. Build all groups with the same number of classes."
            )

    def num_groups(self, num_local_members: int) -> int:
        return self.topology.num_groups

    def _gather(self, logits, name: str):
        import horovod.tensorflow as hvd

        logits = tf.stop_gradient(tf.convert_to_tensor(logits))
        if self.topology.num_groups == 1:
            return tf.expand_dims(logits, 0)
        gathered = on_host(hvd.allgather, logits, name=name, process_set=self.pair_set)
        # [G * batch, classes] -> [G, batch, classes]; the pair set lists
        # ranks in group order, so block g is group g's prediction. The
        # identity outside the host scope copies it back next to the logits.
        return tf.identity(tf.reshape(gathered, tf.concat([[self.topology.num_groups], tf.shape(logits)], 0)))

    def peer_logits(
        self,
        members: Sequence,
        inputs: Sequence,
        logits: Sequence,
        data_mode: str,
    ) -> list[dict]:
        everyone = self._gather(logits[0], "codistill_train_logits")
        return [{g: everyone[g] for g in self._peers}]

    def all_logits(self, logits):
        """Every group's logits on this worker's (evaluation) batch: [G, batch, classes]."""
        return self._gather(logits, "codistill_eval_logits")

    def bytes_sent_per_step(self, batch_size: int, num_classes: int, num_params: int) -> float:
        # Ring all-gather: each worker's own block travels to each other group.
        return traffic.allgather_bytes(batch_size, num_classes, self.topology.num_groups)
