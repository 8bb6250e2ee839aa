"""What a sweep's runs show: points, each method's best within the budget, paired statistics, table, figure.

Every evaluated epoch of every run is a candidate point (learned, held-out forgotten): a
practitioner stops training when it is good enough, so "the most learned within the forgetting
budget" ranges over learning rate × epoch. Points average the seeds of one (method, learning rate,
epoch).

Counts of a few dozen questions move one question at a time, so differences between methods are
reported with paired statistics (:mod:`cpl_masks.evaluation.stats`): two runs of the same split and seed
answer the same questions, and the per-question records of their runs (``questions.jsonl``) pair
them. Each method is compared with full fine-tuning, and every mask with the random mask of the
same share, each at its best point, by a bootstrap interval over questions (each question with all
its seeds as one unit) and an exact sign test over questions (McNemar's for one seed). An interval
that contains 0 reads "no detectable difference".
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cpl_masks.evaluation.outcomes import (
    OUTCOMES,
    compare_outcomes,
    describe_difference,
    question_outcomes,
    read_question_records,
)
from cpl_masks.sweep.config import at_share, split_share
from cpl_masks.utils.files import atomic_write

_MEAN_KEYS = ("learned_share", "heldout_forgotten_share", "forgotten_share", "retain_loss_delta", "time_s")
REFERENCES = {
    "full": "full fine-tuning",
    "random": "the random mask of the same share",
    "dynamic": "the per-step rule steered by the task's own mastered set",  # for retain-* methods
    "random-signs": "the per-step rule steered by random signs",  # for dynamic and retain-* methods
}
MASK_LIKE = ("mask", "gradient-magnitude")  # compared with the random mask as well; so is every reuse-*


def epoch_figures(row: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one evaluated epoch (a ``metrics.jsonl`` row) that the comparison needs."""
    totals = row["totals"]
    return {
        "epoch": row["epoch"],
        "learned": row["learned"],
        "inject_wrong": totals["inject_wrong"],
        "forgotten": row["forgotten"],
        "mastered_right": totals["mastered_right"],
        "heldout_forgotten": row["heldout_forgotten"],
        "heldout_right": totals["heldout_right"],
        "learned_share": _share(row["learned"], totals["inject_wrong"]),
        "forgotten_share": _share(row["forgotten"], totals["mastered_right"]),
        "heldout_forgotten_share": _share(row["heldout_forgotten"], totals["heldout_right"]),
        "delta_logprob": row.get("delta_logprob"),
        "delta_margin": row.get("delta_margin"),
        "retain_loss_delta": row.get("retain_loss_delta"),
        "mask_agreement": row.get("mask_agreement"),
    }


def _share(count: int | None, total: int | None) -> float | None:
    return None if count is None or not total else count / total


