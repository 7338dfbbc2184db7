"""The terms of `CodistillModel`'s loss that are not Keras's task loss: the
peers' mean logits (teachers) with non-finite peers made harmless, the
distillation term per position, the coupled weight penalty, and per-member
gradient clipping. Functions of their inputs, so that the model class keeps
only the Keras protocol (`compute_loss`, `compute_metrics`, the steps).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from tf_codistill import positions, task

__all__ = ["replica_scaled", "teachers", "distill_term", "per_position", "weight_penalty", "clip_per_member"]


def replica_scaled(value):
    """`value` divided by the replicas in sync, as Keras scales its losses
    under a `tf.distribute` strategy (the gradients are then summed)."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value / replicas if replicas > 1 else value


def teachers(peer_maps, num_groups: int, bad_peer_steps: keras.Variable):
    """Mean peer logits per local member, with non-finite peers made harmless.

    Args:
        peer_maps: per local member, a dict `group -> peer logits`.
        num_groups: the number of groups (the length of `bad_peer_steps`).
        bad_peer_steps: per group, the steps in which its predictions held
            NaN or Inf; incremented here.

    Returns:
        `(teachers, usable)`: `usable[i]` is 0.0 when any of member i's peers
        sent NaN or Inf this step (its distillation term is then dropped).
    """
    out, usable = [], []
    bad = [0.0] * num_groups
    for peers in peer_maps:
        values = [ops.stop_gradient(task.float32(v)) for v in peers.values()]
        finite = [ops.all(ops.isfinite(v)) for v in values]
        safe = [ops.where(ops.isfinite(v), v, ops.zeros_like(v)) for v in values]
        out.append(safe[0] if len(safe) == 1 else ops.mean(ops.stack(safe), axis=0))
        usable.append(ops.cast(ops.all(ops.stack(finite)), "float32"))
        for g, ok in zip(peers.keys(), finite):
            bad[g] = ops.maximum(bad[g], 1.0 - ops.cast(ok, "float32"))
    bad_peer_steps.assign_add(ops.stack([ops.convert_to_tensor(b, "float32") for b in bad]))
    return out, usable


def per_position(distance, teacher, student):
    """The distance at every position: `[batch, ...]` from `[batch, ..., classes]`."""
    if len(student.shape) == 2:
        return distance.per_example(teacher, student)
    flat = distance.per_example(positions.rows(teacher), positions.rows(student))
    return tf.reshape(flat, tf.shape(student)[:-1])


def distill_term(distance, teacher, student, sample_weight, mask=None):
    """D(teacher, student) per position, averaged over the valid positions
    (weighted per example or per position when there are sample weights),
    scaled for the strategy like Keras scales its losses."""
    if sample_weight is None and mask is None and len(student.shape) == 2:
        value = ops.cast(distance.compute_loss(teacher, student), "float32")
    else:
        values = ops.cast(per_position(distance, teacher, student), "float32")
        value = positions.position_mean(values, positions.position_weights(values, sample_weight, mask), mask)
    return replica_scaled(value)


def weight_penalty(weight_decay, variables, iterations):
    """`0.5 x coefficient x sum of squares` of `variables` (the coupled L2 of
    the paper's SGD: its gradient is `coefficient x w`), or None when the
    coefficient is the constant 0. `weight_decay` is a float or a step
    schedule called with `iterations`."""
    if isinstance(weight_decay, float):
        if weight_decay == 0.0:
            return None
        coeff = weight_decay
    else:
        coeff = weight_decay(iterations)
    squares = ops.sum(ops.stack([ops.sum(ops.square(v)) for v in variables]))
    return replica_scaled(0.5 * coeff * squares)


def clip_per_member(members, clip_norm: float, grads, variables, loss_scale):
    """Each member's gradients clipped to `clip_norm` on their own (of the
    unscaled gradient: `loss_scale` is the mixed-float16 loss scale, else 1)."""
    owner = {id(v): i for i, m in enumerate(members) for v in m.trainable_variables}
    out = list(grads)
    for i in range(len(members)):
        index = [k for k, v in enumerate(variables) if owner.get(id(v)) == i and out[k] is not None]
        if index:
            clipped, _ = tf.clip_by_global_norm([out[k] for k in index], clip_norm * loss_scale)
            for k, g in zip(index, clipped):
                out[k] = g
    return out
