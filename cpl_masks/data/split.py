"""Splitting a question set into what the model masters and what it must learn.

The mastered set M (answered right) and the injection set I (answered wrong) are the inputs of
every later stage. A seeded share of M can be held out so forgetting is later measured on
questions that never shaped a mask. With ``min_margin`` δ a question counts as mastered only when
it is right by at least δ (the correct choice's score over the best wrong one), so lucky guesses
of a model near chance stay out of M; such questions go to neither set and are counted as
``uncertain``.

A second question set can add a **forgetting pool** to the held-out file: questions of another set
(``pool``) that the untouched model answers right by at least δ, none of them one of the split's
own questions. Forgetting costs only forward passes, so a pool of hundreds of questions measures it
far more finely than the few held-out questions of a small split. Pool questions are filed under
ids ``pool:<id>`` so they never collide with the split's own.

Every question's score is kept in ``scores.jsonl``: a training run on the split's own files takes
its epoch-0 evaluation from there instead of scoring the untouched model again.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cpl_masks.data.questions import Question, check_limit, questions_sha256, write_questions
from cpl_masks.errors import CplError
from cpl_masks.models import LoadedModel, model_fingerprint
from cpl_masks.scoring.base import DEFAULT_SCORING
from cpl_masks.scoring.scorers import SCORINGS, Scorer, Scores, make_scorer, score_questions
from cpl_masks.utils.files import prepare_output_dir, write_json, write_jsonl
from cpl_masks.utils.progress import progress_bar
from cpl_masks.utils.versions import package_versions

MASTERED, INJECT, HELDOUT, SUMMARY = "mastered.jsonl", "inject.jsonl", "mastered_heldout.jsonl", "split.json"
SCORES = "scores.jsonl"
POOL_PREFIX = "pool:"
_SCORE_FIELDS = ("predictions", "correct", "losses", "logprobs", "margins")


@dataclass
class Split:
    """The outcome of scoring a question set: who is right, who is wrong, and how it was measured."""

    mastered: list[Question]
    inject: list[Question]
    heldout: list[Question]
    summary: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # question id -> its scores at split time


def split_questions(
    loaded: LoadedModel,
    questions: Sequence[Question],
    *,
    scoring: str = DEFAULT_SCORING,
    holdout_fraction: float = 0.0,
    min_margin: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    show_progress: bool = True,
    pool: Sequence[Question] = (),
    pool_limit: int | None = None,
) -> Split:
    """Score every question once and sort it into mastered, held-out mastered and injection sets.

    A question is mastered when it is answered right by a margin of at least ``min_margin``.
    ``pool`` candidates (see the module's docstring) are scored in order until ``pool_limit`` are
    kept; the kept ones join the held-out set after the held-out share of M.

    Raises:
        CplError: a bad option, or a question longer than the model's context (before any scoring).
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise CplError(f"--holdout-fraction {holdout_fraction}: must be in [0, 1)")
    if not min_margin >= 0.0:
        raise CplError(f"--min-margin {min_margin}: must be a number >= 0")
    check_limit(pool_limit, "--heldout-limit")
    scorer = make_scorer(scoring, loaded.tokenizer)
    scorer.check_fits(loaded.model, questions)
    scores = score_questions(
        loaded.model, scorer, questions, batch_size=batch_size, description="split", show_progress=show_progress
    )
    right = [q for q, ok, margin in zip(questions, scores.correct, scores.margins) if ok and margin >= min_margin]
    wrong = [q for q, ok in zip(questions, scores.correct) if not ok]
    held_ids = set(q.id for q in random.Random(seed).sample(right, round(len(right) * holdout_fraction)))
    mastered = [q for q in right if q.id not in held_ids]
    kept, pool_scores = forgetting_pool(
        loaded.model,
        scorer,
        pool,
        exclude=questions,
        min_margin=min_margin,
        limit=pool_limit,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    heldout = [q for q in right if q.id in held_ids] + kept
    summary = {
        "model": {"ref": loaded.ref, "fingerprint": model_fingerprint(loaded.model)},
        "data": {"sha256": questions_sha256(questions), "rows": len(questions)},
        "scoring": scoring,
        "accuracy": scores.accuracy,
        "counts": {
            "mastered": len(mastered),
            "heldout": len(heldout) - len(kept),
            "pool": len(kept),
            "inject": len(wrong),
            "uncertain": len(questions) - len(right) - len(wrong),
        },
        "holdout_fraction": holdout_fraction,
        "pool": {"candidates": len(pool), "candidates_sha256": questions_sha256(pool), "limit": pool_limit}
        if pool
        else None,
        "min_margin": min_margin,
        "seed": seed,
        "versions": package_versions(),
    }
    per_question = {
        q.id: {key: getattr(scores, key)[index] for key in _SCORE_FIELDS} for index, q in enumerate(questions)
    }
    per_question.update(pool_scores)
    return Split(mastered=mastered, inject=wrong, heldout=heldout, summary=summary, scores=per_question)


def forgetting_pool(
    model: Any,
    scorer: Scorer,
    candidates: Sequence[Question],
    *,
    exclude: Sequence[Question] = (),
    min_margin: float = 0.0,
    limit: int | None = None,
    batch_size: int = 16,
    show_progress: bool = True,
) -> tuple[list[Question], dict[str, dict[str, Any]]]:
    """The candidates the model answers right by at least ``min_margin``, in order, at most ``limit`` of them.

    Candidates whose content (a question and its choices, an item's prompt and completion) is one of
    ``exclude`` are skipped, so the pool never overlaps the split. Candidates are scored a few batches at
    a time and scoring stops once ``limit`` are kept. Returns the kept questions under ids ``pool:<id>``
    and their scores by that id.
    """
    check_limit(limit, "--heldout-limit")
    taken = {q.content for q in exclude}
    fresh = [q for q in candidates if q.content not in taken]
    scorer.check_fits(model, fresh)
    kept: list[Question] = []
    scores: dict[str, dict[str, Any]] = {}
    chunk = 4 * batch_size
    with progress_bar("forgetting pool", len(fresh), show_progress) as advance:
        for start in range(0, len(fresh), chunk):
            batch = fresh[start : start + chunk]
            result = score_questions(model, scorer, batch, batch_size=batch_size, show_progress=False)
            for index, question in enumerate(batch):
                if result.correct[index] and result.margins[index] >= min_margin and len(kept) != limit:
                    renamed = replace(question, id=f"{POOL_PREFIX}{question.id}")
                    kept.append(renamed)
                    scores[renamed.id] = {key: getattr(result, key)[index] for key in _SCORE_FIELDS}
            advance(len(batch))
            if len(kept) == limit:
                break
    return kept, scores


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


def resolve_scoring(
    requested: str | None,
    *,
    mask_scoring: str | None = None,
    data_path: str | os.PathLike | None = None,
    force: bool | None = False,
) -> str:
    """The one scoring rule of profile, controls and train: which answer loss a stage uses.

    An unknown name is refused first. Then: the asked scoring (refused when it differs from the
    one the mask was profiled with, unless ``force``), else the mask's, else the one ``split.json``
    beside ``data_path`` records, else ``letter``. So a mask and a training run score answers the
    way the split did unless told otherwise.

    Args:
        requested: ``--scoring`` as given, or None.
        mask_scoring: the scoring of the mask the stage works from (``--mask`` or ``--like``).
        data_path: a question file of the split (its folder may hold ``split.json``).
        force: accept a scoring other than the mask's; None where the command offers no such
            override (the refusal then does not suggest ``--force``).

    Raises:
        CplError: an unknown scoring, a mismatch with the mask's, or an unreadable ``split.json``.
    """
    if requested is not None and requested not in SCORINGS:
        raise CplError(f"--scoring {requested}: choose one of {', '.join(SCORINGS)}")
    if requested is None:
        return mask_scoring or (recorded_scoring(data_path) if data_path is not None else None) or DEFAULT_SCORING
    if mask_scoring and requested != mask_scoring and not force:
        hint = "; pass --force to use it anyway" if force is False else ""
        raise CplError(f"--scoring {requested}: the mask was profiled with {mask_scoring} scoring{hint}")
    return requested


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
    write_jsonl(out / SCORES, ({"id": key, **values} for key, values in split.scores.items()))
    write_json(out / SUMMARY, summary)
    return out


def split_scores(
    data_file: str | os.PathLike, sets: dict[str, list[Question]], *, fingerprint: str, scoring: str
) -> dict[str, Scores] | None:
    """The split's own epoch-0 scores of ``sets``, or None when they cannot stand in for a fresh evaluation.

    They stand in only when ``data_file`` lies in a split folder made from these exact weights
    (``fingerprint``) with this ``scoring``, and every set is one of that split's files, unchanged.
    """
    folder = Path(data_file).parent
    if not (folder / SUMMARY).is_file() or not (folder / SCORES).is_file():
        return None
    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        recorded = {row["id"]: row for row in map(json.loads, (folder / SCORES).read_text("utf-8").splitlines())}
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    own_files = set(summary.get("files", {}).values())
    same_model = summary.get("model", {}).get("fingerprint") == fingerprint and summary.get("scoring") == scoring
    if not same_model or any(questions_sha256(questions) not in own_files for questions in sets.values()):
        return None
    if any(q.id not in recorded for questions in sets.values() for q in questions):
        return None
    return {
        name: Scores(**{key: [recorded[q.id][key] for q in questions] for key in _SCORE_FIELDS})
        for name, questions in sets.items()
    }