def aggregate(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per (method, learning rate, evaluated epoch): means and spreads over seeds.

    A run summary's ``epochs`` lists its evaluated epochs after 0; a summary without it (an older
    sweep) is one point at its final epoch. A diverged seed makes every point of its (method, lr)
    diverged.
    """
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["lr"]), []).append(run)
    points = []
    for (method, lr), members in groups.items():
        base: dict[str, Any] = {"method": method, "lr": lr, "seeds": len(members)}
        if any(member.get("learned_share") is None for member in members):
            points.append({**base, "epoch": None, "diverged": True})
            continue
        by_epoch: dict[Any, list[Mapping[str, Any]]] = {}
        for member in members:
            for figures in member.get("epochs") or [member]:
                by_epoch.setdefault(figures.get("epoch"), []).append({**figures, "time_s": member.get("time_s")})
        for epoch, figures in by_epoch.items():
            points.append({**base, "epoch": epoch, **_means(figures), "diverged": False})
    return points


def _means(members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    point: dict[str, Any] = {}
    for key in _MEAN_KEYS:
        values = [member[key] for member in members if member.get(key) is not None]
        point[key] = statistics.mean(values) if values else None
        point[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    for key in ("delta_logprob", "delta_margin"):
        names = members[0].get(key) or {}
        point[key] = {name: statistics.mean(member[key][name] for member in members) for name in names}
    agreement = [member["mask_agreement"]["touched"] for member in members if member.get("mask_agreement")]
    point["mask_agreement_touched"] = statistics.mean(agreement) if agreement else None
    return point


def best_per_method(points: Sequence[Mapping[str, Any]], budget: float) -> dict[str, dict[str, Any] | None]:
    """Each method at its most-learning point (learning rate × epoch) whose held-out forgetting is within ``budget``.

    Ties in learning go to less forgetting, then the smaller learning rate, then the earlier epoch.
    ``None``: no point of the method stayed within the budget.
    """
    best: dict[str, dict[str, Any] | None] = {}
    for point in points:
        best.setdefault(point["method"], None)
        if point["diverged"] or point["heldout_forgotten_share"] > budget + 1e-12:
            continue
        current = best[point["method"]]
        if current is None or _rank(point) > _rank(current):
            best[point["method"]] = dict(point)
    return best


def _rank(point: Mapping[str, Any]) -> tuple[float, ...]:
    return (point["learned_share"], -point["heldout_forgotten_share"], -point["lr"], -(point.get("epoch") or 0))


def pareto_front(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both axes (learns at least as much, forgets at most as much, one strictly)."""
    alive = [point for point in points if not point["diverged"]]

    def dominated(point: Mapping[str, Any]) -> bool:
        return any(
            other["learned_share"] >= point["learned_share"]
            and other["heldout_forgotten_share"] <= point["heldout_forgotten_share"]
            and (
                other["learned_share"] > point["learned_share"]
                or other["heldout_forgotten_share"] < point["heldout_forgotten_share"]
            )
            for other in alive
        )

    front = [dict(point) for point in alive if not dominated(point)]
    return sorted(front, key=lambda point: point["heldout_forgotten_share"])


def learned_forgotten_auc(points: Sequence[Mapping[str, Any]], up_to: float) -> dict[str, float | None]:
    """Per method, the mean over budgets b in [0, ``up_to``] of the most it learned within b.

    The area under the method's learned-vs-forgotten frontier (a step function), divided by
    ``up_to``: 1.0 would be learning everything without forgetting anything. With ``up_to`` 0 it is
    the most learned with nothing forgotten. None: no point of the method forgot ``up_to`` or less.
    """
    areas: dict[str, float | None] = {}
    for method in dict.fromkeys(point["method"] for point in points):
        alive = sorted(
            (p["heldout_forgotten_share"], p["learned_share"])
            for p in points
            if p["method"] == method and not p["diverged"] and p["heldout_forgotten_share"] <= up_to + 1e-12
        )
        if not alive:
            areas[method] = None
            continue
        if up_to <= 0:
            areas[method] = max(learned for _, learned in alive)
            continue
        area, best = 0.0, 0.0
        for (start, learned), end in zip(alive, [x for x, _ in alive[1:]] + [up_to]):
            best = max(best, learned)
            area += best * (end - start)
        areas[method] = area / up_to
    return areas


def final_points(
    points: Sequence[Mapping[str, Any]], best: Mapping[str, Mapping[str, Any] | None]
) -> dict[str, dict[str, Any] | None]:
    """Each method at the end of training: its last evaluated epoch, at its best point's learning rate
    (the smallest of its grid when no point stayed within the budget)."""
    chosen: dict[str, dict[str, Any] | None] = {}
    for method in dict.fromkeys(point["method"] for point in points):
        alive = [p for p in points if p["method"] == method and not p["diverged"]]
        if not alive:
            chosen[method] = None
            continue
        lr = best[method]["lr"] if best.get(method) else min(p["lr"] for p in alive)
        chosen[method] = dict(max((p for p in alive if p["lr"] == lr), key=lambda p: p.get("epoch") or 0))
    return chosen


