"""The one summary figure of README.md and RESULTS.md: learned against held-out forgotten in the paper's regime.

One panel per model (SmolLM2-135M-Instruct: SGD batch 1, lr 3e-5, 12 epochs, three seeds, 311 held-out questions;
Gemma 3 270M: lr 1e-5, 8 epochs, four seeds, 424 held-out questions; RESULTS.md section 0), one curve per method
through its evaluated epochs (mean over the seeds, from epoch 0 at the origin), the last epoch marked with error
bars of one standard deviation over the seeds. LoRA (rank 8, lr 1e-3), which forgets more than twice as many
held-out questions as full fine-tuning, is named in a note instead of drawn. Read from the sweeps' stored records
(``sweep.json``) with the same reading code as ``paper_tables.py``: :func:`cpl_masks.sweep.report.aggregate`.

Usage: .venv/bin/python experiments/analysis/summary_figure.py [--results experiments/results]
       [--out experiments/results/summary/learned-vs-forgotten.png]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cpl_masks.sweep.report import aggregate

ROOT = Path(__file__).resolve().parents[2]
PANELS = (  # (title, sweep folder under the results folder)
    ("SmolLM2-135M-Instruct", "smollm2-paper"),
    ("Gemma 3 270M", "gemma3-paper"),
)
METHODS = {  # method -> (legend label, colour, marker), in drawing order
    "full": ("full fine-tuning", "tab:gray", "o"),
    "mask": ("static mask (profiled, sign rule)", "tab:blue", "s"),
    "random": ("random mask, same share", "tab:orange", "^"),
    "dynamic": ("per-step rule (--method dynamic)", "tab:green", "D"),
}
OFF_CHART = {"lora": "LoRA (rank 8, lr 1e-3)"}  # forgets over twice as much as full: named in a note, not drawn


def read_points(sweep: Path) -> tuple[list[dict[str, Any]], Mapping[str, Any]]:
    """The sweep's points (one per method, learning rate and evaluated epoch, means and spreads over the seeds
    of its finished runs) and the sweep's own record."""
    payload = json.loads((sweep / "sweep.json").read_text(encoding="utf-8"))
    runs = [run for run in payload["runs"] if run.get("learned_share") is not None or run.get("diverged")]
    return [point for point in aggregate(runs) if not point["diverged"]], payload


def curves(points: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Each method's points in epoch order (one learning rate per method in the paper-regime sweeps), the
    methods of :data:`METHODS` first, in its order."""
    found: dict[str, list[Mapping[str, Any]]] = {method: [] for method in METHODS}
    for point in points:
        found.setdefault(point["method"], []).append(point)
    return {method: sorted(curve, key=lambda p: p["epoch"]) for method, curve in found.items() if curve}


def rate(lr: float) -> str:
    """A learning rate as RESULTS.md writes it: 3e-5, not 3e-05."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def describe(payload: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> str:
    """A panel's subtitle: the learning rate of full fine-tuning (every method's but LoRA's), epochs, seeds, sizes."""
    config = payload["config"]
    lr = min(point["lr"] for point in points if point["method"] == "full")
    epochs = max(point["epoch"] for point in points)
    seeds = max(point["seeds"] for point in points)
    counts = payload["split"]["counts"]
    return (
        f"SGD batch 1, lr {rate(lr)}, {epochs} epochs ({config.get('eval_every', 1)} a point), {seeds} seeds\n"
        f"{counts['inject']} to inject, {payload['heldout_questions']} held-out questions"
    )


def draw(results: Path, out: Path) -> None:
    """Draw both panels to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS), figsize=(6.2 * len(PANELS), 5.2))
    for axis, (title, folder) in zip(axes, PANELS, strict=True):
        points, payload = read_points(results / folder)
        notes: list[str] = []
        for method, curve in curves(points).items():
            last = curve[-1]
            if method in OFF_CHART:
                notes.append(
                    f"not drawn: {OFF_CHART[method]}, epoch {last['epoch']}: "
                    f"{100 * last['learned_share']:.1f} % learned, "
                    f"{100 * last['heldout_forgotten_share']:.1f} % held-out forgotten"
                )
                continue
            label, color, marker = METHODS.get(method, (method, None, "o"))
            xs = [0.0] + [100 * p["heldout_forgotten_share"] for p in curve]
            ys = [0.0] + [100 * p["learned_share"] for p in curve]
            axis.plot(xs, ys, color=color, marker=marker, markersize=4, linewidth=1.4, alpha=0.85, label=label)
            axis.errorbar(
                xs[-1],
                ys[-1],
                xerr=100 * last["heldout_forgotten_share_sd"],
                yerr=100 * last["learned_share_sd"],
                color=color,
                marker=marker,
                markersize=8,
                capsize=3,
                linewidth=1.2,
            )
        axis.set_title(f"{title}\n{describe(payload, points)}", fontsize=10)
        axis.set_xlabel(f"held-out forgotten (% of {payload['heldout_questions']} held-out mastered questions)")
        axis.set_xlim(left=0)
        axis.grid(alpha=0.3)
        for index, note in enumerate(notes):
            axis.text(0.99, 0.02 + 0.05 * index, note, transform=axis.transAxes, ha="right", fontsize=7.5)
    top = max(axis.get_ylim()[1] for axis in axes)
    for axis in axes:
        axis.set_ylim(0, top)
    axes[0].set_ylabel("learned (% of the injection questions)")
    axes[0].legend(fontsize=8, loc="upper left")
    figure.suptitle(
        "Learned against forgotten in the paper's regime (RESULTS.md §0): mean over the seeds at each "
        "evaluated epoch from 0; large marker: the last epoch, ± 1 sd over the seeds",
        fontsize=10,
    )
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> None:
    """Read both paper-regime sweeps and draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "experiments" / "results" / "summary" / "learned-vs-forgotten.png"
    )
    args = parser.parse_args()
    draw(args.results, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
