"""Markdown tables of finished sweeps, for RESULTS.md: every (method, learning rate) point, then each
method at its best learning rate under one or more forgetting budgets.

Usage: .venv/bin/python experiments/analysis/results_tables.py SWEEP_DIR [SWEEP_DIR ...] [--budgets 0.02,0.15]
       .venv/bin/python experiments/analysis/results_tables.py --merge SWEEP_DIR SWEEP_DIR ...   (pool runs, e.g. seeds)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cpl_masks.sweep.report import aggregate, best_per_method


def _pct(value: float | None, spread: float | None = None, seeds: int = 1) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f} %" + (f" ± {100 * spread:.0f}" if seeds > 1 and spread is not None else "")


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _spread(value: float | None, seeds: int) -> str:
    return f" ± {value:.3f}" if seeds > 1 and value is not None else ""


def point_row(point: dict[str, Any]) -> str:
    """One markdown row of a (method, learning rate) point."""
    if point["diverged"]:
        return f"| {point['method']} | {point['lr']:g} | diverged | | | | | | |"
    margin = point.get("delta_margin") or {}
    agreement = point.get("mask_agreement_touched")
    seeds = point["seeds"]
    return (
        f"| {point['method']} | {point['lr']:g} | {_pct(point['learned_share'], point.get('learned_share_sd'), seeds)}"
        f" | {_pct(point['forgotten_share'], point.get('forgotten_share_sd'), seeds)}"
        f" | {_pct(point['heldout_forgotten_share'], point.get('heldout_forgotten_share_sd'), seeds)}"
        f" | {_num(margin.get('mastered'))} | {_num(margin.get('heldout'))}"
        f" | {_num(point.get('retain_loss_delta'), 3)}{_spread(point.get('retain_loss_delta_sd'), seeds)}"
        f" | {'-' if agreement is None else f'{100 * agreement:.1f} %'} |"
    )


HEADER = (
    "| method | lr | learned | forgotten (M) | held-out forgotten | Δ margin M | Δ margin held-out "
    "| Δ retain loss | mask agrees with sign rule after training |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def merged_table(folders: list[Path]) -> str:
    """The runs of several sweeps over the same split pooled into one table (one run per method, lr and seed)."""
    runs = {}
    for folder in folders:
        for run in json.loads((folder / "sweep.json").read_text())["runs"]:
            runs.setdefault((run["method"], run["lr"], run["seed"]), run)
    seeds = sorted({seed for _, _, seed in runs})
    names = " + ".join(folder.name for folder in folders)
    points = aggregate(list(runs.values()))
    return "\n".join([f"**{names}**, pooled: seeds {seeds} (mean ± standard deviation).", "", HEADER,
                      *(point_row(point) for point in points), ""])  # fmt: skip


def sweep_tables(folder: Path, budgets: list[float]) -> str:
    """All points of one sweep, then the best rate per method under each budget."""
    payload = json.loads((folder / "sweep.json").read_text())
    split = payload["split"]["counts"]
    lines = [
        f"**{folder.name}**: split {split['inject']} to inject / {split['mastered']} mastered / "
        f"{split['heldout']} held out; seeds {payload['config']['seeds']}.",
        "",
        HEADER,
        *(point_row(point) for point in payload["points"]),
        "",
    ]
    for budget in budgets:
        best = best_per_method(payload["points"], budget)
        cells = [f"{method} @ {point['lr']:g}: {_pct(point['learned_share'])}" if point else f"{method}: none"
                 for method, point in best.items()]  # fmt: skip
        lines.append(f"Best within a held-out forgetting budget of {budget:.0%}: " + "; ".join(cells) + ".")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Print the tables of every sweep folder given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--budgets", default="0.02,0.15")
    parser.add_argument("--merge", action="store_true", help="pool the sweeps' runs into one table")
    args = parser.parse_args()
    if args.merge:
        print(merged_table(args.sweeps))
        return
    budgets = [float(value) for value in args.budgets.split(",")]
    print("\n".join(sweep_tables(folder, budgets) for folder in args.sweeps))


if __name__ == "__main__":
    main()
