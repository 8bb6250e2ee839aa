"""Benchmark: our ``loglik`` scoring against lm-evaluation-harness on the same questions (issue 17).

Needs the ``bench`` extra (``pip install -e '.[bench]'``, i.e. lm-eval). Writes the questions and an
lm-eval task to a temporary folder (nothing is downloaded: the task reads a local JSONL through
``datasets``' ``json`` builder, ``HF_DATASETS_OFFLINE=1``/``HF_HUB_OFFLINE=1``) with the prompt our
scorer uses: context ``Question: ...\\nAnswer:``, continuations `` choice``. Our scorer starts every
sequence with the tokenizer's BOS token; lm-eval's HF backend adds none for a tokenizer whose
encoding does not, so the task's prompt starts with the BOS token's text, which encodes to that id
(checked). lm-eval's HF backend loads the same local model folder.

Runs ours (shared path), lm-eval and ours again (and with ``--with-before`` the per-choice path
once), all in one process on the same threads, and prints (``--json`` writes) throughput, accuracy,
the largest per-choice log-likelihood gap and each question whose prediction differs, with why.

    .venv/bin/python experiments/speed/lm_eval_agreement.py --set csqa:200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from cpl_masks import DEFAULT_MODEL, load_model, score_questions
from cpl_masks.models import pretrained_folder
from cpl_masks.scoring.scorers import LoglikScorer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring_bench import Recorder, before, read_set

TASK = """task: cpl_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
"""


def write_task(folder: Path, questions, scorer: LoglikScorer, bos_text: str) -> None:
    rows = [
        {"id": q.id, "prompt": bos_text + scorer.context_text(q), "choices": list(q.choices), "label": q.answer}
        for q in questions
    ]
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    (folder / "cpl_local_mc.yaml").write_text(TASK.format(data=json.dumps(str(data))))


def run_lm_eval(folder: Path, model_folder: str, batch_size: int) -> tuple[float, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model_folder, device="cpu", dtype="float32", batch_size=batch_size)
    start = time.perf_counter()
    results = simple_evaluate(
        model=lm,
        tasks=["cpl_local_mc"],
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
        num_fewshot=0,
    )
    return time.perf_counter() - start, results


def encode(tokenizer, text: str) -> list[int]:
    """A text's token ids as our scorer encodes it: no special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_ids(tokenizer) -> list[int]:
    """The BOS token our scorer starts a plain (non-chat) prompt with, where the tokenizer has one."""
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def why(question, scorer: LoglikScorer, ours: list[float], theirs: list[float]) -> str:
    """A differing prediction's cause: the context/continuation split, or a near-tie within rounding."""
    bos = bos_ids(scorer.tokenizer)
    context = bos + encode(scorer.tokenizer, scorer.context_text(question))
    for choice, text in enumerate(question.choices):
        whole = bos + encode(scorer.tokenizer, f"{scorer.context_text(question)} {text}")
        if whole[: len(context)] != context:
            return f"choice {choice}'s first token merges with the context's last: the split differs"
    top = sorted(ours, reverse=True)
    gap = max(abs(a - b) for a, b in zip(ours, theirs))
    return f"near-tie: our top two differ by {top[0] - top[1]:.2g}, the scores by at most {gap:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--set", default="csqa:200")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--with-before", action="store_true", help="also time the per-choice path once")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name, questions = read_set(args.set)
    loaded = load_model(args.model, device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    probe = LoglikScorer(tokenizer, normalize=False)
    bos_text = tokenizer.bos_token or ""
    assert encode(tokenizer, bos_text + "Question:") == bos_ids(tokenizer) + encode(tokenizer, "Question:"), (
        "the BOS text does not encode to the BOS id"
    )

    def ours() -> tuple[float, dict[str, list[float]]]:
        recorder = Recorder(LoglikScorer(tokenizer, normalize=False))
        start = time.perf_counter()
        score_questions(model, recorder, questions, batch_size=args.batch_size, show_progress=False)
        return time.perf_counter() - start, recorder.tables

    seconds: dict[str, list[float]] = {"ours (shared)": [], "lm-eval": []}
    elapsed, tables = ours()
    seconds["ours (shared)"].append(elapsed)
    with tempfile.TemporaryDirectory() as folder:
        write_task(Path(folder), questions, probe, bos_text)
        elapsed, results = run_lm_eval(Path(folder), str(pretrained_folder(args.model)), args.batch_size)
    seconds["lm-eval"].append(elapsed)
    elapsed, _ = ours()
    seconds["ours (shared)"].append(elapsed)
    if args.with_before:
        start = time.perf_counter()
        before(model, tokenizer, questions, args.batch_size)
        seconds["ours (per-choice, before)"] = [time.perf_counter() - start]

    samples = sorted(results["samples"]["cpl_local_mc"], key=lambda sample: sample["doc_id"])
    differing, gap = [], 0.0
    for question, sample in zip(questions, samples, strict=True):
        assert sample["doc"]["id"] == question.id
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
        mine = tables[question.id]
        gap = max(gap, *(abs(a - b) for a, b in zip(mine, theirs, strict=True)))
        if max(range(len(mine)), key=mine.__getitem__) != max(range(len(theirs)), key=theirs.__getitem__):
            differing.append({"id": question.id, "why": why(question, probe, mine, theirs)})
    ours_acc = sum(max(range(len(q.choices)), key=tables[q.id].__getitem__) == q.answer for q in questions)
    report = {
        "set": name,
        "questions": len(questions),
        "model": args.model,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "lm_eval_version": __import__("lm_eval").__version__,
        "seconds": seconds,
        "questions_per_second": {key: len(questions) / statistics.median(v) for key, v in seconds.items()},
        "accuracy": {"ours": ours_acc / len(questions), "lm-eval": results["results"]["cpl_local_mc"]["acc,none"]},
        "max_choice_loglik_gap": gap,
        "differing_predictions": differing,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
