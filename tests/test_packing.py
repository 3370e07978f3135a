"""Packing of whole samples into per-rank token budgets, and the learning-rate schedule."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speculators.train.optim import lr_factor
from speculators.train.packing import lpt_bins, plan_epoch


def _check_plan(lengths, capacity, world, plan):
    seen = sorted(i for step in plan.steps for b in step for i in b)
    # Every sample exactly once: none dropped, none repeated.
    assert seen == list(range(len(lengths)))
    for step in plan.steps:
        # One bin per rank on every step, so every rank runs the same number of steps.
        assert len(step) == world
        loads = [sum(min(lengths[i], capacity) for i in b) for b in step]
        assert max(loads) <= capacity
        # LPT balance: the heaviest and the lightest rank differ by at most one sample.
        longest = max((min(lengths[i], capacity) for b in step for i in b), default=0)
        assert max(loads) - min(loads) <= longest
    assert plan.truncated == sum(1 for n in lengths if n > capacity)


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=0, max_size=60),
    capacity=st.integers(16, 400),
    world=st.integers(1, 4),
    seed=st.integers(0, 3),
)
def test_plan_packs_every_sample_once_balanced_within_budget(lengths, capacity, world, seed):
    plan = plan_epoch(lengths, capacity, world, seed=seed, epoch=1)
    _check_plan(lengths, capacity, world, plan)


def test_plan_uses_exact_lengths_and_fills_bins():
    # 12 samples of 100 tokens, budget 400 per rank, 2 ranks: 8 fit per step exactly.
    plan = plan_epoch([100] * 12, 400, 2, seed=0, epoch=0)
    assert [sorted(len(b) for b in step) for step in plan.steps] == [[4, 4], [2, 2]]
    assert plan.empty_bins == 0


def test_long_samples_are_truncated_and_counted_not_dropped():
    plan = plan_epoch([50, 1000, 30], 64, 1, seed=0, epoch=0)
    _check_plan([50, 1000, 30], 64, 1, plan)
    assert plan.truncated == 1
    assert plan.lengths == [50, 64, 30]


def test_tail_smaller_than_world_gives_padding_only_bins():
    plan = plan_epoch([10, 10, 10], 10, 2, seed=0, epoch=0)
    assert len(plan) == 2 and plan.empty_bins == 1
    _check_plan([10, 10, 10], 10, 2, plan)


def test_order_is_seeded_per_epoch():
    lengths = list(range(1, 41))
    a = plan_epoch(lengths, 64, 2, seed=0, epoch=0).steps
    assert a == plan_epoch(lengths, 64, 2, seed=0, epoch=0).steps
    assert a != plan_epoch(lengths, 64, 2, seed=0, epoch=1).steps
    assert a != plan_epoch(lengths, 64, 2, seed=1, epoch=0).steps


def test_lpt_puts_longest_first_on_lightest_bin():
    assert lpt_bins([0, 1, 2, 3], [5, 4, 3, 3], 2) == [[0, 3], [1, 2]]


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(kind):
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup, kind) for s in range(total)]
    assert all(0 < a < b for a, b in zip(f[:warmup], f[1 : warmup + 1]))  # rising warmup
    assert f[warmup] == pytest.approx(1.0)
    tail = f[warmup:]
    if kind == "constant":
        assert all(x == 1.0 for x in tail)
    else:
        assert all(a >= b for a, b in zip(tail, tail[1:]))  # non-increasing
        assert 0 < tail[-1] < 0.05  # ends near zero, never exactly zero on a trained step
    if kind == "linear":
        assert f[warmup + 45] == pytest.approx(0.5)
    if kind == "cosine":
        assert f[warmup + 45] == pytest.approx(0.5)
        assert f[warmup + 10] > 1 - 10 / 90  # cosine stays above the line early on


def test_schedule_without_warmup_starts_at_peak():
    assert lr_factor(0, 10, 0, "linear") == 1.0
