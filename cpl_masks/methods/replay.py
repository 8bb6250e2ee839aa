"""Replay (``replay``): mix mastered questions into each epoch's training stream.

The injection questions come in their usual seeded order; ``round(n·share / (1 − share))``
mastered questions are spread evenly among them, so ``share`` of the epoch's stream rehearses what
the model already knows. The replayed questions are drawn from ``context.mastered`` (the set a mask
is profiled on), never from the held-out set, in an order fixed by (seed, epoch), so a resumed run
sees the same stream.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cpl_masks.data.questions import Question
from cpl_masks.errors import CplError
from cpl_masks.methods.base import Method, MethodContext, epoch_order, option


@dataclass
class ReplayOptions:
    """The share of each epoch's stream made of mastered questions (``--replay-share``)."""

    replay_share: float = option(0.5, "share of each epoch's stream that is mastered questions")

    def __post_init__(self) -> None:
        if not 0 <= self.replay_share < 1:
            raise CplError(f"--replay-share {self.replay_share}: must be in [0, 1)")


def replay_count(inject_count: int, share: float) -> int:
    """Mastered questions to add to ``inject_count`` injection questions so they make ``share`` of the stream."""
    return round(inject_count * share / (1 - share))


def replay_order(count: int, needed: int, seed: int, epoch: int) -> list[int]:
    """``needed`` indices into ``count`` mastered questions: seeded shuffles of all of them, one after another.

    Each pass visits every mastered question once before any repeats; it depends only on
    (seed, epoch), like :func:`~cpl_masks.methods.base.epoch_order`.
    """
    order: list[int] = []
    cycle = 0
    while len(order) < needed:
        shuffled = list(range(count))
        random.Random(f"cpl-masks:replay:{seed}:{epoch}:{cycle}").shuffle(shuffled)
        order += shuffled
        cycle += 1
    return order[:needed]


def interleave(first: Sequence[Any], second: Sequence[Any]) -> list[Any]:
    """Both sequences merged, each in its own order, with ``second``'s items spread evenly over the whole.

    Position ``k`` of the result takes the next item of ``second`` exactly when
    ``⌊(k+1)·r/T⌋`` passes ``⌊k·r/T⌋`` (``r = len(second)``, ``T`` the total), the line-drawing rule.
    """
    total, spread = len(first) + len(second), len(second)
    merged, left, right = [], iter(first), iter(second)
    for position in range(total):
        takes_second = (position + 1) * spread // total > position * spread // total
        merged.append(next(right) if takes_second else next(left))
    return merged


class Replay(Method):
    """Plain fine-tuning on a stream where ``replay_share`` of the questions are mastered ones."""

    name = "replay"

    def __init__(self, context: MethodContext, options: ReplayOptions | None = None) -> None:
        self.mastered = context.require_mastered(self.name)
        self.share = (options or ReplayOptions()).replay_share

    def stream(self, inject: Sequence[Question], epoch: int, seed: int) -> list[Question]:
        """The injection questions in their seeded order with mastered questions spread evenly among them."""
        ordered = [inject[index] for index in epoch_order(len(inject), seed, epoch)]
        needed = replay_count(len(inject), self.share)
        replayed = [self.mastered[index] for index in replay_order(len(self.mastered), needed, seed, epoch)]
        return interleave(ordered, replayed)

    def describe(self) -> dict[str, Any]:
        """The mastered questions available to replay."""
        return {"replay_pool": len(self.mastered)}
