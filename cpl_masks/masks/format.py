"""The freeze-mask file: one safetensors file holding which parameter entries may be trained.

Layout (format ``cpl-mask``, version ``1.0``; version ``3.0`` is the retain set's, below):

* one ``uint8`` tensor per model parameter, named like the parameter, of ``ceil(n / 8)`` bytes for
  a parameter of ``n`` entries. The parameter is flattened in row-major (C) order and its bits are
  packed **little-endian within each byte** (:mod:`cpl_masks.masks.bits`): bit ``k`` (value ``1 << k``) of
  byte ``b`` is entry ``8 * b + k``; unused high bits of the last byte are 0 (a file setting one is
  refused). Bit 1 = collaborative (may be trained), 0 = conflicting (frozen). This is
  ``numpy.packbits(bits, bitorder="little")``.
* optionally, the scores ``s = g_M ⊙ g_I`` as ``bfloat16`` tensors of the parameter's shape under
  ``scores/<parameter name>`` (saved with ``--save-scores``, so a mask can be re-cut later). They
  must be finite; an entry the injection gradient does not touch is ``+0``, a touched one scoring
  zero ``-0`` (:func:`cpl_masks.profiling.selection.encode_scores`). The metadata then holds
  ``scores_sha256``: the sha256, over the parameter names in sorted order, of ``"<name>\\n"``
  followed by that parameter's raw little-endian bfloat16 score bytes, checked on load.
* the safetensors header metadata (string to string) holds a single key, ``cpl_mask``, whose value
  is a JSON object: ``{"format", "version", "id", "shapes", "scores", "metadata"}`` where ``shapes``
  maps each parameter name to its shape (in model order), ``scores`` says whether scores are stored
  and ``metadata`` is the provenance (model ref and fingerprint, data hashes, scoring, rule, seed,
  package versions, creation time, counts, parents of a combined mask, ``recut_of`` of a re-cut).
  The JSON is strict: a NaN or an infinity anywhere in it is refused, and never written.

The content id is the sha256, over the parameter names in sorted order, of
``"<name>|<shape as comma-separated ints>\\n"`` followed by that parameter's packed bytes (and,
in a retain set, its negative plane's). A retain set's id then covers, after ``"retain\\n"``, the
canonical JSON (sorted keys, no spaces, ASCII) of an object holding, under the dotted names of
:data:`RETAIN_ID_FIELDS`, every metadata field that changes what the set does (null where absent):
``scoring`` (the scorer its questions are scored with), ``model.fingerprint`` and
``model.fingerprint_bf16`` (the weights it is applied to without ``--allow-other-weights``),
``retain.objective``, ``retain.confidence``, ``retain.uncertain`` (how each refresh measures the
signs and what an uncertain one does) and ``retain.questions`` (what every refresh measures them
on). The rest is provenance (names, paths, times, versions, the loss's description, lineage) or
follows from those and is checked against them (``data.mastered`` against the questions,
``counts`` against the planes). The id names the mask, is independent of the order tensors were
added in, and is checked on load, so an edited copy never shares an id, nor a registry name, with
the original. A freeze mask's id covers its bits alone: its metadata changes nothing it does.

**Retain sets** (``"kind": "retain"`` in the header; version ``3.0``, which readers of 1.x and 2.x refuse)
hold sign(g_M), the mean gradient over a set of questions the model must keep (of the answer loss,
or of the cross-entropy over the choices: ``retain.objective``), at the weights it was profiled on:
what the per-step rule (``--method dynamic``) steers by. Per parameter,
two planes packed like a mask's bits: ``<name>`` where g_M > 0 and ``negative/<name>`` where
g_M < 0 (both 0: g_M = 0). No scores. The metadata's ``retain.questions`` holds the questions
themselves (canonical records, hashed as ``data.mastered.sha256``), so a pulled retain set can be
refreshed. A retain set is never a freeze mask: the commands that train through a mask refuse it,
and the reverse.

Retain sets of version ``2.0`` (written before their id covered the metadata above, so an edited
copy could share the original's id and registry name) are refused, with a message to profile them
again; their questions are in them, so ``cpl-masks profile --kind retain`` on those questions at the
same weights gives the same signs under a 3.0 id. Freeze masks keep version 1.0 and their ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpl_masks.errors import CplError
from cpl_masks.masks.bits import count_set_bits, pack_bits, unpack_bits
from cpl_masks.masks.reading import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_KEY,
    NEGATIVE_PREFIX,
    PLAIN_MASK_VERSION,
    SCORES_HASH_KEY,
    SCORES_PREFIX,
    check_counts,
    check_planes,
    read_header,
    read_tensors,
)
from cpl_masks.masks.signs import PackedSigns
from cpl_masks.utils.files import atomic_write


def scores_sha256(scores: Mapping[str, torch.Tensor]) -> str:
    """Hash of stored bfloat16 scores: sha256 over sorted names and raw score bytes (module docstring)."""
    digest = hashlib.sha256()
    for name in sorted(scores):
        digest.update(f"{name}\n".encode())
        digest.update(scores[name].to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def check_finite_scores(scores: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse scores holding a NaN or an infinity: cutting them would give a meaningless mask."""
    for name, tensor in scores.items():
        if not bool(torch.isfinite(tensor).all()):
            raise CplError(f"{where}: the stored scores of {name} are not all finite (the file is corrupted)")


