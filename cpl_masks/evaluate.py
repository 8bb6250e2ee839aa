"""Before/after evaluation of a training run: what was learned and what was forgotten.

Every count is relative to an epoch-0 evaluation done on the untouched model, so a question the
split got wrong by chance but the model answers right before training is never counted as learned:

* learned: injection questions answered wrong at epoch 0 and right now;
* forgotten: mastered questions answered right at epoch 0 and wrong now;
* held-out forgotten: the same on held-out mastered questions, which no mask ever saw.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from cpl_masks.data import Question
from cpl_masks.files import atomic_write
from cpl_masks.scoring import Scorer, score_questions

EVAL_SETS = ("inject", "mastered", "heldout")
METRIC_COLUMNS = (
    "epoch",
    "train loss",
    "learned",
    "forgotten",
    "held-out forgotten",
    "inject acc",
    "mastered acc",
)


def evaluate_sets(
    model: Any,
    scorer: Scorer,
    sets: Mapping[str, Sequence[Question]],
    *,
    batch_size: int = 16,
    epoch: int = 0,
    show_progress: bool = True,
) -> dict[str, list[bool]]:
    """Which questions of each non-empty set the model answers right (per set, in input order)."""
    model.eval()
    return {
        name: score_questions(
            model,
            scorer,
            questions,
            batch_size=batch_size,
            description=f"eval {name} (epoch {epoch})",
            show_progress=show_progress,
        ).correct
        for name, questions in sets.items()
        if questions
    }


def count_transitions(before: Sequence[bool], after: Sequence[bool]) -> tuple[int, int]:
    """How many questions went wrong → right and right → wrong between two evaluations."""
    gained = sum(1 for was, now in zip(before, after, strict=True) if now and not was)
    lost = sum(1 for was, now in zip(before, after, strict=True) if was and not now)
    return gained, lost


def epoch_metrics(
    epoch: int,
    baseline: Mapping[str, Sequence[bool]],
    current: Mapping[str, Sequence[bool]],
    *,
    train_loss: float | None = None,
) -> dict[str, Any]:
    """One metrics row: learned, forgotten and held-out forgotten against the epoch-0 baseline.

    ``heldout_forgotten`` is ``None`` when there is no held-out set. ``totals`` gives the
    denominators: injection questions wrong at epoch 0, mastered and held-out questions right.
    """
    learned, _ = count_transitions(baseline["inject"], current["inject"])
    _, forgotten = count_transitions(baseline["mastered"], current["mastered"])
    heldout_forgotten = None
    if "heldout" in baseline:
        _, heldout_forgotten = count_transitions(baseline["heldout"], current["heldout"])
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "learned": learned,
        "forgotten": forgotten,
        "heldout_forgotten": heldout_forgotten,
        "accuracy": {name: sum(correct) / len(correct) for name, correct in current.items()},
        "totals": {
            "inject_wrong": sum(1 for ok in baseline["inject"] if not ok),
            "mastered_right": sum(baseline["mastered"]),
            "heldout_right": sum(baseline["heldout"]) if "heldout" in baseline else None,
        },
    }


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
                f"{row['accuracy']['inject']:.1%}",
                f"{row['accuracy']['mastered']:.1%}",
            )
        )
    return table


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
    "time (s)",
    "peak memory (MB)",
)


def comparison_rows(runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """One table row per run (``run.json`` payloads by label), in the order of :data:`COMPARE_COLUMNS`."""
    table = []
    for label, run in runs.items():
        final, totals = run["final"], run["final"]["totals"]
        heldout = final.get("heldout_forgotten")
        table.append(
            (
                label,
                run["mode"],
                (run.get("mask_id") or "-")[:8],
                f"{final['learned']}/{totals['inject_wrong']}",
                f"{final['forgotten']}/{totals['mastered_right']}",
                "-" if heldout is None else f"{heldout}/{totals['heldout_right']}",
                round(float(run["time_s"]), 1),
                round(run["peak_memory_bytes"] / 2**20),
            )
        )
    return table


def draw_comparison(runs: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Grouped bars of learned, forgotten and held-out forgotten per run, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = (("learned", "learned"), ("forgotten", "forgotten"), ("heldout_forgotten", "held-out forgotten"))
    labels = list(runs)
    width = 0.8 / len(series)
    figure, axis = plt.subplots(figsize=(max(5, 1.6 * len(labels)), 4))
    for offset, (key, name) in enumerate(series):
        values = [runs[label]["final"].get(key) or 0 for label in labels]
        axis.bar([index + offset * width for index in range(len(labels))], values, width, label=name)
    axis.set_xticks([index + width for index in range(len(labels))], labels, rotation=15)
    axis.set_ylabel("questions")
    axis.set_title("learned vs forgotten per run")
    axis.legend()
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
