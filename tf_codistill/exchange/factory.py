"""One place that turns a runtime's exchange kind and transport into an `Exchange`.

A new kind of exchange is a module in this folder, its name in
`tf_codistill.choices.EXCHANGE_KINDS` and a branch in `make_exchange` (the
runtime, train.py's `--exchange` choices and the study checks read the
choice list).
"""

from __future__ import annotations


def make_exchange(runtime):
    """The exchange for `runtime` (a `tf_codistill.runtime.Runtime`), or None
    where the model's own local exchange serves: one group, or every group in
    this process exchanging predictions. Call it under the group's strategy
    scope (the weights exchange creates variables); one per model."""
    if runtime.num_groups == 1:
        return None
    if runtime.exchange_kind == "predictions":
        if runtime.transport == "local":
            return None
        from tf_codistill.exchange.horovod import HorovodExchange

        return HorovodExchange(runtime.topology, runtime.pair_set)
    if runtime.exchange_kind == "weights":
        from tf_codistill.exchange import weights

        if runtime.transport == "directory":
            # One writer per group: the job's rank 0 (the job is one group).
            transport = weights.DirectoryTransport(runtime.exchange_dir, writer=runtime.is_chief)
        elif runtime.transport == "horovod":
            transport = weights.HorovodWeightsTransport(runtime.topology, runtime.pair_set, runtime.group_set)
        else:
            transport = weights.LocalTransport()
        return weights.StaleWeightsExchange(
            runtime.exchange_every,
            transport,
            group=runtime.group,
            num_groups=runtime.num_groups,
            peer_timeout=runtime.peer_timeout,
            on_stale=runtime.on_stale,
        )
    if runtime.exchange_kind == "average":
        from tf_codistill.exchange.average import AveragingExchange, outer_sgd

        return AveragingExchange(
            runtime.exchange_every,
            outer_sgd(runtime.outer_learning_rate, runtime.outer_momentum),
            topology=runtime.topology,
            pair_set=runtime.pair_set,
            teacher=runtime.average_teacher,
        )
    raise ValueError(f"unknown exchange kind {runtime.exchange_kind!r}.")
