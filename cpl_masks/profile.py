"""Gradient profiling: which parameters conflict with what the model already knows.

Two batched passes over the data give the mean answer-loss gradients ``g_I`` (injection set) and
``g_M`` (mastered set); the score ``s = g_M ⊙ g_I`` of each entry decides, through a
:class:`~cpl_masks.selection.Rule`, whether it is collaborative (trainable) or frozen. The
confidence rule scores by ``s``'s t-statistic instead, from a pass per question
(:func:`gradient_moments`) that also gives each entry's standard error.

Each batch's loss is the sum of its per-question losses divided by the set size, so the gradients
accumulated over the batches are exactly the mean. A post-accumulate hook moves every parameter's
gradient into a float32 buffer as soon as backward produces it (whatever the model's dtype), so
memory stays at the model, two float32 gradient buffers and one batch's activations; each tensor's
mask is computed as soon as both its gradients exist and both are freed right after.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cpl_masks import distributed
from cpl_masks.data import Question, questions_sha256
from cpl_masks.errors import CplError
from cpl_masks.masks import SCORES_HASH_KEY, Mask, weights_metadata
from cpl_masks.models import LoadedModel, activation_checkpointing
from cpl_masks.progress import progress_bar
from cpl_masks.scoring import Scorer, batches, make_scorer
from cpl_masks.selection import Rule, encode_scores, t_statistic, touched_entries
from cpl_masks.split import resolve_scoring
from cpl_masks.versions import stamp

LOSSES = {
    "letter": "cross-entropy of the answer letter at the last position (chat template)",
    "loglik": "mean token cross-entropy of the correct choice's text",
    "loglik-norm": "mean token cross-entropy of the correct choice's text",
}


def profile(
    loaded: LoadedModel,
    mastered: Sequence[Question],
    inject: Sequence[Question],
    *,
    rule: Rule | None = None,
    scoring: str | None = None,
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
        rule: how scores become bits: a threshold or a keep fraction, and tensor patterns
            (default ``Rule()``: collaborative where ``s >= 0``).
        scoring: the answer loss (``letter``, ``loglik`` or ``loglik-norm``); default: the one
            ``split.json`` beside ``data_paths["mastered"]`` records, else ``letter``
            (:func:`cpl_masks.split.resolve_scoring`).
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
    rule = rule or Rule()
    scoring = resolve_scoring(scoring, data_path=(data_paths or {}).get("mastered"))
    scorer = make_scorer(scoring, loaded.tokenizer)
    scorer.check_fits(loaded.model, [*mastered, *inject])
    torch.manual_seed(seed)
    distributed.setup(str(loaded.device))  # joins the launcher's group if the caller has not
    check_rule_runs(rule, wrapping)
    weights = weights_metadata(loaded.model)  # of the whole weights, before any sharding
    if distributed.wrapping_for(wrapping) == "fsdp2":
        distributed.shard_model(loaded.model)
    device = loaded.device
    reset_peak_memory(device)
    started = time.perf_counter()
    shown = show_progress and distributed.is_main()
    with progress_bar("profile (I, then M)", len(inject) + len(mastered), shown) as advance:
        passes = {"batch_size": batch_size, "checkpointing": checkpointing, "advance": advance}
        gradients = _gradients(rule, loaded.model, scorer, mastered, inject, **passes)
    bits, stats, scores = _cut(rule, *gradients, keep_scores=save_scores or rule.keep_fraction is not None)
    seconds = time.perf_counter() - started
    metadata = {
        "model": {"ref": loaded.ref, **weights},
        "scoring": scoring,
        "loss": LOSSES[scoring],
        "data": data_provenance({"mastered": mastered, "inject": inject}, data_paths),
        "task": task,
        "rule": rule.to_metadata(),
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
            "wrapping": distributed.wrapping_for(wrapping),
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
    """``parent``'s rule applied again at ``model``'s current weights: the mask a profile would give now.

    For a static mask that follows the weights during training (``--reprofile-every``). The result
    is a child of ``parent`` (``parents``, ``reprofile_of``), records the weights it was profiled at
    and ``at`` (the epoch and step), and keeps ``parent``'s data, scoring and task.
    """
    rule = Rule.from_metadata(parent.metadata.get("rule"), f"mask {parent.id[:12]}")
    gradients = _gradients(rule, model, scorer, mastered, inject, batch_size=batch_size)
    bits, stats, _ = _cut(rule, *gradients, keep_scores=rule.keep_fraction is not None)
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
    rule: Rule,
    model: torch.nn.Module,
    scorer: Scorer,
    mastered: Sequence[Question],
    inject: Sequence[Question],
    *,
    batch_size: int,
    checkpointing: bool = True,
    advance: Callable[[int], None] = lambda _n: None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Errors | None]:
    """g_M and g_I as ``rule`` needs them: batched means, or (the t-statistic) per-question moments."""
    if rule.statistic != "t":
        passes = {"batch_size": batch_size, "checkpointing": checkpointing, "advance": advance}
        g_inject = mean_gradients(model, scorer, inject, **passes)  # I first, as the progress bar says
        return mean_gradients(model, scorer, mastered, **passes), g_inject, None
    moments_i = gradient_moments(model, scorer, inject, checkpointing=checkpointing, advance=advance)
    moments_m = gradient_moments(model, scorer, mastered, checkpointing=checkpointing, advance=advance)
    return moments_m.mean, moments_i.mean, (moments_m.standard_error, moments_i.standard_error)


def data_provenance(
    sets: dict[str, Sequence[Question]], paths: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """The ``data`` metadata of a mask: sha256, row count and source path of each question set it saw.

    Recorded so a mask names exactly the questions that shaped it (``paths`` maps set names to files).
    """
    return {
        key: {"sha256": questions_sha256(rows), "rows": len(rows), "path": (paths or {}).get(key)}
        for key, rows in sets.items()
    }


def mean_gradients(
    model: torch.nn.Module,
    scorer: Scorer,
    questions: Sequence[Question],
    *,
    batch_size: int = 16,
    checkpointing: bool = True,
    advance: Callable[[int], None] = lambda _n: None,
) -> dict[str, torch.Tensor]:
    """Mean gradient of the answer loss over ``questions``, one float32 tensor per named parameter.

    With ``checkpointing`` each decoder layer's activations are recomputed in backward, so a batch
    costs about one layer's activations instead of all of them; the gradients are the same. Under
    several processes (:mod:`cpl_masks.distributed`) each rank takes its share of the questions,
    divides by the global count and the float32 sums are all-reduced, so every rank returns the
    single-process mean (up to the order of float additions); every rank must call it. On a model
    sharded with FSDP2 the gradients come reduce-scattered, and each returned tensor is a DTensor
    holding this rank's shard.
    """
    parameters = dict(model.named_parameters())  # deduplicates tied weights
    buffers: dict[str, torch.Tensor] = {}
    sharded = any(distributed.is_dtensor(parameter) for parameter in parameters.values())
    with _gradients_into(parameters, buffers), activation_checkpointing(model, checkpointing):
        for batch, weight in _rank_batches(questions, batch_size, equal_counts=sharded):
            losses = scorer.loss(model, batch)  # (B,) per-question answer loss
            scale = weight * (distributed.world_size() if sharded else 1)  # FSDP2 averages over the ranks
            (losses.sum() * scale / len(questions)).backward()  # divided by the global count
            advance(len(batch) * distributed.world_size() if weight else 0)
    ordered = {name: buffers.pop(name, None) for name in parameters}  # model order
    for name, parameter in parameters.items():
        if ordered[name] is None:  # the loss does not reach this parameter
            ordered[name] = torch.zeros_like(parameter, dtype=torch.float32)  # a DTensor under FSDP2
        if not sharded:
            distributed.all_reduce_sum(ordered[name])  # float32 sum of the ranks' partial means: the mean
        if not _all_finite(ordered[name]):
            raise CplError(f"profile: the gradient of {name} is not finite (loss overflow? try --dtype float32)")
    return ordered


@dataclass
class GradientMoments:
    """Per entry, the mean answer-loss gradient over a question set and its standard error."""

    mean: dict[str, torch.Tensor]  # name -> float32 (param shape)
    standard_error: dict[str, torch.Tensor]  # name -> float32: sample std of the per-question gradients / sqrt(n)


class GradientSums:
    """Running sums of per-question gradients and of their squares: moments of any prefix of a pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        parameters = dict(model.named_parameters())
        self.count = 0
        self.total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
        self.squares = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}

    def add(self, gradient: dict[str, torch.Tensor]) -> None:
        """Add one question's gradient (name -> tensor; a parameter it does not reach may be absent)."""
        self.count += 1
        for name, value in gradient.items():
            self.total[name] += value
            self.squares[name].addcmul_(value, value)

    def moments(self) -> GradientMoments:
        """Mean and standard error over every rank's questions so far (all-reduced; every rank must call it)."""
        count = distributed.all_reduce_sum(torch.tensor([float(self.count)])).item()
        if count < 2:
            raise CplError(f"--confidence needs at least 2 questions per set for a standard error, got {count:.0f}")
        mean, error = {}, {}
        for name in self.total:
            total = distributed.all_reduce_sum(self.total[name].clone())
            squares = distributed.all_reduce_sum(self.squares[name].clone())
            mean[name] = total / count
            variance = (squares - count * mean[name].square()).clamp_(min=0) / (count - 1)
            error[name] = variance.div_(count).sqrt_()
        return GradientMoments(mean, error)


