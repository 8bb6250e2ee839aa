"""Bool tensors packed eight entries to a byte, little-endian within each byte (``numpy.packbits``'s
``bitorder="little"``): the freeze-mask file stores its tensors this way, and the per-step rule holds
the signs of ``g_M`` this way in memory. Bit ``k`` of byte ``b`` is entry ``8 * b + k`` of the
flattened (row-major) tensor; unused high bits of the last byte are 0.

On the CPU numpy packs and unpacks (about 10x faster than torch ops there); elsewhere torch does, on
the tensor's own device, so a CUDA rule never copies to the host.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CHUNK_ENTRIES = 1 << 22  # entries a training step unpacks at a time (a multiple of 8): 4 MiB of bool
_BIT_VALUES = tuple(1 << bit for bit in range(8))
_POPCOUNT = torch.tensor([bin(value).count("1") for value in range(256)], dtype=torch.int64)  # (256,)


def packed_size(count: int) -> int:
    """Bytes that ``count`` packed entries take."""
    return (count + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor of any shape into ``ceil(n / 8)`` uint8 bytes on its device."""
    flat = bits.detach().reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.to(torch.bool).numpy(), bitorder="little"))
    return pack_bits_torch(flat)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape`` on ``packed``'s device."""
    count = math.prod(shape)
    if packed.device.type == "cpu":
        flat = np.unpackbits(packed.numpy(), count=count, bitorder="little")  # (n,) uint8 0/1
        return torch.from_numpy(flat.view(np.bool_)).reshape(shape)
    return unpack_bits_torch(packed, shape)


def pack_bits_torch(bits: torch.Tensor) -> torch.Tensor:
    """:func:`pack_bits` in torch ops, on any device (what it uses off the CPU)."""
    padded = torch.nn.functional.pad(bits.reshape(-1).to(torch.uint8), (0, -bits.numel() % 8))
    weights = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=bits.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits_torch(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """:func:`unpack_bits` in torch ops, on any device (what it uses off the CPU)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).view(-1)[: math.prod(shape)].view(shape).to(torch.bool)


def count_set_bits(packed: torch.Tensor) -> int:
    """Number of 1 bits in a packed tensor, without unpacking it."""
    if packed.device.type == "cpu" and hasattr(np, "bitwise_count"):  # numpy >= 2: a native popcount
        return int(np.bitwise_count(packed.numpy()).sum(dtype=np.int64))
    return int(_POPCOUNT.to(packed.device)[packed.to(torch.int64)].sum())


def padding_is_clear(packed: torch.Tensor, count: int) -> bool:
    """Whether the unused high bits of the last byte of ``count`` packed entries are all 0, as the format requires.

    A set padding bit is no entry, yet a popcount would count it: a share over 100 %.
    """
    used = count % 8
    return used == 0 or packed.numel() == 0 or int(packed[-1]) >> used == 0
