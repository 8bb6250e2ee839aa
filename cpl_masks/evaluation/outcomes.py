"""Before/after evaluation of a training run: what was learned and what was forgotten.

Every count is relative to an epoch-0 evaluation of the untouched model, so a question the split
got wrong by chance but the model answers right before training is never counted as learned:

* learned: injection questions answered wrong at epoch 0 and right now;
* forgotten: mastered questions answered right at epoch 0 and wrong now;
* held-out forgotten: the same on held-out mastered questions, which no mask ever saw.

A small model answers many questions near chance, so answers flip for no reason and counts alone
are noisy. Beside them every row records continuous changes against epoch 0: the mean change in
the correct choice's score (``delta_logprob``) and in its margin over the best wrong choice
(``delta_margin``) per set, and the change in loss on a general text (``retain_loss_delta``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import astuple, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cpl_masks.data.questions import Question
from cpl_masks.errors import CplError
from cpl_masks.evaluation.harness import PREFIX as HARNESS_PREFIX
from cpl_masks.evaluation.stats import compare_paired, count_transitions, mean_change, transitions
from cpl_masks.scoring.scorers import Scorer, Scores, batches, pad_left, score_questions
from cpl_masks.training.record import RunRecord
from cpl_masks.utils import distributed
from cpl_masks.utils.files import atomic_write

EVAL_SETS = ("inject", "mastered", "heldout")
METRIC_COLUMNS = (
    "epoch",
    "train loss",
    "learned",
    "forgotten",
    "held-out forgotten",
    "Δ margin M",
    "Δ margin held-out",
    "Δ retain loss",
)


def evaluate_sets(
    model: Any,
    scorer: Scorer,
    sets: Mapping[str, Sequence[Question]],
    *,
    batch_size: int = 16,
    epoch: int = 0,
    show_progress: bool = True,
) -> dict[str, Scores]:
    """Scores of every question of each non-empty set (per set, in input order).

    Under several processes each rank scores its share and every rank gets all the scores
    (:func:`score_sharded`).
    """
    model.eval()
    return {
        name: score_sharded(
            model,
            scorer,
            questions,
            batch_size=batch_size,
            description=f"eval {name} (epoch {epoch})",
            show_progress=show_progress,
        )
        for name, questions in sets.items()
        if questions
    }


def score_sharded(
    model: Any,
    scorer: Scorer,
    questions: Sequence[Question],
    *,
    batch_size: int = 16,
    description: str = "scoring",
    show_progress: bool = True,
) -> Scores:
    """:func:`~cpl_masks.scoring.scorers.score_questions` with rank ``r`` scoring questions ``r::N``, gathered in order.

    Every rank scores the same number of questions (a short share is topped up with repeats of the
    first question, whose results are dropped), so a sharded model (FSDP2, whose every forward is a
    collective) runs the same number of forward passes on every rank.
    """
    if not distributed.active():
        return score_questions(
            model, scorer, questions, batch_size=batch_size, description=description, show_progress=show_progress
        )
    share = list(distributed.shard(questions))
    padded = share + [questions[0]] * (distributed.shard_size(len(questions)) - len(share))
    shown = show_progress and distributed.is_main()
    local = score_questions(model, scorer, padded, batch_size=batch_size, description=description, show_progress=shown)
    rows = list(zip(*astuple(local)))[: len(share)]  # one (prediction, correct, loss, logprob, margin) per question
    merged = distributed.gather_shards(rows, len(questions))
    return Scores(*(list(column) for column in zip(*merged))) if merged else Scores(*([] for _ in fields(Scores)))


def epoch_metrics(
    epoch: int,
    baseline: Mapping[str, Scores],
    current: Mapping[str, Scores],
    *,
    train_loss: float | None = None,
    retain_loss: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One metrics row: learned, forgotten and held-out forgotten against the epoch-0 baseline.

    ``heldout_forgotten`` is ``None`` when there is no held-out set. ``totals`` gives the
    denominators: injection questions wrong at epoch 0, mastered and held-out questions right.
    ``delta_logprob`` and ``delta_margin`` are per-set means of the change since epoch 0;
    ``retain_loss`` is the (epoch 0, now) loss on the retain text, if one was given.
    """
    learned, _ = count_transitions(baseline["inject"].correct, current["inject"].correct)
    _, forgotten = count_transitions(baseline["mastered"].correct, current["mastered"].correct)
    heldout_forgotten = None
    if "heldout" in baseline:
        _, heldout_forgotten = count_transitions(baseline["heldout"].correct, current["heldout"].correct)
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "learned": learned,
        "forgotten": forgotten,
        "heldout_forgotten": heldout_forgotten,
        "accuracy": {name: scores.accuracy for name, scores in current.items()},
        "totals": {
            "inject_wrong": sum(1 for ok in baseline["inject"].correct if not ok),
            "mastered_right": sum(baseline["mastered"].correct),
            "heldout_right": sum(baseline["heldout"].correct) if "heldout" in baseline else None,
        },
        "delta_logprob": {name: mean_change(baseline[name].logprobs, now.logprobs) for name, now in current.items()},
        "delta_margin": {name: mean_change(baseline[name].margins, now.margins) for name, now in current.items()},
        "retain_loss": None if retain_loss is None else retain_loss[1],
        "retain_loss_delta": None if retain_loss is None else retain_loss[1] - retain_loss[0],
    }


