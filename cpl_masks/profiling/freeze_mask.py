"""Gradient profiling: which parameters conflict with what the model already knows.

Two batched passes over the data give the mean answer-loss gradients ``g_I`` (injection set) and
``g_M`` (mastered set); the score ``s = g_M ⊙ g_I`` of each entry decides, through a
:class:`~cpl_masks.profiling.selection.Cut`, whether it is collaborative (trainable) or frozen. The
confidence cut scores by ``s``'s t-statistic instead, from a pass per question
(:func:`~cpl_masks.profiling.gradients.gradient_sums`) that also gives each entry's standard error.

The gradients come from :mod:`cpl_masks.profiling.gradients`, so memory stays at the model, two float32
gradient buffers and one batch's activations; each tensor's mask is computed as soon as both its
gradients exist and both are freed right after.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cpl_masks.data.questions import MULTIPLE_CHOICE, Item, Question, questions_sha256
from cpl_masks.data.split import resolve_scoring
from cpl_masks.errors import CplError
from cpl_masks.masks.format import SCORES_HASH_KEY, Mask, weights_metadata
from cpl_masks.models import LoadedModel
from cpl_masks.profiling.gradients import gradient_sums, mean_gradients
from cpl_masks.profiling.selection import Cut, encode_scores, t_statistic, touched_entries
from cpl_masks.scoring.completion import DEFAULT_LOSS_ON
from cpl_masks.scoring.scorers import Scorer, make_scorer
from cpl_masks.utils import distributed, sharding
from cpl_masks.utils.progress import progress_bar
from cpl_masks.utils.versions import stamp

LOSSES = {
    "letter": "cross-entropy of the answer letter at the last position (chat template)",
    "loglik": "mean token cross-entropy of the correct choice's text",
    "loglik-norm": "mean token cross-entropy of the correct choice's text",
}
CHOICES_LOSS = "cross-entropy over the choices' scores (the loss of the prediction: its margin)"
COMPLETION_LOSSES = {
    "completion": "mean token cross-entropy of the completion (assistant) tokens",
    "all": "mean token cross-entropy of every token",
}


def loss_metadata(
    scoring: str, loss_on: str, sets: Sequence[Sequence[Item]], objective: str = "answer"
) -> dict[str, str]:
    """The ``loss`` a mask or retain set records, and ``loss_on`` where free-form items took part.

    A set of multiple-choice questions alone records what it always did, so its mask is the same file.
    """
    forms = {item.form for items in sets for item in items}
    choices = LOSSES[scoring] if objective == "answer" else CHOICES_LOSS
    if forms <= {MULTIPLE_CHOICE}:
        return {"loss": choices}
    free = COMPLETION_LOSSES[loss_on]
    return {
        "loss": f"{choices} (multiple choice); {free} (free-form)" if MULTIPLE_CHOICE in forms else free,
        "loss_on": loss_on,
    }


def profile(
    loaded: LoadedModel,
    mastered: Sequence[Question],
    inject: Sequence[Question],
    *,
    cut: Cut | None = None,
    scoring: str | None = None,
    loss_on: str = DEFAULT_LOSS_ON,
    batch_size: int = 16,
    save_scores: bool = False,
    checkpointing: bool = True,
    seed: int = 0,
    task: str | None = None,
    data_paths: dict[str, str] | None = None,
    show_progress: bool = True,
    wrapping: str | None = None,
) -> Mask:
    """Profile ``loaded`` on the mastered and injection sets and return the freeze mask.

    Args:
        loaded: the model and tokenizer to profile.
        mastered: questions the model answers right (M).
        inject: questions it answers wrong, to be learned (I).
        cut: how scores become bits: a threshold or a keep fraction, and tensor patterns
            (default ``Cut()``: collaborative where ``s >= 0``).
        scoring: the answer loss (``letter``, ``loglik`` or ``loglik-norm``); default: the one
            ``split.json`` beside ``data_paths["mastered"]`` records, else ``letter``
            (:func:`cpl_masks.data.split.resolve_scoring`).
        loss_on: free-form items' loss: ``completion`` (their completion tokens) or ``all`` tokens.
        batch_size: questions per forward/backward pass.
        save_scores: keep the bfloat16 scores in the mask, so it can be re-cut without profiling.
        checkpointing: recompute layer activations in backward (same gradients, far less memory).
        seed: seeds torch (recorded in the mask).
        task: the task name recorded in the mask (the registry names the mask after it).
        data_paths: where ``mastered`` and ``inject`` were read from, recorded under those keys.
        show_progress: show a progress bar over both passes.
        wrapping: under torchrun, ``ddp`` (the default: every rank holds the whole model and the
            gradient sums are all-reduced) or ``fsdp2`` (the model is sharded in place with
            ``fully_shard`` and stays so; gradients, scores and cuts are per-rank shards, and the
            bits are gathered one tensor at a time). Ignored in a single process.

    Returns:
        The mask; its metadata holds the provenance, per-tensor statistics (entries touched by
        ``g_I``, positive and negative parts of ``g_M·g_I``, squared norms) and a ``profile``
        section with the time, peak memory (of this process) and number of processes of the run.
        Under ``torchrun`` every rank profiles its share of the questions and returns the same mask.
    """
    if not mastered or not inject:
        raise CplError("profile needs a non-empty mastered set and a non-empty injection set")
    cut = cut or Cut()
    scoring = resolve_scoring(scoring, data_path=(data_paths or {}).get("mastered"))
    scorer = make_scorer(scoring, loaded.tokenizer, loss_on=loss_on)
    scorer.check_fits(loaded.model, [*mastered, *inject])
    torch.manual_seed(seed)
    distributed.setup(str(loaded.device))  # joins the launcher's group if the caller has not
    check_cut_runs(cut, wrapping)
    weights = weights_metadata(loaded.model)  # of the whole weights, before any sharding
    if sharding.wrapping_for(wrapping) == "fsdp2":
        sharding.shard_model(loaded.model)
    device = loaded.device
    reset_peak_memory(device)
    started = time.perf_counter()
    shown = show_progress and distributed.is_main()
    with progress_bar("profile (I, then M)", len(inject) + len(mastered), shown) as advance:
        passes = {"batch_size": batch_size, "checkpointing": checkpointing, "advance": advance}
        gradients = _gradients(cut, loaded.model, scorer, mastered, inject, **passes)
    bits, stats, scores = _select(cut, *gradients, keep_scores=save_scores or cut.keep_fraction is not None)
    seconds = time.perf_counter() - started
    metadata = {
        "model": {"ref": loaded.ref, **weights},
        "scoring": scoring,
        **loss_metadata(scoring, loss_on, [mastered, inject]),
        "data": data_provenance({"mastered": mastered, "inject": inject}, data_paths),
        "task": task,
        "rule": cut.to_metadata(),
        "seed": seed,
        **stamp(),
        "parents": [],
        "tensors": stats,
        "counts": touched_counts(stats),
        "profile": {
            "batch_size": batch_size,
            "checkpointing": checkpointing,
            "device": str(device),
            "dtype": weights["dtype"],
            "seconds": round(seconds, 3),
            **peak_memory(device),
            "processes": distributed.world_size(),
            "wrapping": sharding.wrapping_for(wrapping),
        },
    }
    return Mask.from_bool(bits, metadata, scores=scores if save_scores else None)


def reprofile(
    parent: Mask,
    model: torch.nn.Module,
    scorer: Scorer,
    mastered: Sequence[Question],
    inject: Sequence[Question],
    *,
    batch_size: int = 16,
    at: dict[str, int] | None = None,
) -> Mask:
    """``parent``'s cut applied again at ``model``'s current weights: the mask a profile would give now.

    For a static mask that follows the weights during training (``--reprofile-every``). The result
    is a child of ``parent`` (``parents``, ``reprofile_of``), records the weights it was profiled at
    and ``at`` (the epoch and step), and keeps ``parent``'s data, scoring and task.
    """
    cut = Cut.from_metadata(parent.metadata.get("rule"), f"mask {parent.id[:12]}")
    gradients = _gradients(cut, model, scorer, mastered, inject, batch_size=batch_size)
    bits, stats, _ = _select(cut, *gradients, keep_scores=cut.keep_fraction is not None)
    kept = {key: value for key, value in parent.metadata.items() if key not in ("profile", SCORES_HASH_KEY)}
    metadata = {
        **kept,
        "model": {**(parent.metadata.get("model") or {}), **weights_metadata(model)},
        "parents": [parent.id],
        "reprofile_of": parent.id,
        "reprofiled_at": at or {},
        "tensors": stats,
        "counts": touched_counts(stats),
        **stamp(),
    }
    return Mask.from_bool(bits, metadata)


Errors = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # standard errors of g_M and g_I


def _gradients(
    cut: Cut,
    model: torch.nn.Module,
    scorer: Scorer,
    mastered: Sequence[Question],
    inject: Sequence[Question],
    *,
    batch_size: int,
    checkpointing: bool = True,
    advance: Callable[[int], None] = lambda _n: None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Errors | None]:
    """g_M and g_I as ``cut`` needs them: batched means, or (the t-statistic) per-question moments."""
    if cut.statistic != "t":
        passes = {"batch_size": batch_size, "checkpointing": checkpointing, "advance": advance}
        g_inject = mean_gradients(model, scorer, inject, **passes)  # I first, as the progress bar says
        return mean_gradients(model, scorer, mastered, **passes), g_inject, None
    moments_i = gradient_sums(model, scorer, inject, checkpointing=checkpointing, advance=advance).moments()
    moments_m = gradient_sums(model, scorer, mastered, checkpointing=checkpointing, advance=advance).moments()
    return moments_m.mean, moments_i.mean, (moments_m.standard_error, moments_i.standard_error)


def data_provenance(sets: dict[str, Sequence[Item]], paths: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The ``data`` metadata of a mask: sha256, row count and source path of each question set it saw.

    Recorded so a mask names exactly the questions that shaped it (``paths`` maps set names to files). A set
    of free-form items also records its ``format`` (multiple choice, the only format once, records none).
    """
    provenance = {}
    for key, rows in sets.items():
        provenance[key] = {"sha256": questions_sha256(rows), "rows": len(rows), "path": (paths or {}).get(key)}
        forms = sorted({item.form for item in rows})
        if forms != [MULTIPLE_CHOICE]:
            provenance[key]["format"] = ", ".join(forms)
    return provenance


