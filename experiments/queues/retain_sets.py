"""The question files of the retain-set experiment (``experiments/queues/sweeps.sh OUT retain``).

From the paper queue's split: ``pool-128.jsonl`` (128 questions of its CommonsenseQA forgetting pool,
drawn with seed 0), ``pool-32.jsonl`` (the first 32 of them) and ``reach.jsonl`` (the pool questions
outside ``pool-128``: where a retain set's protection is measured beyond its own questions); from the
reliability queue's MMLU split, ``mmlu-128.jsonl`` (a retain set of another distribution); and
``task-b.jsonl``, the built-in demo facts after the first 160 (a second task to inject).

Usage: python experiments/queues/retain_sets.py PAPER_SPLIT MMLU_MASTERED --out DIR
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from cpl_masks import load_questions, write_questions

DEMO_TASK_A_ROWS = 160  # the paper queue's --limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paper_split", type=Path)
    parser.add_argument("mmlu_mastered", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    demo_ids = {question.id for question in load_questions("builtin:demo")}
    pool = [q for q in load_questions(args.paper_split / "mastered_heldout.jsonl") if q.id not in demo_ids]
    drawn = random.Random(0).sample(pool, 128)
    chosen = {question.id for question in drawn}
    mmlu = load_questions(args.mmlu_mastered)
    files = {
        "pool-128": drawn,
        "pool-32": drawn[:32],
        "reach": [question for question in pool if question.id not in chosen],
        "mmlu-128": random.Random(0).sample(mmlu, 128),
        "task-b": load_questions("builtin:demo")[DEMO_TASK_A_ROWS:],
    }
    for name, questions in files.items():
        write_questions(args.out / f"{name}.jsonl", questions)
        print(f"{name}: {len(questions)} questions")


if __name__ == "__main__":
    main()
