"""``cpl-masks profile --kind retain`` and how a retain set is shown: the CLI side of :mod:`cpl_masks.retain`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpl_masks import distributed
from cpl_masks.cli.common import print_table, say
from cpl_masks.data import load_questions
from cpl_masks.errors import CplError
from cpl_masks.masks import Mask
from cpl_masks.models import load_model
from cpl_masks.retain import profile_retain

KINDS = ("mask", "retain")


def check_retain_options(*, inject: Path | None, mastered: Path | None, given: dict[str, Any]) -> None:
    """Refuse, before any model loads, what a retain set cannot take: an injection set or a mask rule's options."""
    if mastered is None:
        raise CplError("--kind retain needs --mastered (the questions the model must keep)")
    if inject is not None:
        raise CplError("--kind retain profiles the questions to keep alone; it takes no --inject")
    options = [option for option, value in given.items() if value is not None]
    if options:
        raise CplError(f"{options[0]} applies to --kind mask, not to a retain set")


def make_retain_set(
    mastered: Path,
    *,
    model: str,
    scoring: str | None,
    batch_size: int,
    checkpointing: bool,
    task: str | None,
    dtype: str,
    device: str,
    threads: int | None,
) -> Mask:
    """Load the questions and the model and profile the retain set (every rank; rank 0 then saves it)."""
    questions = load_questions(mastered)
    loaded = distributed.main_first(lambda: load_model(model, dtype=dtype, device=device, threads=threads))
    return profile_retain(
        loaded,
        questions,
        scoring=scoring,
        batch_size=batch_size,
        checkpointing=checkpointing,
        task=task,
        data_path=str(mastered),
    )


def print_retain(retain: Mask) -> None:
    """A retain set in a few lines: its questions, and how many entries g_M pushes up, down or not at all."""
    counts = retain.metadata.get("counts") or {}
    entries, positive, negative = (int(counts.get(key) or 0) for key in ("entries", "positive", "negative"))
    mastered = (retain.metadata.get("data") or {}).get("mastered") or {}

    def share(count: int) -> str:
        return f"{count / entries:.1%}" if entries else "-"

    model, scoring = (retain.metadata.get("model") or {}).get("ref"), retain.metadata.get("scoring")
    say(f"retain set {retain.id[:12]}: {mastered.get('rows')} questions, model {model}, {scoring} scoring")
    zero = entries - positive - negative
    rows = [("entries", entries, share(entries)), ("g_M > 0", positive, share(positive))]
    rows += [("g_M < 0", negative, share(negative)), ("g_M = 0", zero, share(zero))]
    print_table(f"retain set {retain.id[:12]}", ["", "entries", "share"], rows)
