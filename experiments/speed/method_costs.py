"""What each training method costs at 0.25B to 2B parameters: peak memory above the loaded model, seconds a step.

A Llama-architecture model of the given size is built from its config with random weights (no download;
SmolLM2's tokenizer and vocabulary), then trained for a few steps through the tool's own training loop,
each (size, dtype, variant) in a fresh process. Measured per variant:

* **peak**: the kernel's peak resident set (VmHWM) over the steps after the first, minus the resident set
  of the loaded model (the first step creates the optimizer state, which the later steps hold; the
  per-step rule refreshes g_M before the first step, and inside the window only with ``refresh_every`` 1);
* **seconds a step**: mean wall time of those steps, at batch 1 and a fixed question length.

Variants: full AdamW; masked AdamW at kept shares 0.25 / 0.5 / 0.75 (random masks of that share in every
tensor, which cost what a profiled mask of that share costs); SGD, full and under a static mask (share 0.5);
the per-step rule (SGD, packed signs) without and with a refresh in the window; LoRA r 8 and r 16 (AdamW).
Each figure is also given as a ratio to full AdamW of the same size and dtype, measured in the same run.

Usage:
    .venv/bin/python experiments/speed/method_costs.py --sizes 0.25,0.5,1 --dtypes float32,bfloat16 \\
        --out experiments/results/method-costs
Records: OUT/<size>-<dtype>-<variant>.json (resumable: a finished record is not measured again);
``--table`` prints the table and the fitted lines from the records.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpl_masks import Mask, MethodContext, Question, TrainConfig, make_method, make_scorer
from cpl_masks.models import pretrained_folder
from cpl_masks.training.loop import TrainingLoop

# Llama shapes by size: hidden, MLP width, layers, attention heads, key/value heads (SmolLM2's vocabulary)
SIZES = {
    "0.25": (1024, 2816, 16, 16, 4),
    "0.5": (1536, 4096, 16, 24, 4),
    "1": (2048, 5632, 22, 32, 4),
    "2": (2560, 6912, 24, 32, 4),
}


@dataclass(frozen=True)
class Variant:
    """One way to train: a method of the tool's table, its optimizer and options, a kept share for masks."""

    method: str
    optimizer: str
    share: float | None = None  # kept (trainable) share of a random mask
    options: tuple[tuple[str, Any], ...] = ()


VARIANTS = {
    "adamw-full": Variant("full", "adamw"),
    "adamw-mask-0.25": Variant("mask", "adamw", 0.25),
    "adamw-mask-0.5": Variant("mask", "adamw", 0.5),
    "adamw-mask-0.75": Variant("mask", "adamw", 0.75),
    "sgd-full": Variant("full", "sgd"),
    "sgd-mask-0.5": Variant("mask", "sgd", 0.5),
    "per-step": Variant("dynamic", "sgd"),
    "per-step-refresh": Variant("dynamic", "sgd", options=(("refresh_every", 1),)),
    "lora-r8": Variant("lora", "adamw", options=(("lora_rank", 8),)),
    "lora-r16": Variant("lora", "adamw", options=(("lora_rank", 16), ("lora_alpha", 32))),
}
FREE_GIB = 22  # what a 24 GB machine has free for a run
WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from")


