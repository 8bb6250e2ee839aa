"""Benchmark: the dynamic rule holding sign(g_M) in two bits per entry, against the same rule holding
g_M in float32 (the rule before issue 15) and against plain fine-tuning (issue 15, "signs in bits").

SmolLM2-135M-Instruct on the CPU, SGD batch 1, one epoch over the shortest ARC-Challenge questions
with g_M refreshed at its start; each variant in its own process (peak RSS reset after loading):

* peak resident memory above the loaded model, per parameter;
* bytes the rule holds between refreshes (g_M or its signs);
* seconds per step (without the refresh) and seconds per refresh;
* a hash of the trained weights: the two dynamic variants must train bit-identically.

``dynamic-confident`` is the rule with ``--confidence 2``: a refresh takes a pass per question of M
and holds two float32 sums per entry while it runs.

Usage: .venv/bin/python experiments/speed/signs_bench.py [--inject 8] [--mastered 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import DATA, questions, reset_peak_rss, rss

from cpl_masks import MethodContext, TrainConfig, load_model, make_method, make_scorer
from cpl_masks.methods.base import RefreshOptions
from cpl_masks.methods.masking import DynamicCPL
from cpl_masks.methods.reference import mastered_gradient
from cpl_masks.training.loop import TrainingLoop

VARIANTS = ("full", "dynamic-float", "dynamic", "dynamic-confident")
OPTIONS = {"dynamic-confident": ("dynamic", {"confidence": 2.0})}  # signs that count only where |t| > 2


class FloatDynamic(DynamicCPL):
    """The dynamic rule as it was before packed signs: g_M kept in float32, the product's sign tested."""

    def __init__(self, context: MethodContext) -> None:
        self.retain, self.keep_signs, self.refreshed = None, False, []  # no retain set: g_M over M
        self.reference = mastered_gradient(context, RefreshOptions())

    def mask_gradients(self, model: torch.nn.Module) -> None:
        g_mastered = self.reference.value
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                parameter.grad.masked_fill_(parameter.grad * g_mastered[name] < 0, 0)


def held_bytes(method) -> int:
    kept = getattr(getattr(method, "reference", None), "kept", None)
    if kept is None:
        return 0
    if isinstance(kept, dict):
        return sum(tensor.numel() * tensor.element_size() for tensor in kept.values())
    return kept.nbytes()


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m-instruct", device="cpu", threads=args.threads)
    inject, mastered = questions(args)
    scorer = make_scorer("loglik", loaded.tokenizer)
    context = MethodContext(scorer, mastered, batch_size=8)
    name, options = OPTIONS.get(variant, (variant, None))
    method = FloatDynamic(context) if variant == "dynamic-float" else make_method(name, context, options)
    refresh_seconds = []
    if hasattr(method, "reference"):
        refresh = method.reference.refresh_if_due

        def timed(model: torch.nn.Module, epoch: int, step: int) -> None:
            started = time.perf_counter()
            refresh(model, epoch, step)
            refresh_seconds.append(time.perf_counter() - started)

        method.reference.refresh_if_due = timed
    trainer = TrainingLoop(
        loaded.model, scorer, method, TrainConfig(lr=3e-5, batch_size=1, seed=0, show_progress=False)
    )
    reset_peak_rss()
    loaded_rss = rss()
    started = time.perf_counter()
    trainer.train_epoch(inject, 1)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for name, parameter in loaded.model.named_parameters():
        digest.update(name.encode() + parameter.detach().numpy().tobytes())
    return {
        "params": sum(parameter.numel() for parameter in loaded.model.parameters()),
        "peak_above_loaded": rss() - loaded_rss,
        "held_bytes": held_bytes(method),
        "step_seconds": (seconds - sum(refresh_seconds)) / len(inject),
        "refresh_seconds": sum(refresh_seconds),
        "weights_sha256": digest.hexdigest(),
    }


def in_subprocess(args: argparse.Namespace, variant: str) -> dict:
    command = [sys.executable, __file__, "--variant", variant, "--inject", str(args.inject)]
    command += ["--mastered", str(args.mastered), "--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inject", type=int, default=8)
    parser.add_argument("--mastered", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", choices=VARIANTS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args, args.variant)))
        return
    if not DATA.is_file():
        sys.exit(f"skipped: {DATA} is missing")
    results = {variant: in_subprocess(args, variant) for variant in VARIANTS}
    params = results["full"]["params"]
    print(f"{'variant':<18} {'peak above loaded B/param':>26} {'held B/param':>13} {'s/step':>7} {'refresh s':>9}")
    for variant, row in results.items():
        print(
            f"{variant:<18} {row['peak_above_loaded'] / params:>26.2f} {row['held_bytes'] / params:>13.3f} "
            f"{row['step_seconds']:>7.2f} {row['refresh_seconds']:>9.1f}"
        )
    same = results["dynamic"]["weights_sha256"] == results["dynamic-float"]["weights_sha256"]
    print(f"packed and float g_M trained bit-identically: {same}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
