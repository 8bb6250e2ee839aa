"""Reading a mask file as the untrusted bytes it may be: the one gate every file passes before use.

Masks are shared (the Hub, a colleague's folder), so :func:`read_header` validates everything a
file says before anything uses it: the safetensors layout (every tensor's dtype, shape and byte
range, which must tile the data exactly), the ``cpl_mask`` JSON (strict: no NaN or Infinity
anywhere in it), the types of its fields and metadata and the ranges of its numbers
(:mod:`cpl_masks.masks.metadata_checks`: counts within the entries they count, sums of their
sign), and that each parameter's packed bits (and scores) have the size its shape needs.
:func:`read_tensors` then reads exactly those byte ranges; once the content id is verified,
:func:`check_planes` checks each packed plane's padding bits and :func:`check_counts` the recorded
counts against the bits. The format itself is described in :mod:`cpl_masks.masks.format`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cpl_masks.errors import CplError
from cpl_masks.masks.bits import packed_size, padding_is_clear
from cpl_masks.masks.metadata_checks import SCORES_HASH_KEY as SCORES_HASH_KEY  # re-exported: the format's name
from cpl_masks.masks.metadata_checks import check_metadata

FORMAT_NAME = "cpl-mask"
# A retain set (``kind``) is written as 3.0: its content id covers its questions and sign measure
# (format.py). Readers of 1.x refuse it rather than take it for a freeze mask, and readers of 2.x
# refuse it by its version rather than call it corrupted; retain sets of 2.0, whose id covers the
# sign planes alone, are refused here. A plain mask is still written as 1.0, readable by every release.
FORMAT_VERSION = "3.0"
PLAIN_MASK_VERSION = "1.0"
READABLE_MAJORS = ("1", "2", "3")
RETAIN_MAJOR = "3"  # the first major whose retain-set id covers what the set does
HEADER_KEY = "cpl_mask"
SCORES_PREFIX = "scores/"
NEGATIVE_PREFIX = "negative/"  # a retain set's second plane: where g_M < 0
KINDS = ("mask", "retain")
_MAX_HEADER_BYTES = 100_000_000
_MAX_DIMS, _MAX_SIZE = 16, 2**40  # bounds of a shape in a mask file
_CONTENT_ID = re.compile(r"^[0-9a-f]{64}$")


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read a mask file's header (format, version, id, shapes, metadata) and validate all of it.

    The one gate every mask file passes before anything uses it, since masks are shared and a file
    may come from anyone: the safetensors layout (every tensor's dtype, shape and byte range, which
    must tile the data exactly), the ``cpl_mask`` JSON (with no NaN or Infinity anywhere in it) and
    the types and ranges of its fields and metadata, and that each parameter's packed bits (and
    scores) are stored with the size its shape needs. Anything else is a one-line :class:`CplError`
    naming the file and the field.
    """
    path = Path(path)
    raw = _raw_safetensors_header(path)
    header = _cpl_header(path, raw.pop("__metadata__", None))
    _check_header_types(path, header)
    check_metadata(path, header["metadata"], header["shapes"])
    _check_tensor_layout(path, raw, header["shapes"], with_scores=header["scores"], kind=header["kind"])
    return header


def _cpl_header(path: Path, metadata: Any) -> dict[str, Any]:
    """The ``cpl_mask`` JSON object of the safetensors metadata, with its format and version checked."""
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values())
    ):
        raise CplError(f"{path}: corrupted safetensors header ('__metadata__' is not an object of strings)")
    text = (metadata or {}).get(HEADER_KEY)
    if text is None:
        raise CplError(f"{path}: not a cpl-masks mask file (no '{HEADER_KEY}' header)")
    header = _parse_json(path, text, "mask header")
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        found = header.get("format") if isinstance(header, dict) else None
        raise CplError(f"{path}: unknown mask format {_short(found)} (expected {FORMAT_NAME!r})")
    version = header.get("version")
    if not isinstance(version, str) or not _readable_version(version):
        raise CplError(
            f"{path}: mask format version {_short(version)} is not supported (this tool reads up to {FORMAT_VERSION})"
        )
    header.setdefault("kind", "mask")
    missing = [key for key in ("id", "shapes", "scores", "metadata") if key not in header]
    if missing:
        raise CplError(f"{path}: mask header lacks {', '.join(missing)}")
    return header


def _readable_version(version: str) -> bool:
    """A major version this tool reads; a newer minor one only adds fields, which are kept and never read."""
    return version.split(".")[0] in READABLE_MAJORS