def rss(field: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its peak since the last reset (``VmHWM``), in bytes."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith(field)).split()[1]) * 1024


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark, so what came before does not hide the window's peak."""
    Path("/proc/self/clear_refs").write_text("5")


def build_model(size: str, dtype: torch.dtype, vocab: int) -> torch.nn.Module:
    """A randomly initialised Llama of ``size``, its weights created in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, layers, heads, kv_heads = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def questions(count: int, words: int, prefix: str) -> list[Question]:
    """``count`` questions of about ``words`` words each, four choices, deterministic."""
    rows = []
    for index in range(count):
        text = " ".join(WORDS[(index * 7 + position) % len(WORDS)] for position in range(words))
        choices = tuple(f"{WORDS[(index + choice) % len(WORDS)]} {choice}" for choice in range(4))
        rows.append(Question(id=f"{prefix}{index}", question=text + "?", choices=choices, answer=index % 4))
    return rows


def random_mask(model: torch.nn.Module, share: float) -> Mask:
    """A mask keeping ``share`` of every tensor's entries, at random positions."""
    generator = torch.Generator().manual_seed(1)
    bits = {name: torch.rand(p.shape, generator=generator) < share for name, p in model.named_parameters()}
    return Mask.from_bool(bits, {"task": f"random-{share}"})


def measure(size: str, dtype_name: str, variant_name: str, steps: int, words: int) -> dict[str, Any]:
    """One variant in this process: build, train ``steps`` steps, and report the window's peak and time."""
    from transformers import AutoTokenizer

    variant = VARIANTS[variant_name]
    tokenizer = AutoTokenizer.from_pretrained(pretrained_folder("smollm2-135m-instruct"))
    model = build_model(size, getattr(torch, dtype_name), len(tokenizer))
    parameters = sum(p.numel() for p in model.parameters())
    mask = random_mask(model, variant.share) if variant.share is not None else None
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what building freed, so it cannot hide the peak
    loaded = rss()
    scorer = make_scorer("letter", tokenizer)
    context = MethodContext(scorer, questions(4, words, "m"), mask, batch_size=1)
    method = make_method(variant.method, context, dict(variant.options))
    config = TrainConfig(lr=1e-5, optimizer=variant.optimizer, show_progress=False)
    loop = TrainingLoop(model, scorer, method, config)
    window: dict[str, float] = {}

    def after_first_step(*_: Any) -> None:  # the window opens once the first step made the state
        if not window:
            reset_peak()
            window["start"] = time.perf_counter()

    loop.optimizer.register_step_post_hook(after_first_step)
    loop.train_epoch(questions(steps, words, "i"), 1)  # one epoch: a refresh in the window only if asked
    seconds = (time.perf_counter() - window["start"]) / (steps - 1)
    return {
        "size": size,
        "dtype": dtype_name,
        "variant": variant_name,
        "parameters": parameters,
        "loaded_rss": loaded,
        "peak_above_loaded": rss("VmHWM") - loaded,
        "seconds_per_step": seconds,
        "steps": steps,
        "words": words,
        "threads": torch.get_num_threads(),
    }


def run_all(args: argparse.Namespace) -> None:
    """Every (size, dtype, variant) in its own process, skipping finished records."""
    args.out.mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            for variant in args.variants.split(","):
                record = args.out / f"{size}-{dtype}-{variant}.json"
                if record.is_file():
                    continue
                command = [sys.executable, __file__, "--one", size, dtype, variant, "--steps", str(args.steps)]
                command += ["--words", str(args.words), "--threads", str(args.threads)]
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(f"{record.name}: failed\n{done.stderr[-2000:]}", flush=True)
                    continue
                record.write_text(done.stdout)
                row = json.loads(done.stdout)
                print(
                    f"{record.stem}: {row['peak_above_loaded'] / 2**30:.2f} GiB above {row['loaded_rss'] / 2**30:.2f}"
                    f" GiB loaded, {row['seconds_per_step']:.2f} s a step ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Every finished record in ``folder``."""
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def fitted(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Least-squares line of peak bytes against parameters: (bytes per parameter, constant bytes)."""
    xs = [row["parameters"] for row in rows]
    ys = [row["peak_above_loaded"] for row in rows]
    if len(rows) < 2:
        return ys[0] / xs[0], 0.0
    slope, intercept = statistics.linear_regression(xs, ys)
    return slope, intercept


def print_fit(folder: Path) -> None:
    """The fitted lines as ``cpl_masks.training.costs.MEASURED`` holds them."""
    rows = read_records(folder)
    print("MEASURED: dict[tuple[str, str], Line] = {")
    for dtype in sorted({row["dtype"] for row in rows}):
        for variant in VARIANTS:
            group = [row for row in rows if row["dtype"] == dtype and row["variant"] == variant]
            if group:
                slope, constant = fitted(group)
                print(f'    ("{dtype}", "{variant}"): Line({slope:.3f}, {constant:.4g}),')
    print("}")


def print_table(folder: Path) -> None:
    """The Markdown table of every record, with ratios to full AdamW, and the fitted lines."""
    rows = read_records(folder)
    base = {(r["size"], r["dtype"]): r for r in rows if r["variant"] == "adamw-full"}
    print("| size | dtype | variant | B/param above loaded | × AdamW | s/step | × AdamW |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for row in sorted(rows, key=lambda r: (float(r["size"]), r["dtype"], list(VARIANTS).index(r["variant"]))):
        reference = base.get((row["size"], row["dtype"]))
        per_param = row["peak_above_loaded"] / row["parameters"]
        memory = f"{row['peak_above_loaded'] / reference['peak_above_loaded']:.2f}" if reference else "-"
        speed = f"{row['seconds_per_step'] / reference['seconds_per_step']:.2f}" if reference else "-"
        print(
            f"| {row['parameters'] / 1e9:.2f}B | {row['dtype']} | {row['variant']} | {per_param:.2f} | {memory} | "
            f"{row['seconds_per_step']:.2f} | {speed} |"
        )
    print(
        "\n| dtype | variant | fitted B/param above weights | constant (GiB) | 7B: weights + method (GiB) "
        f"| 8B (GiB) | largest in {FREE_GIB} GiB |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for dtype in sorted({row["dtype"] for row in rows}):
        weight = 2 if dtype == "bfloat16" else 4
        for variant in VARIANTS:
            group = [row for row in rows if row["dtype"] == dtype and row["variant"] == variant]
            if not group:
                continue
            slope, constant = fitted(group)
            at = {size: ((slope + weight) * size * 1e9 + constant) / 2**30 for size in (7, 8)}
            largest = (FREE_GIB * 2**30 - constant) / (slope + weight) / 1e9
            print(
                f"| {dtype} | {variant} | {slope:.2f} | {constant / 2**30:.2f} | {at[7]:.0f} | {at[8]:.0f} "
                f"| {largest:.2f}B |"
            )


def main() -> None:
    """Measure (``--out``), one variant in this process (``--one``), or print the table (``--table``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/method-costs"))
    parser.add_argument("--sizes", default="0.25,0.5,1")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=4, help="Steps a variant trains (the first is not timed).")
    parser.add_argument(
        "--words", type=int, default=40, help="Words of a question (40: a prompt of 115 tokens with its choices)."
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("SIZE", "DTYPE", "VARIANT"))
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--fit", action="store_true", help="Print the fitted lines for cpl_masks.training.costs.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(*args.one, steps=args.steps, words=args.words)))
    elif args.table:
        print_table(args.out)
    elif args.fit:
        print_fit(args.out)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
