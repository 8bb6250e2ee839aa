"""Which entries a mask calls collaborative: the rule that turns scores ``s = g_M ⊙ g_I`` into bits.

Three ways to cut, recorded in the mask's ``rule`` metadata:

* ``threshold`` τ (default 0, the CPL paper's rule): collaborative where ``s >= τ``;
* ``keep_fraction`` F: the F share of entries with the largest ``s`` is collaborative. Entries are
  ranked by their ``bfloat16``-rounded score (the precision scores are stored in), so a mask cut at
  profiling time equals one re-cut later from stored scores; ties at the cut are all kept, so the
  kept share can exceed F slightly;
* ``freeze_pattern`` / ``train_pattern`` (regular expressions, ``re.search`` on parameter names):
  force whole tensors frozen or collaborative, whatever their scores (freeze wins if both match).
  Forced tensors do not count towards the keep fraction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch

from cpl_masks.errors import CplError

_BF16_KEYS = 1 << 16
_ZERO_KEY = 0x8000  # bf16_keys of +0.0


@dataclass(frozen=True)
class Rule:
    """How scores become a mask; stored as the mask's ``rule`` metadata."""

    threshold: float | None = 0.0
    keep_fraction: float | None = None
    freeze_pattern: str | None = None
    train_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise CplError(f"--keep-fraction {self.keep_fraction}: must be in (0, 1]")
        if (self.threshold is None) == (self.keep_fraction is None):
            raise CplError("give exactly one of --threshold and --keep-fraction")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise CplError(f"--threshold {self.threshold}: must be a finite number")
        for option, pattern in (
            ("--freeze-pattern", self.freeze_pattern),
            ("--train-pattern", self.train_pattern),
        ):
            _compile(option, pattern)

    @classmethod
    def from_metadata(cls, rule: Mapping) -> Rule:
        """The rule a mask was cut with, from its metadata."""
        return cls(**{key: rule.get(key) for key in ("threshold", "keep_fraction", "freeze_pattern", "train_pattern")})

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

    def keeps_zero(self, name: str, cut_key: int | None) -> bool:
        """Whether a score of exactly 0 (an entry the injection gradient does not touch) is collaborative."""
        forced = self.forced(name)
        if forced is not None:
            return forced
        if self.threshold is not None:
            return self.threshold <= 0.0
        return cut_key is not None and cut_key <= _ZERO_KEY

    def select(self, name: str, scores: torch.Tensor, cut_key: int | None) -> torch.Tensor:
        """Bool mask of one tensor's scores (``cut_key`` from :meth:`cut_key` when cutting by fraction)."""
        forced = self.forced(name)
        if forced is not None:
            return torch.full(scores.shape, forced, dtype=torch.bool, device=scores.device)
        if self.threshold is not None:
            return scores >= self.threshold
        if cut_key is None:
            return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        return bf16_keys(scores) >= cut_key

    def cut_key(self, named_scores: Iterable[tuple[str, torch.Tensor]]) -> int | None:
        """For a keep fraction: the smallest ordered bfloat16 key kept (None keeps nothing)."""
        if self.keep_fraction is None:
            return None
        histogram = torch.zeros(_BF16_KEYS, dtype=torch.int64)  # (65536,) entries per ordered bf16 value
        for name, scores in named_scores:
            if self.forced(name) is None:
                histogram += torch.bincount(bf16_keys(scores).reshape(-1).cpu(), minlength=_BF16_KEYS)
        wanted = math.ceil(self.keep_fraction * int(histogram.sum()))
        if wanted == 0:
            return None
        kept_from = histogram.flip(0).cumsum(0).flip(0)  # (65536,) entries with key >= index
        return int((kept_from >= wanted).nonzero().max())


def bf16_keys(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving integer key in [0, 65536) of each score rounded to bfloat16 (-0 counts as +0)."""
    bits = (scores.to(torch.bfloat16) + 0.0).view(torch.int16).to(torch.int64) & 0xFFFF  # raw bf16 bits
    negative = bits >= 0x8000
    return torch.where(negative, 0xFFFF - bits, bits + 0x8000)


def _compile(option: str, pattern: str | None) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as error:
        raise CplError(f"{option} {pattern!r}: not a valid regular expression ({error})") from error
