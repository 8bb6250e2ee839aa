"""Paired statistics for two training methods evaluated on the same questions.

Two methods trained from the same weights on the same split answer the same questions, so their
outcomes are *paired*: for each question we know whether method A and method B learned it (an
injection question now answered correctly) or forgot it (a mastered question now answered
wrongly). Pairing is what makes small differences detectable: only the questions on which the
methods disagree carry information about which one is better.

Two complementary answers, both computed from boolean arrays aligned by question:

* :func:`mcnemar_exact`: is the difference real? The exact two-sided McNemar test on the
  discordant pairs.
* :func:`paired_bootstrap`: how large is it? A percentile interval for ``count(B) − count(A)``,
  resampling questions.

Several seeds (runs of one split with another example order, another random mask) answer the same
questions, so the questions are the sample and the seeds are repeated measures of each: both
answers treat a question with all its seeds as one unit. The bootstrap resamples questions and sums
each drawn question's difference over the seeds; the test counts the questions on which B comes out
ahead over the seeds against those on which A does (a sign test; McNemar's test for one seed).
Pooling (seed, question) pairs as if independent would count a seed that repeats another's
outcomes, as runs at a small learning rate nearly do, as new evidence.

:func:`compare_paired` runs both on one or more seeds and returns something JSON can hold.
Only numpy is needed; the binomial tail is computed exactly for the sizes seen in practice and in
log space beyond, so no size overflows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cpl_masks.errors import CplError

# Up to this many discordant pairs the binomial tail is an exact integer sum (a few ms at most);
# beyond, a log-space sum whose relative error stays below 1e-9 and whose cost grows only linearly.
_EXACT_TAIL_MAX_N = 2000
_MINUS = "\u2212"  # typographic minus, so "−1" lines up with "+7"

Outcomes = Sequence[bool] | np.ndarray
"""One method's outcomes, one per question: a list of bools or 0/1, or a 1-D array."""
_Pairs = list[tuple[np.ndarray, np.ndarray]]  # validated (a, b) outcomes, one pair per seed


