"""Mask reliability: do selections made from two disjoint halves of the data agree, and how does that
grow with the number of questions? (issue 15, "the benchmark that decides": reproducibility)

A split's mastered and injection sets are shuffled (``--seed``) and cut into two disjoint halves of
up to the largest size each. Each half is profiled one question at a time (batch 1, the moments the
confidence rules need), and at every size (the first n questions of each set) these selections are
taken (``--rules``, default all):

* ``sign``: the CPL rule, frozen where ``g_M ⊙ g_I < 0``;
* ``confidence``: frozen where the t-statistic of ``g_M ⊙ g_I`` is below ``-K`` (``--confidence``);
* ``retain signs``: the sign of ``g_M`` alone (what the per-step rule steers by), compared over the
  entries where both halves' ``g_M`` is non-zero;
* ``confident retain signs``: the signs of ``g_M`` that hold with confidence (|g_M| > K standard
  errors, as ``profile --kind retain --confidence K`` keeps them), compared over the entries where
  both halves count a sign.

The retain rules take ``g_M`` of ``--retain-objective`` (``answer`` or ``choices``, as ``profile
--kind retain --objective``); the M×I rules always of the answer loss. Only the passes the chosen
rules need are run.

The halves are compared by agreement (share of entries with the same bit), by the Jaccard index of
their frozen sets, and by the share of one half's frozen entries the other also freezes, each beside
what two independent selections with the same shares reach by chance.

Usage: .venv/bin/python experiments/analysis/mask_reliability.py SPLIT_DIR [--sizes 10,20,40,80,160]
       [--confidence 2] [--rules sign,confidence,retain signs,confident retain signs] [--retain-objective answer]
       [--model smollm2-135m-instruct] [--threads 1] --out reliability.json [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from cpl_masks import load_model, load_questions, make_scorer
from cpl_masks.data.split import resolve_scoring
from cpl_masks.masks.bits import pack_bits, unpack_bits
from cpl_masks.masks.signs import PackedSigns
from cpl_masks.profiling.gradients import GradientSums, question_gradients
from cpl_masks.profiling.selection import t_statistic
from cpl_masks.utils.files import write_json

MASK_RULES = ("sign", "confidence")  # frozen bits, from g_M and g_I of the answer loss
SIGN_RULES = ("retain signs", "confident retain signs")  # sign planes of g_M alone
RULES = (*MASK_RULES, *SIGN_RULES)


def halves(split: Path, largest: int, seed: int) -> dict[str, tuple[list, list]]:
    """Each set's two disjoint halves of ``largest`` questions, in a shuffled order fixed by ``seed``."""
    cut = {}
    for key, file in (("mastered", "mastered.jsonl"), ("inject", "inject.jsonl")):
        rows = load_questions(split / file)
        if len(rows) < 2 * largest:
            raise SystemExit(f"{split / file}: {len(rows)} questions, need {2 * largest} for two halves of {largest}")
        random.Random(f"{seed}:{key}").shuffle(rows)
        cut[key] = (rows[:largest], rows[largest : 2 * largest])
    return cut


def selections(
    loaded, scorer, halves_of: dict[str, list], sizes: list[int], rules: list[str], confidence: float, objective: str
) -> dict:
    """Per size, each rule's packed selection of one half: frozen bits (M×I rules) or sign planes (retain rules)."""
    passes = {}  # set -> (questions, objective): only what the rules need
    if any(rule in MASK_RULES for rule in rules):
        passes |= {"mastered": (halves_of["mastered"], "answer"), "inject": (halves_of["inject"], "answer")}
    if any(rule in SIGN_RULES for rule in rules):
        passes["retain"] = (halves_of["mastered"], objective)
    if passes.get("retain") == passes.get("mastered"):
        del passes["retain"]  # the same pass: g_M of the answer loss
    sums = {key: GradientSums(loaded.model) for key in passes}
    taken, done = {}, 0
    for size in sizes:
        for key, (rows, loss) in passes.items():
            for gradient in question_gradients(loaded.model, scorer, rows[done:size], objective=loss):
                sums[key].add(gradient)
        done = size
        taken[size] = {rule: {} for rule in rules}
        by_tensor = zip(*(total.moments_by_tensor() for total in sums.values()), strict=True)
        for per_set in by_tensor:  # one tensor of every pass at a time: Gemma's whole moments do not fit
            moments = dict(zip(sums, per_set, strict=True))  # pass -> (name, mean, standard error)
            take_tensor(taken[size], moments, rules, confidence)
        print(f"  {size} questions per set: {time.strftime('%H:%M:%S')}", flush=True)
    return taken


def take_tensor(taken: dict, moments: dict, rules: list[str], confidence: float) -> None:
    """Add one tensor's selection by each rule to ``taken`` (rule -> name -> packed bits or sign planes)."""
    if any(rule in MASK_RULES for rule in rules):
        name, g_m, error_m = moments["mastered"]
        _, g_i, error_i = moments["inject"]
        if "sign" in rules:
            taken["sign"][name] = pack_bits(g_m * g_i < 0)
        if "confidence" in rules:
            taken["confidence"][name] = pack_bits(t_statistic(g_m, g_i, error_m, error_i) < -confidence)
    name, mean, error = moments.get("retain", moments.get("mastered"))
    if "retain signs" in rules:
        taken["retain signs"] |= planes(PackedSigns.of({name: mean}))
    if "confident retain signs" in rules:
        significant = PackedSigns.significant([(name, mean, error)], confidence, freeze_uncertain=False)
        taken["confident retain signs"] |= planes(significant)