# The metadata fields that change what a retain set does, which its content id covers (module docstring).
RETAIN_ID_FIELDS = (
    ("scoring",),
    ("model", "fingerprint"),
    ("model", "fingerprint_bf16"),
    ("retain", "objective"),
    ("retain", "confidence"),
    ("retain", "uncertain"),
    ("retain", "questions"),
)


def content_id(
    packed: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    negative: Mapping[str, torch.Tensor] | None = None,
    behaviour: bytes | None = None,
) -> str:
    """The mask's content id: sha256 over sorted names, shapes and packed bits, then a retain set's
    ``behaviour`` (:func:`retain_behaviour`); see the module docstring."""
    digest = hashlib.sha256()
    for name in sorted(shapes):
        digest.update(f"{name}|{','.join(str(size) for size in shapes[name])}\n".encode())
        digest.update(packed[name].numpy().tobytes())
        if negative is not None:
            digest.update(negative[name].numpy().tobytes())
    if behaviour is not None:
        digest.update(b"retain\n" + behaviour)
    return digest.hexdigest()


def retain_behaviour(metadata: Mapping[str, Any]) -> bytes:
    """The canonical JSON of a retain set's :data:`RETAIN_ID_FIELDS`, which its content id covers.

    Sorted keys, no spaces, ASCII only, so the same values give the same bytes however the file
    ordered or spaced them; a field that is absent (or under a value that is not an object) is null.
    """
    fields = {".".join(path): _field(metadata, path) for path in RETAIN_ID_FIELDS}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _field(metadata: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = metadata
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


@dataclass
class Mask:
    """A freeze mask: per parameter, which entries are collaborative (trainable) and which frozen."""

    packed: dict[str, torch.Tensor]  # name -> (ceil(n/8),) uint8 packed bits
    shapes: dict[str, tuple[int, ...]]  # name -> parameter shape, in model order
    metadata: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] | None = None  # name -> bfloat16 s = g_M ⊙ g_I, parameter shape
    negative: dict[str, torch.Tensor] | None = None  # a retain set: name -> packed plane where g_M < 0

    @classmethod
    def from_bool(
        cls,
        masks: Mapping[str, torch.Tensor],
        metadata: dict[str, Any],
        scores: Mapping[str, torch.Tensor] | None = None,
    ) -> Mask:
        """Build a mask from bool tensors (True = collaborative), adding overall counts to the metadata."""
        packed = {name: pack_bits(bits) for name, bits in masks.items()}
        shapes = {name: tuple(bits.shape) for name, bits in masks.items()}
        stored = None if scores is None else {name: scores[name].detach().to("cpu", torch.bfloat16) for name in shapes}
        mask = cls(packed=packed, shapes=shapes, metadata=dict(metadata), scores=stored)
        mask.metadata.pop(SCORES_HASH_KEY, None)
        if stored is not None:
            mask.metadata[SCORES_HASH_KEY] = scores_sha256(stored)
        mask.metadata["counts"] = {**mask.metadata.get("counts", {}), **mask.bit_counts()}
        return mask

    @classmethod
    def from_signs(cls, signs: PackedSigns, metadata: dict[str, Any]) -> Mask:
        """A retain set: ``signs`` (sign(g_M), two planes per tensor) with its metadata."""
        shapes = {name: tuple(shape) for name, shape in signs.shapes.items()}
        positive = {name: plane.cpu() for name, plane in signs.positive.items()}
        negative = {name: plane.cpu() for name, plane in signs.negative.items()}
        retain = cls(positive, shapes, dict(metadata), negative=negative)
        retain.metadata["counts"] = retain.bit_counts()
        return retain

    @property
    def kind(self) -> str:
        """``mask`` (a freeze mask) or ``retain`` (a retain set: the signs of g_M)."""
        return "mask" if self.negative is None else "retain"

    def require_kind(self, kind: str, where: str) -> None:
        """Refuse a retain set where a freeze mask is wanted, and the reverse, naming ``where`` it was given."""
        if self.kind == kind:
            return
        if kind == "retain":
            raise CplError(f"{where}: mask {self.id[:12]} is a freeze mask, not a retain set (give it as --mask)")
        raise CplError(
            f"{where}: {self.id[:12]} is a retain set (the signs of g_M), not a freeze mask "
            "(give it as --retain, with --method dynamic)"
        )

    def signs(self) -> PackedSigns:
        """A retain set's sign(g_M), as the per-step rule holds it."""
        self.require_kind("retain", "signs")
        assert self.negative is not None
        return PackedSigns(dict(self.packed), dict(self.negative), {n: torch.Size(s) for n, s in self.shapes.items()})

    @property
    def names(self) -> list[str]:
        """Parameter names, in model order."""
        return list(self.shapes)

    @functools.cached_property
    def id(self) -> str:
        """The content id (hex sha256 of names, shapes and bits; a retain set's also of what it does).

        A retain set's metadata is part of it: change it before the id is first read, never after.
        """
        behaviour = None if self.negative is None else retain_behaviour(self.metadata)
        return content_id(self.packed, self.shapes, self.negative, behaviour)

    def bit_counts(self) -> dict[str, int]:
        """The whole-mask counts the bits determine, as ``counts`` records them: entries and collaborative
        ones, or a retain set's entries and positive, negative and frozen (uncertain, both planes) ones."""
        if self.negative is None:
            return {"entries": self.entries, "collaborative": self.collaborative_count()}
        negative = self.negative
        return {
            "entries": self.entries,
            "positive": sum(count_set_bits(plane) for plane in self.packed.values()),
            "negative": sum(count_set_bits(plane) for plane in negative.values()),
            "frozen": sum(count_set_bits(self.packed[name] & negative[name]) for name in self.packed),
        }

    @property
    def entries(self) -> int:
        """Total number of parameter entries the mask covers."""
        return sum(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes.values())

    def entries_of(self, name: str) -> int:
        """Number of entries of one parameter."""
        return int(np.prod(self.shapes[name], dtype=np.int64))

    def collaborative(self, name: str) -> torch.Tensor:
        """Bool tensor of the parameter's shape: True where the entry is collaborative (trainable)."""
        if name not in self.shapes:
            raise CplError(f"mask {self.id[:12]}: no parameter named {name}")
        return unpack_bits(self.packed[name], self.shapes[name])

    def collaborative_count(self, name: str | None = None) -> int:
        """Collaborative entries of one parameter, or of the whole mask when ``name`` is None."""
        names = self.names if name is None else [name]
        return sum(count_set_bits(self.packed[item]) for item in names)

    def collaborative_share(self, name: str | None = None) -> float:
        """Share of collaborative entries, of one parameter or of the whole mask."""
        total = self.entries if name is None else self.entries_of(name)
        return self.collaborative_count(name) / total if total else 0.0

    def header(self) -> dict[str, Any]:
        """The JSON object stored under the ``cpl_mask`` header key."""
        kind = {} if self.kind == "mask" else {"kind": self.kind}
        return {
            "format": FORMAT_NAME,
            "version": PLAIN_MASK_VERSION if self.kind == "mask" else FORMAT_VERSION,
            **kind,
            "id": self.id,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "scores": self.scores is not None,
            "metadata": self.metadata if self.scores is not None else _without_scores_hash(self.metadata),
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the mask (and its scores, if any) as one safetensors file, atomically.

        With ``overwrite`` False an existing file at ``path`` (one created since the caller checked)
        is not replaced: :class:`CplError`.
        """
        from safetensors.torch import save

        tensors = dict(self.packed)
        if self.scores is not None:
            tensors.update({SCORES_PREFIX + name: tensor.contiguous() for name, tensor in self.scores.items()})
        if self.negative is not None:
            tensors.update({NEGATIVE_PREFIX + name: plane for name, plane in self.negative.items()})
        payload = save(tensors, metadata={HEADER_KEY: self._header_json()})
        with atomic_write(path, "wb", replace=overwrite) as handle:
            handle.write(payload)
        return Path(path)

    def _header_json(self) -> str:
        """The header as strict JSON; a NaN or an infinity, which no reader accepts, is refused, not written."""
        header = self.header()
        try:
            return json.dumps(header, ensure_ascii=False, allow_nan=False)
        except ValueError:
            where = _non_finite(header["metadata"]) or "?"
            raise CplError(
                f"mask {self.id[:12]}: metadata '{where}' is not a finite number (NaN or infinite); not written"
            ) from None

    @classmethod
    def load(cls, path: str | os.PathLike, *, scores: bool = True) -> Mask:
        """Read and verify a mask file (format, version, tensors, content id, padding bits, the counts the bits
        determine), with its scores if asked."""
        header = read_header(path)
        shapes = {name: tuple(shape) for name, shape in header["shapes"].items()}
        with_scores = bool(scores and header["scores"])
        retain = header["kind"] == "retain"
        tensors = read_tensors(Path(path), shapes, with_scores=with_scores, with_negative=retain)
        packed = {name: tensors[name] for name in shapes}
        negative = {name: tensors[NEGATIVE_PREFIX + name] for name in shapes} if retain else None
        stored = {name: tensors[SCORES_PREFIX + name] for name in shapes} if with_scores else None
        mask = cls(packed=packed, shapes=shapes, metadata=header["metadata"], scores=stored, negative=negative)
        if mask.id != header["id"]:
            raise CplError(
                f"{path}: content id mismatch (file says {header['id'][:12]}, bits give {mask.id[:12]}); "
                "the file is corrupted or was edited"
            )
        check_planes(path, packed, shapes)  # after the id: a flipped byte is reported as the corruption it is
        if negative is not None:
            check_planes(path, negative, shapes, NEGATIVE_PREFIX)
        check_counts(path, header["metadata"].get("counts"), mask.bit_counts())
        if stored is not None:
            _check_scores(path, stored, header["metadata"].get(SCORES_HASH_KEY))
        return mask

    def check_model(
        self, model: torch.nn.Module, *, allow_other_weights: bool = False, fingerprint: str | None = None
    ) -> None:
        """Refuse a model whose parameter names or shapes differ, or (unless allowed) whose weights differ.

        ``fingerprint`` is the model's :func:`~cpl_masks.models.model_fingerprint` when the caller has
        it already, so the weights are not hashed twice.
        """
        actual = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
        problems = [f"{name} missing from the model" for name in self.shapes if name not in actual]
        problems += [f"{name} not in the mask" for name in actual if name not in self.shapes]
        problems += [
            f"{name} is {list(actual[name])} in the model but {list(shape)} in the mask"
            for name, shape in self.shapes.items()
            if name in actual and actual[name] != shape
        ]
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise CplError(f"mask {self.id[:12]} does not fit this model: {shown}")
        if not allow_other_weights:
            self._check_weights(model, fingerprint)

    def _check_weights(self, model: torch.nn.Module, fingerprint: str | None) -> None:
        """Refuse other weights: the exact fingerprint, or the bfloat16 one (same checkpoint, other dtype)."""
        from cpl_masks.models import model_fingerprint

        recorded = self.metadata.get("model") or {}
        expected = recorded.get("fingerprint")
        if expected is None or (fingerprint or model_fingerprint(model)) == expected:
            return
        rounded = recorded.get("fingerprint_bf16")
        if rounded is not None and model_fingerprint(model, rounded_to=torch.bfloat16) == rounded:
            return
        profiled_in = (
            recorded.get("dtype") or (self.metadata.get("profile") or {}).get("dtype") or "an unrecorded dtype"
        )
        raise CplError(
            f"mask {self.id[:12]} was profiled on other weights (fingerprint {expected[:12]}, "
            f"model {recorded.get('ref')} in {profiled_in}; this model is in {dtype_name(model)}); "
            "pass --allow-other-weights to use it anyway"
        )


def weights_metadata(model: torch.nn.Module) -> dict[str, str]:
    """What a mask records of the weights it is made from, for :meth:`Mask.check_model`.

    The exact fingerprint; one of the weights rounded to bfloat16, so the same checkpoint loaded at
    another precision is still accepted; and the dtype, so a refusal can name both.
    """
    from cpl_masks.models import model_fingerprint

    return {
        "fingerprint": model_fingerprint(model),
        "fingerprint_bf16": model_fingerprint(model, rounded_to=torch.bfloat16),
        "dtype": dtype_name(model),
    }


def dtype_name(model: torch.nn.Module) -> str:
    """The dtype of a model's first parameter, as a name (``float32``, ``bfloat16``)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _non_finite(value: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinity in a JSON-like value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _without_scores_hash(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata of a mask saved without its scores: no hash of scores that are not there."""
    return {key: value for key, value in metadata.items() if key != SCORES_HASH_KEY}


def _check_scores(path: str | os.PathLike, scores: Mapping[str, torch.Tensor], recorded: str | None) -> None:
    """Refuse stored scores that are not bfloat16, differ from their recorded hash, or are not finite.

    Files written before the hash was recorded have none; their scores are still checked for finiteness.
    """
    wrong = next((name for name, tensor in scores.items() if tensor.dtype != torch.bfloat16), None)
    if wrong is not None:
        raise CplError(f"{path}: the stored scores of {wrong} are {scores[wrong].dtype}, not bfloat16")
    if recorded is not None and scores_sha256(scores) != recorded:
        raise CplError(f"{path}: stored scores do not match their recorded sha256; the file is corrupted or was edited")
    check_finite_scores(scores, str(path))
