"""A TRL ``SFTTrainer`` script that learns new chat facts while a retain set keeps what the model knows.

An ordinary SFT script (a conversational dataset, an ``SFTConfig``, ``trainer.train()``) plus the two
lines marked ``# cpl-masks``: the retain set hooks every gradient, so each step keeps only the entries
that agree in sign with g_M (the gradient of the retained items' loss), and the Trainer measures g_M
again from those items at each epoch's start and every ``--refresh-every`` optimizer steps.

Without ``--data`` it trains on the invented facts of ``builtin:demo-chat``; without ``--retain`` it
first profiles a retain set on that set's general facts which the model gets right, so it runs as it is:

    .venv/bin/python examples/sft_trainer_retain.py --max-steps 10 --out runs/sft
    .venv/bin/python examples/sft_trainer_retain.py --data chats.jsonl --retain smollm2-135m-instruct/general.retain

``--data`` is a JSONL file of TRL rows (``{"messages": [...]}`` or ``{"prompt": ..., "completion": ...}``).
A retain set of multiple-choice questions steers free-form training as well; the recommended one is
profiled with ``--objective choices``:

    cpl-masks profile --kind retain --objective choices --mastered keep.jsonl --scoring loglik --name general
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpl_masks import DEFAULT_MODEL, LoadedModel, Mask, SignRuleHandle, load_model, load_questions, profile_retain
from cpl_masks.data.demo import chat_rows
from cpl_masks.scoring.scorers import Scores, make_scorer, score_questions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: model, data, retain set, training length, output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, hub id, folder or .gguf")
    parser.add_argument("--data", default=None, help="JSONL of TRL chat rows (default: builtin:demo-chat's invented)")
    parser.add_argument("--limit", type=int, default=32, help="train on the first N rows")
    parser.add_argument("--retain", default=None, help="retain set: file, registry name or Hub repo (default: profile)")
    parser.add_argument("--retain-limit", type=int, default=48, help="general facts to profile a retain set on")
    parser.add_argument("--refresh-every", type=int, default=30, help="re-measure g_M every K steps (0: never)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--optim", default="adamw_torch", help="a Trainer optimizer name; the paper's rule: sgd")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--out", type=Path, default=Path("runs/sft-retain"))
    return parser.parse_args(argv)


def chat_dataset(data: str | None, limit: int) -> Any:
    """The training rows as a ``datasets.Dataset``: a user's JSONL, or the demo's invented facts as chats."""
    from datasets import Dataset, load_dataset

    if data is not None:
        dataset = load_dataset("json", data_files=data, split="train")
        return dataset.select(range(min(limit, len(dataset))))
    rows = [row for row in chat_rows() if row["id"].startswith("invented-")][:limit]
    return Dataset.from_list([{"prompt": row["prompt"], "completion": row["completion"]} for row in rows])


def profiled_retain_set(loaded: LoadedModel, limit: int, out: Path) -> str:
    """Profile a retain set on builtin:demo-chat's general facts the model gets right; returns its file."""
    items = [item for item in load_questions("builtin:demo-chat") if item.id.startswith("general-")][:limit]
    scores = score_questions(loaded.model, make_scorer("letter", loaded.tokenizer), items, show_progress=False)
    known = [item for item, right in zip(items, scores.correct) if right] or items  # a random model knows none
    retain = profile_retain(loaded, known, task="general-chat", show_progress=False)
    return str(retain.save(out / "general.retain.safetensors"))


def retain_scores(handle: SignRuleHandle) -> Scores:
    """How the model does on the retain set's own items (right, and their loss), in eval mode."""
    training = handle.model.training
    handle.model.eval()
    scores = score_questions(handle.model, handle.scorer, handle.questions, show_progress=False)
    handle.model.train(training)
    return scores


@dataclass
class Result:
    """What :func:`main` ran: the trainer, the retain set's handle, its items' scores before and after."""

    trainer: Any  # trl.SFTTrainer
    handle: SignRuleHandle
    before: Scores
    after: Scores


def main(argv: list[str] | None = None) -> Result:
    """Build an ordinary SFTTrainer, add the two cpl-masks lines, train, and report on the retained items."""
    from trl import SFTConfig, SFTTrainer

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, threads=args.threads)  # any AutoModelForCausalLM and its tokenizer will do
    retain_ref = args.retain or profiled_retain_set(loaded, args.retain_limit, args.out)
    config = SFTConfig(
        output_dir=str(args.out / "sft"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        optim=args.optim,
        bf16=False,  # fp32, as the retain set was measured
        logging_steps=1,
        save_strategy="no",
        report_to=[],
    )
    trainer = SFTTrainer(
        model=loaded.model,
        args=config,
        train_dataset=chat_dataset(args.data, args.limit),
        processing_class=loaded.tokenizer,
    )

    retain = Mask.from_ref(retain_ref)  # cpl-masks: a retain set (file, registry name or Hub repo)
    handle = retain.apply(trainer, refresh_every=args.refresh_every)  # cpl-masks: steer every step by it

    before = retain_scores(handle)
    trainer.train()
    after = retain_scores(handle)
    print(
        f"retain set {retain.id[:12]} ({len(handle.questions)} items, {handle.measure.describe()}): "
        f"right {sum(before.correct)} -> {sum(after.correct)}, mean loss {mean(before.losses):.3f} -> "
        f"{mean(after.losses):.3f}; {trainer.state.global_step} steps, g_M measured again {handle.refreshes} times"
    )
    return Result(trainer, handle, before, after)


def mean(values: list[float]) -> float:
    """The mean of a non-empty list."""
    return sum(values) / len(values)


if __name__ == "__main__":
    main()
