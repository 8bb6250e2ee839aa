"""The signs of g_M in two bits per entry: the same rule as the float product, at 1/16 of the memory."""

from __future__ import annotations

import math

import pytest
import torch

from cpl_masks.masks.bits import pack_bits, pack_bits_torch, packed_size, unpack_bits, unpack_bits_torch
from cpl_masks.masks.signs import PackedSigns

SHAPES = {"a": (7,), "b": (3, 5), "c": (2, 4, 8)}  # sizes 7, 15, 64: ragged and whole last bytes


def signed(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random values with a third of them exactly 0, so all three signs occur."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator)
    return values.masked_fill(torch.rand(shape, generator=generator) < 1 / 3, 0.0)


@pytest.mark.parametrize("shape", SHAPES.values())
def test_the_torch_packing_used_off_the_cpu_equals_numpys(shape):
    bits = signed(shape, seed=1) > 0
    packed = pack_bits(bits)
    assert torch.equal(pack_bits_torch(bits), packed)
    assert torch.equal(unpack_bits_torch(packed, shape), bits)
    assert torch.equal(unpack_bits(packed, shape), bits)
    assert packed.numel() == packed_size(math.prod(shape))


def test_disagreeing_entries_are_those_where_the_float_product_is_negative():
    g_mastered = {name: signed(shape, seed=index) for index, (name, shape) in enumerate(SHAPES.items())}
    signs = PackedSigns.of(g_mastered)
    for index, (name, shape) in enumerate(SHAPES.items()):
        step = signed(shape, seed=100 + index)
        expected = step * g_mastered[name] < 0
        assert expected.any() and (~expected).any()
        assert torch.equal(signs.disagreeing(name, step), expected)
        assert torch.equal(signs.sign(name), torch.sign(g_mastered[name]).to(torch.int8))


def test_take_packs_and_frees_each_float_tensor_and_holds_two_bits_an_entry():
    gradients = {name: signed(shape, seed=7) for name, shape in SHAPES.items()}
    expected = {name: torch.sign(gradient).to(torch.int8) for name, gradient in gradients.items()}
    signs = PackedSigns.take(gradients)
    assert gradients == {}
    assert all(torch.equal(signs.sign(name), expected[name]) for name in SHAPES)
    assert signs.nbytes() == sum(2 * packed_size(math.prod(shape)) for shape in SHAPES.values())


@pytest.mark.parametrize("freeze", [False, True])
def test_only_significant_signs_count_and_uncertain_entries_pass_or_freeze(freeze):
    #            significant +  significant -  uncertain  no spread, +  untouched
    mean = torch.tensor([3.0, -3.0, 0.5, 0.2, 0.0])
    error = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    signs = PackedSigns.significant([("w", mean, error)], 2.0, freeze_uncertain=freeze)
    assert signs.sign("w").tolist() == [1, -1, 0, 1, 0]
    for step in (torch.ones(5), -torch.ones(5)):
        against = (step * torch.tensor([1.0, -1.0, 0.0, 1.0, 0.0])) < 0
        against[2] = freeze  # frozen: every non-zero step entry disagrees
        assert torch.equal(signs.disagreeing("w", step), against)
    assert not signs.disagreeing("w", torch.zeros(5)).any()
