"""`length-mixed` batch order: a permutation, deterministic per seed, with less padding than random
batches while every batch keeps the modality mix (what grouping by length alone loses)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from eyecare_edge.training.batching import LengthMixedSampler, length_mixed_order, padding_fraction
from eyecare_edge.training.train_options import TrainingError, TrainOptions


def _demo_like(n: int = 640, seed: int = 0) -> tuple[list[int], list[str]]:
    """Lengths shaped like the demo's closed-QA conversations: OCT 239-375, fundus 304-620."""
    rng = np.random.default_rng(seed)
    groups = ["fundus" if rng.random() < 0.6 else "oct" for _ in range(n)]
    lengths = [int(rng.integers(304, 621)) if g == "fundus" else int(rng.integers(239, 376)) for g in groups]
    return lengths, groups


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[b : b + size] for b in range(0, len(order), size)]


def test_order_is_a_seeded_permutation():
    lengths, groups = _demo_like(203)  # not a multiple of the batch: one short batch
    a = length_mixed_order(lengths, groups, 8, seed=1)
    assert sorted(a) == list(range(203))
    assert a == length_mixed_order(lengths, groups, 8, seed=1)
    assert a != length_mixed_order(lengths, groups, 8, seed=2)


def test_the_short_batch_stays_last():
    """67 samples, one group, length = index: a window of 64 shuffled samples (8 full batches,
    each a run of consecutive lengths within the window) and a window of 3, whose batch is short
    and must stay last: anywhere else, the DataLoader would cut every later batch across two."""
    order = length_mixed_order(list(range(67)), ["x"] * 67, 8, seed=3)
    window = sorted(order[:64])
    for b in _batches(order[:64], 8):
        start = window.index(min(b))
        assert sorted(b) == window[start : start + 8], b
    assert len(order) == 67 and set(order[64:]) == set(range(67)) - set(window)


def test_less_padding_than_random_and_every_batch_keeps_the_mix():
    lengths, groups = _demo_like()
    order = length_mixed_order(lengths, groups, 8, seed=0)
    shuffled = [int(i) for i in np.random.default_rng(0).permutation(len(lengths))]
    mixed, random = padding_fraction(order, lengths, 8), padding_fraction(shuffled, lengths, 8)
    assert random > 0.2 and mixed < random - 0.07, (mixed, random)
    # grouping by length alone would give all-OCT batches; here every batch holds both groups
    # in about the overall proportion (60% fundus: 4-6 of 8)
    per_batch = [Counter(groups[i] for i in b)["fundus"] for b in _batches(order, 8)]
    assert min(per_batch) >= 3 and max(per_batch) <= 7, Counter(per_batch)

    # and lengths are grouped within each group: fundus lengths in a batch span less than at random
    def spread(o):
        return np.mean(
            [np.ptp([lengths[i] for i in b if groups[i] == "fundus"] or [0]) for b in _batches(o, 8)]
        )

    assert spread(order) < 0.5 * spread(shuffled)


def test_a_single_group_is_plain_length_grouping_within_windows():
    lengths = list(range(100, 164))  # 64 samples, one window of 8 batches
    order = length_mixed_order(lengths, ["x"] * 64, 8, seed=0)
    assert (
        sorted(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in _batches(order, 8)) == [7] * 8
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 lengths but 1 groups"):
        length_mixed_order([1, 2], ["a"], 8, 0)
    with pytest.raises(ValueError, match="positive"):
        length_mixed_order([1], ["a"], 0, 0)
    with pytest.raises(TrainingError, match="unknown batching 'sorted'"):
        TrainOptions(init="i", data="d", out="o", batching="sorted")
    with pytest.raises(TrainingError, match="the vision stage batches images"):
        TrainOptions(init="i", data="d", out="o", stage="vision", batching="length-mixed")


def test_epoch_of_a_trainer_state():
    from eyecare_edge.training.train import epoch_of

    assert [epoch_of(e) for e in (None, 0.0, 0.9999999, 1.0, 1.5, 2.99)] == [0, 0, 1, 1, 1, 2]


def test_sampler_reshuffles_each_epoch_and_set_epoch_reproduces_one():
    lengths, groups = _demo_like(96)
    s = LengthMixedSampler(lengths, groups, 8, seed=5)
    first, second = list(s), list(s)
    assert len(s) == 96 and sorted(first) == sorted(second) == list(range(96)) and first != second
    s.set_epoch(1)
    assert list(s) == second == length_mixed_order(lengths, groups, 8, 6)
