"""Paired bootstrap comparisons over (task, seed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3pet.stats import pair_up, paired_difference


def test_point_estimate_weighs_each_task_the_same():
    # task a: 5 seeds, mean +1.0; task b: 1 seed, -3.0. Pooled pairs would give 1/3; tasks weigh the same: -1.
    p = paired_difference({"a": [1.0, 0.5, 1.5, 1.0, 1.0], "b": [-3.0]})
    assert p.mean == pytest.approx(-1.0)
    assert (p.wins, p.losses, p.ties, p.pairs, p.tasks, p.min_pairs) == (5, 1, 0, 6, 2, 1)


def test_constant_differences_give_a_zero_width_interval():
    p = paired_difference({"a": [0.02, 0.02], "b": [0.02, 0.02, 0.02]})
    assert p.low == p.mean == p.high == pytest.approx(0.02)


def test_interval_excludes_zero_only_for_a_consistent_gain():
    clear = paired_difference({"a": [0.03, 0.05, 0.04], "b": [0.02, 0.06, 0.03]})
    assert clear.low > 0
    noise = paired_difference({"a": [0.05, -0.04, 0.01], "b": [-0.03, 0.04, -0.02]})
    assert noise.low < 0 < noise.high


def test_pair_up_keeps_only_shared_seeds():
    a = {("rte", 0): 0.6, ("rte", 1): 0.5, ("cb", 0): 0.7}
    b = {("rte", 0): 0.55, ("rte", 2): 0.9, ("cb", 0): 0.8}
    assert pair_up(a, b) == {"cb": [pytest.approx(-0.1)], "rte": [pytest.approx(0.05)]}


def test_no_pairs_is_an_error():
    with pytest.raises(ValueError):
        paired_difference({"rte": []})


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(["rte", "mrpc", "cb"]),
                       st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=5), min_size=1))
def test_interval_brackets_the_estimate_and_is_seeded(diffs):
    p = paired_difference(diffs, n_boot=300, seed=1)
    lo = min(min(d) for d in diffs.values())
    hi = max(max(d) for d in diffs.values())
    assert lo - 1e-12 <= p.low <= p.mean + 1e-12 and p.mean - 1e-12 <= p.high <= hi + 1e-12
    assert p == paired_difference(diffs, n_boot=300, seed=1)
