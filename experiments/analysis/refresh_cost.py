"""Protection against the cost of refreshing g_M (issue 15), for RESULTS.md: the per-step rule's runs on a
paper queue's split (``experiments/queues/refresh_cost.sh``), each placed at what its refreshes cost in passes over M
an epoch, from never refreshing (0) to all of M once an epoch (1). At one epoch: each run's counts, its
differences against the every-epoch refresh and against full fine-tuning of the same seed (paired by
question: McNemar's exact test and a bootstrap interval), and a figure of the three outcomes against the cost.

Usage: .venv/bin/python experiments/analysis/refresh_cost.py OUT [--queue paper|paper-gemma] [--seed 0] [--epoch 12]
       [--plot refresh-cost.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from cpl_masks import CplError, compare_outcomes, question_outcomes, read_question_records
from cpl_masks.evaluation.outcomes import OUTCOMES, describe_difference
from cpl_masks.methods import ScheduleOptions

QUEUES = {"paper": ("3e-05", 12), "paper-gemma": ("1e-05", 8)}  # queue -> its learning rate in run names, epochs
EVERY_EPOCH = "all of M"
HEADERS = ("learned", "forgotten (M)", "held-out forgotten")


def runs(queue: str) -> tuple[dict[str, str], str]:
    """The queue's per-step rule runs (label -> folder relative to OUT, at {seed}) and its full fine-tuning run."""
    lr = QUEUES[queue][0]
    found = {"never (stored signs)": f"{queue}-extra/dynamic-never-s{{seed}}"}
    found |= {f"{n} of M drawn": f"{queue}-extra/dynamic-sample{n}-s{{seed}}" for n in (8, 16, 35)}
    found[EVERY_EPOCH] = f"{queue}/runs/dynamic-lr{lr}-s{{seed}}"
    return found, f"{queue}/runs/full-lr{lr}-s{{seed}}"


def passes_per_epoch(folder: Path, records: list[dict]) -> float:
    """What an epoch after the first spends refreshing g_M, in passes over M: the refreshes the run's own
    schedule makes due (:meth:`ScheduleOptions.due`), each over ``refresh_sample`` questions or all of M."""
    request = json.loads((folder / "config.json").read_text(encoding="utf-8"))["request"]
    options = request["method_options"]
    sizes = {record["set"]: len(record["id"]) for record in records if record["epoch"] == 0}
    steps = math.ceil(sizes["inject"] / request["config"]["batch_size"])
    schedule = ScheduleOptions(options.get("refresh_every"))
    refreshes = sum(schedule.due(2, step) for step in range(steps))
    if refreshes and request.get("retain") is not None:
        raise SystemExit(f"{folder}: a refreshing retain run steers by its retain set's questions, not by M")
    mastered = sizes["mastered"]
    return refreshes * min(options.get("refresh_sample") or mastered, mastered) / mastered


def count(found: dict[str, dict[str, bool]], outcome: str) -> int:
    """How many questions had ``outcome``."""
    return sum(found[outcome].values())


def against(found: dict, reference: dict) -> str:
    """``found − reference`` per outcome, paired by question; blank for a run against itself."""
    if found is reference:
        return ""
    entries = compare_outcomes([(reference, found)])
    return " / ".join(describe_difference(entries[outcome]) for outcome in OUTCOMES)


def table(points: dict[str, tuple[float, dict]], full: dict, epoch: int) -> list[str]:
    """One row per run: its cost, counts, and differences against the every-epoch refresh and full fine-tuning."""
    joined = " / ".join(HEADERS)
    rows = [
        f"| run (epoch {epoch}) | passes over M an epoch | {' | '.join(HEADERS)} | "
        f"against all of M: {joined} | against full: {joined} |",
        "|---" * (4 + len(HEADERS)) + "|",
    ]
    every_epoch = points[EVERY_EPOCH][1]
    for label, (passes, found) in {**points, "full fine-tuning": (math.nan, full)}.items():
        counts = [f"{count(found, outcome)}/{len(found[outcome])}" for outcome in OUTCOMES]
        cost = "-" if math.isnan(passes) else f"{passes:.2f}"
        differences = f"{against(found, every_epoch)} | {against(found, full)}"
        rows.append(f"| {label} | {cost} | {' | '.join(counts)} | {differences} |")
    return rows


def draw(points: dict[str, tuple[float, dict]], full: dict, epoch: int, path: Path) -> None:
    """Each outcome against the refresh cost, one panel each, full fine-tuning as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(points.values(), key=lambda point: point[0])
    figure, axes = plt.subplots(1, len(OUTCOMES), figsize=(4.2 * len(OUTCOMES), 3.8))
    for axis, outcome, header in zip(axes, OUTCOMES, HEADERS, strict=True):
        axis.plot([passes for passes, _ in ordered], [count(found, outcome) for _, found in ordered], marker="o")
        axis.axhline(count(full, outcome), linestyle="--", color="grey", label="full fine-tuning")
        axis.set_xlabel("refresh cost (passes over M an epoch)")
        axis.set_title(f"{header} (of {len(full[outcome])}), epoch {epoch}")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    """Print the table at one epoch and draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the OUT folder of experiments/queues/sweeps.sh and refresh_cost.sh")
    parser.add_argument("--queue", choices=sorted(QUEUES), default="paper")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch", type=int, default=None, help="default: the queue's last (paper 12, paper-gemma 8)")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    args.epoch = args.epoch or QUEUES[args.queue][1]
    templates, full_template = runs(args.queue)
    points = {}
    for label, template in templates.items():
        folder = args.out / template.format(seed=args.seed)
        records = read_question_records(folder, missing_ok=True)
        try:
            if records is None:
                raise CplError(f"not run: {folder}")
            points[label] = (passes_per_epoch(folder, records), question_outcomes(records, args.epoch))
        except CplError as error:  # not run, or still short of that epoch
            print(f"{label}: left out ({error})")
    full = question_outcomes(read_question_records(args.out / full_template.format(seed=args.seed)), args.epoch)
    print("\n".join(table(points, full, args.epoch)))
    if args.plot is not None:
        draw(points, full, args.epoch, args.plot)


if __name__ == "__main__":
    main()
