"""Control masks: what a CPL mask is measured against, made as ordinary mask files.

A CPL mask keeps the entries whose mastered and injection gradients agree in sign. Two controls
keep exactly as many entries in every tensor, chosen without that agreement:

* ``random``: positions drawn uniformly at random (seeded), so any gain of the CPL mask over it
  comes from *which* entries it keeps, not from how many or in which tensors;
* ``gradient-magnitude``: the entries with the largest ``|g_I|``, the mean injection-set gradient.
  It uses the injection gradient but ignores the mastered one, so it isolates what the sign
  agreement with ``g_M`` adds.

Both are plain :class:`~cpl_masks.masks.format.Mask` objects: they save, register, train (``--mask``) and
diff like any other mask. Their ``rule`` metadata is ``{"control", "like", "seed"}`` and their only
parent is the mask they mirror.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpl_masks.data.questions import Question, load_questions
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.models import LoadedModel, model_fingerprint
from cpl_masks.profiling.freeze_mask import (
    LOSSES,
    data_provenance,
    peak_memory,
    reset_peak_memory,
    touched_counts,
)
from cpl_masks.profiling.gradients import mean_gradients
from cpl_masks.registry.names import default_task
from cpl_masks.scoring.base import DEFAULT_SCORING
from cpl_masks.scoring.scorers import make_scorer
from cpl_masks.utils.progress import progress_bar
from cpl_masks.utils.versions import stamp


@dataclass(frozen=True)
class Control:
    """A control rule: how it picks each tensor's entries, and what it needs to pick them."""

    summary: str
    needs_inject: bool  # ranks entries by the injection set's gradient: needs the model and the questions
    seeded: bool  # its positions depend on the seed, so a sweep draws one per seed


CONTROLS = {
    "random": Control("uniformly random positions", needs_inject=False, seeded=True),
    "gradient-magnitude": Control("the largest |g_I|", needs_inject=True, seeded=False),
}


def control_mask(
    rule: str,
    like: Mask,
    *,
    seed: int = 0,
    task: str | None = None,
    model: Callable[[], LoadedModel] | None = None,
    inject_path: str | Path | None = None,
    scoring: str | None = None,
    batch_size: int = 16,
    show_progress: bool = True,
) -> Mask:
    """The control mask ``rule`` makes of ``like``: the one builder the CLI and the sweep share.

    Args:
        rule: a name of :data:`CONTROLS`.
        like: the mask whose per-tensor collaborative counts the control copies.
        seed: seeds the random control's positions.
        task: the task recorded in the control; by default ``like``'s task plus ``-<rule>``, so a
            control never takes the name of the mask it mirrors.
        model: loads the model ``like`` was profiled on (called only for gradient-magnitude).
        inject_path: the injection questions whose gradient ranks entries (gradient-magnitude).
        scoring: the answer loss (gradient-magnitude); defaults to ``like``'s.
        batch_size: questions per forward/backward pass (gradient-magnitude).
        show_progress: show a progress bar over the injection set.
    """
    like.require_kind("mask", "--like")
    if rule not in CONTROLS:
        raise CplError(f"--rule {rule}: choose one of {', '.join(CONTROLS)}")
    if not CONTROLS[rule].needs_inject:
        return random_mask(like, seed=seed, task=task)
    if model is None or inject_path is None:
        raise CplError(f"the {rule} control needs the model and --inject")
    return gradient_magnitude_mask(
        model(),
        load_questions(inject_path),
        like,
        scoring=scoring or like.metadata.get("scoring") or DEFAULT_SCORING,
        batch_size=batch_size,
        show_progress=show_progress,
        task=task,
        data_paths={"inject": str(inject_path)},
    )


def random_mask(like: Mask, *, seed: int = 0, task: str | None = None) -> Mask:
    """A mask with ``like``'s collaborative count in every tensor, at uniformly random positions.

    The control for "does it matter which entries CPL keeps?": same budget per tensor, no gradient.

    Args:
        like: the mask whose per-tensor collaborative counts are copied.
        seed: seeds the ``torch.Generator`` that draws the positions (same seed, same mask).
        task: the task name recorded in the mask (default: ``like``'s task + ``-random``).

    Returns:
        The control mask; ``model`` and ``scoring`` are ``like``'s.
    """
    generator = torch.Generator().manual_seed(seed)
    bits = {
        name: _random_bits(like.shapes[name], like.collaborative_count(name), generator) for name in like.names
    }  # name -> (param shape) bool
    metadata = {
        **_control_metadata(like, "random", seed=seed, task=task),
        "scoring": like.metadata.get("scoring"),
        "loss": like.metadata.get("loss"),
    }
    return Mask.from_bool(bits, metadata)


