"""Which entries a mask calls collaborative: the cut that turns scores ``s = g_M ⊙ g_I`` into bits.

Three ways to cut, recorded in the mask's ``rule`` metadata:

* ``threshold`` τ (default 0, the CPL paper's rule): collaborative where ``s >= τ``;
* ``keep_fraction`` F: exactly ``ceil(F × E)`` of the ``E`` eligible entries are collaborative
  (F read as the decimal it is written as, so 0.3 of 10 entries is 3). Entries are ranked by their
  ``bfloat16``-rounded score (the precision scores are stored in), largest first, so a mask cut at
  profiling time equals one re-cut later from stored scores. Ties at the cut (typically the many
  entries scoring exactly 0, which the injection gradient does not touch) are broken by position:
  tensors in the mask's (model) order, then flat row-major index within a tensor, earlier first;
* ``freeze_pattern`` / ``train_pattern`` (regular expressions, ``re.search`` on parameter names):
  force whole tensors frozen or collaborative, whatever their scores (freeze wins if both match).
  Forced tensors are not eligible: they do not count towards the keep fraction.

The score is ``s`` itself (``statistic="product"``), or with ``statistic="t"`` its t-statistic
``t = s / se(s)``, where ``se(s)² = g_I² se(g_M)² + g_M² se(g_I)²`` (the delta method, M and I
independent) and the standard errors come from per-question gradients
(:func:`cpl_masks.profiling.gradients.gradient_sums`). ``--confidence K`` is the t-statistic with threshold
``-K``: an entry is frozen only where it conflicts with confidence, ``t < -K``; a keep fraction then
ranks by ``t``.

Stored scores mark which entries the injection gradient touches by the sign of zero: an untouched
entry is stored as ``+0``, a touched one whose score is (or rounds to) zero as ``-0`` (see
:func:`encode_scores`), so a re-cut counts the touched entries it keeps exactly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import torch

from cpl_masks.errors import CplError

_BF16_KEYS = 1 << 16
STATISTICS = ("product", "t")


@dataclass(frozen=True)
class Cut:
    """How scores become a mask; stored as the mask's ``rule`` metadata.

    The one place that checks a cut's options (exactly one of ``threshold`` and ``keep_fraction``,
    their ranges, the patterns), so every command refuses the same mistakes in the same words.
    """

    threshold: float | None = 0.0
    keep_fraction: float | None = None
    freeze_pattern: str | None = None
    train_pattern: str | None = None
    statistic: str = "product"  # the score: s = g_M ⊙ g_I, or "t", its t-statistic (module docstring)

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise CplError(f"rule statistic {self.statistic!r}: choose one of {', '.join(STATISTICS)}")
        if (self.threshold is None) == (self.keep_fraction is None):
            raise CplError("give exactly one of --threshold and --keep-fraction")
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise CplError(f"--keep-fraction {self.keep_fraction}: must be in (0, 1]")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise CplError(f"--threshold {self.threshold}: must be a finite number")
        for option, pattern in (
            ("--freeze-pattern", self.freeze_pattern),
            ("--train-pattern", self.train_pattern),
        ):
            _compile(option, pattern)

    @classmethod
    def from_options(
        cls,
        threshold: float | None,
        keep_fraction: float | None,
        confidence: float | None = None,
        *,
        freeze_pattern: str | None = None,
        train_pattern: str | None = None,
    ) -> Cut:
        """The rule the command line's options describe: the sign rule (threshold 0) when no cut is given;
        ``--confidence K`` scores by the t-statistic, cut at ``-K`` unless a keep fraction ranks by it."""
        if confidence is not None:
            if threshold is not None:
                raise CplError("give --confidence or --threshold, not both (--confidence K cuts the t-statistic at -K)")
            if not 0.0 <= confidence < math.inf:
                raise CplError(f"--confidence {confidence}: must be a finite number >= 0")
            threshold = None if keep_fraction is not None else -confidence
        elif threshold is None and keep_fraction is None:
            threshold = 0.0
        statistic = "product" if confidence is None else "t"
        return cls(threshold, keep_fraction, freeze_pattern, train_pattern, statistic)

    @classmethod
    def from_metadata(cls, recorded: Any, where: str) -> Cut:
        """The sign rule a mask's ``rule`` metadata records, refusing a control's or a combination's."""
        names = {item.name for item in dataclasses.fields(cls)}
        if not isinstance(recorded, dict) or not set(recorded) <= names:
            raise CplError(f"{where}: its rule {recorded!r} is not a sign rule (a control or a combination)")
        try:
            return cls(**recorded)
        except (TypeError, ValueError) as error:
            raise CplError(f"{where}: its rule {recorded!r} is not a valid rule ({error})") from None

    def to_metadata(self) -> dict:
        """The rule as JSON-ready metadata."""
        return asdict(self)

    def forced(self, name: str) -> bool | None:
        """False if the tensor is forced frozen, True if forced collaborative, None if its scores decide."""
        if self.freeze_pattern and re.search(self.freeze_pattern, name):
            return False
        if self.train_pattern and re.search(self.train_pattern, name):
            return True
        return None

    def select(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """Bool mask of one tensor under a threshold rule (or a forced tensor), decided tensor by tensor.

        A keep fraction ranks all tensors together: use :meth:`cut` for it.
        """
        forced = self.forced(name)
        if forced is not None:
            return torch.full(scores.shape, forced, dtype=torch.bool, device=scores.device)
        if self.threshold is None:
            raise ValueError("a keep-fraction rule cuts all tensors at once: use Cut.cut")
        return scores.float() >= self.threshold  # not in bfloat16: the threshold itself is not rounded

    def select_all(self, named_scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bool masks of every tensor; the mapping's order is the position order ties are broken in."""
        if self.keep_fraction is None:
            return {name: self.select(name, scores) for name, scores in named_scores.items()}
        eligible = {name: scores for name, scores in named_scores.items() if self.forced(name) is None}
        key, ties = self._cut_point(eligible.values())
        bits = {}
        for name, scores in named_scores.items():
            if name not in eligible:
                bits[name] = self.select(name, scores)
                continue
            keys = bf16_keys(scores)  # (param shape) int64
            bits[name], ties = _above_and_first_ties(keys, key, ties)
        return bits

    def _cut_point(self, scores: Iterable[torch.Tensor]) -> tuple[int, int]:
        """The smallest kept key and how many entries at that key are kept (first in position order)."""
        histogram = torch.zeros(_BF16_KEYS, dtype=torch.int64)  # (65536,) entries per ordered bf16 value
        for tensor in scores:
            histogram += torch.bincount(bf16_keys(tensor).reshape(-1).cpu(), minlength=_BF16_KEYS)
        wanted = math.ceil(Fraction(str(self.keep_fraction)) * int(histogram.sum()))
        if wanted == 0:
            return _BF16_KEYS, 0  # nothing eligible: no key is that large
        kept_from = histogram.flip(0).cumsum(0).flip(0)  # (65536,) entries with key >= index
        key = int((kept_from >= wanted).nonzero().max())
        above = int(kept_from[key + 1]) if key + 1 < _BF16_KEYS else 0
        return key, wanted - above


def _above_and_first_ties(keys: torch.Tensor, key: int, ties: int) -> tuple[torch.Tensor, int]:
    """Entries with a key above ``key``, plus the first ``ties`` (flat order) at ``key``; and the ties left."""
    bits = keys > key
    at = keys == key
    count = int(at.sum())
    if count <= ties:
        return bits | at, ties - count
    if ties > 0:
        first = at.reshape(-1).cumsum(0, dtype=torch.int32) <= ties  # (n,) True up to the ties-th tie
        bits |= at & first.reshape(keys.shape)
    return bits, 0


def bf16_keys(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving integer key in [0, 65536) of each score rounded to bfloat16 (-0 counts as +0)."""
    bits = (scores.to(torch.bfloat16) + 0.0).view(torch.int16).to(torch.int64) & 0xFFFF  # raw bf16 bits
    negative = bits >= 0x8000
    return torch.where(negative, 0xFFFF - bits, bits + 0x8000)


def t_statistic(
    g_mastered: torch.Tensor, g_inject: torch.Tensor, se_mastered: torch.Tensor, se_inject: torch.Tensor
) -> torch.Tensor:
    """``s / se(s)`` per entry for ``s = g_M ⊙ g_I`` (module docstring); finite everywhere.

    Where ``se(s)`` is 0 the score is 0 if ``s`` is, else ``s``'s sign at the largest finite value.
    """
    product = g_mastered * g_inject
    error = (g_inject.square() * se_mastered.square() + g_mastered.square() * se_inject.square()).sqrt()
    largest = torch.finfo(torch.bfloat16).max
    t = torch.where(error > 0, product / error, product.sign() * largest)
    return t.nan_to_num(nan=0.0, posinf=largest, neginf=-largest).clamp(-largest, largest)


def encode_scores(product: torch.Tensor, touched: torch.Tensor) -> torch.Tensor:
    """Scores as stored: ``product`` in bfloat16, with ``+0`` for untouched and ``-0`` for touched zeros.

    Recorded this way so :func:`touched_entries` can tell, from the stored scores alone, which
    entries the injection gradient moves; the value (and so every cut) is unchanged.
    """
    scores = product.to(torch.bfloat16)
    scores = torch.where(scores == 0, torch.full_like(scores, -0.0), scores)
    return torch.where(touched, scores, torch.zeros_like(scores))


def touched_entries(scores: torch.Tensor) -> torch.Tensor:
    """Bool tensor: True where stored ``scores`` (from :func:`encode_scores`) are anything but ``+0``."""
    return scores.to(torch.bfloat16).view(torch.int16) != 0


def _compile(option: str, pattern: str | None) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as error:
        raise CplError(f"{option} {pattern!r}: not a valid regular expression ({error})") from error
