"""Packs whole samples into fixed-size token budgets, one bin per rank per step.

Works on exact sample lengths only (no file I/O); every sample of an epoch lands in exactly one
bin, every rank gets the same number of steps, and nothing is dropped without being counted.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np


@dataclass
class EpochPlan:
    """`steps[s][r]` lists the sample indices rank r packs at step s (possibly none)."""

    steps: list[list[list[int]]]
    truncated: int = 0  # samples longer than the budget, cut to it
    empty_bins: int = 0  # bins with no sample (padding-only batches at the epoch's tail)
    lengths: list[int] = field(default_factory=list)  # packed (capped) length of every sample

    def __len__(self) -> int:
        return len(self.steps)

    def rank_steps(self, rank: int) -> list[list[int]]:
        return [step[rank] for step in self.steps]


def lpt_bins(items: list[int], lengths: list[int], num_bins: int) -> list[list[int]]:
    """Longest-processing-time-first: each item (longest first) goes to the lightest bin."""
    heap = [(0, b) for b in range(num_bins)]
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    # Ties broken by the item's position, so the result does not depend on sort stability.
    for item in sorted(items, key=lambda i: (-lengths[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(item)
        heapq.heappush(heap, (load + lengths[item], b))
    return bins


def _fits(items: list[int], lengths: list[int], num_bins: int, capacity: int) -> bool:
    return all(sum(lengths[i] for i in b) <= capacity for b in lpt_bins(items, lengths, num_bins))


def _largest_prefix(order, start, lengths, num_bins, capacity, tail_tokens) -> int:
    """How many samples from order[start:] LPT packs into the bins (at least one).

    Galloping then binary search: LPT fit is not strictly monotone in the prefix length, but
    every candidate is checked, so whatever this returns does fit.
    """
    remaining = len(order) - start
    if tail_tokens <= num_bins * capacity and _fits(order[start:], lengths, num_bins, capacity):
        return remaining
    good, bad = 1, 2
    while bad < remaining and _fits(order[start : start + bad], lengths, num_bins, capacity):
        good, bad = bad, bad * 2
    bad = min(bad, remaining)
    while bad - good > 1:
        mid = (good + bad) // 2
        if _fits(order[start : start + mid], lengths, num_bins, capacity):
            good = mid
        else:
            bad = mid
    return good


def plan_epoch(
    lengths: list[int],
    capacity: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> EpochPlan:
    """Pack samples (lengths in tokens) into `world_size` bins of `capacity` tokens per step.

    The sample order is a permutation seeded by (seed, epoch); each step takes the longest run
    of the remaining samples that LPT fits into one bin per rank, so batches stay random while
    ranks stay balanced (their loads differ by at most one sample's length).
    """
    if capacity < 1 or world_size < 1:
        raise ValueError("capacity and world_size must be positive")
    capped = [min(int(n), capacity) for n in lengths]
    truncated = sum(1 for n in lengths if n > capacity)
    order = list(range(len(capped)))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(capped)).tolist()
    steps, start, empty = [], 0, 0
    tail_tokens = sum(capped)  # tokens of order[start:]
    while start < len(order):
        n = _largest_prefix(order, start, capped, world_size, capacity, tail_tokens)
        tail_tokens -= sum(capped[i] for i in order[start : start + n])
        bins = lpt_bins(order[start : start + n], capped, world_size)
        empty += sum(1 for b in bins if not b)
        steps.append(bins)
        start += n
    return EpochPlan(steps=steps, truncated=truncated, empty_bins=empty, lengths=capped)