@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test on paired outcomes.

    Attributes:
        b01: Pairs where A is false and B is true (B better on this question).
        b10: Pairs where A is true and B is false (A better on this question).
        n: All pairs, concordant ones included.
        p_value: Exact two-sided p-value; 1.0 when no pair is discordant.
    """

    b01: int
    b10: int
    n: int
    p_value: float

    @property
    def discordant(self) -> int:
        """Pairs on which the two methods disagree: the only ones the test looks at."""
        return self.b01 + self.b10


@dataclass(frozen=True)
class Interval:
    """A paired difference ``count(B) − count(A)`` with its bootstrap percentile interval.

    Attributes:
        difference: Observed total count in B minus total count in A, summed over seeds.
        low: Lower end of the percentile interval, in the same units (a count).
        high: Upper end of the percentile interval.
        n: Number of paired questions, summed over seeds; divides counts into per-question rates.
        confidence: Coverage of the interval, e.g. 0.95.
    """

    difference: int
    low: int
    high: int
    n: int
    confidence: float

    @property
    def contains_zero(self) -> bool:
        """Whether the interval admits no difference at all (the data cannot tell A and B apart)."""
        return self.low <= 0 <= self.high

    @property
    def rate(self) -> float:
        """The difference per question (a difference of proportions)."""
        return self.difference / self.n

    @property
    def rate_low(self) -> float:
        """Lower end of the interval per question."""
        return self.low / self.n

    @property
    def rate_high(self) -> float:
        """Upper end of the interval per question."""
        return self.high / self.n

    def describe(self, unit: str = "") -> str:
        """One line for a report, e.g. ``"+3 learned (95 % CI −1 to +7), no detectable difference"``.

        Args:
            unit: Word placed after the difference ("learned", "forgotten"); empty for none.

        Returns:
            The signed difference, the interval and, when the interval contains 0, a note that
            the data show no detectable difference.
        """
        unit_text = f" {unit}" if unit else ""
        text = (
            f"{_signed(self.difference)}{unit_text} "
            f"({self.confidence * 100:g} % CI {_signed(self.low)} to {_signed(self.high)})"
        )
        return f"{text}, no detectable difference" if self.contains_zero else text


@dataclass(frozen=True)
class PairedComparison:
    """Both answers for one comparison of B against A: how large (bootstrap) and how sure (McNemar).

    Attributes:
        a_count: Total count of true outcomes for method A, summed over seeds.
        b_count: Total count of true outcomes for method B.
        seeds: Number of seeds (groups) pooled.
        interval: Bootstrap interval of ``b_count − a_count``.
        mcnemar: Exact sign test over questions of the seeds' summed differences: ``b01`` questions
            favour B, ``b10`` favour A (McNemar's test when there is one seed).
    """

    a_count: int
    b_count: int
    seeds: int
    interval: Interval
    mcnemar: McNemar

    def to_dict(self) -> dict[str, Any]:
        """Plain ints, floats and bools, ready for ``json.dumps``."""
        interval = self.interval
        return {
            "a_count": self.a_count,
            "b_count": self.b_count,
            "seeds": self.seeds,
            "n": interval.n,
            "difference": interval.difference,
            "rate": interval.rate,
            "confidence": interval.confidence,
            "low": interval.low,
            "high": interval.high,
            "rate_low": interval.rate_low,
            "rate_high": interval.rate_high,
            "contains_zero": interval.contains_zero,
            "b01": self.mcnemar.b01,
            "b10": self.mcnemar.b10,
            "p_value": self.mcnemar.p_value,
        }


def mcnemar_exact(a: Outcomes, b: Outcomes) -> McNemar:
    """Exact two-sided McNemar test of paired outcomes ``a`` and ``b`` (one seed, or pooled).

    Under the null hypothesis each discordant pair is equally likely to favour A or B, so
    ``b01 ~ Binomial(b01 + b10, 1/2)`` and ``p = min(1, 2 · P(X ≤ min(b01, b10)))``.

    Args:
        a: Outcomes of method A, one per question (bool or 0/1).
        b: Outcomes of method B for the same questions, in the same order.

    Returns:
        The discordant counts and the p-value.

    Raises:
        CplError: If the arrays are empty, not 1-D, of different lengths or not 0/1.
    """
    a_arr, b_arr = _pair(a, b, where="")
    b01 = int(np.count_nonzero(~a_arr & b_arr))
    b10 = int(np.count_nonzero(a_arr & ~b_arr))
    return McNemar(b01=b01, b10=b10, n=int(a_arr.size), p_value=_mcnemar_p(b01, b10))


def paired_bootstrap(
    a_groups: Sequence[Outcomes],
    b_groups: Sequence[Outcomes],
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``count(B) − count(A)``, resampling questions.

    Every seed holds the same questions in the same order. Each question's difference is summed
    over the seeds, ``d = Σ_seeds (b − a)``, and each resample draws as many questions as there are,
    uniformly with replacement, and sums their ``d``. Since ``d`` takes few distinct values, a
    resample is determined by how many questions of each value it drew, and those counts follow a
    multinomial over the values' shares: drawing the counts directly gives exactly the distribution
    of drawing indices, in O(resamples × values) time whatever the number of questions. The
    interval ends are order statistics of the resampled totals (lower and higher, never
    interpolated), so they are counts and err on the wide side.

    Args:
        a_groups: One array per seed of method A's outcomes (bool or 0/1), over the same questions.
        b_groups: One array per seed of method B's outcomes, aligned by question with ``a_groups``.
        resamples: Number of bootstrap resamples.
        confidence: Coverage of the interval, strictly between 0 and 1.
        seed: Seed of the random generator; the same inputs and seed give the same interval.

    Returns:
        The observed difference and its interval.

    Raises:
        CplError: On empty input, groups of different lengths, values other than 0/1, a
            confidence outside (0, 1) or fewer than one resample.
    """
    pairs = _groups(a_groups, b_groups)
    return _bootstrap(_question_differences(pairs), len(pairs), resamples=resamples, confidence=confidence, seed=seed)


def _bootstrap(differences: np.ndarray, seeds: int, *, resamples: int, confidence: float, seed: int) -> Interval:
    """:func:`paired_bootstrap` on each question's difference summed over the ``seeds``: ``(n,)``."""
    _check_options(resamples, confidence)
    values, counts = np.unique(differences, return_counts=True)
    draws = np.random.default_rng(seed).multinomial(differences.size, counts / differences.size, size=resamples)
    totals = draws @ values  # (resamples,) resampled count(B) − count(A)
    tail = (1.0 - confidence) / 2.0
    return Interval(
        difference=int(differences.sum()),
        low=int(np.quantile(totals, tail, method="lower")),
        high=int(np.quantile(totals, 1.0 - tail, method="higher")),
        n=int(differences.size) * seeds,  # (seed, question) pairs
        confidence=float(confidence),
    )


def compare_paired(
    a_groups: Sequence[Outcomes],
    b_groups: Sequence[Outcomes],
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Compare B against A over one or more seeds: bootstrap interval and sign test, both by question.

    Args:
        a_groups: One array per seed of method A's outcomes (bool or 0/1), over the same questions.
        b_groups: One array per seed of method B's outcomes, aligned by question with ``a_groups``.
        resamples: Number of bootstrap resamples.
        confidence: Coverage of the interval, strictly between 0 and 1.
        seed: Seed of the bootstrap's random generator.

    Returns:
        Counts, the interval of their difference and the sign test over questions.

    Raises:
        CplError: As :func:`paired_bootstrap`.
    """
    pairs = _groups(a_groups, b_groups)
    differences = _question_differences(pairs)
    interval = _bootstrap(differences, len(pairs), resamples=resamples, confidence=confidence, seed=seed)
    ahead, behind = int(np.count_nonzero(differences > 0)), int(np.count_nonzero(differences < 0))
    return PairedComparison(
        a_count=sum(int(a_arr.sum()) for a_arr, _ in pairs),
        b_count=sum(int(b_arr.sum()) for _, b_arr in pairs),
        seeds=len(pairs),
        interval=interval,
        mcnemar=McNemar(b01=ahead, b10=behind, n=int(differences.size), p_value=_mcnemar_p(ahead, behind)),
    )


def _question_differences(pairs: _Pairs) -> np.ndarray:
    """``Σ_seeds (b − a)`` per question: ``(n,)`` int64."""
    return sum(b_arr.astype(np.int64) - a_arr.astype(np.int64) for a_arr, b_arr in pairs)


def _mcnemar_p(b01: int, b10: int) -> float:
    """Two-sided exact p-value from the discordant counts."""
    n = b01 + b10
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * _binomial_half_cdf(min(b01, b10), n))


def _binomial_half_cdf(k: int, n: int) -> float:
    """``P(X ≤ k)`` for ``X ~ Binomial(n, 1/2)`` with ``k ≤ n / 2``: exact, or in log space for large n."""
    if n <= _EXACT_TAIL_MAX_N:
        # Python ints never overflow and int / int is correctly rounded.
        return sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return _binomial_half_cdf_log(k, n)


def _binomial_half_cdf_log(k: int, n: int) -> float:
    """``P(X ≤ k)`` for ``X ~ Binomial(n, 1/2)`` summed in log space (never overflows, may underflow to 0)."""
    i = np.arange(k, dtype=np.float64)
    # log C(n, i), i = 0..k, by the ratio C(n, i+1) / C(n, i) = (n − i) / (i + 1).
    log_comb = np.concatenate(([0.0], np.cumsum(np.log(n - i) - np.log(i + 1))))  # (k+1,)
    log_terms = log_comb - n * math.log(2.0)
    top = float(log_terms.max())
    return float(math.exp(top) * np.exp(log_terms - top).sum())


def _groups(a_groups: Sequence[Outcomes], b_groups: Sequence[Outcomes]) -> _Pairs:
    """Validated (a, b) boolean arrays, one pair per seed, every seed over the same number of questions."""
    if len(a_groups) != len(b_groups):
        raise CplError(f"A has {len(a_groups)} seed(s) and B has {len(b_groups)}; pass one array per seed for each")
    if len(a_groups) == 0:
        raise CplError("no seeds to compare: a_groups and b_groups are empty")
    pairs = [_pair(a, b, where=f"seed {index}: ") for index, (a, b) in enumerate(zip(a_groups, b_groups))]
    for index, (a_arr, _) in enumerate(pairs):
        if a_arr.size != pairs[0][0].size:
            raise CplError(
                f"seed {index} has {a_arr.size} questions and seed 0 has {pairs[0][0].size}; "
                "every seed must hold the same questions in the same order"
            )
    return pairs


def _pair(a: Outcomes, b: Outcomes, *, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Two validated 1-D boolean arrays of the same, non-zero length."""
    a_arr = _outcomes(a, f"{where}A")
    b_arr = _outcomes(b, f"{where}B")
    if a_arr.size != b_arr.size:
        raise CplError(
            f"{where}A has {a_arr.size} questions and B has {b_arr.size}; the outcomes must be aligned by question"
        )
    if a_arr.size == 0:
        raise CplError(f"{where}no questions: the outcome arrays are empty")
    return a_arr, b_arr


def _outcomes(values: Outcomes, name: str) -> np.ndarray:
    """One method's outcomes as a 1-D bool array, refusing anything but bool or 0/1."""
    array = np.asarray(values)
    if array.ndim == 0:
        raise CplError(f"{name} outcomes must be an array of questions, got one value; pass one array per seed")
    if array.ndim != 1:
        raise CplError(f"{name} outcomes must be one flat array of questions, got shape {array.shape}")
    if array.dtype == np.bool_:
        return array
    if array.size and array.dtype.kind not in "iuf":
        raise CplError(f"{name} outcomes must be bool or 0/1, got dtype {array.dtype}")
    bad = array[(array != 0) & (array != 1)]
    if bad.size:
        raise CplError(f"{name} outcomes must be bool or 0/1, got {bad[0].item()}")
    return array.astype(bool)


def _check_options(resamples: int, confidence: float) -> None:
    """Refuse a confidence outside (0, 1) or fewer than one resample."""
    if not 0.0 < confidence < 1.0:
        raise CplError(f"confidence must be strictly between 0 and 1 (e.g. 0.95), got {confidence}")
    if resamples < 1:
        raise CplError(f"resamples must be at least 1, got {resamples}")


def _signed(value: int) -> str:
    """``+3``, ``−1`` (typographic minus) or ``0``."""
    if value > 0:
        return f"+{value}"
    return f"{_MINUS}{-value}" if value < 0 else "0"


def transitions(before: Sequence[bool], after: Sequence[bool]) -> tuple[list[bool], list[bool]]:
    """Per question, whether it went wrong → right (gained) and right → wrong (lost) between two evaluations."""
    pairs = list(zip(before, after, strict=True))
    return [bool(now and not was) for was, now in pairs], [bool(was and not now) for was, now in pairs]


def count_transitions(before: Sequence[bool], after: Sequence[bool]) -> tuple[int, int]:
    """How many questions went wrong → right and right → wrong between two evaluations."""
    gained, lost = transitions(before, after)
    return sum(gained), sum(lost)


def mean_change(before: Sequence[float], after: Sequence[float]) -> float:
    """Mean of ``after - before`` over paired values (0 for empty sets)."""
    changes = [now - was for was, now in zip(before, after, strict=True)]
    return sum(changes) / len(changes) if changes else 0.0
