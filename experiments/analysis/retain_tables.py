"""Tables and a figure of the retain-set experiment (``experiments/queues/sweeps.sh OUT retain``), for RESULTS.md.

Every run is scored on the same held-out file (the paper queue's: its CommonsenseQA forgetting pool and
the demo's held-out share), which this splits by where a question sits relative to the retain sets:
``in pool-128`` (the questions the pool-128 retain set steers by), ``reach`` (the rest of the pool: how
far protection reaches beyond a retain set's own questions) and the demo's held-out questions. Task A
is the paper queue's split, its references that queue's seed-0 runs of full fine-tuning and of the
per-step rule steered by the task's own mastered set, read at the same epoch (same seed, same order,
constant learning rate: the first epochs of a longer run are the shorter run); task B is the demo's
remaining facts. Differences are paired by question (one seed: McNemar's exact test and a bootstrap
interval over questions).

``--queue retain-gemma`` reads the same experiment on Gemma 3 270M (``experiments/queues/retain_gemma.sh``: task A
only, its references the paper-gemma queue's seed-0 runs).

``--seeds 0,1,2`` reads instead the runs repeated at those seeds (the retain set, its random-signs control
and the re-profiled mask of ``experiments/queues/reprofiled.sh``, against the paper queue's runs of the same seed):
each seed's counts, and the differences summed over the seeds, paired by question with all its seeds.

Usage: .venv/bin/python experiments/analysis/retain_tables.py OUT [--queue retain|retain-gemma] [--epoch 6]
       [--plot retain.png] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from cpl_masks import CplError, compare_outcomes, load_questions, question_outcomes, read_question_records
from cpl_masks.evaluation.outcomes import describe_difference

RUNS = {  # label -> run folder, relative to OUT (the retain queue, SmolLM2)
    "A full": "paper/runs/full-lr3e-05-s0",
    "A dynamic (own M)": "paper/runs/dynamic-lr3e-05-s0",
    "A retain pool-128": "retain/runs/a-retain-pool128",
    "A retain pool-128 (choices)": "retain/runs/a-retain-pool128-choices",
    "A dynamic (own M, choices)": "retain/runs/a-dynamic-choices",
    "A retain pool-32": "retain/runs/a-retain-pool32",
    "A retain mmlu-128": "retain/runs/a-retain-mmlu128",
    "A retain mmlu-128 (choices)": "retain/runs/a-retain-mmlu128-choices",
    "A random signs": "retain/runs/a-random-signs",
    "A retain pool-128 (choices, K=2, pass)": "retain/runs/a-retain-pool128-choices-c2-pass",
    "A retain pool-128 (choices, K=2, freeze)": "retain/runs/a-retain-pool128-choices-c2-freeze",
    "B full": "retain/runs/b-full",
    "B dynamic (own M)": "retain/runs/b-dynamic",
    "B retain pool-128": "retain/runs/b-retain-pool128",
    "B retain pool-128 (choices)": "retain/runs/b-retain-pool128-choices",
    "B retain pool-128 (choices, every 30)": "retain/runs/b-retain-pool128-choices-r30",
}
COMPARISONS = [  # (run, reference)
    ("A retain pool-128", "A full"),
    ("A retain pool-128", "A dynamic (own M)"),
    ("A retain pool-128 (choices)", "A full"),
    ("A retain pool-128 (choices)", "A retain pool-128"),
    ("A dynamic (own M, choices)", "A full"),
    ("A dynamic (own M, choices)", "A dynamic (own M)"),
    ("A retain pool-32", "A full"),
    ("A retain mmlu-128", "A full"),
    ("A retain mmlu-128 (choices)", "A full"),
    ("A random signs", "A full"),
    ("A retain pool-128 (choices)", "A random signs"),
    ("A dynamic (own M, choices)", "A random signs"),
    ("A dynamic (own M)", "A random signs"),
    ("A retain pool-128 (choices, K=2, pass)", "A full"),
    ("A retain pool-128 (choices, K=2, pass)", "A retain pool-128 (choices)"),
    ("A retain pool-128 (choices, K=2, freeze)", "A full"),
    ("A retain pool-128 (choices, K=2, freeze)", "A retain pool-128 (choices)"),
    ("A dynamic (own M)", "A full"),
    ("B retain pool-128", "B full"),
    ("B retain pool-128", "B dynamic (own M)"),
    ("B retain pool-128 (choices)", "B full"),
    ("B retain pool-128 (choices)", "B dynamic (own M)"),
    ("B retain pool-128 (choices, every 30)", "B full"),
    ("B retain pool-128 (choices, every 30)", "B retain pool-128 (choices)"),
    ("B dynamic (own M)", "B full"),
]

GEMMA_RUNS = {  # the retain-gemma queue
    "A full": "paper-gemma/runs/full-lr1e-05-s0",
    "A dynamic (own M)": "paper-gemma/runs/dynamic-lr1e-05-s0",
    "A retain pool-128 (choices)": "retain-gemma/runs/a-retain-pool128-choices",
    "A dynamic (own M, choices)": "retain-gemma/runs/a-dynamic-choices",
    "A random signs": "retain-gemma/runs/a-random-signs",
}
QUEUES = {  # queue -> (its folder under OUT, its runs)
    "retain": ("retain", RUNS),
    "retain-gemma": ("retain-gemma", GEMMA_RUNS),
}

SEEDED_RUNS = {  # queue -> label -> run folder at {seed}; {suffix}: "" at seed 0 (the first run), else -s{seed}
    "retain": {
        "A full": "paper/runs/full-lr3e-05-s{seed}",
        "A mask": "paper/runs/mask-lr3e-05-s{seed}",
        "A dynamic (own M)": "paper/runs/dynamic-lr3e-05-s{seed}",
        "A mask re-profiled": "paper-extra/mask-reprofiled-s{seed}",
        "A retain pool-128 (choices)": "retain/runs/a-retain-pool128-choices{suffix}",
        "A random signs": "retain/runs/a-random-signs{suffix}",
    },
    "retain-gemma": {
        "A full": "paper-gemma-all/runs/full-lr1e-05-s{seed}",
        "A mask": "paper-gemma-all/runs/mask-lr1e-05-s{seed}",
        "A dynamic (own M)": "paper-gemma-all/runs/dynamic-lr1e-05-s{seed}",
        "A mask re-profiled": "paper-gemma-extra/mask-reprofiled-s{seed}",
        "A retain pool-128 (choices)": "retain-gemma/runs/a-retain-pool128-choices{suffix}",
        "A random signs": "retain-gemma/runs/a-random-signs{suffix}",
    },
}
SEEDED_COMPARISONS = [
    ("A retain pool-128 (choices)", "A full"),
    ("A retain pool-128 (choices)", "A random signs"),
    ("A retain pool-128 (choices)", "A dynamic (own M)"),
    ("A retain pool-128 (choices)", "A mask"),
    ("A random signs", "A full"),
    ("A dynamic (own M)", "A full"),
    ("A mask re-profiled", "A mask"),
    ("A mask re-profiled", "A full"),
    ("A dynamic (own M)", "A mask re-profiled"),
]


def seeded_folder(out: Path, template: str, seed: int) -> Path:
    """A repeated run's folder at ``seed``."""
    return out / template.format(seed=seed, suffix="" if seed == 0 else f"-s{seed}")