QUESTIONS = "questions.jsonl"  # a run folder's per-question records of every evaluated epoch
OUTCOMES = {"learned": "inject", "forgotten": "mastered", "heldout_forgotten": "heldout"}  # outcome -> its set


def question_records(
    epoch: int, sets: Mapping[str, Sequence[Question]], scores: Mapping[str, Scores]
) -> list[dict[str, Any]]:
    """One record per evaluated set: every question's id, whether it is right, its correct choice's score
    and margin, in the set's order. These make paired comparisons possible: which questions, not how many."""
    return [
        {
            "epoch": epoch,
            "set": name,
            "id": [question.id for question in sets[name]],
            "correct": [int(ok) for ok in result.correct],
            "logprob": [round(value, 5) for value in result.logprobs],
            "margin": [round(value, 5) for value in result.margins],
        }
        for name, result in scores.items()
    ]


def question_outcomes(records: Sequence[Mapping[str, Any]], epoch: int | None = None) -> dict[str, dict[str, bool]]:
    """Per question, whether it was learned or forgotten by ``epoch`` (None: the last evaluated one).

    Returns ``{"learned": {id: bool}, "forgotten": {...}, "heldout_forgotten": {...}}`` over every
    question of the set (False where the transition cannot happen: a question right at epoch 0 is
    never learned), so two runs from the same split align question by question. Each lm-eval task
    scored at epoch 0 and at ``epoch`` adds its set's forgotten items under the set's name (``lm-eval:<task>``).
    """
    by_epoch: dict[int, dict[str, Mapping[str, Any]]] = {}
    for record in records:
        by_epoch.setdefault(record["epoch"], {})[record["set"]] = record
    if 0 not in by_epoch:
        raise CplError("the per-question records hold no epoch 0 to compare against")
    epoch = max(by_epoch) if epoch is None else epoch
    if epoch not in by_epoch:
        raise CplError(f"epoch {epoch} was not evaluated (evaluated: {', '.join(map(str, sorted(by_epoch)))})")
    outcomes: dict[str, dict[str, bool]] = {}
    for outcome, name in OUTCOMES.items():
        if name not in by_epoch[0]:
            continue
        before, after = by_epoch[0][name], by_epoch[epoch][name]
        gained, lost = transitions(before["correct"], after["correct"])
        outcomes[outcome] = dict(zip(before["id"], gained if outcome == "learned" else lost, strict=True))
    for name in (name for name in by_epoch[0] if name.startswith(HARNESS_PREFIX) and name in by_epoch[epoch]):
        before, after = by_epoch[0][name], by_epoch[epoch][name]
        outcomes[name] = dict(zip(before["id"], transitions(before["correct"], after["correct"])[1], strict=True))
    return outcomes


def read_question_records(folder: str | Path, *, missing_ok: bool = False) -> list[dict[str, Any]] | None:
    """A run folder's per-question records (``questions.jsonl``); None when absent and ``missing_ok``.

    Raises:
        CplError: the file is missing (unless ``missing_ok``) or not valid JSON lines.
    """
    path = Path(folder) / QUESTIONS
    if not path.is_file():
        if missing_ok:
            return None
        raise CplError(f"{folder}: no {QUESTIONS} (a run made before per-question records were kept)")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise CplError(f"{path}: not valid JSON lines ({error.msg} at line {error.lineno})") from error


