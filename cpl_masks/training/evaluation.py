"""A run's evaluation at the current weights: every set's scores, the retain text's loss, a mask's drift,
the lm-eval tasks' items (epoch 0 and the last epoch only: :mod:`cpl_masks.evaluation.harness`), and the
epoch-0 baseline they are measured against (:mod:`cpl_masks.evaluation.outcomes` holds the measures)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from cpl_masks.data.questions import questions_sha256
from cpl_masks.data.split import split_scores
from cpl_masks.errors import CplError
from cpl_masks.evaluation.harness import TaskScores, score_tasks, task_metrics, task_records
from cpl_masks.evaluation.outcomes import epoch_metrics, evaluate_sets, question_records, text_loss, text_windows
from cpl_masks.masks.format import Mask
from cpl_masks.profiling.freeze_mask import sign_agreement
from cpl_masks.scoring.scorers import Scores
from cpl_masks.training.loop import TrainingDiverged, TrainingLoop
from cpl_masks.training.request import RunData, RunRequest, read_track_text


class RunEvaluation:
    """Scores a run's question sets (and its retain text, and a mask's drift) at the current weights."""

    def __init__(
        self,
        request: RunRequest,
        trainer: TrainingLoop,
        tokenizer: Any,
        data: RunData,
        mask: Mask | None,
        fingerprint: str,
    ):
        self.request, self.trainer, self.tokenizer, self.data, self.mask = request, trainer, tokenizer, data, mask
        self.fingerprint = fingerprint
        self.retain_text = read_track_text(request.retain_text) if request.retain_text else None
        if self.retain_text is not None:  # refused now, before any training, rather than a NaN in metrics.jsonl
            text_windows(tokenizer, self.retain_text, name=self.text_name)

    @property
    def text_name(self) -> str:
        """The tracked text as messages name it: the option and the file."""
        return f"--track-text {self.request.retain_text}"

    def scores(self, epoch: int) -> dict[str, Scores]:
        """Every set's scores after ``epoch``."""
        config = self.trainer.config
        with self.trainer.autocast():
            return evaluate_sets(
                self.trainer.model,
                self.trainer.scorer,
                self.data.sets(),
                batch_size=config.eval_batch_size,
                epoch=epoch,
                show_progress=config.show_progress,
            )

    def retain_loss(self, *, untouched: bool = False) -> float | None:
        """Loss on the tracked text, if the run has one; never NaN or infinite.

        Raises:
            CplError: a loss that is not finite at the ``untouched`` weights (the model overflows in its dtype);
            TrainingDiverged: one that is not finite after training (the run stops, its last checkpoint kept).
        """
        if self.retain_text is None:
            return None
        with self.trainer.autocast():
            loss = text_loss(self.trainer.model, self.tokenizer, self.retain_text, name=self.text_name)
        if math.isfinite(loss):
            return loss
        if untouched:
            raise CplError(f"{self.text_name}: the loss is {loss} at the untouched weights; try --dtype float32")
        raise TrainingDiverged(f"{self.text_name}: the loss is {loss} (training diverged)")

    def harness_scores(self) -> dict[str, TaskScores]:
        """The ``--lm-eval-tasks`` tasks' per-item results at the current weights (none without the option)."""
        request = self.request
        if not request.lm_eval_tasks:
            return {}
        with self.trainer.autocast():
            return score_tasks(
                self.trainer.model,
                self.tokenizer,
                request.lm_eval_tasks,
                include=request.lm_eval_include,
                limit=request.lm_eval_limit,
                batch_size=self.trainer.config.eval_batch_size,
            )

    def drift(self, epoch: int) -> dict[str, Any] | None:
        """Agreement of the static mask with the sign rule at the current weights (``--track-drift``).

        At epoch 0 a mask cut by the plain sign rule from these very weights and questions agrees by
        construction: that is recorded without profiling again (two gradient passes).
        """
        if not self.request.track_drift or self.mask is None:
            return None
        if epoch == 0 and self.profiled_here():
            return {"all": 1.0, "touched": 1.0, "by_construction": True}
        data, trainer = self.data, self.trainer
        return sign_agreement(
            trainer.model,
            trainer.scorer,
            self.mask,
            data.mastered,
            data.inject,
            batch_size=trainer.config.eval_batch_size,
        )

    def profiled_here(self) -> bool:
        """Whether the mask was cut by the plain sign rule from this run's weights, scoring and questions."""
        metadata = (self.mask.metadata if self.mask is not None else None) or {}
        rule, data = metadata.get("rule") or {}, metadata.get("data") or {}
        plain = rule.get("threshold") == 0.0 and not any(
            rule.get(key) for key in ("keep_fraction", "freeze_pattern", "train_pattern")
        )
        same_data = all(
            isinstance(data.get(name), dict) and data[name].get("sha256") == questions_sha256(questions)
            for name, questions in (("mastered", self.data.mastered), ("inject", self.data.inject))
        )
        same_model = (metadata.get("model") or {}).get("fingerprint") == self.fingerprint
        return plain and same_data and same_model and metadata.get("scoring") == self.trainer.scorer.name

    def evaluate(
        self, epoch: int, baseline: Baseline, train_loss: float | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The metrics row after ``epoch`` against the epoch-0 ``baseline`` (epoch 0 is the baseline itself),
        and the per-question records of that evaluation.

        With ``--lm-eval-tasks`` the row's ``lm_eval`` holds each task's figures at epoch 0 and after the
        last epoch (None between: lm-eval is slow), and the records its items as the set ``lm-eval:<task>``.
        """
        retain = baseline.retain_loss if epoch == 0 else self.retain_loss()
        current = baseline.scores if epoch == 0 else self.scores(epoch)
        row = epoch_metrics(
            epoch,
            baseline.scores,
            current,
            train_loss=train_loss,
            retain_loss=None if retain is None else (baseline.retain_loss, retain),
        )
        row["mask_agreement"] = self.drift(epoch)
        records = question_records(epoch, self.data.sets(), current)
        if self.request.lm_eval_tasks:
            last = epoch == self.request.config.epochs
            tasks = baseline.harness if epoch == 0 else self.harness_scores() if last else None
            row["lm_eval"] = None if tasks is None else task_metrics(baseline.harness, tasks)
            records.extend(task_records(epoch, tasks or {}))
        return row, records


@dataclass
class Baseline:
    """The untouched model's scores of every set and its retain-text loss: what epoch 0 is measured against."""

    scores: dict[str, Scores]
    retain_loss: float | None
    source: str  # "split" (taken from the split's scores.jsonl) or "scored"
    harness: dict[str, TaskScores] = field(default_factory=dict)  # the lm-eval tasks' items, by task

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the checkpoint."""
        return {**asdict(self), "scores": {name: asdict(scores) for name, scores in self.scores.items()}}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Baseline:
        """Rebuild a baseline saved by :meth:`to_dict`."""
        scores = {name: Scores(**entry) for name, entry in values["scores"].items()}
        harness = {task: TaskScores(**entry) for task, entry in (values.get("harness") or {}).items()}
        return cls(scores=scores, retain_loss=values["retain_loss"], source=values["source"], harness=harness)


def epoch_zero(evaluation: RunEvaluation, fingerprint: str) -> Baseline:
    """Epoch 0 from the split's own scores when they fit these weights and files, else scored now."""
    trainer, request = evaluation.trainer, evaluation.request
    known = split_scores(request.inject, evaluation.data.sets(), fingerprint=fingerprint, scoring=trainer.scorer.name)
    retain, harness = evaluation.retain_loss(untouched=True), evaluation.harness_scores()
    if known is not None:
        return Baseline(scores=known, retain_loss=retain, source="split", harness=harness)
    return Baseline(scores=evaluation.scores(0), retain_loss=retain, source="scored", harness=harness)
