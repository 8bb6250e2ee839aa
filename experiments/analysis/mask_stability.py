"""Mask stability: do masks profiled on disjoint halves of one split, or on different tasks, agree?

For each sweep folder given, the split's mastered and injection sets are cut into two disjoint
halves (alternate questions) and a mask is profiled on each half; then every pair of the sweeps'
full CPL masks is compared. Agreement is set against what two independent random masks with the
same collaborative shares p and q would reach by chance: p·q + (1 − p)(1 − q).

Usage: .venv/bin/python experiments/analysis/mask_stability.py SWEEP_DIR [SWEEP_DIR ...] --out stability.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from cpl_masks import Mask, diff, load_model, load_questions, profile
from cpl_masks.utils.files import write_json


def chance_agreement(first: Mask, second: Mask) -> float:
    """Agreement two independent masks with these collaborative shares would reach by chance."""
    p, q = first.collaborative_share(), second.collaborative_share()
    return p * q + (1 - p) * (1 - q)


def comparison(first: Mask, second: Mask) -> dict:
    """Agreement and Jaccard of two masks, with the chance level beside them."""
    overall = diff(first, second)["overall"]
    return {
        "agreement": overall["agreement"],
        "jaccard": overall["jaccard"],
        "chance_agreement": chance_agreement(first, second),
        "shares": [first.collaborative_share(), second.collaborative_share()],
    }


def halves(sweep: Path, threads: int) -> dict:
    """Profile a mask on each half of the sweep's split and compare the two."""
    config = json.loads((sweep / "sweep_config.json").read_text())
    loaded = load_model(config["model"], threads=threads)
    mastered, inject = (
        load_questions(sweep / "split" / "mastered.jsonl"),
        load_questions(sweep / "split" / "inject.jsonl"),
    )
    masks = [
        profile(loaded, mastered[start::2], inject[start::2], scoring=config["scoring"], show_progress=False)
        for start in (0, 1)
    ]
    return {"sizes": [len(mastered[0::2]), len(inject[0::2])], **comparison(*masks)}


def main() -> None:
    """Compare halves within each sweep and full masks across sweeps; write and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    results: dict = {"halves": {}, "tasks": {}}
    for sweep in args.sweeps:
        results["halves"][sweep.name] = halves(sweep, args.threads)
        print(sweep.name, "halves:", json.dumps(results["halves"][sweep.name]))
    full = {sweep.name: Mask.load(sweep / "masks" / "cpl.safetensors", scores=False) for sweep in args.sweeps}
    for (a, first), (b, second) in itertools.combinations(full.items(), 2):
        if first.shapes == second.shapes:
            results["tasks"][f"{a} vs {b}"] = comparison(first, second)
            print(a, "vs", b, json.dumps(results["tasks"][f"{a} vs {b}"]))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
