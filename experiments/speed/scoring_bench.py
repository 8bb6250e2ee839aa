"""Benchmark: loglik scoring with the shared context against the per-choice path it replaced (issue 17).

For each question set, scores the same questions with ``before`` (one sequence per (question,
choice) pair, batches in input order: the scoring as it was) and ``after`` (one packed sequence per
question, batches ordered by length: :func:`cpl_masks.scoring.scorers.score_questions` today), repetitions
interleaved and their order alternated so a busy machine slows both alike. Each repetition uses
fresh scorers, so both pay their tokenization. Prints, and writes with ``--json``, questions per
second (median over repetitions), the speed-up, and the agreement: the largest difference between
the two paths' scores of any choice, and the number of differing predictions.

    .venv/bin/python experiments/speed/scoring_bench.py --sets mmlu:32 csqa:64 builtin:demo:64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from cpl_masks import DEFAULT_MODEL, Question, load_model, load_questions, score_questions
from cpl_masks.data.questions import BUILTIN_DEMO
from cpl_masks.scoring.scorers import LoglikScorer, batches

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def read_set(spec: str) -> tuple[str, list[Question]]:
    """``NAME:COUNT`` (a file in ../shared/data, or ``builtin:demo``), its first COUNT questions."""
    name, _, count = spec.rpartition(":")
    source = BUILTIN_DEMO if name == BUILTIN_DEMO else str(DATA / f"{name}.jsonl")
    return name, load_questions(source, limit=int(count))


class Recorder:
    """A scorer that keeps every batch's choice table, keyed by question id, for the agreement check."""

    def __init__(self, scorer: LoglikScorer) -> None:
        self.scorer = scorer
        self.tables: dict[str, list[float]] = {}

    def batch_key(self, question: Question) -> int:
        return self.scorer.batch_key(question)

    def choice_scores(self, model, questions):
        table, losses = self.scorer.choice_scores(model, questions)  # (B, C), (B,)
        for question, row in zip(questions, table.tolist(), strict=True):
            self.tables[question.id] = row[: len(question.choices)]
        return table, losses


def before(model, tokenizer, questions: list[Question], batch_size: int) -> dict[str, list[float]]:
    """The scoring as it was: one sequence per choice, batches in input order."""
    recorder = Recorder(LoglikScorer(tokenizer, normalize=False, path="per-choice"))
    for batch in batches(questions, batch_size):
        recorder.choice_scores(model, batch)
    return recorder.tables


def after(model, tokenizer, questions: list[Question], batch_size: int) -> dict[str, list[float]]:
    """The scoring now: the shared-context path through :func:`score_questions`."""
    recorder = Recorder(LoglikScorer(tokenizer, normalize=False, path="shared"))
    score_questions(model, recorder, questions, batch_size=batch_size, show_progress=False)
    return recorder.tables


def bench_set(model, tokenizer, questions: list[Question], repeats: int, batch_size: int) -> dict:
    runs = {"before": before, "after": after}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    tables: dict[str, dict[str, list[float]]] = {}
    with warnings.catch_warnings(record=True) as caught:  # a fallback to the per-choice path says so
        warnings.simplefilter("always")
        for repeat in range(repeats):
            for name in list(runs) if repeat % 2 == 0 else list(runs)[::-1]:
                start = time.perf_counter()
                tables[name] = runs[name](model, tokenizer, questions, batch_size)
                seconds[name].append(time.perf_counter() - start)
    gap = max(abs(a - b) for q in questions for a, b in zip(tables["before"][q.id], tables["after"][q.id]))
    flips = sum(
        max(range(len(q.choices)), key=tables["before"][q.id].__getitem__)
        != max(range(len(q.choices)), key=tables["after"][q.id].__getitem__)
        for q in questions
    )
    scorer = LoglikScorer(tokenizer, normalize=False)
    qps = {name: len(questions) / statistics.median(times) for name, times in seconds.items()}
    return {
        "questions": len(questions),
        "mean_tokens_per_choice_row": statistics.mean(scorer.sequence_length(q) for q in questions),
        "mean_packed_tokens": statistics.mean(scorer.batch_key(q) for q in questions),
        "seconds": seconds,
        "questions_per_second": qps,
        "speedup": qps["after"] / qps["before"],
        "speedup_per_repeat": [b / a for a, b in zip(seconds["after"], seconds["before"], strict=True)],
        "max_choice_score_gap": gap,
        "differing_predictions": flips,
        "warnings": sorted({str(warning.message) for warning in caught}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sets", nargs="+", default=["mmlu:32", "csqa:64", f"{BUILTIN_DEMO}:64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    report = {
        "model": args.model,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sets": {},
    }
    for spec in args.sets:
        name, questions = read_set(spec)
        result = bench_set(loaded.model, loaded.tokenizer, questions, args.repeats, args.batch_size)
        report["sets"][name] = result
        qps = result["questions_per_second"]
        print(
            f"{name}: {result['questions']} questions, {result['mean_tokens_per_choice_row']:.0f} tokens a choice row;"
            f" before {qps['before']:.2f} q/s, after {qps['after']:.2f} q/s, speed-up {result['speedup']:.2f}x"
            f" (per repeat {', '.join(f'{r:.2f}' for r in result['speedup_per_repeat'])});"
            f" max choice-score gap {result['max_choice_score_gap']:.2g},"
            f" {result['differing_predictions']} predictions differ",
            *result["warnings"],
            sep="\n",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
