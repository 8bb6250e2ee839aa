"""Training benchmark on SmolLM2-135M-Instruct: static mask vs full vs dynamic, same data and steps.

Measures, in one run (each memory figure in its own subprocess):

1. step time of static-mask SGD against full SGD (goal: ≤ 1.05×);
2. peak memory of static-mask against dynamic training (goal: static saves ≥ 3.5 bytes/parameter);
3. optimizer-state bytes of masked AdamW against plain AdamW (goal: shrinks with the collaborative share);
4. one epoch of dynamic mode (batched g_M and evaluation) against the paper's per-example loop
   (batch-1 g_M and evaluation): goal ≥ 3× faster, same learned/forgotten counts for the same seed.

Usage: .venv/bin/python experiments/speed/train_bench.py [--inject 4] [--mastered 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from cpl_masks import MethodContext, TrainConfig, load_model, load_questions, make_method, make_scorer, profile
from cpl_masks.evaluation.outcomes import epoch_metrics, evaluate_sets
from cpl_masks.methods.masking import DynamicCPL
from cpl_masks.training.loop import TrainingLoop, optimizer_state_bytes

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "arc_challenge.jsonl"
MASK_FILE = Path("/tmp/cpl-train-bench-mask.safetensors")


def questions(args: argparse.Namespace) -> tuple[list, list]:
    """The shortest questions of ARC-Challenge: the first ones as I, the next ones as M."""
    rows = sorted(load_questions(DATA), key=lambda q: len(q.question) + sum(map(len, q.choices)))
    return rows[: args.inject], rows[args.inject : args.inject + args.mastered]


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so loading the model does not hide training's peak."""
    Path("/proc/self/clear_refs").write_text("5")


def rss() -> int:
    """Peak resident set size since the last reset, in bytes (Linux VmHWM)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) * 1024


def method_for(name: str, scorer, mastered, g_m_batch: int = 1):
    from cpl_masks import Mask

    mask = Mask.load(MASK_FILE, scores=False) if name == "mask" else None
    return make_method(name, MethodContext(scorer, mastered, mask, batch_size=g_m_batch))


def step_time(args, method: str) -> float:
    """Seconds per SGD step (batch 1) after one warm-up step."""
    loaded = load_model("smollm2-135m-instruct", device="cpu")
    inject, mastered = questions(args)
    scorer = make_scorer("letter", loaded.tokenizer)
    trainer = TrainingLoop(
        loaded.model, scorer, method_for(method, scorer, mastered), TrainConfig(lr=1e-4, show_progress=False)
    )
    trainer.train_epoch(inject[:1], 1)
    started = time.perf_counter()
    trainer.train_epoch(inject, 2)
    return (time.perf_counter() - started) / len(inject)


def memory_part(args, method: str, optimizer: str) -> dict:
    """Peak RSS of one epoch (run in a fresh process), and the RSS right after loading."""
    loaded = load_model("smollm2-135m-instruct", device="cpu")
    inject, mastered = questions(args)
    scorer = make_scorer("letter", loaded.tokenizer)
    reset_peak_rss()
    loaded_rss = rss()
    config = TrainConfig(lr=1e-4, optimizer=optimizer, show_progress=False)
    trainer = TrainingLoop(loaded.model, scorer, method_for(method, scorer, mastered), config)
    trainer.train_epoch(inject, 1)
    return {
        "peak_rss": rss(),
        "loaded_rss": loaded_rss,
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "trainable_entries": trainer.trainable_entries,
    }


def dynamic_epoch(args, per_example: bool) -> dict:
    """One dynamic epoch with evaluation before and after; batch 1 everywhere for the paper's loop."""
    loaded = load_model("smollm2-135m-instruct", device="cpu")
    inject, mastered = questions(args)
    scorer = make_scorer("letter", loaded.tokenizer)
    batch = 1 if per_example else 16
    sets = {"inject": inject, "mastered": mastered}
    started = time.perf_counter()
    baseline = evaluate_sets(loaded.model, scorer, sets, batch_size=batch, show_progress=False)
    method = DynamicCPL(MethodContext(scorer, mastered, batch_size=batch))
    trainer = TrainingLoop(loaded.model, scorer, method, TrainConfig(lr=args.lr, seed=0, show_progress=False))
    trainer.train_epoch(inject, 1)
    after = evaluate_sets(loaded.model, scorer, sets, batch_size=batch, show_progress=False)
    row = epoch_metrics(1, baseline, after)
    return {"seconds": time.perf_counter() - started, "learned": row["learned"], "forgotten": row["forgotten"]}


def in_subprocess(part: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--part", part, "--inject", str(args.inject), "--mastered", str(args.mastered)]
    command += ["--lr", str(args.lr)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_part(part: str, args: argparse.Namespace) -> dict:
    kind, _, detail = part.partition(":")
    if kind == "step":
        return {"seconds": step_time(args, detail)}
    if kind == "memory":
        method, optimizer = detail.split(",")
        return memory_part(args, method, optimizer)
    return dynamic_epoch(args, per_example=detail == "paper")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inject", type=int, default=4)
    parser.add_argument("--mastered", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--part")
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args.part, args)))
        return
    if not DATA.is_file():
        sys.exit(f"skipped: {DATA} is missing")
    inject, mastered = questions(args)
    loaded = load_model("smollm2-135m-instruct", device="cpu")
    mask = profile(loaded, mastered, inject, show_progress=False)
    mask.save(MASK_FILE)
    share = mask.collaborative_share()
    del loaded
    results = {"collaborative_share": share, "threads": torch.get_num_threads()}
    for method in ("full", "mask"):
        results[f"step_{method}"] = in_subprocess(f"step:{method}", args)["seconds"]
    for method, optimizer in (("mask", "sgd"), ("dynamic", "sgd"), ("full", "adamw"), ("mask", "adamw")):
        results[f"memory_{method}_{optimizer}"] = in_subprocess(f"memory:{method},{optimizer}", args)
    for loop in ("batched", "paper"):
        results[f"dynamic_{loop}"] = in_subprocess(f"dynamic:{loop}", args)
    static, dynamic = results["memory_mask_sgd"], results["memory_dynamic_sgd"]
    adam_full, adam_mask = results["memory_full_adamw"], results["memory_mask_adamw"]
    summary = {
        "step_time_ratio_mask_over_full": results["step_mask"] / results["step_full"],
        "static_saves_bytes_per_param": (dynamic["peak_rss"] - static["peak_rss"]) / static["params"],
        "static_saves_bytes_per_param_above_loaded": (
            (dynamic["peak_rss"] - dynamic["loaded_rss"]) - (static["peak_rss"] - static["loaded_rss"])
        )
        / static["params"],
        "adamw_state_ratio_mask_over_plain": adam_mask["optimizer_state_bytes"] / adam_full["optimizer_state_bytes"],
        "dynamic_speedup_over_paper_loop": results["dynamic_paper"]["seconds"] / results["dynamic_batched"]["seconds"],
        "same_counts": (results["dynamic_paper"]["learned"], results["dynamic_paper"]["forgotten"])
        == (results["dynamic_batched"]["learned"], results["dynamic_batched"]["forgotten"]),
    }
    print(json.dumps({"results": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
