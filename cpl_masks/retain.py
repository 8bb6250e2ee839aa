"""Retain sets: what the model must keep, stored as the signs the per-step rule steers by.

The paper's rule (``--mode dynamic``) keeps the entries of each step's gradient ``g`` where
``g ⊙ g_M ≥ 0``. ``g_M`` depends only on the mastered questions and the weights, not on what is
injected, so it can be profiled once, without an injection set, and reused for any task on the
same weights: a retain set holds sign(g_M) in two bits per entry (:class:`~cpl_masks.signs.PackedSigns`)
and the questions themselves, so training can refresh it as the weights move. It is a file of
the mask format with ``kind: retain`` (:mod:`cpl_masks.masks`), so the registry, the Hub and every
check of untrusted files treat it as they treat masks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from cpl_masks import distributed
from cpl_masks.data import Question, parse_questions, questions_sha256
from cpl_masks.errors import CplError
from cpl_masks.gradients import mean_gradients
from cpl_masks.masks import Mask, weights_metadata
from cpl_masks.models import LoadedModel
from cpl_masks.profile import LOSSES, data_provenance, peak_memory, reset_peak_memory
from cpl_masks.progress import progress_bar
from cpl_masks.scorer import check_objective
from cpl_masks.scoring import make_scorer
from cpl_masks.signs import PackedSigns
from cpl_masks.split import resolve_scoring
from cpl_masks.versions import stamp

CHOICES_LOSS = "cross-entropy over the choices' scores (the loss of the prediction: its margin)"


def profile_retain(
    loaded: LoadedModel,
    questions: Sequence[Question],
    *,
    scoring: str | None = None,
    batch_size: int = 16,
    checkpointing: bool = True,
    task: str | None = None,
    data_path: str | None = None,
    show_progress: bool = True,
    objective: str = "answer",
) -> Mask:
    """Profile a retain set: sign(g_M) over ``questions`` (what the model must keep) at ``loaded``'s weights.

    Args:
        loaded: the model and tokenizer.
        questions: the questions to protect, usually the mastered set of a split (any set the model
            answers right will do: they need not come from the task to be injected).
        scoring: the answer loss; default: the one ``split.json`` beside ``data_path`` records, else letter.
        batch_size: questions per forward/backward pass. A run refreshing with the same batch size
            (``train --eval-batch-size``) computes bit-identical signs at the same weights.
        checkpointing: recompute layer activations in backward (same gradients, less memory).
        task: the task name recorded (the registry files it as ``<model>/<task>.retain``).
        data_path: where ``questions`` were read from, recorded.
        show_progress: show a progress bar over the pass.
        objective: the loss g_M is the gradient of: ``answer`` (the correct choice's own loss, the
            paper's) or ``choices`` (the cross-entropy over the choices, whose gradient protects the
            margin); recorded, and every refresh in training takes the same.

    Returns:
        A mask-format file of kind ``retain``: both sign planes, and the questions in its metadata.
    """
    if not questions:
        raise CplError("profile --kind retain needs a non-empty question set (--mastered)")
    check_objective(objective)
    scoring = resolve_scoring(scoring, data_path=data_path)
    scorer = make_scorer(scoring, loaded.tokenizer)
    scorer.check_fits(loaded.model, questions)
    distributed.setup(str(loaded.device))
    reset_peak_memory(loaded.device)
    started = time.perf_counter()
    with progress_bar("profile retain set", len(questions), show_progress and distributed.is_main()) as advance:
        gradient = mean_gradients(
            loaded.model,
            scorer,
            questions,
            batch_size=batch_size,
            checkpointing=checkpointing,
            advance=advance,
            objective=objective,
        )
    signs = PackedSigns.take(gradient)
    metadata: dict[str, Any] = {
        "model": {"ref": loaded.ref, **weights_metadata(loaded.model)},
        "scoring": scoring,
        "loss": LOSSES[scoring] if objective == "answer" else CHOICES_LOSS,
        "data": data_provenance({"mastered": questions}, {"mastered": data_path} if data_path else None),
        "task": task,
        **stamp(),
        "parents": [],
        "retain": {
            "questions": [question.to_record() for question in questions],
            "objective": objective,
        },
        "profile": {
            "batch_size": batch_size,
            "checkpointing": checkpointing,
            "device": str(loaded.device),
            "seconds": round(time.perf_counter() - started, 3),
            **peak_memory(loaded.device),
            "processes": distributed.world_size(),
        },
    }
    return Mask.from_signs(signs, metadata)


def refreshed_retain(parent: Mask, signs: PackedSigns, model_weights: dict[str, str], at: dict[str, int]) -> Mask:
    """The retain set ``parent`` refreshed during training: its questions' signs at the weights of (epoch, step).

    A child of ``parent`` (``parents``, ``reprofile_of``) recording the weights and ``at``
    (``reprofiled_at``, as a mask profiled again during training does).
    """
    kept = {key: value for key, value in parent.metadata.items() if key not in ("profile", "counts")}
    metadata = {
        **kept,
        "model": {**(parent.metadata.get("model") or {}), **model_weights},
        "parents": [parent.id],
        "reprofile_of": parent.id,
        "reprofiled_at": at,
        **stamp(),
    }
    return Mask.from_signs(signs, metadata)


def retain_objective(retain: Mask, asked: str | None) -> str:
    """The loss a retain set's signs are the gradient of, which every refresh must take too.

    Raises:
        CplError: ``asked`` (an ``--objective`` given with it) is another, or the file records an unknown one.
    """
    recorded = check_objective(
        (retain.metadata.get("retain") or {}).get("objective") or "answer", f"retain set {retain.id[:12]}: objective"
    )
    if asked is not None and asked != recorded:
        raise CplError(f"--objective {asked}: retain set {retain.id[:12]} holds the signs of its {recorded} loss")
    return recorded


def retain_questions(retain: Mask) -> list[Question]:
    """A retain set's questions, validated as a file's rows are and checked against their recorded hash."""
    retain.require_kind("retain", "retain set")
    where = f"retain set {retain.id[:12]}"
    records = (retain.metadata.get("retain") or {}).get("questions")
    questions = parse_questions(records, f"{where} (its questions)")
    recorded = ((retain.metadata.get("data") or {}).get("mastered") or {}).get("sha256")
    if recorded != questions_sha256(questions):
        raise CplError(f"{where}: its questions do not match their recorded sha256 (the metadata was edited)")
    return questions