class _NonFinite(ValueError):
    """A number JSON cannot hold: ``NaN``, ``Infinity``, or a literal too large for a float (``1e999``)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def _no_constant(text: str) -> Any:
    raise _NonFinite(text)


def _parse_json(path: Path, text: str | bytes, what: str) -> Any:
    """``json.loads`` of strict JSON, whose every failure (bad syntax or bytes, nesting too deep, NaN or
    Infinity, which Python's reader accepts and its writer prints back, not JSON) is a one-line error."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except _NonFinite as error:
        raise CplError(f"{path}: {what} holds {_short(str(error))}, not a finite number") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(error, RecursionError) else "not valid JSON"
        raise CplError(f"{path}: {what} is {reason}") from error


def _short(value: Any, limit: int = 40) -> str:
    """A value from a file, as ``repr`` cut to ``limit`` characters, for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_header_types(path: Path, header: dict[str, Any]) -> None:
    """Refuse, naming the file and the field, a header whose fields have the wrong JSON types."""
    if not isinstance(header["id"], str):
        raise CplError(f"{path}: mask header 'id' is not a string")
    if not _CONTENT_ID.match(header["id"]):
        raise CplError(f"{path}: mask header 'id' {_short(header['id'])} is not a sha256 (64 hex digits)")
    if not isinstance(header["metadata"], dict):
        raise CplError(f"{path}: mask header 'metadata' is not an object")
    if not isinstance(header["scores"], bool):
        raise CplError(f"{path}: mask header 'scores' is not true or false")
    if header["kind"] not in KINDS:
        raise CplError(f"{path}: mask header 'kind' is {_short(header['kind'])}, not one of {', '.join(KINDS)}")
    if header["kind"] == "retain" and header["scores"]:
        raise CplError(f"{path}: a retain set holds signs, not scores ('scores' must be false)")
    if header["kind"] == "retain" and header["version"].split(".")[0] != RETAIN_MAJOR:
        raise CplError(
            f"{path}: a retain set of format {_short(header['version'])}, written before its content id covered "
            "its questions and sign measure; profile it again (cpl-masks profile --kind retain)"
        )
    shapes = header["shapes"]
    if not isinstance(shapes, dict):
        raise CplError(f"{path}: mask header 'shapes' is not an object of parameter name to shape")
    for name, shape in shapes.items():
        if not _is_shape(shape):
            shown = _short(shape)
            raise CplError(f"{path}: mask header shape of {name} is {shown}, not a list of non-negative integers")
        if name.startswith((SCORES_PREFIX, NEGATIVE_PREFIX)) or not name:
            raise CplError(
                f"{path}: mask header names a parameter {_short(name, 200)}, which no parameter can be named"
            )


def _is_shape(shape: Any) -> bool:
    """A list of at most 16 non-negative integers below 2**40 (no real tensor is larger in any dimension)."""
    return (
        isinstance(shape, list)
        and len(shape) <= _MAX_DIMS
        and all(type(size) is int and 0 <= size < _MAX_SIZE for size in shape)
    )


def _check_tensor_layout(
    path: Path, raw: dict[str, Any], shapes: dict[str, Any], *, with_scores: bool, kind: str = "mask"
) -> None:
    """Every parameter's packed bits (and scores, or a retain set's second plane) stored at the size its shape needs.

    ``raw`` maps tensor names to their (already validated) safetensors entries; a tensor that is
    none of these is refused too.
    """
    expected: dict[str, tuple[str, list[int]]] = {}
    for name, shape in shapes.items():
        expected[name] = ("U8", [(math.prod(shape) + 7) // 8])  # (ceil(n/8),) uint8 packed bits
        if with_scores:
            expected[SCORES_PREFIX + name] = ("BF16", list(shape))  # parameter shape, bfloat16 scores
        if kind == "retain":
            expected[NEGATIVE_PREFIX + name] = expected[name]  # the plane where g_M < 0
    missing = [name for name in expected if name not in raw]
    if missing:
        raise CplError(f"{path}: mask file lacks tensor {missing[0]} ({len(missing)} missing)")
    extra = [name for name in raw if name not in expected]
    if extra:
        raise CplError(f"{path}: mask file holds tensor {_short(extra[0], 200)}, which its header does not list")
    for name, (dtype, shape) in expected.items():
        entry = raw[name]
        parameter = name.removeprefix(NEGATIVE_PREFIX)
        if dtype == "U8" and (entry["dtype"], entry["shape"]) != (dtype, shape):
            raise CplError(f"{path}: tensor {name} is not {shape[0]} packed bytes for shape {shapes[parameter]}")
        if (entry["dtype"], entry["shape"]) != (dtype, shape):
            raise CplError(f"{path}: tensor {name} is {entry['dtype']} {entry['shape']}, not {dtype} {shape}")


# bytes per entry of each safetensors dtype (a mask file holds only U8 bits and BF16 scores)
_DTYPE_BYTES = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 1),
    **dict.fromkeys(("U16", "I16", "F16", "BF16"), 2),
    **dict.fromkeys(("U32", "I32", "F32"), 4),
    **dict.fromkeys(("U64", "I64", "F64", "C64"), 8),
}


def _raw_safetensors_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header, its tensors' dtypes, shapes and byte ranges checked against the file.

    The ranges must tile the data after the header exactly, as the safetensors format requires, so
    no size computed from a shape can exceed the file.
    """
    if not path.is_file():
        raise CplError(f"{path}: no such mask file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CplError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, _MAX_HEADER_BYTES):
                raise CplError(
                    f"{path}: not a safetensors file or truncated (header of {length} bytes, file of {size})"
                )
            text = handle.read(length)
    except OSError as error:
        raise CplError(f"{path}: cannot read ({error.strerror or type(error).__name__})") from error
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise CplError(f"{path}: corrupted safetensors header (not JSON)") from error
    if not isinstance(raw, dict):
        raise CplError(f"{path}: corrupted safetensors header (not a JSON object)")
    ranges = []
    for name, entry in raw.items():
        if name != "__metadata__":
            ranges.append((*_tensor_range(path, name, entry), name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise CplError(
                f"{path}: corrupted safetensors header (tensor {_short(name, 200)} does not start at {position})"
            )
        position = end
    if 8 + length + position != size:
        raise CplError(f"{path}: truncated or padded mask file ({size} bytes, header promises {8 + length + position})")
    return raw


def _tensor_range(path: Path, name: str, entry: Any) -> tuple[int, int]:
    """A tensor entry's byte range, after checking its dtype, shape and that the range fits them."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CplError(f"{path}: tensor {_short(name, 200)} is not described by dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise CplError(f"{path}: tensor {_short(name, 200)} has an unknown dtype {_short(dtype)}")
    if not _is_shape(shape):
        raise CplError(
            f"{path}: tensor {_short(name, 200)} has shape {_short(shape)}, not a list of non-negative integers"
        )
    valid = isinstance(offsets, list) and len(offsets) == 2 and all(type(item) is int for item in offsets)
    if not valid or not 0 <= offsets[0] <= offsets[1]:
        raise CplError(f"{path}: tensor {_short(name, 200)} has data_offsets {_short(offsets)}, not [begin, end]")
    size = offsets[1] - offsets[0]
    if size != math.prod(shape) * _DTYPE_BYTES[dtype]:
        raise CplError(f"{path}: tensor {_short(name, 200)} of shape {_short(shape)} does not fill its {size} bytes")
    return offsets[0], offsets[1]


def read_tensors(
    path: Path, shapes: Mapping[str, tuple[int, ...]], *, with_scores: bool, with_negative: bool = False
) -> dict[str, torch.Tensor]:
    """Read the packed tensors (and the scores, or a retain set's negative plane, if asked).

    A missing tensor is a one-line error; :func:`check_planes` then checks the planes.
    """
    from safetensors import SafetensorError, safe_open

    wanted = list(shapes) + ([SCORES_PREFIX + name for name in shapes] if with_scores else [])
    wanted += [NEGATIVE_PREFIX + name for name in shapes] if with_negative else []
    try:
        with safe_open(str(path), framework="pt") as handle:
            present = set(handle.keys())
            missing = [name for name in wanted if name not in present]
            if missing:
                raise CplError(f"{path}: mask file lacks tensor {missing[0]} ({len(missing)} missing)")
            return {name: handle.get_tensor(name) for name in wanted}
    except SafetensorError as error:
        raise CplError(f"{path}: unreadable safetensors file ({str(error).splitlines()[0][:160]})") from error


def check_planes(
    path: str | os.PathLike, planes: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], prefix: str = ""
) -> None:
    """Every packed plane (a mask's bits, either plane of a retain set, named ``prefix + name``): the
    ``ceil(n / 8)`` uint8 bytes of its shape's ``n`` entries, whose padding bits are 0.

    A set padding bit is no entry, yet a count of set bits would count it (a share over 100 %).
    """
    for name, shape in shapes.items():
        plane, count = planes[name], math.prod(shape)
        expected = packed_size(count)
        if plane.dtype != torch.uint8 or tuple(plane.shape) != (expected,):
            raise CplError(f"{path}: tensor {prefix}{name} is not {expected} packed bytes for shape {list(shape)}")
        if not padding_is_clear(plane, count):
            raise CplError(
                f"{path}: tensor {prefix}{name} sets padding bits past its {count} entries "
                "(the unused high bits of its last byte must be 0; the file is corrupted or was edited)"
            )


def check_counts(path: str | os.PathLike, recorded: Any, actual: Mapping[str, int]) -> None:
    """Refuse recorded whole-mask counts (``counts``) that the bits contradict: they are shown as shares.

    ``actual`` holds the counts the bits determine (a freeze mask's entries and collaborative ones, a
    retain set's entries and positive, negative and frozen ones); a count not recorded is not checked.
    """
    for key, value in actual.items():
        claimed = (recorded or {}).get(key)
        if claimed is not None and claimed != value:
            raise CplError(
                f"{path}: mask metadata 'counts.{key}' is {_short(claimed)}, but the bits give {value} "
                "(the file is corrupted or was edited)"
            )