def question_gradients(
    model: torch.nn.Module,
    scorer: Scorer,
    questions: Sequence[Question],
    *,
    checkpointing: bool = True,
    advance: Callable[[int], None] = lambda _n: None,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of ``questions``, one float32 gradient (name -> tensor) per question, each valid
    until the next is asked for."""
    parameters = dict(model.named_parameters())
    buffers: dict[str, torch.Tensor] = {}
    with _gradients_into(parameters, buffers), activation_checkpointing(model, checkpointing):
        for batch, _weight in _rank_batches(questions, 1, equal_counts=False):
            scorer.loss(model, batch).sum().backward()
            yield buffers
            buffers.clear()
            advance(distributed.world_size())


def gradient_moments(
    model: torch.nn.Module,
    scorer: Scorer,
    questions: Sequence[Question],
    *,
    checkpointing: bool = True,
    advance: Callable[[int], None] = lambda _n: None,
) -> GradientMoments:
    """Mean gradient over ``questions`` and its standard error, from one backward pass per question.

    What the confidence rule needs to tell a conflict from noise. It costs a pass per question
    (batch 1) and two float32 sums per entry. Under several processes each rank takes its share and
    the sums are all-reduced; a model sharded with FSDP2 is refused (:func:`check_rule_runs`).
    """
    sums = GradientSums(model)
    for gradient in question_gradients(model, scorer, questions, checkpointing=checkpointing, advance=advance):
        sums.add(gradient)
    return sums.moments()


def check_rule_runs(rule: Rule, wrapping: str | None) -> None:
    """Refuse, before any model loads, a rule that cannot run under the requested wrapping."""
    if rule.statistic == "t" and distributed.wrapping_for(wrapping) == "fsdp2":
        raise CplError("--confidence cannot run under --distributed fsdp2 (per-question gradients); use ddp")


def _rank_batches(
    questions: Sequence[Question], batch_size: int, *, equal_counts: bool
) -> Iterator[tuple[Sequence[Question], float]]:
    """This rank's batches of ``questions`` with their weight (1), sorted by length so batches pad less.

    With ``equal_counts`` (an FSDP2 model, whose every backward is a collective) a rank with fewer
    batches than the others ends with batches of one question at weight 0.
    """
    local = distributed.shard(sorted(questions, key=_text_length))
    own = batches(local, batch_size) if local else []
    for batch in own:
        yield batch, 1.0
    if equal_counts:
        for _ in range(math.ceil(distributed.shard_size(len(questions)) / batch_size) - len(own)):
            yield questions[:1], 0.0


def _all_finite(gradient: torch.Tensor) -> bool:
    """Whether every entry is finite; for a DTensor, on every rank (the answer is the same everywhere)."""
    if not distributed.is_dtensor(gradient):
        return bool(torch.isfinite(gradient).all())
    bad = torch.tensor([float(not torch.isfinite(distributed.local(gradient)).all())], device=gradient.device)
    return not distributed.all_reduce_sum(bad).item()


def _text_length(question: Question) -> int:
    return len(question.question) + sum(len(choice) for choice in question.choices)


@contextlib.contextmanager
def _gradients_into(parameters: dict[str, torch.nn.Parameter], buffers: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, every backward adds each parameter's gradient to ``buffers[name]`` (float32)."""
    flags = {name: parameter.requires_grad for name, parameter in parameters.items()}
    handles = []
    for name, parameter in parameters.items():
        parameter.grad = None
        parameter.requires_grad_(True)
        handles.append(parameter.register_post_accumulate_grad_hook(_accumulator(name, buffers)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, parameter in parameters.items():
            parameter.grad = None
            parameter.requires_grad_(flags[name])


def _accumulator(name: str, buffers: dict[str, torch.Tensor]) -> Callable[[torch.nn.Parameter], None]:
    def hook(parameter: torch.nn.Parameter) -> None:
        grad = parameter.grad
        if name in buffers:
            buffers[name] += grad
        else:
            buffers[name] = grad if grad.dtype == torch.float32 else grad.float()
        parameter.grad = None

    return hook


def _cut(
    rule: Rule,
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
        placed = grad_i if distributed.is_dtensor(grad_i) else None  # FSDP2: both are shards placed alike
        grad_m, grad_i = distributed.local(grad_m), distributed.local(grad_i)
        product = grad_m * grad_i  # (param shape, or this rank's shard of it) float32 s = g_M ⊙ g_I
        score = product if errors is None else t_statistic(grad_m, grad_i, errors[0].pop(name), errors[1].pop(name))
        touched = grad_i != 0  # bool, entries the injection gradient moves
        kept = rule.select(name, score) if rule.keep_fraction is None else torch.zeros_like(touched)
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
            scores[name] = _whole(encode_scores(score, touched), placed).cpu()
        if rule.keep_fraction is None:
            bits[name] = _whole(kept, placed).cpu()
        del grad_m, grad_i, product, score, touched, kept
    if rule.keep_fraction is not None:
        bits = rule.cut(scores)
        for name, entry in stats.items():
            entry["touched_collaborative"] = kept_touched(bits[name], scores[name])
    return bits, stats, scores


def kept_touched(bits: torch.Tensor, scores: torch.Tensor) -> int:
    """Collaborative entries among those ``g_I`` touches, from a tensor's bits and its stored scores."""
    return int((bits & touched_entries(scores)).sum())


def _whole(shard: torch.Tensor, placed: torch.Tensor | None) -> torch.Tensor:
    """The whole tensor of ``shard``, this rank's part of a tensor placed like ``placed`` (None: already whole).

    One tensor is gathered at a time, so no rank ever holds more than one whole tensor of the model.
    """
    if placed is None:
        return shard
    from torch.distributed.tensor import DTensor

    wire = shard.to(torch.uint8) if shard.dtype == torch.bool else shard  # gloo gathers no bool tensors
    spread = DTensor.from_local(wire, placed.device_mesh, placed.placements, shape=placed.shape, stride=placed.stride())
    whole = spread.full_tensor()
    return whole.bool() if shard.dtype == torch.bool else whole


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
    """How far a static mask still matches the sign rule ``g_M ⊙ g_I ≥ 0`` at the model's current weights.

    A mask is profiled once, at the start; as training moves the weights the gradients it was cut
    from change. ``all`` is the share of every entry whose bit agrees with the rule now, ``touched``
    the same among entries the injection gradient moves now (untouched entries score 0 and agree
    trivially).
    """
    g_inject = mean_gradients(model, scorer, inject, batch_size=batch_size)
    g_mastered = mean_gradients(model, scorer, mastered, batch_size=batch_size)
    agree = touched = agree_touched = 0
    for name in mask.names:
        grad_i = g_inject.pop(name)
        now = (g_mastered.pop(name) * grad_i) >= 0  # (param shape) bool, the rule at current weights
        same = now == mask.collaborative(name).to(now.device)  # (param shape) bool
        moved = grad_i != 0
        agree += int(same.sum())
        touched += int(moved.sum())
        agree_touched += int((same & moved).sum())
    return {"all": agree / mask.entries, "touched": agree_touched / touched if touched else 1.0}
