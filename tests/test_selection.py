"""The cutting rule: exact keep fractions, position tie-breaking, forced tensors, stored-score encoding."""

from __future__ import annotations

import pytest
import torch

from cpl_masks.errors import CplError
from cpl_masks.profiling.selection import Cut, encode_scores, touched_entries

SCORES = {
    "a": torch.tensor([0.0, 1.0, 0.0, -1.0]),
    "b": torch.tensor([[0.0, 0.0], [2.0, 0.0]]),
}


def keep(fraction: float, scores=SCORES, **patterns) -> dict[str, list]:
    bits = Cut(threshold=None, keep_fraction=fraction, **patterns).select_all(scores)
    return {name: tensor.int().tolist() for name, tensor in bits.items()}


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [
        (0.25, {"a": [0, 1, 0, 0], "b": [[0, 0], [1, 0]]}),  # the two positive scores
        (0.3, {"a": [1, 1, 0, 0], "b": [[0, 0], [1, 0]]}),  # ceil(2.4) = 3: the first zero wins the tie
        (0.5, {"a": [1, 1, 1, 0], "b": [[0, 0], [1, 0]]}),  # both zeros of "a" come before those of "b"
        (0.75, {"a": [1, 1, 1, 0], "b": [[1, 1], [1, 0]]}),  # within "b": row-major order
        (1.0, {"a": [1, 1, 1, 1], "b": [[1, 1], [1, 1]]}),
    ],
)
def test_keep_fraction_keeps_exactly_the_share_breaking_ties_by_position(fraction, expected):
    assert keep(fraction) == expected


def test_keep_fraction_reads_the_fraction_as_written():
    scores = {"w": torch.arange(10.0)}
    assert sum(keep(0.3, scores)["w"]) == 3  # 0.3 * 10 is 3.0000000000000004 in floats
    assert sum(keep(0.1, scores)["w"]) == 1


def test_tensor_order_is_the_mappings_order():
    reordered = {"b": SCORES["b"], "a": SCORES["a"]}
    assert keep(0.5, reordered) == {"a": [0, 1, 0, 0], "b": [[1, 1], [1, 0]]}


def test_forced_tensors_are_not_eligible():
    bits = keep(0.5, freeze_pattern="^b$", train_pattern="^c$", scores={**SCORES, "c": torch.tensor([-5.0])})
    assert bits == {"a": [1, 1, 0, 0], "b": [[0, 0], [0, 0]], "c": [1]}  # 2 of a's 4 entries


def test_a_fraction_of_nothing_keeps_nothing():
    assert keep(0.5, freeze_pattern=".") == {"a": [0, 0, 0, 0], "b": [[0, 0], [0, 0]]}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": 0.0, "keep_fraction": 0.3}, "give exactly one of --threshold and --keep-fraction"),
        ({"threshold": None}, "give exactly one of --threshold and --keep-fraction"),
        ({"threshold": None, "keep_fraction": 0.0}, "--keep-fraction 0.0: must be in (0, 1]"),
        ({"threshold": float("inf")}, "--threshold inf: must be a finite number"),
        ({"train_pattern": "["}, "--train-pattern '[': not a valid regular expression"),
    ],
)
def test_rule_refuses_bad_options_naming_them(options, message):
    with pytest.raises(CplError) as error:
        Cut(**options)
    assert str(error.value).startswith(message)


def test_stored_scores_mark_touched_entries_by_the_sign_of_zero():
    product = torch.tensor([0.0, 1e-45, -0.0, 3.0, 0.0, -2.0])  # 1e-45 rounds to 0 in bfloat16
    touched = torch.tensor([False, True, True, True, False, True])
    stored = encode_scores(product, touched)
    assert stored.dtype == torch.bfloat16
    assert stored.float().tolist() == [0.0, 0.0, 0.0, 3.0, 0.0, -2.0]
    assert touched_entries(stored).tolist() == touched.tolist()


def test_a_threshold_is_compared_unrounded_with_bfloat16_scores():
    scores = {"w": torch.tensor([1.0, 1.0078125], dtype=torch.bfloat16)}  # neighbours in bfloat16
    assert Cut(threshold=1.001).select_all(scores)["w"].tolist() == [False, True]  # 1.001 would round to 1.0
