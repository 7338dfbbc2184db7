"""Per-group seeds, the one rule: a group's seed is the base seed with the
group inserted as one base-1000 digit.

    group_seed(seed, group, "init")  = seed * 1000 + group
    group_seed(seed, group, "data")  = seed % 1000 + 1000 * group + 1_000_000 * (seed // 1000)

"init" seeds group g's initial weights (the digit at the bottom); "data"
seeds group g's data order where each group reads its own (the digit above
the seed's last three). For each stream the map (seed, group) -> seed is
one-to-one for groups below `MAX_GROUPS`: no two (seed, group) pairs share an
order, so seed 1000's groups never read seed 0's. Both agree with the rules
this library used before, `seed * 1000 + g` and `seed + 1000 * g`, wherever
the old data rule had no collision (every base seed below 1000), so runs with
those seeds are unchanged. No TensorFlow.
"""

from __future__ import annotations

from tf_codistill.checks import check_int

__all__ = ["MAX_GROUPS", "MAX_SEED", "STREAMS", "group_seed", "max_seed"]

#: Groups a seed rule keeps apart: the group is one base-1000 digit.
MAX_GROUPS = 1000

#: What a group's seed seeds: its initial weights, or its data order.
STREAMS = ("init", "data")


def max_seed(num_groups: int) -> int:
    """The largest base seed whose every group's "init" seed fits in 32 bits
    (what `keras.utils.set_random_seed` takes)."""
    return (2**32 - num_groups) // MAX_GROUPS


#: The largest base seed for any number of groups up to `MAX_GROUPS`.
MAX_SEED = max_seed(MAX_GROUPS)


def group_seed(seed: int, group: int, stream: str) -> int:
    """Group `group`'s seed for `stream` ("init" or "data") in a run of base `seed`.

    Raises:
        TypeError / ValueError: a seed or group that is not an integer in
            range, or an unknown stream.
    """
    check_int("seed", seed, 0)
    check_int("group", group, 0)
    if group >= MAX_GROUPS:
        raise ValueError(f"group must be < {MAX_GROUPS} (one base-1000 digit of the seed), got {group}.")
    if stream == "init":
        return seed * MAX_GROUPS + group
    if stream == "data":
        high, low = divmod(seed, 1000)
        return low + 1000 * (group + MAX_GROUPS * high)
    raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}.")
