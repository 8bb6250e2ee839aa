"""Retain sets: what the model must keep, stored as the signs the per-step rule steers by.

The paper's rule (``--method dynamic``) keeps the entries of each step's gradient ``g`` where
``g ⊙ g_M ≥ 0``. ``g_M`` depends only on the mastered questions and the weights, not on what is
injected, so it can be profiled once, without an injection set, and reused for any task on the
same weights: a retain set holds sign(g_M) in two bits per entry (:class:`~cpl_masks.masks.signs.PackedSigns`)
and the questions themselves, so training can refresh it as the weights move. It is a file of
the mask format with ``kind: retain`` (:mod:`cpl_masks.masks.format`), so the registry, the Hub and every
check of untrusted files treat it as they treat masks.

How the signs are measured (:class:`SignMeasure`: the loss, and optionally a confidence threshold
under which a sign does not count) is recorded with them, and every refresh measures them the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cpl_masks.data.questions import Question, parse_questions, questions_sha256
from cpl_masks.data.split import resolve_scoring
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask, weights_metadata
from cpl_masks.masks.signs import PackedSigns
from cpl_masks.models import LoadedModel
from cpl_masks.profiling.freeze_mask import data_provenance, loss_metadata, peak_memory, reset_peak_memory
from cpl_masks.profiling.gradients import gradient_sums, mean_gradients
from cpl_masks.scoring.base import check_objective
from cpl_masks.scoring.completion import DEFAULT_LOSS_ON
from cpl_masks.scoring.scorers import Scorer, make_scorer
from cpl_masks.utils import distributed
from cpl_masks.utils.progress import progress_bar
from cpl_masks.utils.versions import stamp

UNCERTAIN = ("pass", "freeze")  # what the rule does with an entry whose sign is not significant
CONFIDENCE_HELP = (
    "count a sign of g_M only where |g_M| exceeds K standard errors (a backward pass per question of M; "
    "default: every sign counts)"
)
UNCERTAIN_HELP = "with a confidence: an entry of uncertain sign is moved by every step (pass) or by none (freeze)"


@dataclass(frozen=True)
class SignMeasure:
    """How sign(g_M) is measured: the loss it is the gradient of and which signs count.

    With ``confidence`` K a sign counts only where ``|t| = |g_M| / se(g_M) > K``, from a pass per
    question; each uncertain entry then passes every step (``pass``) or is frozen (``freeze``).
    """

    objective: str = "answer"
    confidence: float | None = None
    uncertain: str = "pass"

    def __post_init__(self) -> None:
        check_objective(self.objective)
        number = isinstance(self.confidence, int | float) and not isinstance(self.confidence, bool)
        if self.confidence is not None and not (number and 0 <= self.confidence < math.inf):
            raise CplError(f"--confidence {str(self.confidence)[:40]}: must be a finite number >= 0")
        if self.uncertain not in UNCERTAIN:
            raise CplError(f"--uncertain {str(self.uncertain)[:40]}: choose one of {', '.join(UNCERTAIN)}")
        if self.uncertain != "pass" and self.confidence is None:
            raise CplError(f"--uncertain {self.uncertain} needs --confidence (without it every sign counts)")

    @classmethod
    def given(cls, objective: str | None, confidence: float | None, uncertain: str | None) -> SignMeasure:
        """The measure from options as given, None taking the default; refuses what does not go together."""
        return cls(objective or "answer", confidence, uncertain or "pass")

    def to_metadata(self) -> dict[str, Any]:
        """The fields a retain set records under ``retain``."""
        return {"objective": self.objective, "confidence": self.confidence, "uncertain": self.uncertain}

    def describe(self) -> str:
        """The measure in a few words, for reports and model cards."""
        if self.confidence is None:
            return f"{self.objective} loss, every sign"
        return (
            f"{self.objective} loss, a sign where |g_M| > {self.confidence:g} standard errors "
            f"(an uncertain entry: {self.uncertain})"
        )


def measure_signs(
    model: torch.nn.Module,
    scorer: Scorer,
    questions: Sequence[Question],
    measure: SignMeasure,
    *,
    batch_size: int = 16,
    checkpointing: bool = True,
    advance: Callable[[int], None] = lambda _n: None,
) -> PackedSigns:
    """sign(g_M) over ``questions`` at ``model``'s weights, as ``measure`` says: what the per-step rule steers by.

    Profiling a retain set, every refresh in training and the Trainer's hooks all measure through here,
    so a refresh at the profiled weights gives the profiled signs.
    """
    if measure.confidence is None:
        gradient = mean_gradients(
            model,
            scorer,
            questions,
            batch_size=batch_size,
            checkpointing=checkpointing,
            advance=advance,
            objective=measure.objective,
        )
        return PackedSigns.take(gradient)
    sums = gradient_sums(
        model, scorer, questions, checkpointing=checkpointing, advance=advance, objective=measure.objective
    )
    return PackedSigns.significant(sums.drain(), measure.confidence, freeze_uncertain=measure.uncertain == "freeze")


def profile_retain(
    loaded: LoadedModel,
    questions: Sequence[Question],
    *,
    scoring: str | None = None,
    loss_on: str = DEFAULT_LOSS_ON,
    batch_size: int = 16,
    checkpointing: bool = True,
    task: str | None = None,
    data_path: str | None = None,
    show_progress: bool = True,
    measure: SignMeasure | None = None,
) -> Mask:
    """Profile a retain set: sign(g_M) over ``questions`` (what the model must keep) at ``loaded``'s weights.

    Args:
        loaded: the model and tokenizer.
        questions: the questions to protect, usually the mastered set of a split (any set the model
            answers right will do: they need not come from the task to be injected).
        scoring: the answer loss; default: the one ``split.json`` beside ``data_path`` records, else letter.
        loss_on: free-form items' loss: ``completion`` (their completion tokens) or ``all`` tokens.
        batch_size: questions per forward/backward pass. A run refreshing with the same batch size
            (``train --eval-batch-size``) computes bit-identical signs at the same weights.
        checkpointing: recompute layer activations in backward (same gradients, less memory).
        task: the task name recorded (the registry files it as ``<model>/<task>.retain``).
        data_path: where ``questions`` were read from, recorded.
        show_progress: show a progress bar over the pass.
        measure: how the signs are measured (default ``SignMeasure()``): the loss g_M is the gradient
            of, ``answer`` (the correct choice's own loss, the paper's) or ``choices`` (the
            cross-entropy over the choices, whose gradient protects the margin), and an optional
            confidence threshold; recorded, and every refresh in training measures the same way.

    Returns:
        A mask-format file of kind ``retain``: both sign planes, and the questions in its metadata.
    """
    if not questions:
        raise CplError("profile --kind retain needs a non-empty question set (--mastered)")
    parse_questions([question.to_record() for question in questions], "the retain set's questions")  # as read back
    measure = measure or SignMeasure()
    scoring = resolve_scoring(scoring, data_path=data_path)
    scorer = make_scorer(scoring, loaded.tokenizer, loss_on=loss_on)
    scorer.check_fits(loaded.model, questions)
    distributed.setup(str(loaded.device))
    reset_peak_memory(loaded.device)
    started = time.perf_counter()
    with progress_bar("profile retain set", len(questions), show_progress and distributed.is_main()) as advance:
        signs = measure_signs(
            loaded.model,
            scorer,
            questions,
            measure,
            batch_size=batch_size,
            checkpointing=checkpointing,
            advance=advance,
        )
    metadata: dict[str, Any] = {
        "model": {"ref": loaded.ref, **weights_metadata(loaded.model)},
        "scoring": scoring,
        **loss_metadata(scoring, loss_on, [questions], measure.objective),
        "data": data_provenance({"mastered": questions}, {"mastered": data_path} if data_path else None),
        "task": task,
        **stamp(),
        "parents": [],
        "retain": {
            "questions": [question.to_record() for question in questions],
            **measure.to_metadata(),
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


def retain_measure(retain: Mask, given: Mapping[str, Any] | None = None) -> SignMeasure:
    """How a retain set's signs were measured, which every refresh must repeat.

    ``given`` holds the options given with it (a method's options; those of the measure,
    ``objective``, ``confidence`` and ``uncertain``, are read, None meaning not given); each one
    given must be the recorded one.

    Raises:
        CplError: an option given with another value, or a file recording an invalid measure.
    """
    recorded = retain.metadata.get("retain") or {}
    where = f"retain set {retain.id[:12]}"
    try:
        measure = SignMeasure.given(recorded.get("objective"), recorded.get("confidence"), recorded.get("uncertain"))
    except CplError as error:
        raise CplError(f"{where}: its recorded sign measure is invalid ({error})") from None
    for key, wanted in measure.to_metadata().items():
        value = (given or {}).get(key)
        if value is not None and value != wanted:
            raise CplError(f"--{key} {value}: {where} was measured with {key} {wanted}")
    return measure


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
