"""Free-form injection (issue 26): the demo's invented facts taught as chat or prompt-completion pairs.

What it runs, for one model (every step skipped when its output is there, so a stopped queue resumes):

1. the inputs: the demo's general facts in the free-form format (split into mastered M and a held-out
   half: the *reach*, unseen items of M's distribution), a pool of multiple-choice questions of another
   distribution the model answers right (CommonsenseQA, from ``../shared/data``), the demo's general
   facts as multiple-choice questions the model answers right (what the MCQ retain set holds), and the
   first ``--inject`` invented facts in the free-form format (I);
2. the static CPL mask (g_M, g_I of the completion loss), a free-form retain set (signs of g_M over M) and
   a multiple-choice retain set (``--objective choices`` over the MCQ general facts);
3. per optimizer and seed: full fine-tuning (every epoch evaluated, so stopping early is a baseline),
   the static mask, the per-step rule steered by M, the two retain sets, and LoRA; each run scores
   I, M and one held-out file holding the reach, the pool and the MCQ facts (ids ``pool:`` and ``mcq-``),
   and, with ``--lm-eval-tasks``, lm-evaluation-harness tasks before and after.

Usage: .venv/bin/python experiments/queues/free_form.py OUT --model smollm2-135m-instruct --data builtin:demo-chat
       [--scoring letter] [--order adamw-s0,adamw-s1,sgd-s0,adamw-s2] [--optimizers adamw:3e-5:4,sgd:1e-3:1]
       [--methods full,mask,...] [--epochs 4] [--eval-every 2] [--inject 32] [--pool-limit 40] [--mcq-limit 40]
       [--lm-eval-tasks arc_challenge_local --lm-eval-include experiments/lm_eval_tasks] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from cpl_masks import load_questions, write_questions

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
METHODS = {  # run name -> train options after the common ones ({out}: the queue's folder)
    "full": ["--method", "full"],
    "mask": ["--mask", "{out}/mask.safetensors"],
    "dynamic": ["--method", "dynamic"],
    "retain-free": ["--retain", "{out}/retain-free.safetensors"],
    "retain-mcq": ["--retain", "{out}/retain-mcq.safetensors"],
    "lora": ["--method", "lora"],
}


def cli(*args: str) -> None:
    """Run one ``cpl-masks`` command, echoed, stopping the queue if it fails."""
    command = [str(Path(sys.executable).parent / "cpl-masks"), *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def prepare(options: argparse.Namespace, out: Path) -> None:
    """The split of the general facts, the pool, the MCQ facts, the injection set and the held-out file."""
    common = ["--model", options.model, "--threads", str(options.threads), "--scoring", options.scoring]
    items = load_questions(options.data)
    if not (out / "general.jsonl").is_file():
        write_questions(out / "general.jsonl", [item for item in items if item.id.startswith("general-")])
        write_questions(
            out / "inject.jsonl", [item for item in items if item.id.startswith("invented-")][: options.inject]
        )
    if not (out / "split" / "split.json").is_file():
        cli("split", "--data", str(out / "general.jsonl"), "--holdout-fraction", "0.5", "--heldout-data",
            str(SHARED / options.pool), "--heldout-limit", str(options.pool_limit), "--out", str(out / "split"),
            "--overwrite", *common)  # fmt: skip
    if not (out / "mcq" / "split.json").is_file():
        general = [q for q in load_questions("builtin:demo") if q.id.startswith("general-")]
        write_questions(out / "mcq-general.jsonl", [dataclasses.replace(q, id=f"mcq-{q.id}") for q in general])
        cli("split", "--data", str(out / "mcq-general.jsonl"), "--limit", "96", "--min-margin", "0.5",
            "--out", str(out / "mcq"), "--overwrite", *common)  # fmt: skip
    if not (out / "heldout.jsonl").is_file():
        mcq = load_questions(out / "mcq" / "mastered.jsonl")[: options.mcq_limit]
        write_questions(out / "mcq-retain.jsonl", mcq)
        write_questions(out / "heldout.jsonl", [*load_questions(out / "split" / "mastered_heldout.jsonl"), *mcq])


def profile(options: argparse.Namespace, out: Path) -> None:
    """The static mask and the two retain sets."""
    common = ["--model", options.model, "--threads", str(options.threads), "--scoring", options.scoring]
    split = out / "split"
    if not (out / "mask.safetensors").is_file():
        cli("profile", "--mastered", str(split / "mastered.jsonl"), "--inject", str(out / "inject.jsonl"),
            "--out", str(out / "mask.safetensors"), *common)  # fmt: skip
    if not (out / "retain-free.safetensors").is_file():
        cli("profile", "--kind", "retain", "--mastered", str(split / "mastered.jsonl"),
            "--out", str(out / "retain-free.safetensors"), *common)  # fmt: skip
    if not (out / "retain-mcq.safetensors").is_file():
        cli("profile", "--kind", "retain", "--objective", "choices", "--mastered", str(out / "mcq-retain.jsonl"),
            "--out", str(out / "retain-mcq.safetensors"), *common)  # fmt: skip


def train(options: argparse.Namespace, out: Path) -> None:
    """Every method at each (seed, optimizer) of ``--order``, in that order, so a cut-short queue has whole groups.

    Full fine-tuning is evaluated after every epoch (each epoch a point: stopping early is a baseline), the
    other methods every ``--eval-every`` epochs.
    """
    rates = dict(item.split(":", 1) for item in options.optimizers.split(","))  # optimizer -> lr:batch size
    for group in options.order.split(","):
        optimizer, seed = group.split("-s")
        lr, batch_size = rates[optimizer].split(":")
        for method in options.methods.split(","):
            extra = METHODS[method]
            run = out / "runs" / f"{method}-{optimizer}-s{seed}"
            if (run / "run.json").is_file():
                continue
            every = "1" if method == "full" else str(options.eval_every)
            lm_eval = ["--lm-eval-tasks", options.lm_eval_tasks, "--lm-eval-include", options.lm_eval_include,
                       "--lm-eval-limit", str(options.lm_eval_limit)] if options.lm_eval_tasks else []  # fmt: skip
            cli("train", *(part.format(out=out) for part in extra), "--inject", str(out / "inject.jsonl"),
                "--mastered", str(out / "split" / "mastered.jsonl"), "--heldout", str(out / "heldout.jsonl"),
                "--epochs", str(options.epochs), "--eval-every", every, "--optimizer", optimizer, "--lr", lr,
                "--batch-size", batch_size, "--seed", seed, "--model", options.model, "--scoring", options.scoring,
                "--threads", str(options.threads), *lm_eval, "--out", str(run), "--overwrite")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="builtin:demo-chat")
    parser.add_argument("--scoring", default="letter")
    parser.add_argument("--pool", default="csqa.jsonl")
    parser.add_argument("--pool-limit", type=int, default=40)
    parser.add_argument("--mcq-limit", type=int, default=40)
    parser.add_argument("--inject", type=int, default=32)
    parser.add_argument("--order", default="adamw-s0,adamw-s1,sgd-s0,adamw-s2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--optimizers", default="adamw:3e-5:4,sgd:1e-3:1")  # optimizer:lr:batch size
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--lm-eval-tasks", default=None)
    parser.add_argument("--lm-eval-include", default="experiments/lm_eval_tasks")
    parser.add_argument("--lm-eval-limit", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    os.environ["CPL_MASKS_HOME"] = str((options.out / "home").resolve())
    prepare(options, options.out)
    profile(options, options.out)
    train(options, options.out)


if __name__ == "__main__":
    main()
