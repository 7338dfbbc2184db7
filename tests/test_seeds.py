"""The per-group seed rule (tf_codistill/seeds.py): one-to-one, and the old rules where they had no collision."""

import pytest

from tf_codistill import seeds

SEEDS = range(10_000)
GROUPS = range(64)


@pytest.mark.parametrize("stream", seeds.STREAMS)
def test_no_two_seed_group_pairs_share_a_seed(stream):
    got = {seeds.group_seed(s, g, stream) for s in SEEDS for g in GROUPS}
    assert len(got) == len(SEEDS) * len(GROUPS)


def test_the_old_data_rule_collided_and_the_new_one_does_not():
    assert 1000 + 1000 * 0 == 0 + 1000 * 1  # seed 1000's group 0 read seed 0's group 1 order
    assert seeds.group_seed(1000, 0, "data") != seeds.group_seed(0, 1, "data")


def test_the_rules_match_the_old_ones_where_those_were_one_to_one():
    for s in (0, 1, 4, 999):
        for g in (0, 1, 7, 63):
            assert seeds.group_seed(s, g, "data") == s + 1000 * g  # committed studies: seeds 0-4
    for s in (0, 4, 1000, 4_294_966):
        for g in (0, 1, 999):
            assert seeds.group_seed(s, g, "init") == s * 1000 + g


def test_every_init_seed_of_the_largest_seed_fits_in_32_bits():
    for groups in (1, 2, 64, seeds.MAX_GROUPS):
        top = seeds.max_seed(groups)
        assert seeds.group_seed(top, groups - 1, "init") < 2**32
        assert seeds.group_seed(top + 1, groups - 1, "init") >= 2**32


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((0, seeds.MAX_GROUPS, "data"), ValueError, "group must be < 1000"),
        ((-1, 0, "data"), ValueError, "seed must be >= 0"),
        ((0, 1.0, "init"), TypeError, "group must be an integer"),
        ((0, 0, "order"), ValueError, "stream must be one of"),
    ],
)
def test_bad_arguments_are_named(args, error, match):
    with pytest.raises(error, match=match):
        seeds.group_seed(*args)
