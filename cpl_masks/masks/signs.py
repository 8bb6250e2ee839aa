"""The signs of ``g_M`` in two bits per entry: all the per-step rule needs, at 1/16 of a float32 copy.

The paper's rule keeps the entries of a step's gradient ``g`` where ``g ⊙ g_M ≥ 0``. That depends on
``g_M`` only through its sign (positive, negative or zero), so :class:`PackedSigns` holds, per
tensor, two bit planes (:mod:`cpl_masks.masks.bits`): where ``g_M > 0`` and where ``g_M < 0``. A step
packs its own gradient's signs the same way and finds the disagreeing entries with bitwise
operations on the planes, unpacking only the result.

With a confidence threshold (:meth:`PackedSigns.significant`) a sign is kept only where it is
significant; an uncertain entry either has neither plane set (every step moves it, as where
``g_M = 0``) or both (every non-zero step entry disagrees: it is frozen).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from cpl_masks.masks import bits
from cpl_masks.masks.bits import pack_bits, packed_size, unpack_bits


@dataclass
class PackedSigns:
    """sign(g_M) per named tensor as two packed planes, ``positive`` (g_M > 0) and ``negative`` (g_M < 0)."""

    positive: dict[str, torch.Tensor]  # name -> uint8 (ceil(n/8),)
    negative: dict[str, torch.Tensor]
    shapes: dict[str, torch.Size]

    @classmethod
    def of(cls, gradients: Mapping[str, torch.Tensor]) -> PackedSigns:
        """The signs of ``gradients`` (name -> tensor)."""
        return cls.take(dict(gradients))  # a shallow copy: the caller's tensors stay

    @classmethod
    def take(cls, gradients: dict[str, torch.Tensor]) -> PackedSigns:
        """The signs of ``gradients``, emptying the dict as it packs, so each float tensor is freed once packed."""
        signs = cls({}, {}, {})
        for name in list(gradients):
            signs.add(name, gradients.pop(name))
        return signs

    @classmethod
    def significant(
        cls, moments: Iterable[tuple[str, torch.Tensor, torch.Tensor]], threshold: float, *, freeze_uncertain: bool
    ) -> PackedSigns:
        """The signs of ``g_M`` that hold with confidence: where ``|g_M| > threshold`` standard errors.

        Where the sign is uncertain (a non-zero standard error and ``|t| <= threshold``) both planes
        are set if ``freeze_uncertain`` (no step moves the entry), else neither (every step does). An
        entry whose standard error is zero keeps its sign. ``moments`` yields (name, mean, standard
        error) per tensor (:meth:`~cpl_masks.profiling.gradients.GradientSums.drain`), each freed once packed.
        """
        signs = cls({}, {}, {})
        for name, mean, error in moments:
            bound = error * threshold
            positive, negative = mean > bound, mean < -bound
            if freeze_uncertain:
                uncertain = (error > 0) & ~(positive | negative)
                positive, negative = positive | uncertain, negative | uncertain
            signs._put(name, positive, negative)
        return signs

    @classmethod
    def random(cls, shapes: Mapping[str, torch.Size], seed: str) -> PackedSigns:
        """Signs drawn at random, each entry + or − with even odds and none zero, fixed by ``seed``: the
        control of the rule (what steering by signs does when they carry nothing of g_M)."""
        generator = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
        signs = cls({}, {}, {})
        for name, shape in shapes.items():
            positive = torch.randint(0, 2, shape, generator=generator, dtype=torch.uint8).bool()
            signs._put(name, positive, ~positive)
        return signs

    def drop_disagreeing(self, model: torch.nn.Module) -> None:
        """Zero, in place, the gradient entries of ``model`` whose sign disagrees with these (``g ⊙ g_M < 0``)."""
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                self.drop_disagreeing_in(name, parameter.grad)  # one tensor at a time

    def drop_disagreeing_in(self, name: str, gradient: torch.Tensor) -> None:
        """Zero, in place, the entries of one tensor's gradient whose sign disagrees with these, a chunk of
        :data:`~cpl_masks.masks.bits.CHUNK_ENTRIES` entries at a time (no temporary outgrows a chunk)."""
        flat, chunk = gradient.view(-1), _chunk_entries()
        for start in range(0, flat.numel(), chunk):
            part = flat[start : start + chunk]
            planes = slice(start // 8, start // 8 + packed_size(part.numel()))
            part.masked_fill_(_disagreeing(part, self.positive[name][planes], self.negative[name][planes]), 0)

    def add(self, name: str, gradient: torch.Tensor) -> None:
        """Record the signs of one tensor of ``g_M``, packed a chunk at a time (no temporary outgrows a chunk)."""
        flat, chunk = gradient.reshape(-1), _chunk_entries()
        planes = [_planes(flat[start : start + chunk]) for start in range(0, flat.numel(), chunk)] or [_planes(flat)]
        self.positive[name] = torch.cat([positive for positive, _ in planes])
        self.negative[name] = torch.cat([negative for _, negative in planes])
        self.shapes[name] = gradient.shape

    def _put(self, name: str, positive: torch.Tensor, negative: torch.Tensor) -> None:
        """Record one tensor's two planes from bool tensors of its shape."""
        self.positive[name], self.negative[name] = pack_bits(positive), pack_bits(negative)
        self.shapes[name] = positive.shape

    def disagreeing(self, name: str, gradient: torch.Tensor) -> torch.Tensor:
        """Bool (``gradient``'s shape): the entries where ``gradient ⊙ g_M < 0``."""
        return _disagreeing(gradient, self.positive[name], self.negative[name])

    def sign(self, name: str) -> torch.Tensor:
        """sign(g_M) of one tensor as int8 (-1, 0, +1; a frozen uncertain entry reads 0), unpacked (for tests
        and reports)."""
        shape = self.shapes[name]
        return unpack_bits(self.positive[name], shape).to(torch.int8) - unpack_bits(self.negative[name], shape).to(
            torch.int8
        )

    def to(self, device: torch.device | str) -> PackedSigns:
        """The same signs with their planes on ``device`` (the gradients' device)."""

        def moved(planes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {name: plane.to(device) for name, plane in planes.items()}

        return PackedSigns(moved(self.positive), moved(self.negative), dict(self.shapes))

    def nbytes(self) -> int:
        """Bytes the planes take in memory."""
        return sum(plane.numel() for plane in self._planes())

    def _planes(self) -> Iterator[torch.Tensor]:
        yield from self.positive.values()
        yield from self.negative.values()


def _planes(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return pack_bits(tensor > 0), pack_bits(tensor < 0)


def _disagreeing(tensor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Bool (``tensor``'s shape): where ``tensor`` has the sign opposite to the packed planes given."""
    mine_positive, mine_negative = _planes(tensor)
    return unpack_bits((mine_positive & negative) | (mine_negative & positive), tensor.shape)


def _chunk_entries() -> int:
    """Entries a chunk of the per-step rule takes: ``CHUNK_ENTRIES`` rounded up to whole bytes of the planes."""
    return packed_size(bits.CHUNK_ENTRIES) * 8
