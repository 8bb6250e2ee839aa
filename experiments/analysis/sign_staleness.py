"""Staleness of sign(g_M): how far the signs a retain set stores at the start still agree with g_M's signs
as training moves the weights (issue 15, "staleness").

A retain set's questions are measured at the base weights (as ``profile --kind retain`` does, for each
loss), then the model is fine-tuned plainly on an injection set (SGD batch 1, the paper's regime: the
weights move as far as any method moves them, and the rule never refreshes) and after every epoch the
signs are measured again at the trained weights and compared with the stored ones: agreement over
the entries where both have a sign, against 50 % by chance. With ``--first-epoch-steps 5,10,30`` the first
epoch is trained in chunks of its shuffled questions and measured after each of those steps as well.

Usage: .venv/bin/python experiments/analysis/sign_staleness.py --mastered RETAIN.jsonl --inject INJECT.jsonl
       [--model smollm2-135m-instruct] [--lr 3e-5] [--epochs 5] [--first-epoch-steps 5,10,30] [--threads 1]
       --out staleness.json [--plot F.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cpl_masks import MethodContext, TrainConfig, load_model, load_questions, make_method, make_scorer
from cpl_masks.masks.bits import count_set_bits
from cpl_masks.masks.signs import PackedSigns
from cpl_masks.profiling.retain import SignMeasure, measure_signs
from cpl_masks.training.loop import TrainingLoop
from cpl_masks.utils.files import write_json

OBJECTIVES = ("answer", "choices")


def agreement(first: PackedSigns, second: PackedSigns) -> dict:
    """Where both have a sign: the share with the same sign; and the share of all entries compared."""
    same = compared = entries = 0
    for name, shape in first.shapes.items():
        signed = [(first.positive[name] | first.negative[name]), (second.positive[name] | second.negative[name])]
        both = signed[0] & signed[1]
        agree = (first.positive[name] & second.positive[name]) | (first.negative[name] & second.negative[name])
        same, compared, entries = same + count_set_bits(agree), compared + count_set_bits(both), entries + shape.numel()
    return {"agreement": same / compared if compared else 1.0, "compared_share": compared / entries}


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for objective in OBJECTIVES:
        points = results["epochs"]
        axis.plot([0, *[p["epoch"] for p in points]], [1.0, *[p[objective]["agreement"] for p in points]], "o-",
                  label=f"{objective} loss")  # fmt: skip
    axis.axhline(0.5, linestyle=":", color="grey", label="chance")
    axis.set_xlabel("epochs of plain fine-tuning (SGD batch 1)")
    axis.set_ylabel("agreement with the stored signs")
    axis.set_title(f"{results['model']}: sign(g_M) of {results['questions']} questions, lr {results['lr']:g}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mastered", type=Path, required=True, help="the retain set's questions")
    parser.add_argument("--inject", type=Path, required=True, help="what the model is fine-tuned on")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--first-epoch-steps", default="", help="also measure after these steps of epoch 1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", threads=args.threads)
    scorer = make_scorer("loglik", loaded.tokenizer)
    kept, inject = load_questions(args.mastered), load_questions(args.inject)

    def signs_now() -> dict[str, PackedSigns]:
        return {name: measure_signs(loaded.model, scorer, kept, SignMeasure(name)) for name in OBJECTIVES}

    stored = signs_now()
    method = make_method("full", MethodContext(scorer, kept))
    trainer = TrainingLoop(loaded.model, scorer, method, TrainConfig(lr=args.lr, batch_size=1, show_progress=False))
    results = {"model": args.model, "questions": len(kept), "lr": args.lr, "inject": len(inject), "epochs": []}

    def record(epoch: float, loss: float, label: str) -> None:
        now = signs_now()
        row = {"epoch": epoch, "train_loss": loss, **{name: agreement(stored[name], now[name]) for name in OBJECTIVES}}
        results["epochs"].append(row)
        print(f"{label} ({time.strftime('%H:%M:%S')}): loss {loss:.3f}, "
              + ", ".join(f"{name} {row[name]['agreement']:.1%}" for name in OBJECTIVES), flush=True)  # fmt: skip
        write_json(args.out, results)  # after every measure, readable while it runs

    steps = [int(step) for step in args.first_epoch_steps.split(",") if step] + [len(inject)]
    shuffled = method.stream(inject, 1, seed=0)
    for start, stop in zip([0, *steps], steps, strict=False):  # the first epoch, in chunks
        loss = trainer.train_epoch(shuffled[start:stop], 1)
        record(stop / len(inject), loss, f"epoch 1, step {stop}")
    for epoch in range(2, args.epochs + 1):
        record(epoch, trainer.train_epoch(inject, epoch), f"epoch {epoch}")
    if args.plot:
        draw(results, args.plot)


if __name__ == "__main__":
    main()