def planes(signs: PackedSigns) -> dict:
    """Per tensor, the (positive, negative) planes."""
    return {name: (signs.positive[name], signs.negative[name]) for name in signs.positive}


def compare(first: dict, second: dict, shapes: dict, rule: str) -> dict:
    """Agreement, Jaccard and overlap of two halves' selections, with the chance levels."""
    counts = torch.zeros(4, dtype=torch.float64)  # entries, frozen in A, frozen in B, frozen in both
    total = 0
    for name, shape in shapes.items():
        total += shape.numel()
        if rule in SIGN_RULES:
            a_pos, a_neg = (unpack_bits(plane, shape) for plane in first[name])
            b_pos, b_neg = (unpack_bits(plane, shape) for plane in second[name])
            both = (a_pos | a_neg) & (b_pos | b_neg)  # both halves count a sign (non-zero, or significant)
            a, b = a_neg[both], b_neg[both]  # "frozen" read as: g_M negative
        else:
            a, b = unpack_bits(first[name], shape), unpack_bits(second[name], shape)
        counts += torch.tensor([a.numel(), a.sum(), b.sum(), (a & b).sum()], dtype=torch.float64)
    entries, in_a, in_b, in_both = counts.tolist()
    p, q = in_a / entries, in_b / entries
    agreement = (entries - in_a - in_b + 2 * in_both) / entries
    union = in_a + in_b - in_both
    return {
        "entries": int(entries),
        "compared_share": entries / total,  # of all entries: where a sign rule has a sign in both halves
        "shares": [p, q],
        "agreement": agreement,
        "chance_agreement": p * q + (1 - p) * (1 - q),
        "jaccard": in_both / union if union else 1.0,
        "chance_jaccard": p * q / (p + q - p * q) if p + q else 1.0,
        "overlap": in_both / min(in_a, in_b) if min(in_a, in_b) else 1.0,
    }


def plot(results: dict, path: Path) -> None:
    """Agreement and Jaccard against the sample size (chance dotted), and the share of entries compared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    sizes = sorted(int(size) for size in results["comparisons"])  # a JSON file may hold them sorted as text
    for rule, color in zip(results["rules"], ("C0", "C1", "C2", "C3"), strict=False):
        rows = [results["comparisons"][str(size)][rule] for size in sizes]
        for axis, key in zip(axes, ("agreement", "jaccard"), strict=False):
            axis.plot(sizes, [row[key] for row in rows], "o-", color=color, label=rule)
            axis.plot(sizes, [row[f"chance_{key}"] for row in rows], ":", color=color)
        axes[2].plot(sizes, [row.get("compared_share", 1.0) for row in rows], "o-", color=color, label=rule)
    titles = ("agreement (dotted: chance)", "jaccard of the frozen sets (dotted: chance)", "share of entries compared")
    for axis, title in zip(axes, titles, strict=True):
        axis.set_xscale("log")
        axis.set_xlabel("questions per set in each half")
        axis.set_title(title)
    axes[2].set_yscale("log")
    axes[0].legend()
    figure.suptitle(f"{results['model']}, retain signs of the {results.get('retain_objective', 'answer')} loss")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("split", type=Path)
    parser.add_argument("--sizes", default="10,20,40,80,160")
    parser.add_argument("--confidence", type=float, default=2.0)
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--retain-objective", default="answer", choices=("answer", "choices"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    rules = [rule for rule in RULES if rule in args.rules.split(",")]
    if not rules or len(rules) != len(args.rules.split(",")):
        raise SystemExit(f"--rules {args.rules}: choose among {', '.join(RULES)}")
    cut = halves(args.split, sizes[-1], args.seed)
    loaded = load_model(args.model, device="cpu", threads=args.threads)
    scorer = make_scorer(resolve_scoring(None, data_path=args.split / "mastered.jsonl"), loaded.tokenizer)
    shapes = {name: parameter.shape for name, parameter in loaded.model.named_parameters()}
    taken = []
    for half in (0, 1):
        print(f"half {half + 1}:", flush=True)
        halves_of = {key: rows[half] for key, rows in cut.items()}
        taken.append(selections(loaded, scorer, halves_of, sizes, rules, args.confidence, args.retain_objective))
    results = {
        "split": str(args.split),
        "model": args.model,
        "confidence": args.confidence,
        "retain_objective": args.retain_objective,
        "rules": rules,
        "seed": args.seed,
        "comparisons": {
            str(size): {rule: compare(taken[0][size][rule], taken[1][size][rule], shapes, rule) for rule in rules}
            for size in sizes
        },
    }
    write_json(args.out, results)
    print(
        f"{'questions':>9} {'rule':<22} {'frozen':>13} {'agree':>6} {'chance':>6} {'jaccard':>7} {'chance':>6} compared"
    )
    for size, rows in results["comparisons"].items():
        for rule, row in rows.items():
            shares = "/".join(f"{share:.0%}" for share in row["shares"])
            print(
                f"{size:>9} {rule:<22} {shares:>13} {row['agreement']:>6.1%} {row['chance_agreement']:>6.1%} "
                f"{row['jaccard']:>7.1%} {row['chance_jaccard']:>6.1%} {row['compared_share']:>8.1%}"
            )
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
