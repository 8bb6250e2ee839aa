"""A plain transformers ``Trainer`` script that trains only a mask's collaborative entries.

The two lines marked ``# CPL`` are all a ``Trainer`` (or TRL ``SFTTrainer``) script needs: gradients
of frozen entries are masked before clipping, and no optimizer step (weight decay included) moves
a frozen entry. Without ``--mask`` the script first profiles a small mask on the built-in demo
questions, so it runs as it is:

    .venv/bin/python examples/trainer_integration.py --limit 32 --epochs 1 --out runs/trainer
    .venv/bin/python examples/trainer_integration.py --mask owner/name   # a Hub repo, registry name or file
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from cpl_masks import DEFAULT_MODEL, LoadedModel, Mask, Question, load_model, load_questions, profile, split_questions


def parse_args() -> argparse.Namespace:
    """Command-line options: model, mask, data size, training length, output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, hub id, folder or .gguf")
    parser.add_argument("--mask", default=None, help="mask file, registry name or Hub repo (default: profile one)")
    parser.add_argument("--data", default="builtin:demo", help="question set (file, dataset or builtin:demo)")
    parser.add_argument("--limit", type=int, default=32, help="use only the first N questions")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, default=Path("runs/trainer"))
    return parser.parse_args()


def profiled_mask(loaded: LoadedModel, questions: list[Question], out: Path) -> tuple[str, list[Question]]:
    """Profile a mask on the questions (no ``--mask`` given); returns its file and the questions to inject."""
    split = split_questions(loaded, questions, scoring="loglik", show_progress=False)
    mask = profile(loaded, split.mastered, split.inject, scoring="loglik", task="trainer-example", show_progress=False)
    return str(mask.save(out / "mask.safetensors")), split.inject


def text_dataset(tokenizer: Any, questions: list[Question]) -> list[dict[str, torch.Tensor]]:
    """Each question with its right answer as one causal-LM training text, tokenized."""
    texts = [f"Question: {q.question}\nAnswer: {q.choices[q.answer]}{tokenizer.eos_token}" for q in questions]
    return [{"input_ids": torch.tensor(tokenizer(text)["input_ids"])} for text in texts]


def main() -> None:
    """Build an ordinary Trainer, add the two CPL lines, train, and check that frozen entries held."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)  # any AutoModelForCausalLM works; this also reads built-in names and GGUF
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "right"
    questions = load_questions(args.data, limit=args.limit)
    mask_ref = args.mask
    if mask_ref is None:
        mask_ref, questions = profiled_mask(loaded, questions, args.out)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(args.out / "trainer"),
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=args.lr,
            weight_decay=0.01,
            max_grad_norm=1.0,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
        ),
        train_dataset=text_dataset(tokenizer, questions),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )

    mask = Mask.from_ref(mask_ref)  # CPL
    mask.apply(trainer)  # CPL

    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer.train()
    report(mask, model, before)


def report(mask: Mask, model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Print how many collaborative and frozen entries changed (frozen: always 0)."""
    changed = {"collaborative": 0, "frozen": 0}
    for name, parameter in model.named_parameters():
        moved = parameter.detach().cpu() != before[name].cpu()  # bool, parameter shape
        collaborative = mask.collaborative(name)
        changed["collaborative"] += int((moved & collaborative).sum())
        changed["frozen"] += int((moved & ~collaborative).sum())
    print(
        f"mask {mask.id[:12]}: changed {changed['collaborative']} collaborative and {changed['frozen']} frozen entries"
    )


if __name__ == "__main__":
    main()
