"""Paired statistics: the exact McNemar (sign) test and the bootstrap interval, both by question."""

from __future__ import annotations

import json
import math
import time
from fractions import Fraction

import numpy as np
import pytest

from cpl_masks.errors import CplError
from cpl_masks.evaluation.stats import Interval, compare_paired, mcnemar_exact, paired_bootstrap


def table(b01: int, b10: int, both: int = 0, neither: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Paired outcomes with the given 2×2 counts, shuffled so order cannot matter."""
    a = np.array([False] * b01 + [True] * b10 + [True] * both + [False] * neither)
    b = np.array([True] * b01 + [False] * b10 + [True] * both + [False] * neither)
    order = np.random.default_rng(b01 * 1000 + b10).permutation(a.size)
    return a[order], b[order]


def differences(n: int, gained: int, lost: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n questions on which B gains ``gained`` over A and loses ``lost``; the rest agree at random."""
    rng = np.random.default_rng(seed)
    a = rng.random(n) < 0.5
    b = a.copy()
    order = rng.permutation(n)
    flips_up, flips_down = order[:gained], order[gained : gained + lost]
    a[flips_up], b[flips_up] = False, True
    a[flips_down], b[flips_down] = True, False
    return a, b


def enumerated_p(b01: int, b10: int) -> float:
    """Two-sided exact p by listing all 2^n sign patterns of the discordant pairs (no binomial formula)."""
    n = b01 + b10
    if n == 0:
        return 1.0
    k = min(b01, b10)
    at_most_k = sum(1 for pattern in range(2**n) if pattern.bit_count() <= k)
    return min(1.0, float(Fraction(2 * at_most_k, 2**n)))


# --- McNemar ---------------------------------------------------------------------------------


def test_mcnemar_textbook_table_is_exact():
    a, b = table(1, 9, both=30, neither=12)
    result = mcnemar_exact(a, b)
    assert (result.b01, result.b10, result.n, result.discordant) == (1, 9, 52, 10)
    # 2 · (C(10,0) + C(10,1)) / 2^10 = 22 / 1024, as R's binom.test(1, 10) reports (0.02148).
    assert result.p_value == 22 / 1024 == 0.021484375


def test_mcnemar_published_value():
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91, Table 1 (Bentur et al.):
    # AHR before/after stem cell transplantation, n12 = 1, n21 = 7; exact conditional p = 0.070.
    a, b = table(1, 7, both=1, neither=12)
    result = mcnemar_exact(a, b)
    assert round(result.p_value, 3) == 0.070
    assert result.p_value == 18 / 256


@pytest.mark.parametrize("b01", range(0, 9))
def test_mcnemar_matches_enumeration(b01):
    for b10 in range(0, 9):
        assert mcnemar_exact(*table(b01, b10, both=2)).p_value == pytest.approx(enumerated_p(b01, b10), rel=1e-12)


def test_mcnemar_symmetric_in_swapping_methods():
    a, b = table(3, 17, both=40, neither=40)
    forward, backward = mcnemar_exact(a, b), mcnemar_exact(b, a)
    assert (forward.b01, forward.b10) == (backward.b10, backward.b01) == (3, 17)
    assert forward.p_value == backward.p_value < 0.01


def test_mcnemar_without_discordance_is_one():
    a, b = table(0, 0, both=10, neither=5)
    assert mcnemar_exact(a, b).p_value == 1.0
    assert mcnemar_exact(*table(6, 6)).p_value == 1.0  # balanced: 2·P(X ≤ 6) > 1 is capped


def test_mcnemar_large_counts_use_log_space_accurately():
    # 1400 vs 1600 discordant pairs: beyond the exact integer sum, checked against one here.
    n, k = 3000, 1400
    exact = Fraction(2 * sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    assert mcnemar_exact(*table(k, n - k)).p_value == pytest.approx(float(exact), rel=1e-9)


def test_mcnemar_huge_counts_never_overflow():
    # Normal approximation with continuity correction is accurate to ~1e-6 at this size.
    b01, b10 = 50_000, 50_400
    n = b01 + b10
    z = (b01 + 0.5 - n / 2) / math.sqrt(n / 4)
    assert mcnemar_exact(*table(b01, b10)).p_value == pytest.approx(math.erfc(-z / math.sqrt(2)), abs=1e-4)
    assert mcnemar_exact(*table(400_000, 600_000)).p_value == 0.0  # underflows, does not raise


def test_mcnemar_accepts_lists_of_ints():
    assert mcnemar_exact([0, 1, 1, 0], [1, 1, 0, 1]) == mcnemar_exact(*map(np.array, ([0, 1, 1, 0], [1, 1, 0, 1])))
    assert mcnemar_exact([0, 1, 1, 0], [1, 1, 0, 1]).b01 == 2


# --- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_deterministic_for_a_seed():
    a, b = differences(200, gained=15, lost=9)
    first = paired_bootstrap([a], [b], seed=7)
    assert paired_bootstrap([a], [b], seed=7) == first
    others = {paired_bootstrap([a], [b], seed=s, resamples=500) for s in range(8)}
    assert len({(i.low, i.high) for i in others}) > 1  # the seed does change the draws


def test_bootstrap_covers_a_known_difference():
    # B learns exactly 20 more of 400 questions: 20 gained, none lost.
    a = np.zeros(400, dtype=bool)
    a[:100] = True
    b = a.copy()
    b[100:120] = True
    interval = paired_bootstrap([a], [b])
    assert interval.difference == 20
    assert interval.n == 400
    assert 0 < interval.low < 20 < interval.high
    assert not interval.contains_zero
    # sd of the resampled sum = sqrt(400 · (0.05 − 0.05²)) ≈ 4.36, so the ends lie ~8.5 away.
    assert 9 <= interval.low <= 14
    assert 26 <= interval.high <= 31
    assert interval.rate == pytest.approx(0.05)


def test_bootstrap_width_shrinks_with_questions():
    small = paired_bootstrap(*map(lambda x: [x], differences(14, gained=2, lost=1)))
    large = paired_bootstrap(*map(lambda x: [x], differences(400, gained=40, lost=20)))
    assert (small.difference, large.difference) == (1, 20)
    small_width, large_width = small.rate_high - small.rate_low, large.rate_high - large.rate_low
    # Normal theory: widths 3.92·sd = ~6.7 of 14 questions and ~30 of 400 questions.
    assert 0.3 <= small_width <= 0.7
    assert 0.05 <= large_width <= 0.1
    assert small_width > 3 * large_width
    assert small.contains_zero and not large.contains_zero


def test_bootstrap_contains_zero_for_small_random_differences():
    a, b = differences(300, gained=6, lost=5, seed=3)
    interval = paired_bootstrap([a], [b])
    assert interval.difference == 1
    assert interval.contains_zero
    assert interval.low < 0 < interval.high
    identical = paired_bootstrap([a], [a])
    assert (identical.difference, identical.low, identical.high) == (0, 0, 0)
    assert identical.contains_zero


def test_bootstrap_pools_seeds_by_summing_counts():
    groups = [differences(100, 10, 5, seed=1), differences(100, 2, 4, seed=2), differences(100, 12, 2, seed=3)]
    a_groups, b_groups = [a for a, _ in groups], [b for _, b in groups]
    interval = paired_bootstrap(a_groups, b_groups)
    assert interval.difference == 5 - 2 + 10 == sum(int(b.sum()) - int(a.sum()) for a, b in groups)
    assert interval.n == 300
    single = paired_bootstrap(a_groups[:1], b_groups[:1])
    assert single.difference == 5 and single.n == 100


def test_seeds_that_repeat_each_other_are_not_new_evidence():
    # Two seeds with the same outcomes (a small learning rate hardly depends on the example order):
    # the difference doubles and so must the interval, since the questions, not the seeds, are the
    # sample; resampling each seed on its own would widen it by only sqrt(2) and call it significant.
    a, b = differences(300, gained=12, lost=4, seed=4)
    once = compare_paired([a], [b], seed=1)
    twice = compare_paired([a, a], [b, b], seed=1)
    assert twice.interval.difference == 2 * once.interval.difference == 16
    assert (twice.interval.low, twice.interval.high) == (2 * once.interval.low, 2 * once.interval.high)
    assert (twice.mcnemar.b01, twice.mcnemar.b10, twice.mcnemar.p_value) == (12, 4, once.mcnemar.p_value)
    assert once.mcnemar == mcnemar_exact(a, b)


def test_the_sign_test_counts_each_question_once_for_the_side_its_seeds_favour():
    a0, b0 = np.array([0, 0, 1, 0, 1]), np.array([1, 1, 0, 0, 1])  # seed 0: B ahead on q0, q1; A on q2
    a1, b1 = np.array([0, 1, 1, 0, 1]), np.array([1, 0, 0, 1, 1])  # seed 1: B on q0, q3; A on q1, q2
    result = compare_paired([a0, a1], [b0, b1])
    # summed over the seeds: q0 +2, q1 0, q2 -2, q3 +1, q4 0 -> two questions favour B, one A
    assert (result.mcnemar.b01, result.mcnemar.b10, result.mcnemar.n) == (2, 1, 5)
    assert result.interval.difference == 1


def test_seeds_over_different_questions_are_refused():
    with pytest.raises(CplError, match="seed 1 has 3 questions and seed 0 has 2"):
        paired_bootstrap([[1, 0], [1, 0, 1]], [[0, 1], [1, 1, 1]])


def test_bootstrap_matches_index_resampling():
    # The multinomial shortcut must give the distribution of resampling question indices.
    a, b = differences(400, gained=40, lost=20, seed=5)
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 400, size=(20_000, 400))  # (resamples, questions)
    d = b.astype(int) - a.astype(int)
    totals = d[indices].sum(axis=1)
    reference = np.quantile(totals, [0.025, 0.975])
    interval = paired_bootstrap([a], [b], resamples=20_000, seed=2)
    assert abs(interval.low - reference[0]) <= 1.5
    assert abs(interval.high - reference[1]) <= 1.5


def test_bootstrap_confidence_changes_width():
    a, b = differences(400, gained=40, lost=20)
    wide = paired_bootstrap([a], [b], confidence=0.99)
    narrow = paired_bootstrap([a], [b], confidence=0.5)
    assert wide.high - wide.low > 2 * (narrow.high - narrow.low)


def test_bootstrap_is_fast():
    a, b = differences(400, gained=40, lost=20)
    start = time.perf_counter()
    paired_bootstrap([a], [b], resamples=10_000)
    assert time.perf_counter() - start < 0.5


# --- describe and compare --------------------------------------------------------------------


def test_describe():
    assert Interval(20, 12, 28, 400, 0.95).describe("learned") == "+20 learned (95 % CI +12 to +28)"
    assert Interval(3, -1, 7, 14, 0.95).describe() == "+3 (95 % CI \u22121 to +7), no detectable difference"
    assert Interval(-5, -9, -2, 400, 0.9).describe("forgotten") == "\u22125 forgotten (90 % CI \u22129 to \u22122)"
    assert Interval(0, 0, 0, 10, 0.975).describe() == "0 (97.5 % CI 0 to 0), no detectable difference"


def test_compare_paired_to_dict():
    groups = [differences(200, 25, 5, seed=1), differences(200, 20, 8, seed=2)]
    a_groups, b_groups = [a for a, _ in groups], [b for _, b in groups]
    result = compare_paired(a_groups, b_groups, resamples=2000, seed=3)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["seeds"] == 2 and data["n"] == 400
    assert data["b_count"] - data["a_count"] == data["difference"] == 32
    summed = sum(b.astype(int) - a.astype(int) for a, b in groups)  # per question, over the seeds
    assert (data["b01"], data["b10"]) == (int((summed > 0).sum()), int((summed < 0).sum()))
    assert data["p_value"] < 1e-3
    assert data["low"] <= 32 <= data["high"] and data["contains_zero"] is False
    assert data["rate"] == pytest.approx(32 / 400)
    assert result.interval == paired_bootstrap(a_groups, b_groups, resamples=2000, seed=3)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_groups", "b_groups", "kwargs", "message"),
    [
        ([[1, 0]], [[1, 0, 1]], {}, "seed 0: A has 2 questions and B has 3"),
        ([[1, 0], [1]], [[1, 0], [0, 1]], {}, "seed 1: A has 1 questions and B has 2"),
        ([[1, 0], [1]], [[1, 0], [0]], {}, "seed 1 has 1 questions and seed 0 has 2"),
        ([[1, 0]], [[1, 0], [0, 1]], {}, "A has 1 seed"),
        ([], [], {}, "no seeds"),
        ([[]], [[]], {}, "seed 0: no questions"),
        ([[1, 2]], [[1, 0]], {}, "seed 0: A outcomes must be bool or 0/1, got 2"),
        ([["x", "y"]], [[1, 0]], {}, "dtype"),
        ([[[1, 0]]], [[[1, 0]]], {}, "one flat array"),
        ([1, 0], [0, 1], {}, "pass one array per seed"),
        ([[1, 0]], [[1, 0]], {"confidence": 1.0}, "confidence must be strictly between 0 and 1"),
        ([[1, 0]], [[1, 0]], {"confidence": 0.0}, "confidence"),
        ([[1, 0]], [[1, 0]], {"confidence": 95}, "got 95"),
        ([[1, 0]], [[1, 0]], {"resamples": 0}, "resamples must be at least 1"),
    ],
)
def test_bad_input(a_groups, b_groups, kwargs, message):
    with pytest.raises(CplError, match=message):
        paired_bootstrap(a_groups, b_groups, **kwargs)
    with pytest.raises(CplError, match=message):
        compare_paired(a_groups, b_groups, **kwargs)


def test_mcnemar_bad_input():
    with pytest.raises(CplError, match="A has 2 questions and B has 1"):
        mcnemar_exact([True, False], [True])
    with pytest.raises(CplError, match="no questions"):
        mcnemar_exact([], [])
    with pytest.raises(CplError, match="B outcomes must be bool or 0/1, got 0.5"):
        mcnemar_exact([1, 0], [0.5, 1])