def describe_difference(entry: Mapping[str, Any]) -> str:
    """``+3 [−1, +7] p=0.25`` or ``… no detectable difference`` for one paired comparison's ``to_dict``."""
    text = f"{entry['difference']:+d} [{entry['low']:+d}, {entry['high']:+d}] p={entry['p_value']:.2g}"
    return f"{text}, no detectable difference" if entry["contains_zero"] else text


def compare_outcomes(
    pairs: Sequence[tuple[Mapping[str, Mapping[str, bool]], Mapping[str, Mapping[str, bool]]]],
    outcomes: Mapping[str, str] = OUTCOMES,
) -> dict[str, dict[str, Any]]:
    """Per outcome, run B against run A over pairs of runs (one pair per seed), paired by question
    (every pair of one split, so each question's seeds are one unit of :mod:`cpl_masks.evaluation.stats`).

    ``outcomes`` names the outcomes compared, each with the set it is measured on (for the error):
    :data:`OUTCOMES` by default, or finer ones a caller derived, such as held-out forgetting by subset.

    Returns the :func:`cpl_masks.evaluation.stats.compare_paired` record of ``B − A`` for each outcome both
    runs of every pair measured.

    Raises:
        CplError: a pair's runs did not evaluate the same questions (not one split).
    """
    groups: dict[str, tuple[list[list[bool]], list[list[bool]]]] = {name: ([], []) for name in outcomes}
    questions: dict[str, list[str]] = {}  # every pair's questions, in one order: the seeds align by question
    for a, b in pairs:
        for name, measured_on in outcomes.items():
            if name not in a or name not in b:
                continue
            keys = questions.setdefault(name, sorted(a[name]))
            if set(a[name]) != set(keys) or set(b[name]) != set(keys):
                raise CplError(f"the runs did not evaluate the same {measured_on} questions (not one split)")
            groups[name][0].append([a[name][key] for key in keys])
            groups[name][1].append([b[name][key] for key in keys])
    return {name: compare_paired(a, b).to_dict() for name, (a, b) in groups.items() if a}


def outcome_differences(
    a: Mapping[str, Mapping[str, bool]], b: Mapping[str, Mapping[str, bool]]
) -> list[tuple[str, str, bool, bool]]:
    """The questions two runs of one split disagree on: ``(outcome, id, a's, b's)`` for every outcome
    (learned, forgotten, held-out forgotten, forgotten on an lm-eval task) one run had and the other did not."""
    return [
        (outcome, key, happened, b[outcome][key])
        for outcome in a
        if outcome in b
        for key, happened in a[outcome].items()
        if key in b[outcome] and happened != b[outcome][key]
    ]


