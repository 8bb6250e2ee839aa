"""Benchmark: batched profiling against the straightforward one-question-at-a-time loop.

Picks ``--questions`` mastered and as many injection questions from ARC-Challenge by SmolLM2's own
letter predictions, then profiles them twice, each in its own subprocess so peak RSS is measured
separately: the library's batched :func:`cpl_masks.profiling.freeze_mask.profile` and the paper-style loop
(batch 1, one backward per question, gradients summed in ``.grad``). Prints and writes (``--json``)
the time ratio, peak-memory ratio and mask agreement.

    .venv/bin/python experiments/speed/profile_bench.py --questions 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cpl_masks import (
    DEFAULT_MODEL,
    Mask,
    diff,
    load_model,
    load_questions,
    make_scorer,
    profile,
    score_questions,
    write_questions,
)
from cpl_masks.scoring.scorers import batches

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "arc_challenge.jsonl"


def choose_sets(count: int, folder: Path) -> None:
    """Score ARC rows in chunks until ``count`` right and ``count`` wrong answers are found."""
    loaded = load_model(DEFAULT_MODEL, device="cpu")
    scorer = make_scorer("letter", loaded.tokenizer)
    right, wrong = [], []
    for chunk in batches(load_questions(DATA), 32):
        scores = score_questions(loaded.model, scorer, chunk, description="choosing questions", show_progress=False)
        for question, correct in zip(chunk, scores.correct, strict=True):
            (right if correct else wrong).append(question)
        if len(right) >= count and len(wrong) >= count:
            break
    write_questions(folder / "mastered.jsonl", right[:count])
    write_questions(folder / "inject.jsonl", wrong[:count])


def run_batched(folder: Path, batch_size: int) -> float:
    """The library's profiler; returns the profiling time in seconds."""
    loaded = load_model(DEFAULT_MODEL, device="cpu")
    mastered, inject = load_questions(folder / "mastered.jsonl"), load_questions(folder / "inject.jsonl")
    started = time.perf_counter()
    mask = profile(loaded, mastered, inject, batch_size=batch_size, show_progress=False)
    seconds = time.perf_counter() - started
    mask.save(folder / "batched.safetensors")
    return seconds


def run_loop(folder: Path) -> float:
    """The straightforward loop: one question, one backward, gradients summed in ``.grad``."""
    loaded = load_model(DEFAULT_MODEL, device="cpu")
    model, scorer = loaded.model, make_scorer("letter", loaded.tokenizer)
    mastered, inject = load_questions(folder / "mastered.jsonl"), load_questions(folder / "inject.jsonl")
    started = time.perf_counter()
    means = {}
    for key, questions in (("inject", inject), ("mastered", mastered)):
        model.zero_grad(set_to_none=True)
        for question in questions:
            scorer.loss(model, [question]).sum().backward()
        means[key] = {name: p.grad.div_(len(questions)) for name, p in model.named_parameters()}  # in place
    model.zero_grad(set_to_none=True)
    bits = {name: means["mastered"][name] * means["inject"][name] >= 0 for name in means["inject"]}
    seconds = time.perf_counter() - started
    Mask.from_bool(bits, {"model": {"ref": DEFAULT_MODEL}}).save(folder / "loop.safetensors")
    return seconds


def worker(mode: str, folder: Path, batch_size: int) -> None:
    """Run one profiler in this process and print its time and peak RSS as JSON."""
    torch.manual_seed(0)
    seconds = run_batched(folder, batch_size) if mode == "batched" else run_loop(folder)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak}))


def measure(mode: str, folder: Path, batch_size: int) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--folder", str(folder), "--batch-size", str(batch_size)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=64, help="Mastered and injection questions, each.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--worker", choices=("batched", "loop"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.folder, args.batch_size)
        return
    if not DATA.is_file():
        sys.exit(f"skipped: {DATA} is missing")
    with tempfile.TemporaryDirectory(prefix="profile-bench-") as name:
        folder = Path(name)
        choose_sets(args.questions, folder)
        batched = measure("batched", folder, args.batch_size)
        loop = measure("loop", folder, args.batch_size)
        agreement = diff(Mask.load(folder / "batched.safetensors"), Mask.load(folder / "loop.safetensors"))
    results = {
        "questions_per_set": args.questions,
        "batch_size": args.batch_size,
        "batched": batched,
        "loop": loop,
        "speedup": loop["seconds"] / batched["seconds"],
        "memory_ratio": batched["peak_rss_bytes"] / loop["peak_rss_bytes"],
        "agreement": agreement["overall"]["agreement"],
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