def paired_comparisons(
    runs: Sequence[Mapping[str, Any]], chosen: Mapping[str, Mapping[str, Any] | None], sweep_dir: Path
) -> dict[str, dict[str, Any]]:
    """Every method against full fine-tuning, and every mask against the random mask of its share
    (``mask@0.5`` against ``random@0.5``), each at its ``chosen`` point (its best within the budget,
    or :func:`final_points`).

    Keyed ``"<method> vs <reference>"``; each holds, per outcome (learned, forgotten, held-out
    forgotten), the paired difference ``method − reference`` with its interval and test, over the
    questions and the seeds both have (:func:`cpl_masks.evaluation.stats.compare_paired`). Pairs whose runs lack
    per-question records are left out.
    """
    comparisons: dict[str, dict[str, Any]] = {}
    for reference in REFERENCES:
        for method, point in chosen.items():
            base, fraction = split_share(method)
            name = reference if reference == "full" or fraction is None else at_share(reference, fraction)
            against = chosen.get(name)
            if point is None or against is None or method == name or not _compared_with(base, reference):
                continue
            paired = _paired_outcomes(runs, point, against, sweep_dir)
            if paired:
                comparisons[f"{method} vs {name}"] = {
                    "method": {"lr": point["lr"], "epoch": point.get("epoch")},
                    "reference": {"lr": against["lr"], "epoch": against.get("epoch")},
                    **paired,
                }
    return comparisons


def _compared_with(method: str, reference: str) -> bool:
    """Every method against full fine-tuning; mask-like ones against the random mask; the per-step rule
    against its control (random signs), and a retain set's rule also against the same rule steered by the
    task's own mastered set (``dynamic``)."""
    if method.startswith("retain-"):
        return reference in ("full", "dynamic", "random-signs")
    if method == "dynamic":
        return reference in ("full", "random-signs")
    return reference == "full" or method in MASK_LIKE or method.startswith("reuse-")


def _paired_outcomes(
    runs: Sequence[Mapping[str, Any]], point: Mapping[str, Any], reference: Mapping[str, Any], sweep_dir: Path
) -> dict[str, Any] | None:
    """Per outcome, ``point``'s runs against ``reference``'s, paired seed by seed and question by question."""
    ours, theirs = _run_folders(runs, point, sweep_dir), _run_folders(runs, reference, sweep_dir)
    pairs = []
    for seed in sorted(set(ours) & set(theirs)):
        a, b = _outcomes_of(theirs[seed], reference.get("epoch")), _outcomes_of(ours[seed], point.get("epoch"))
        if a is None or b is None:
            return None
        pairs.append((a, b))
    return compare_outcomes(pairs) if pairs else None


def _run_folders(runs: Sequence[Mapping[str, Any]], point: Mapping[str, Any], sweep_dir: Path) -> dict[int, Path]:
    """The run folder of each seed of the point's (method, learning rate)."""
    return {
        run["seed"]: sweep_dir / run["run_dir"]
        for run in runs
        if run["method"] == point["method"] and run["lr"] == point["lr"] and run.get("run_dir")
    }


def _outcomes_of(folder: Path, epoch: int | None) -> dict[str, dict[str, bool]] | None:
    records = read_question_records(folder, missing_ok=True)
    return None if records is None else question_outcomes(records, epoch)


SWEEP_COLUMNS = (
    "method",
    "best lr",
    "epoch",
    "learned",
    "held-out forgotten",
    "forgotten",
    "Δ margin held-out",
    "Δ retain loss",
    "AUC",
    "seeds",
)