def groups(folder: Path) -> dict[str, set[str]]:
    """The held-out questions by where they sit: in pool-128, the rest of the pool (reach), the demo's."""
    in_retain = {question.id for question in load_questions(folder / "pool-128.jsonl")}
    reach = {question.id for question in load_questions(folder / "reach.jsonl")}
    return {"in pool-128": in_retain, "reach": reach}


@functools.cache
def records(folder: Path) -> list[dict]:
    """A run's per-question records, read once: the tables and the figure read every epoch of each run."""
    return read_question_records(folder)


def outcomes(folder: Path, epoch: int, where: dict[str, set[str]]) -> dict[str, dict[str, bool]]:
    """Per question at ``epoch``: learned, forgotten (M), and held-out forgotten split by ``where`` and in all."""
    found = question_outcomes(records(folder), epoch)
    heldout = found["held-out"] = found.pop("heldout_forgotten")
    for name, ids in where.items():
        found[name] = {key: value for key, value in heldout.items() if key in ids}
    pooled = set().union(*where.values())
    found["demo held-out"] = {key: value for key, value in heldout.items() if key not in pooled}
    return found


COLUMNS = ("learned", "forgotten", "reach", "in pool-128", "demo held-out", "held-out")
HEADERS = ("learned", "forgotten (M)", "reach", "in pool-128", "demo held-out", "held-out (all)")
MEASURED_ON = dict(zip(COLUMNS, ("inject", "mastered", "reach", "pool-128", "demo held-out", "held-out"), strict=True))


def count_cells(found: dict[str, dict[str, bool]]) -> list[str]:
    """How many questions each outcome holds, of how many, in column order."""
    return [f"{sum(found[name].values())}/{len(found[name])}" for name in COLUMNS]


