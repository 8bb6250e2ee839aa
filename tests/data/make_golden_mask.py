"""Write ``golden_mask.safetensors``: a small mask with scores, frozen as a reference of the file format.

Run once from the repository root (``.venv/bin/python -m tests.data.make_golden_mask``); the file is
committed and ``tests/test_masks.py`` reads it with the current code. Regenerate it only on a
deliberate format change, and update the expected id and hash in that test with it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cpl_masks.masks.format import Mask

GOLDEN = Path(__file__).with_name("golden_mask.safetensors")
BITS = {  # name -> collaborative bits, in model order; sizes cover a partial last byte and a 2-D tensor
    "model.layers.0.mlp.up_proj.weight": [[1, 0, 1], [1, 1, 0]],
    "model.norm.weight": [1, 0, 0, 1, 1, 0, 1, 0, 1, 1],
    "lm_head.weight": [[0], [1]],
}
SCORES = {  # bfloat16-exact; -0.0 marks a touched entry scoring zero, +0.0 an untouched one
    "model.layers.0.mlp.up_proj.weight": [[0.5, -0.25, 0.0], [1.5, 3.0, -2.0]],
    "model.norm.weight": [0.125, -1.0, -0.5, -0.0, 2.0, -0.0625, 0.0, -8.0, 4.0, 0.75],
    "lm_head.weight": [[-1.0], [0.0]],
}
METADATA = {
    "model": {"ref": "golden-model", "fingerprint": "f" * 64, "fingerprint_bf16": "b" * 64, "dtype": "float32"},
    "scoring": "letter",
    "task": "golden",
    "rule": {"threshold": 0.0, "keep_fraction": None, "freeze_pattern": None, "train_pattern": None},
    "seed": 0,
    "parents": [],
}


def golden_mask() -> Mask:
    """The golden mask, built from the constants above."""
    bits = {name: torch.tensor(values, dtype=torch.bool) for name, values in BITS.items()}
    scores = {name: torch.tensor(values, dtype=torch.bfloat16) for name, values in SCORES.items()}
    return Mask.from_bool(bits, METADATA, scores)


if __name__ == "__main__":
    print(golden_mask().save(GOLDEN), golden_mask().id)
