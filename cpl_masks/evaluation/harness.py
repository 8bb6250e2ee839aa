"""Forgetting measured on lm-evaluation-harness tasks: a run's model scored through lm-eval's own API.

lm-eval is an optional extra (``pip install 'cpl-masks[lm-eval]'``). A run given ``--lm-eval-tasks``
scores the in-memory model with ``lm_eval.simple_evaluate`` at epoch 0 and after its last epoch; each
task's per-sample logs become per-item results (:class:`TaskScores`), kept in the run's
``questions.jsonl`` as the set ``lm-eval:<task>`` with item ids ``<task>:<doc_id>``, in the same
record shape as the run's own sets, so ``cpl-masks compare`` pairs them by item unchanged.

An item is right when its sample's ``acc`` metric is 1. Where the sample gives the log-likelihood of
every choice (``output_type: multiple_choice``) the gold choice's log-likelihood and its margin over
the best other choice are kept too; a ``loglikelihood`` task keeps the gold log-likelihood alone.

Public API: :func:`require_lm_eval`, :func:`parse_tasks`, :func:`check_options`, :func:`check_tasks`,
:func:`score_tasks`, :func:`task_scores` (samples to results), :func:`task_records`, :func:`task_metrics`,
:func:`task_table_rows`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError
from cpl_masks.evaluation.stats import count_transitions, mean_change
from cpl_masks.utils import distributed

PREFIX = "lm-eval:"  # a run's set name for an lm-eval task: lm-eval:<task>
INSTALL = "pip install 'cpl-masks[lm-eval]'"
TASK_COLUMNS = ("lm-eval task", "docs", "accuracy before", "accuracy now", "forgotten", "learned", "Δ margin")


@dataclass
class TaskScores:
    """One lm-eval task's results per item (doc), in doc order.

    ``logprobs`` (the gold choice's log-likelihood) and ``margins`` (its lead over the best other choice,
    negative when wrong) are None when the task's samples do not give them.
    """

    ids: list[str]
    correct: list[bool]
    logprobs: list[float] | None = None
    margins: list[float] | None = None

    @property
    def accuracy(self) -> float:
        """Share of items answered correctly."""
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


def set_name(task: str) -> str:
    """The run's set name for ``task``'s items: ``lm-eval:<task>``."""
    return f"{PREFIX}{task}"


def require_lm_eval() -> None:
    """Refuse, in one line saying how to install it, when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise CplError(f"--lm-eval-tasks needs lm-evaluation-harness, which is not installed: {INSTALL}") from None


def parse_tasks(text: str | Sequence[str] | None) -> list[str] | None:
    """``TASK[,TASK...]`` as a list of names (blanks dropped, order kept, repeats once); None for None.

    Raises:
        CplError: a text that names no task.
    """
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else [part for entry in text for part in str(entry).split(",")]
    names = list(dict.fromkeys(part.strip() for part in parts if part.strip()))
    if not names:
        raise CplError(f"--lm-eval-tasks {str(text)[:40]!r}: names no task (give TASK[,TASK...])")
    return names


def check_options(tasks: Sequence[str] | None, include: str | None, limit: int | None) -> None:
    """Refuse a run's lm-eval options before any model loads: ``--lm-eval-include`` or ``--lm-eval-limit``
    without tasks, a limit under 1, several processes (lm-eval scores the in-memory model in one), an
    uninstalled lm-eval or an unknown task (:func:`check_tasks`).

    Raises:
        CplError: naming the option.
    """
    if tasks is not None and not tasks:
        raise CplError("--lm-eval-tasks: names no task (give TASK[,TASK...])")
    if not tasks:
        for option, value in (("--lm-eval-include", include), ("--lm-eval-limit", limit)):
            if value is not None:
                raise CplError(f"{option} needs --lm-eval-tasks TASK[,TASK...]")
        return
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise CplError(f"--lm-eval-limit {limit}: must be a whole number of docs, at least 1")
    if distributed.launch_env().world_size > 1:
        raise CplError("--lm-eval-tasks scores the model in one process; run it without torchrun/accelerate launch")
    check_tasks(tasks, include)