def count_rows(by_epoch: dict[int, dict[str, dict[str, dict[str, bool]]]]) -> list[str]:
    """Counts per run and evaluated epoch: how many questions each outcome holds, of how many."""
    rows = ["| run | epoch | " + " | ".join(HEADERS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    labels = dict.fromkeys(label for results in by_epoch.values() for label in results)
    for label in labels:
        for epoch, results in by_epoch.items():
            if label in results:
                rows.append(f"| {label} | {epoch} | " + " | ".join(count_cells(results[label])) + " |")
    return rows


def paired_rows(results: dict[str, list[dict[str, dict[str, bool]]]], comparisons: list[tuple[str, str]]) -> list[str]:
    """Each comparison's differences (run − reference) with the 95 % interval and p, summed over the
    seeds each label holds (one outcome record per seed, aligned by seed)."""
    rows = ["| run − reference | " + " | ".join(HEADERS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for run, reference in comparisons:
        if run not in results or reference not in results:
            continue
        found = compare_outcomes(list(zip(results[reference], results[run], strict=True)), MEASURED_ON)
        rows.append(
            f"| {run} − {reference} | " + " | ".join(describe_difference(found[name]) for name in COLUMNS) + " |"
        )
    return rows


def draw(folders: dict[str, list[Path]], epochs: list[int], where: dict[str, set[str]], path: Path) -> None:
    """Learned against forgotten-on-reach, one curve per run (the mean over its seeds' folders) through its
    evaluated epochs; task A and B side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [task for task in ("A", "B") if any(label.startswith(task) for label in folders)]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for label, seeds in folders.items():
            if not label.startswith(task):
                continue
            points = [[outcomes(folder, epoch, where) for folder in seeds] for epoch in epochs]
            axis.plot(
                [sum(sum(p["reach"].values()) for p in point) / len(seeds) for point in points],
                [sum(sum(p["learned"].values()) for p in point) / len(seeds) for point in points],
                marker="o",
                label=label[2:],
            )
        repeats = max(len(seeds) for seeds in folders.values())
        mean = f", mean of {repeats} seeds" if repeats > 1 else ""
        axis.set_title(f"task {task} (epochs {epochs[0]}..{epochs[-1]}{mean})")
        axis.set_xlabel("forgotten of the reach set (the pool's questions outside pool-128)")
        axis.set_ylabel("learned")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def print_single(out: Path, runs: dict[str, str], epoch: int, where: dict[str, set[str]]) -> dict[str, list[Path]]:
    """Every run's counts at each evaluated epoch up to ``epoch`` and the comparisons at ``epoch`` (one seed);
    returns the folders of the runs that reached it."""
    folders = {label: out / path for label, path in runs.items()}
    folders = {label: folder for label, folder in folders.items() if (folder / "questions.jsonl").is_file()}
    by_epoch: dict[int, dict[str, dict[str, dict[str, bool]]]] = {}
    for at in range(2, epoch + 1, 2):
        by_epoch[at] = {}
        for label, folder in folders.items():
            try:
                by_epoch[at][label] = outcomes(folder, at, where)
            except CplError as error:  # a run still short of that epoch
                print(f"{label}: {error}")
    results = by_epoch[epoch]
    print(f"epoch {epoch}; reach {len(where['reach'])} questions, pool-128 {len(where['in pool-128'])}\n")
    print("\n".join(count_rows(by_epoch)) + "\n")
    print(f"paired at epoch {epoch}:\n")
    print("\n".join(paired_rows({label: [found] for label, found in results.items()}, COMPARISONS)))
    return {label: [folder] for label, folder in folders.items() if label in results}


def print_seeded(
    out: Path, queue: str, seeds: list[int], epoch: int, where: dict[str, set[str]]
) -> dict[str, list[Path]]:
    """Each repeated run's counts at ``epoch`` per seed, and the comparisons summed over ``seeds``; returns
    the folders of the runs shown (a label is left out unless every seed has reached that epoch)."""
    results: dict[str, list[dict[str, dict[str, bool]]]] = {}
    shown: dict[str, list[Path]] = {}
    for label, template in SEEDED_RUNS[queue].items():
        folders = [seeded_folder(out, template, seed) for seed in seeds]
        missing = [str(folder) for folder in folders if not (folder / "questions.jsonl").is_file()]
        if missing:
            print(f"{label}: left out (not run: {', '.join(missing)})")
            continue
        try:
            results[label] = [outcomes(folder, epoch, where) for folder in folders]
        except CplError as error:  # a seed short of that epoch
            print(f"{label}: left out ({error})")
            continue
        shown[label] = folders
    print(f"epoch {epoch}, seeds {', '.join(map(str, seeds))}\n")
    rows = ["| run | seed | " + " | ".join(HEADERS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for label, by_seed in results.items():
        for seed, found in zip(seeds, by_seed, strict=True):
            rows.append(f"| {label} | {seed} | " + " | ".join(count_cells(found)) + " |")
    print("\n".join(rows) + f"\n\npaired at epoch {epoch}, summed over the seeds:\n")
    print("\n".join(paired_rows(results, SEEDED_COMPARISONS)))
    return shown


def main() -> None:
    """Print the count and paired tables at one epoch, and draw the curves."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the OUT folder of experiments/queues/sweeps.sh")
    parser.add_argument("--queue", choices=sorted(QUEUES), default="retain")
    parser.add_argument("--epoch", type=int, default=6, help="the epoch compared (counts: every second up to it)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds: read the repeated runs instead")
    args = parser.parse_args()
    queue_folder, runs = QUEUES[args.queue]
    where = groups(args.out / queue_folder)
    epochs = list(range(0, args.epoch + 1, 2))
    if args.seeds is not None:
        seeds = [int(seed) for seed in args.seeds.split(",")]
        shown = print_seeded(args.out, args.queue, seeds, args.epoch, where)
    else:
        shown = print_single(args.out, runs, args.epoch, where)
    if args.plot is not None:
        draw(shown, epochs, where, args.plot)


if __name__ == "__main__":
    main()
