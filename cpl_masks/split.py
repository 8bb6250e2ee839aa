"""Splitting a question set into what the model masters and what it must learn.

The mastered set M (answered right) and the injection set I (answered wrong) are the inputs of
every later stage. A seeded share of M can be held out so forgetting is later measured on
questions that never shaped a mask.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpl_masks.data import Question, questions_sha256, write_questions
from cpl_masks.errors import CplError
from cpl_masks.files import prepare_output_dir, write_json
from cpl_masks.models import LoadedModel, model_fingerprint
from cpl_masks.scoring import make_scorer, score_questions
from cpl_masks.versions import package_versions

MASTERED, INJECT, HELDOUT, SUMMARY = "mastered.jsonl", "inject.jsonl", "mastered_heldout.jsonl", "split.json"


@dataclass
class Split:
    """The outcome of scoring a question set: who is right, who is wrong, and how it was measured."""

    mastered: list[Question]
    inject: list[Question]
    heldout: list[Question]
    summary: dict[str, Any] = field(default_factory=dict)


def split_questions(
    loaded: LoadedModel,
    questions: Sequence[Question],
    *,
    scoring: str = "letter",
    holdout_fraction: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    show_progress: bool = True,
) -> Split:
    """Score every question once and sort it into mastered, held-out mastered and injection sets."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise CplError(f"--holdout-fraction {holdout_fraction}: must be in [0, 1)")
    scorer = make_scorer(scoring, loaded.tokenizer)
    scores = score_questions(loaded.model, scorer, questions, batch_size=batch_size, description="split")
    right = [q for q, ok in zip(questions, scores.correct) if ok]
    wrong = [q for q, ok in zip(questions, scores.correct) if not ok]
    held_ids = set(q.id for q in random.Random(seed).sample(right, round(len(right) * holdout_fraction)))
    mastered = [q for q in right if q.id not in held_ids]
    heldout = [q for q in right if q.id in held_ids]
    summary = {
        "model": {"ref": loaded.ref, "fingerprint": model_fingerprint(loaded.model)},
        "data": {"sha256": questions_sha256(questions), "rows": len(questions)},
        "scoring": scoring,
        "accuracy": scores.accuracy,
        "counts": {"mastered": len(mastered), "heldout": len(heldout), "inject": len(wrong)},
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "versions": package_versions(),
    }
    return Split(mastered=mastered, inject=wrong, heldout=heldout, summary=summary)


def recorded_scoring(data_file: str | os.PathLike) -> str | None:
    """The scoring ``split.json`` records beside a split's question file, or ``None`` without one.

    Later stages default to it so a mask and a training run score answers the way the split did.

    Raises:
        CplError: ``split.json`` exists but has no readable ``scoring``.
    """
    summary = Path(data_file).parent / SUMMARY
    if not summary.is_file():
        return None
    try:
        scoring = json.loads(summary.read_text(encoding="utf-8"))["scoring"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CplError(f"{summary}: cannot read its 'scoring' (pass --scoring)") from error
    if not isinstance(scoring, str):
        raise CplError(f"{summary}: its 'scoring' is not a name (pass --scoring)")
    return scoring


def write_split(split: Split, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the three question files and ``split.json`` into ``out_dir`` (refused if non-empty)."""
    out = prepare_output_dir(out_dir, overwrite=overwrite)
    write_questions(out / MASTERED, split.mastered)
    write_questions(out / INJECT, split.inject)
    if split.heldout:
        write_questions(out / HELDOUT, split.heldout)
    summary = dict(split.summary)
    summary["files"] = {
        name: questions_sha256(rows)
        for name, rows in ((MASTERED, split.mastered), (INJECT, split.inject), (HELDOUT, split.heldout))
        if rows or name != HELDOUT
    }
    write_json(out / SUMMARY, summary)
    return out