def check_cut_runs(cut: Cut, wrapping: str | None) -> None:
    """Refuse, before any model loads, a cut that cannot run under the requested wrapping."""
    if cut.statistic == "t" and sharding.wrapping_for(wrapping) == "fsdp2":
        raise CplError("--confidence cannot run under --distributed fsdp2 (per-question gradients); use ddp")


def _select(
    cut: Cut,
    g_mastered: dict[str, torch.Tensor],
    g_inject: dict[str, torch.Tensor],
    errors: Errors | None,
    *,
    keep_scores: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Turn both gradients into bits tensor by tensor, freeing each pair as soon as it is used.

    The score is ``s = g_M ⊙ g_I``, or its t-statistic when ``errors`` (the standard errors of g_M
    and g_I) are given.

    A threshold decides each tensor on the spot; a keep fraction ranks the stored scores of all
    tensors together once every tensor is scored.
    """
    bits: dict[str, torch.Tensor] = {}
    stats: dict[str, dict[str, Any]] = {}
    scores: dict[str, torch.Tensor] = {}
    for name in list(g_inject):
        grad_m, grad_i = g_mastered.pop(name), g_inject.pop(name)
        placed = grad_i if sharding.is_dtensor(grad_i) else None  # FSDP2: both are shards placed alike
        grad_m, grad_i = sharding.local(grad_m), sharding.local(grad_i)
        product = grad_m * grad_i  # (param shape, or this rank's shard of it) float32 s = g_M ⊙ g_I
        score = product if errors is None else t_statistic(grad_m, grad_i, errors[0].pop(name), errors[1].pop(name))
        touched = grad_i != 0  # bool, entries the injection gradient moves
        kept = cut.select(name, score) if cut.keep_fraction is None else torch.zeros_like(touched)
        sums = torch.stack(
            [
                touched.sum(dtype=torch.float64),
                (kept & touched).sum(dtype=torch.float64),
                product.clamp(min=0).sum(dtype=torch.float64),
                product.clamp(max=0).sum(dtype=torch.float64),
                grad_m.square().sum(dtype=torch.float64),
                grad_i.square().sum(dtype=torch.float64),
            ]
        )  # (6,) float64
        if placed is not None:
            distributed.all_reduce_sum(sums)  # the shards' partial sums: the whole tensor's
        keys = ("touched", "touched_collaborative", "dot_positive", "dot_negative", "norm_m_sq", "norm_i_sq")
        stats[name] = {key: float(value) for key, value in zip(keys, sums.tolist())}
        stats[name].update(touched=int(sums[0]), touched_collaborative=int(sums[1]))
        if keep_scores:
            scores[name] = sharding.whole_from_local(encode_scores(score, touched), placed).cpu()
        if cut.keep_fraction is None:
            bits[name] = sharding.whole_from_local(kept, placed).cpu()
        del grad_m, grad_i, product, score, touched, kept
    if cut.keep_fraction is not None:
        bits = cut.select_all(scores)
        for name, entry in stats.items():
            entry["touched_collaborative"] = kept_touched(bits[name], scores[name])
    return bits, stats, scores


def kept_touched(bits: torch.Tensor, scores: torch.Tensor) -> int:
    """Collaborative entries among those ``g_I`` touches, from a tensor's bits and its stored scores."""
    return int((bits & touched_entries(scores)).sum())


def touched_counts(stats: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Whole-mask totals of the per-tensor touched and touched-collaborative counts (empty without stats)."""
    if not stats:
        return {}
    return {key: sum(entry[key] for entry in stats.values()) for key in ("touched", "touched_collaborative")}


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory count on CUDA, so :func:`peak_memory` reports this run's peak only."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory so far: ``max_memory_allocated`` on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_kind": "cuda"}
    return {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory_kind": "rss",
    }


def sign_agreement(
    model: torch.nn.Module,
    scorer: Scorer,
    mask: Mask,
    mastered: Sequence[Question],
    inject: Sequence[Question],
    *,
    batch_size: int = 16,
) -> dict[str, float]:
    """How far a static mask still matches the sign cut ``g_M ⊙ g_I ≥ 0`` at the model's current weights.

    A mask is profiled once, at the start; as training moves the weights the gradients it was cut
    from change. ``all`` is the share of every entry whose bit agrees with the cut now, ``touched``
    the same among entries the injection gradient moves now (untouched entries score 0 and agree
    trivially).
    """
    g_inject = mean_gradients(model, scorer, inject, batch_size=batch_size)
    g_mastered = mean_gradients(model, scorer, mastered, batch_size=batch_size)
    agree = touched = agree_touched = 0
    for name in mask.names:
        grad_i = g_inject.pop(name)
        now = (g_mastered.pop(name) * grad_i) >= 0  # (param shape) bool, the cut at current weights
        same = now == mask.collaborative(name).to(now.device)  # (param shape) bool
        moved = grad_i != 0
        agree += int(same.sum())
        touched += int(moved.sum())
        agree_touched += int((same & moved).sum())
    return {"all": agree / mask.entries, "touched": agree_touched / touched if touched else 1.0}