def check_tasks(tasks: Sequence[str], include: str | None = None) -> None:
    """Refuse, before any model loads, a task name lm-eval's registry (and ``include``'s YAML) does not know.

    Raises:
        CplError: lm-eval not installed, ``include`` not a folder, or naming the first unknown task.
    """
    require_lm_eval()
    if include is not None and not Path(include).is_dir():
        raise CplError(f"--lm-eval-include {include}: no such folder")
    known = set(_task_manager(tuple(tasks), _folder(include)).all_tasks)
    unknown = [name for name in tasks if name not in known]
    if unknown:
        where = f" nor in --lm-eval-include {include}" if include else ""
        raise CplError(f"--lm-eval-tasks: lm-eval knows no task {unknown[0]!r} in its registry{where}")


def _task_manager(tasks: tuple[str, ...], include: str | None) -> Any:
    """The task manager that knows ``tasks``: ``include``'s YAML alone when every name is there (fast),
    else lm-eval's registry too (several seconds to index)."""
    if include is not None:
        local = _indexed(include, defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return _indexed(include, defaults=True)


@functools.lru_cache(maxsize=4)
def _indexed(include: str | None, *, defaults: bool) -> Any:
    """lm-eval's ``TaskManager`` over ``include`` (and its registry with ``defaults``), built once per process."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        try:
            return TaskManager(include_path=include, include_defaults=defaults)
        except Exception as error:  # lm-eval raises what its YAML loader or file system raised
            raise CplError(f"lm-eval cannot read its tasks{_where(include)}: {_one_line(error)}") from None


def score_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, TaskScores]:
    """Score ``model`` (in memory, as it is now) on lm-eval ``tasks`` with ``lm_eval.simple_evaluate``.

    Returns each leaf task's :class:`TaskScores` by task name (a group gives its subtasks). ``limit``
    takes the first N docs of each task. lm-eval seeds Python's, numpy's and torch's generators; they
    are put back afterwards, so scoring never changes what training draws next.

    Raises:
        CplError: naming the tasks, for whatever lm-eval refuses (a dataset it cannot load, a bad YAML),
            or for samples that carry no ``acc`` metric.
    """
    check_tasks(tasks, include)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = _task_manager(tuple(tasks), _folder(include))
    with _quiet(), _kept_generators():
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            results = simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0
            )
        except CplError:
            raise
        except Exception as error:  # a dataset that cannot be reached, a template that fails, ...
            raise CplError(f"lm-eval {','.join(tasks)}{_where(include)}: {_one_line(error)}") from None
    samples = (results or {}).get("samples") or {}
    return {name: task_scores(name, logged) for name, logged in sorted(samples.items())}


def task_scores(task: str, samples: Sequence[Mapping[str, Any]]) -> TaskScores:
    """One task's logged samples (``simple_evaluate(..., log_samples=True)["samples"][task]``) as per-item results.

    One item per ``doc_id`` (in doc order; with several filters, the ``none`` filter's or else the first's
    sample). ``correct`` is the sample's ``acc``; the gold log-likelihood and margin are kept when every
    sample gives them (see :func:`gold_loglik`).

    Raises:
        CplError: a sample without ``doc_id`` or ``acc`` (a task not scored by accuracy).
    """
    chosen: dict[int, Mapping[str, Any]] = {}
    filters = [sample.get("filter") for sample in samples]
    keep = "none" if "none" in filters else (filters[0] if filters else None)
    for sample in samples:
        if sample.get("filter") != keep:
            continue
        doc = sample.get("doc_id")
        if not isinstance(doc, int) or isinstance(doc, bool):
            raise CplError(f"lm-eval task {task!r}: a logged sample has no doc_id")
        if not isinstance(sample.get("acc"), int | float) or sample["acc"] not in (0, 1):
            raise CplError(f"lm-eval task {task!r}: its samples carry no acc metric of 0 or 1 (cpl-masks needs it)")
        chosen.setdefault(doc, sample)
    ordered = [chosen[doc] for doc in sorted(chosen)]
    golds = [gold_loglik(sample) for sample in ordered]
    logprobs = [gold[0] for gold in golds]
    margins = [gold[1] for gold in golds]
    return TaskScores(
        ids=[f"{task}:{doc}" for doc in sorted(chosen)],
        correct=[bool(sample["acc"]) for sample in ordered],
        logprobs=None if any(value is None for value in logprobs) else [round(v, 5) for v in logprobs],
        margins=None if any(value is None for value in margins) else [round(v, 5) for v in margins],
    )


def gold_loglik(sample: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """The gold choice's log-likelihood and its margin over the best other choice, from one sample.

    A ``multiple_choice`` sample's ``filtered_resps`` hold one ``(loglikelihood, is_greedy)`` per choice
    and its ``target`` the gold index (or indices: the best gold counts); a ``loglikelihood`` sample holds
    the gold continuation's alone (no margin). (None, None) where the sample gives neither.
    """
    responses = sample.get("filtered_resps")
    if not isinstance(responses, list | tuple) or not responses:
        return None, None
    scores = [_loglik(response) for response in responses]
    if any(score is None for score in scores):
        return None, None
    if len(scores) == 1:
        return scores[0], None
    target = sample.get("target")
    golds = target if isinstance(target, list) else [target]
    if not golds or any(not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < len(scores) for g in golds):
        return None, None
    gold = max(scores[index] for index in golds)
    others = [score for index, score in enumerate(scores) if index not in golds]
    return gold, (gold - max(others)) if others else None


def _loglik(response: Any) -> float | None:
    """A finite log-likelihood from ``(loglikelihood, is_greedy)`` or a bare number, else None."""
    value = response[0] if isinstance(response, list | tuple) and response else response
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def task_records(epoch: int, scores: Mapping[str, TaskScores]) -> list[dict[str, Any]]:
    """One ``questions.jsonl`` record per task, shaped as the run's own sets' (``logprob``/``margin`` null
    where the task gives none)."""
    return [
        {
            "epoch": epoch,
            "set": set_name(task),
            "id": list(result.ids),
            "correct": [int(ok) for ok in result.correct],
            "logprob": result.logprobs,
            "margin": result.margins,
        }
        for task, result in scores.items()
    ]


def task_metrics(baseline: Mapping[str, TaskScores], current: Mapping[str, TaskScores]) -> dict[str, dict[str, Any]]:
    """Per task, the metrics row's figures against epoch 0: docs, accuracy before and now, forgotten
    (right at epoch 0, wrong now) of those right, learned of those wrong, and the mean changes of the
    gold log-likelihood and margin (None where the task gives none).

    Raises:
        CplError: a task whose items are not epoch 0's (another limit, a changed dataset).
    """
    figures = {}
    for task, now in current.items():
        before = baseline.get(task)
        if before is None or before.ids != now.ids:
            raise CplError(f"lm-eval task {task!r}: its items are not the ones scored at epoch 0")
        learned, forgotten = count_transitions(before.correct, now.correct)
        right_before = sum(before.correct)
        figures[task] = {
            "docs": len(now.ids),
            "accuracy_before": before.accuracy,
            "accuracy": now.accuracy,
            "right_before": right_before,
            "forgotten": forgotten,
            "wrong_before": len(before.correct) - right_before,
            "learned": learned,
            "delta_logprob": _mean_change(before.logprobs, now.logprobs),
            "delta_margin": _mean_change(before.margins, now.margins),
        }
    return figures


def task_table_rows(row: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """A metrics row's lm-eval figures as table rows in the order of :data:`TASK_COLUMNS` (none without)."""
    return [
        (
            task,
            entry["docs"],
            f"{entry['accuracy_before']:.3f}",
            f"{entry['accuracy']:.3f}",
            f"{entry['forgotten']}/{entry['right_before']}",
            f"{entry['learned']}/{entry['wrong_before']}",
            "-" if entry["delta_margin"] is None else f"{entry['delta_margin']:+.3f}",
        )
        for task, entry in (row.get("lm_eval") or {}).items()
    ]


def _mean_change(before: Sequence[float] | None, after: Sequence[float] | None) -> float | None:
    """:func:`~cpl_masks.evaluation.stats.mean_change`, None where the task gives no such value (or no item)."""
    return None if before is None or after is None or not after else mean_change(before, after)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's loggers at ERROR for the call (their INFO and WARNING lines are for its own CLI)."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _kept_generators() -> Iterator[None]:
    """Python's, numpy's and torch's (CPU and every CUDA device's) generator states, restored on exit."""
    import numpy as np
    import torch

    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _folder(include: str | None) -> str | None:
    """``include`` as an absolute path: one task manager however the folder was spelled."""
    return None if include is None else str(Path(include).resolve())


def _where(include: str | None) -> str:
    return f" (--lm-eval-include {include})" if include else ""


def _one_line(error: BaseException) -> str:
    """An exception as one line of at most 300 characters: its type and its message's first line."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= 300 else f"{line[:297]}..."
