"""Profile a freeze mask and train with it from Python, with the library API (no CLI).

The whole CPL job in one script: score questions and split them into mastered and to-inject sets
(``split_questions``), measure the mask on them (``profile``), then fine-tune with the mask and,
for contrast, without it (``start_run``), and print what each learned and forgot.

    .venv/bin/python examples/profile_and_train.py --limit 32 --epochs 1 --out runs/example

Defaults to the built-in SmolLM2-135M-Instruct and the built-in demo questions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cpl_masks import (
    DEFAULT_MODEL,
    RunRequest,
    TrainConfig,
    load_model,
    load_questions,
    profile,
    split_questions,
    start_run,
    write_split,
)


def parse_args() -> argparse.Namespace:
    """Command-line options: the model, how many questions, how long to train, where to write."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, hub id, folder or .gguf")
    parser.add_argument("--data", default="builtin:demo", help="question set (file, dataset or builtin:demo)")
    parser.add_argument("--limit", type=int, default=32, help="use only the first N questions")
    parser.add_argument("--scoring", default="loglik", help="letter, loglik or loglik-norm")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("runs/example"))
    return parser.parse_args()


def make_mask(args: argparse.Namespace) -> tuple[Path, Path]:
    """Split the questions, profile a mask on the split and save both; returns (split folder, mask file)."""
    loaded = load_model(args.model)
    questions = load_questions(args.data, limit=args.limit)
    split = split_questions(loaded, questions, scoring=args.scoring, holdout_fraction=0.25, show_progress=False)
    split_dir = write_split(split, args.out / "split", overwrite=True)
    print(f"split: {len(split.mastered)} mastered, {len(split.heldout)} held out, {len(split.inject)} to inject")
    mask = profile(loaded, split.mastered, split.inject, scoring=args.scoring, task="example", show_progress=False)
    mask_path = mask.save(args.out / "mask.safetensors")
    print(f"mask {mask.id[:12]}: {mask.collaborative_share():.1%} of entries collaborative")
    return split_dir, mask_path


def train(args: argparse.Namespace, split_dir: Path, mask_path: Path) -> None:
    """Train with the mask and with plain fine-tuning on the same data, and print the outcome of each."""
    heldout = split_dir / "mastered_heldout.jsonl"
    for name, method in (("cpl", {"mask": str(mask_path)}), ("full", {"mode": "full"})):
        request = RunRequest(
            inject=str(split_dir / "inject.jsonl"),
            mastered=str(split_dir / "mastered.jsonl"),
            heldout=str(heldout) if heldout.exists() else None,
            out=str(args.out / name),
            model=args.model,
            scoring=args.scoring,
            config=TrainConfig(epochs=args.epochs, lr=args.lr, show_progress=False),
            **method,
        )
        run = start_run(request, overwrite=True)
        final, totals = run.final, run.final["totals"]
        print(
            f"{name}: learned {final['learned']}/{totals['inject_wrong']}, "
            f"forgotten {final['forgotten']}/{totals['mastered_right']}, "
            f"held-out forgotten {final['heldout_forgotten']}/{totals.get('heldout_right', 0)}"
        )


def main() -> None:
    """Profile, then train."""
    args = parse_args()
    split_dir, mask_path = make_mask(args)
    train(args, split_dir, mask_path)


if __name__ == "__main__":
    main()
