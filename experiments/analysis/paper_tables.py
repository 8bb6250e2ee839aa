"""Markdown tables of a multi-epoch sweep with per-question records, for RESULTS.md: each method's curve
(learned and forgotten at every evaluated epoch, means over the seeds run so far) and the paired
comparisons (intervals and McNemar p) at the end of training and at each method's best point.

Reads the sweep folder itself, so it works on a sweep still running: the comparisons are recomputed
from the finished runs' ``questions.jsonl``.

Usage: .venv/bin/python experiments/analysis/paper_tables.py SWEEP_DIR [--budget 0.01]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cpl_masks.evaluation.outcomes import OUTCOMES, describe_difference
from cpl_masks.sweep.report import aggregate, best_per_method, final_points, paired_comparisons


def curve_rows(points: list[dict]) -> list[str]:
    """One row per (method, lr, epoch): learned, forgotten M and held-out, margins."""
    rows = ["| method | lr | epoch | seeds | learned | forgotten (M) | held-out forgotten | Δ margin held-out |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for p in sorted(points, key=lambda p: (p["method"], p["lr"], p.get("epoch") or 0)):
        if p["diverged"]:
            rows.append(f"| {p['method']} | {p['lr']:g} | - | {p['seeds']} | diverged | | | |")
            continue
        rows.append(
            f"| {p['method']} | {p['lr']:g} | {p['epoch']} | {p['seeds']} | {100 * p['learned_share']:.1f} % | "
            f"{100 * p['forgotten_share']:.1f} % | {100 * p['heldout_forgotten_share']:.1f} % | "
            f"{p['delta_margin'].get('heldout', 0.0):+.3f} |"
        )
    return rows


def paired_rows(comparisons: dict[str, dict]) -> list[str]:
    """One row per comparison: the differences (method − reference) in questions, interval and p."""
    rows = ["| comparison | epochs | learned | forgotten (M) | held-out forgotten |", "| --- | --- | --- | --- | --- |"]
    for label, entry in comparisons.items():
        cells = [describe_difference(entry[name]) if name in entry else "-" for name in OUTCOMES]
        epochs = f"{entry['method']['epoch']} vs {entry['reference']['epoch']}"
        rows.append(f"| {label} | {epochs} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    """Print the tables of one sweep folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--budget", type=float, default=None, help="forgetting budget (default: the sweep's)")
    args = parser.parse_args()
    payload = json.loads((args.sweep / "sweep.json").read_text(encoding="utf-8"))
    runs = [run for run in payload["runs"] if run.get("learned_share") is not None or run.get("diverged")]
    budget = payload["config"]["forgetting_budget"] if args.budget is None else args.budget
    points = aggregate(runs)
    best = best_per_method(points, budget)
    split = payload["split"]["counts"]
    print(f"split: {split}; held-out questions: {payload['heldout_questions']}; runs finished: {len(runs)}\n")
    print("\n".join(curve_rows(points)))
    print(
        "\nat the end of training:\n\n"
        + "\n".join(paired_rows(paired_comparisons(runs, final_points(points, best), args.sweep)))
    )
    print(
        f"\nat each method's best point within {budget:.0%}:\n\n"
        + "\n".join(paired_rows(paired_comparisons(runs, best, args.sweep)))
    )


if __name__ == "__main__":
    main()