def gradient_magnitude_mask(
    loaded: LoadedModel,
    inject: Sequence[Question],
    like: Mask,
    *,
    scoring: str,
    batch_size: int = 16,
    show_progress: bool = True,
    task: str | None = None,
    data_paths: dict[str, str] | None = None,
) -> Mask:
    """A mask keeping, in every tensor, ``like``'s number of entries with the largest ``|g_I|``.

    The control for "what does the sign agreement with ``g_M`` add?": it sees the injection gradient
    but not the mastered one. Ties in ``|g_I|`` go to the lower flat index (a stable sort).

    Args:
        loaded: the model ``like`` was profiled on (same names, shapes and weights).
        inject: the questions to inject (I), whose mean answer-loss gradient ranks the entries.
        like: the mask whose per-tensor collaborative counts are copied.
        scoring: the answer loss (``letter``, ``loglik`` or ``loglik-norm``).
        batch_size: questions per forward/backward pass.
        show_progress: show a progress bar over the injection set.
        task: the task name recorded in the mask (default: ``like``'s task + ``-gradient-magnitude``).
        data_paths: where ``inject`` was read from, under the key ``inject``.

    Returns:
        The control mask, with per-tensor ``touched`` counts and a ``profile`` section (time, memory).

    Raises:
        CplError: an empty injection set, an unknown scoring, or a model other than ``like``'s.
    """
    if not inject:
        raise CplError("the gradient-magnitude control needs a non-empty injection set")
    scorer = make_scorer(scoring, loaded.tokenizer)
    _check_same_weights(like, loaded)
    reset_peak_memory(loaded.device)
    started = time.perf_counter()
    with progress_bar("gradient magnitude (I)", len(inject), show_progress) as advance:
        g_inject = mean_gradients(loaded.model, scorer, inject, batch_size=batch_size, advance=advance)
    bits: dict[str, torch.Tensor] = {}  # name -> (param shape) bool
    stats: dict[str, dict[str, Any]] = {}
    for name in like.names:
        gradient = g_inject.pop(name)  # (param shape) float32 g_I
        bits[name] = _largest_bits(gradient.abs(), like.collaborative_count(name)).cpu()
        stats[name] = _tensor_stats(gradient, bits[name])
        del gradient
    metadata = {
        **_control_metadata(like, "gradient-magnitude", seed=None, task=task),
        "scoring": scoring,
        "loss": LOSSES[scoring],
        "data": data_provenance({"inject": inject}, data_paths),
        "tensors": stats,
        "counts": touched_counts(stats),
        "profile": {
            "batch_size": batch_size,
            "device": str(loaded.device),
            "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - started, 3),
            **peak_memory(loaded.device),
        },
    }
    return Mask.from_bool(bits, metadata)


def _control_metadata(like: Mask, control: str, *, seed: int | None, task: str | None) -> dict[str, Any]:
    """Provenance shared by both controls: ``like``'s model, the rule, the parent and the stamp."""
    return {
        "model": dict(like.metadata.get("model") or {}),
        "task": task if task is not None else f"{default_task(like.metadata)}-{control}",
        "rule": {"control": control, "like": like.id, "seed": seed},
        "seed": seed,
        "parents": [like.id],
        **stamp(),
    }


def _random_bits(shape: tuple[int, ...], count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` True entries at uniformly random positions of a bool tensor of ``shape``."""
    entries = int(np.prod(shape, dtype=np.int64))
    if count in (0, entries):  # nothing to draw
        return torch.full(shape, count > 0, dtype=torch.bool)
    flat = torch.zeros(entries, dtype=torch.bool)  # (n,) bool
    flat[torch.randperm(entries, generator=generator)[:count]] = True
    return flat.reshape(shape)


def _largest_bits(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """True at the ``count`` largest entries of ``magnitude``; ties go to the lower flat index."""
    if count in (0, magnitude.numel()):
        return torch.full(magnitude.shape, count > 0, dtype=torch.bool, device=magnitude.device)
    order = torch.sort(magnitude.reshape(-1), descending=True, stable=True).indices  # (n,) int64
    flat = torch.zeros(magnitude.numel(), dtype=torch.bool, device=magnitude.device)  # (n,) bool
    flat[order[:count]] = True
    return flat.reshape(magnitude.shape)


def _tensor_stats(gradient: torch.Tensor, bits: torch.Tensor) -> dict[str, Any]:
    """What the summary tables read for a tensor: entries ``g_I`` touches, and how many of them are kept."""
    touched = (gradient != 0).cpu()  # (param shape) bool
    return {
        "touched": int(touched.sum()),
        "touched_collaborative": int((touched & bits).sum()),
        "norm_i_sq": float(gradient.square().sum(dtype=torch.float64)),
    }


def _check_same_weights(like: Mask, loaded: LoadedModel) -> None:
    """Refuse a model whose parameter names, shapes or weights differ from those ``like`` was profiled on."""
    like.check_model(loaded.model, allow_other_weights=True)  # names and shapes, one line if they differ
    expected = (like.metadata.get("model") or {}).get("fingerprint")
    if expected is not None and model_fingerprint(loaded.model) != expected:
        raise CplError(
            f"--like {like.id[:12]} was profiled on other weights (fingerprint {expected[:12]}) than "
            f"--model {loaded.ref}; a control must use the same weights"
        )
