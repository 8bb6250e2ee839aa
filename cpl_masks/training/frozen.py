"""The frozen entries of partly frozen tensors, a bit an entry, and the chunks a step visits them in.

A static mask freezes some entries of a tensor; at every step the training loop zeroes their gradients
and (with AdamW) keeps moments for the others only. Held as bool tensors the frozen entries would cost a
byte each, as much as the moments a kept share of 7/8 saves; packed they cost a bit. A tensor is packed
row by row (its first dimension; a vector's entries are rows of one), each row padded to whole bytes,
so FSDP2 shards the packed rows exactly as it shards the parameter's: rank r's rows of one are rank r's
rows of the other.

A step reads the frozen entries a chunk of rows at a time (:func:`row_chunks`, about
:data:`~cpl_masks.masks.bits.CHUNK_ENTRIES` entries, the per-step rule's chunk too), so no temporary
of a step outgrows a chunk: the largest tensor of a 1B model (its embedding, 100M entries) is visited
in pieces of 4M.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cpl_masks.masks import bits
from cpl_masks.masks.bits import count_set_bits


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A view of ``tensor`` as rows: (first dimension, the rest); a vector's entries are rows of one."""
    return tensor.view(tensor.shape[0], -1) if tensor.dim() else tensor.view(1, 1)


def pack_frozen(frozen: torch.Tensor) -> torch.Tensor:
    """``frozen`` (bool, the parameter's shape, True = frozen) packed row by row: (rows, bytes) uint8."""
    rows = as_rows(frozen.contiguous()).to(torch.uint8)  # (rows, cols)
    padded = torch.nn.functional.pad(rows, (0, -rows.shape[1] % 8))  # (rows, 8·bytes)
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=frozen.device)  # little-endian within a byte
    return (padded.view(rows.shape[0], -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def frozen_rows(packed: torch.Tensor, cols: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of packed frozen entries as bool, (stop - start, cols): what one chunk reads."""
    rows = packed[start:stop]  # (n, bytes) uint8
    if rows.device.type == "cpu":
        bits = torch.from_numpy(np.unpackbits(rows.numpy(), axis=1, count=cols, bitorder="little"))
    else:
        shifts = torch.arange(8, dtype=torch.uint8, device=rows.device)
        bits = ((rows.unsqueeze(-1) >> shifts) & 1).view(rows.shape[0], -1)[:, :cols].contiguous()
    return bits.view(torch.bool)


def frozen_count(packed: torch.Tensor) -> int:
    """How many entries are frozen (the padding bits of each row are zero)."""
    return count_set_bits(packed.contiguous().view(-1).cpu())


def row_chunks(rows: torch.Tensor) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges of the rows of ``rows`` (2-D), each about ``CHUNK_ENTRIES`` entries."""
    step = max(1, bits.CHUNK_ENTRIES // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        yield start, min(rows.shape[0], start + step)