def sweep_table_rows(payload: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """One row per method at its best point within the budget (``-`` where none qualified)."""
    rows = []
    auc = payload.get("auc") or {}
    for method, point in payload["best"].items():
        area = "-" if auc.get(method) is None else f"{auc[method]:.1%}"
        if point is None:
            rows.append((method, "none within budget", "-", "-", "-", "-", "-", "-", area, "-"))
            continue
        retain = point.get("retain_loss_delta")
        rows.append(
            (
                method,
                f"{point['lr']:g}",
                "-" if point.get("epoch") is None else point["epoch"],
                _percent(point, "learned_share"),
                _percent(point, "heldout_forgotten_share"),
                _percent(point, "forgotten_share"),
                f"{point['delta_margin'].get('heldout', 0.0):+.3f}",
                "-" if retain is None else f"{retain:+.4f}",
                area,
                point["seeds"],
            )
        )
    return rows


def _percent(point: Mapping[str, Any], key: str) -> str:
    spread = point.get(f"{key}_sd") or 0.0
    return f"{point[key]:.1%}" + (f" ± {spread:.1%}" if point["seeds"] > 1 else "")


PAIRED_COLUMNS = ("comparison", "learned", "forgotten (M)", "held-out forgotten", "questions (held-out)")


def paired_table_rows(comparisons: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """One row per paired comparison: each difference with its interval, McNemar's p, and the sizes."""
    rows = []
    for label, comparison in comparisons.items():
        epochs = f" (epochs {comparison['method']['epoch']} vs {comparison['reference']['epoch']})"
        cells = [label + epochs]
        for outcome in OUTCOMES:
            entry = comparison.get(outcome)
            cells.append("-" if entry is None else describe_difference(entry))
        heldout = comparison.get("heldout_forgotten")
        cells.append("-" if heldout is None else f"{heldout['n']} ({heldout['seeds']} seeds)")
        rows.append(tuple(cells))
    return rows


def draw_sweep(payload: Mapping[str, Any], path: str | Path) -> None:
    """Learned against held-out forgotten, one curve per (method, learning rate) through its evaluated
    epochs with the Pareto front, and learned against the held-out margin change, as a PNG (atomic).

    The margin, not the raw score, is the continuous measure of forgetting: training on answers in
    one format raises every choice's score, so the correct one's score alone can rise while the
    model forgets which choice is right.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [point for point in payload["points"] if not point["diverged"]]
    methods = list(dict.fromkeys(point["method"] for point in points))
    colors = {method: plt.get_cmap("tab10")(index % 10) for index, method in enumerate(methods)}
    figure, (counts, continuous) = plt.subplots(1, 2, figsize=(12, 5))
    curves: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for point in points:
        curves.setdefault((point["method"], point["lr"]), []).append(point)
    for (method, lr), curve in curves.items():
        curve = sorted(curve, key=lambda p: p.get("epoch") or 0)
        learned = [100 * p["learned_share"] for p in curve]
        for axis, xs in (
            (counts, [100 * p["heldout_forgotten_share"] for p in curve]),
            (continuous, [p["delta_margin"].get("heldout", 0.0) for p in curve]),
        ):
            axis.plot(xs, learned, color=colors[method], marker="o", markersize=3, linewidth=1)
            axis.annotate(f"{lr:g}", (xs[-1], learned[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = payload["pareto"]
    counts.plot(
        [100 * p["heldout_forgotten_share"] for p in front],
        [100 * p["learned_share"] for p in front],
        color="black",
        linestyle="--",
        linewidth=1,
        label="Pareto front",
    )
    budget = 100 * payload["config"]["forgetting_budget"]
    counts.axvline(budget, color="grey", linewidth=0.8, linestyle=":", label=f"budget {budget:g}%")
    for method in methods:
        counts.plot([], [], color=colors[method], marker="o", label=method)
    heldout = payload.get("heldout_questions")
    counts.set_xlabel("held-out forgotten (% of held-out mastered" + (f", {heldout} questions)" if heldout else ")"))
    counts.set_ylabel("learned (% of injection questions)")
    counts.set_title("learned vs forgotten, one curve per run through its epochs (labels: lr)")
    counts.legend(fontsize=7)
    continuous.axvline(0, color="grey", linewidth=0.8)
    continuous.set_xlabel("mean change in the correct choice's margin, held-out mastered")
    continuous.set_ylabel("learned (% of injection questions)")
    continuous.set_title("learned vs continuous forgetting")
    for axis in (counts, continuous):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
