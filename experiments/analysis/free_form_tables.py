"""Tables and a figure of the free-form experiment (``experiments/queues/free_form.py``), for RESULTS.md.

Every run of a queue scores the same sets: I (the invented facts, free-form), M (the general facts the
model reproduces, which the free-form retain set and the per-step rule steer by) and one held-out file,
split here by id into the *reach* (held-out general facts of M's distribution, free-form), ``mcq-``
(the general facts as multiple-choice questions: what the MCQ retain set holds) and ``pool:``
(CommonsenseQA questions: another distribution). lm-eval tasks a run scored add a column each.

Printed, per optimizer: each method's counts at its last epoch summed over its seeds; full fine-tuning at
every epoch (stopping early is a baseline); each method against full fine-tuning at the last epoch and
at the epoch whose learned count is nearest the method's (equal learning), paired by item with all the
seeds (``compare_outcomes``: McNemar over items, a bootstrap interval over items).

Usage: .venv/bin/python experiments/analysis/free_form_tables.py OUT [--plot figure.png]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from cpl_masks import compare_outcomes, question_outcomes, read_question_records
from cpl_masks.evaluation.outcomes import describe_difference

METHODS = ("full", "mask", "dynamic", "retain-free", "retain-mcq", "lora")
LABELS = {
    "full": "full fine-tuning",
    "mask": "static mask",
    "dynamic": "per-step rule on M",
    "retain-free": "retain set, free-form M",
    "retain-mcq": "retain set, MCQ (choices)",
    "lora": "LoRA",
}
HELD = {"reach": "", "mcq (MCQ retain's own)": "mcq-", "pool (CommonsenseQA)": "pool:"}  # column -> id prefix


def group_of(key: str) -> str:
    """The held-out column an item id belongs to: the first prefixed column it starts with, else the reach."""
    return next((column for column, prefix in HELD.items() if prefix and key.startswith(prefix)), "reach")


@functools.cache
def records(folder: Path) -> list[dict]:
    return read_question_records(folder)


def epochs(folder: Path) -> list[int]:
    """The epochs a run evaluated."""
    return sorted({record["epoch"] for record in records(folder)})


def outcomes(folder: Path, epoch: int | None = None) -> dict[str, dict[str, bool]]:
    """Per item at ``epoch`` (None: the last): learned, forgotten of M, and held-out forgotten by group."""
    found = question_outcomes(records(folder), epoch)
    held = found.pop("heldout_forgotten")
    result = {"learned": found.pop("learned"), "forgotten (M)": found.pop("forgotten")}
    for column in HELD:
        result[column] = {key: lost for key, lost in held.items() if group_of(key) == column}
    result.update(found)  # lm-eval:<task>
    return result


def runs(out: Path) -> dict[tuple[str, str], dict[str, Path]]:
    """(method, optimizer) -> seed -> finished run folder."""
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for folder in sorted((out / "runs").glob("*-s*")):
        if (folder / "run.json").is_file():
            method, optimizer, seed = folder.name.rsplit("-", 2)
            found.setdefault((method, optimizer), {})[seed] = folder
    return found


def cells(found: list[dict[str, dict[str, bool]]], columns: list[str]) -> str:
    return " | ".join(
        f"{sum(sum(f[c].values()) for f in found)}/{sum(len(f[c]) for f in found)}"
        if all(c in f for f in found)
        else "-"
        for c in columns
    )


def nearest_epoch(full: Path, learned: int) -> int:
    """The epoch of full fine-tuning whose learned count is nearest ``learned`` (the earlier on a tie)."""
    counts = {epoch: sum(outcomes(full, epoch)["learned"].values()) for epoch in epochs(full) if epoch}
    return min(counts, key=lambda epoch: (abs(counts[epoch] - learned), epoch))


def tables(out: Path) -> list[str]:
    found = runs(out)
    lines: list[str] = []
    for optimizer in sorted({optimizer for _, optimizer in found}):
        by_method = {method: found[(method, optimizer)] for method in METHODS if (method, optimizer) in found}
        full = by_method.get("full", {})
        sample = outcomes(next(iter(next(iter(by_method.values())).values())))
        columns = list(sample)
        lines += [f"### {optimizer}", "", "| method | seeds | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 2) + "|"]  # fmt: skip
        for method, seeds in by_method.items():
            last = [outcomes(folder) for folder in seeds.values()]
            lines.append(f"| {LABELS[method]} | {','.join(sorted(seeds))} | {cells(last, columns)} |")
        for epoch in [e for e in epochs(next(iter(full.values()))) if e] if full else []:
            at = [outcomes(folder, epoch) for folder in full.values()]
            lines.append(f"| full, epoch {epoch} | {','.join(sorted(full))} | {cells(at, columns)} |")
        lines += ["", "| method − full fine-tuning | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for method, seeds in by_method.items():
            shared = sorted(set(seeds) & set(full))
            if method == "full" or not shared:
                continue
            pairs = [(outcomes(full[seed]), outcomes(seeds[seed])) for seed in shared]
            early = [
                (
                    outcomes(full[s], nearest_epoch(full[s], sum(outcomes(seeds[s])["learned"].values()))),
                    outcomes(seeds[s]),
                )
                for s in shared
            ]
            for name, chosen in (("last epoch", pairs), ("equal learning", early)):
                compared = compare_outcomes(chosen, {column: column for column in columns})
                row = " | ".join(describe_difference(compared[c]) if c in compared else "-" for c in columns)
                lines.append(f"| {LABELS[method]} ({name}) | {row} |")
        lines.append("")
    return lines


def draw(out: Path, path: Path) -> None:
    """Learned against forgotten on the reach, one curve per method (the mean over its seeds), per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = runs(out)
    optimizers = sorted({optimizer for _, optimizer in found})
    figure, axes = plt.subplots(1, len(optimizers), figsize=(5.5 * len(optimizers), 4.5), squeeze=False)
    for axis, optimizer in zip(axes[0], optimizers, strict=True):
        for method in METHODS:
            seeds = found.get((method, optimizer))
            if not seeds:
                continue
            evaluated = sorted(set.intersection(*(set(epochs(folder)) for folder in seeds.values())))
            points = [[outcomes(folder, epoch) for folder in seeds.values()] for epoch in evaluated]
            xs = [sum(sum(f["reach"].values()) for f in at) / len(at) for at in points]
            ys = [sum(sum(f["learned"].values()) for f in at) / len(at) for at in points]
            axis.plot(xs, ys, marker="o", label=f"{LABELS[method]} ({len(seeds)} seeds)")
        axis.set(title=f"{out.name}: {optimizer}", xlabel="reach forgotten (mean over seeds)", ylabel="learned")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--plot", type=Path)
    options = parser.parse_args()
    print("\n".join(tables(options.out)))
    if options.plot:
        draw(options.out, options.plot)


if __name__ == "__main__":
    main()