@torch.no_grad()
def text_windows(tokenizer: Any, text: str, *, window: int = 256, name: str = "the text") -> list[list[int]]:
    """The token windows :func:`text_loss` scores, each with at least one token to predict.

    Each window starts with the tokenizer's BOS token when it has one; without one, a window's first
    token is only context, so a one-token text leaves nothing to predict.

    Raises:
        CplError: naming ``name``, when the text gives no token to predict (its loss would be NaN).
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    windows = [bos + ids[start : start + window] for start in range(0, len(ids), window)]
    scored = [tokens for tokens in windows if len(tokens) > 1]
    if not scored:
        raise CplError(
            f"{name}: no token to predict ({len(ids)} token{'s' if len(ids) != 1 else ''} with this tokenizer, "
            f"{'a' if bos else 'no'} BOS token); give a longer text"
        )
    return scored


@torch.no_grad()  # scored, never trained on: no graph kept per window
def text_loss(
    model: Any, tokenizer: Any, text: str, *, window: int = 256, batch_size: int = 8, name: str = "the text"
) -> float:
    """Mean next-token cross-entropy of ``model`` on ``text``, read in windows of ``window`` tokens.

    A general text the model already predicts well (``--track-text``) shows forgetting that
    multiple-choice answers of a small model are too noisy to show.

    Raises:
        CplError: naming ``name``, when the text gives no token to predict (never a NaN for an empty text).
    """
    total, count = 0.0, 0
    for batch in batches(text_windows(tokenizer, text, window=window, name=name), batch_size):
        inputs = pad_left(batch, tokenizer.pad_token_id, model.device)
        logits = model(**inputs, use_cache=False).logits[:, :-1, :].float()  # (B, T-1, V)
        real = inputs["attention_mask"].bool()  # (B, T)
        targets = inputs["input_ids"][:, 1:].masked_fill(~(real[:, :-1] & real[:, 1:]), -100)  # (B, T-1)
        total += float(F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum"))
        count += int((targets != -100).sum())
    return total / count  # every window has a target, so count > 0


def metrics_table_rows(rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """Metrics rows as table rows in the order of :data:`METRIC_COLUMNS` ("-" where not measured)."""

    def share(count: int | None, total: int | None) -> str:
        return "-" if count is None else f"{count}/{total}"

    table = []
    for row in rows:
        totals = row["totals"]
        table.append(
            (
                row["epoch"],
                "-" if row["train_loss"] is None else row["train_loss"],
                share(row["learned"], totals["inject_wrong"]),
                share(row["forgotten"], totals["mastered_right"]),
                share(row["heldout_forgotten"], totals["heldout_right"]),
                _signed(row.get("delta_margin", {}).get("mastered")),
                _signed(row.get("delta_margin", {}).get("heldout")),
                _signed(row.get("retain_loss_delta")),
            )
        )
    return table


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def draw_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Draw learned, forgotten and held-out forgotten per epoch as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(epochs, [row["learned"] for row in rows], marker="o", label="learned (inject, wrong → right)")
    axis.plot(epochs, [row["forgotten"] for row in rows], marker="o", label="forgotten (mastered, right → wrong)")
    if rows and rows[0]["heldout_forgotten"] is not None:
        heldout = [row["heldout_forgotten"] for row in rows]
        axis.plot(epochs, heldout, marker="o", linestyle="--", label="forgotten (held-out mastered)")
    axis.set_xlabel("epoch")
    axis.set_ylabel("questions")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)


COMPARE_COLUMNS = (
    "run",
    "mode",
    "mask",
    "learned",
    "forgotten",
    "held-out forgotten",
    "Δ margin held-out",
    "time (s)",
    "peak memory (MB)",
)


def comparison_rows(runs: Mapping[str, RunRecord]) -> list[tuple[Any, ...]]:
    """One table row per run (records by label), in the order of :data:`COMPARE_COLUMNS`."""
    table = []
    for label, run in runs.items():
        final, totals = run.final, run.final["totals"]
        heldout = final.get("heldout_forgotten")
        table.append(
            (
                label,
                run.mode,
                (run.mask_id or "-")[:8],
                f"{final['learned']}/{totals['inject_wrong']}",
                f"{final['forgotten']}/{totals['mastered_right']}",
                "-" if heldout is None else f"{heldout}/{totals['heldout_right']}",
                _signed(final.get("delta_margin", {}).get("heldout")),
                round(float(run.time_s), 1),
                round(run.peak_memory_bytes / 2**20),
            )
        )
    return table


def draw_comparison(runs: Mapping[str, RunRecord], path: str | os.PathLike, *, replace: bool = True) -> None:
    """Grouped bars of learned, forgotten and held-out forgotten per run, as a PNG (written atomically;
    without ``replace`` a file that appeared meanwhile is not replaced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = (("learned", "learned"), ("forgotten", "forgotten"), ("heldout_forgotten", "held-out forgotten"))
    labels = list(runs)
    width = 0.8 / len(series)
    figure, axis = plt.subplots(figsize=(max(5, 1.6 * len(labels)), 4))
    for offset, (key, name) in enumerate(series):
        values = [runs[label].final.get(key) or 0 for label in labels]
        axis.bar([index + offset * width for index in range(len(labels))], values, width, label=name)
    axis.set_xticks([index + width for index in range(len(labels))], labels, rotation=15)
    axis.set_ylabel("questions")
    axis.set_title("learned vs forgotten per run")
    axis.legend()
    figure.tight_layout()
    with atomic_write(path, "wb", replace=replace) as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
