"""``cpl-masks profile | inspect | diff | combine | threshold``: make freeze masks and work with them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from cpl_masks import registry
from cpl_masks.algebra import OPERATIONS, combine, recut
from cpl_masks.cli.common import (
    BatchSizeOption,
    DeviceOption,
    DtypeOption,
    ModelOption,
    ThreadsOption,
    print_table,
    reports_errors,
    stdout,
)
from cpl_masks.data import load_questions
from cpl_masks.errors import CplError
from cpl_masks.mask_stats import diff as diff_masks
from cpl_masks.mask_stats import draw_share_heatmap, summarize
from cpl_masks.masks import Mask
from cpl_masks.models import DEFAULT_MODEL, load_model
from cpl_masks.profile import profile as profile_model
from cpl_masks.split import recorded_scoring

MaskArgument = Annotated[str, typer.Argument(help="Mask: file path, id or id prefix, name@vN, or name (latest).")]
OutOption = Annotated[
    Path | None, typer.Option("--out", "-o", help="Mask file to write (default: only into the registry).")
]
NameOption = Annotated[str | None, typer.Option("--name", help="Task name the registry files the mask under.")]
ThresholdOption = Annotated[float | None, typer.Option(help="Collaborative where s = g_M*g_I >= T (default 0).")]
KeepFractionOption = Annotated[
    float | None, typer.Option(help="Instead of a threshold: keep this share of the most positive scores.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@reports_errors
def profile(
    mastered: Annotated[Path, typer.Option(help="Questions the model answers right (mastered.jsonl).")],
    inject: Annotated[Path, typer.Option(help="Questions to teach it (inject.jsonl).")],
    model: ModelOption = DEFAULT_MODEL,
    scoring: Annotated[
        str | None, typer.Option(help="letter, loglik or loglik-norm (default: split.json's, else letter).")
    ] = None,
    batch_size: BatchSizeOption = 16,
    threshold: ThresholdOption = None,
    keep_fraction: KeepFractionOption = None,
    freeze_pattern: Annotated[str | None, typer.Option(help="Regex of parameter names always frozen.")] = None,
    train_pattern: Annotated[str | None, typer.Option(help="Regex of parameter names always trainable.")] = None,
    save_scores: Annotated[bool, typer.Option(help="Store the scores (bfloat16) for `cpl-masks threshold`.")] = False,
    checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in backward: same gradients, much less memory.")
    ] = True,
    out: OutOption = None,
    name: NameOption = None,
    seed: Annotated[int, typer.Option(help="Torch seed, recorded in the mask.")] = 0,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Measure which parameters conflict with what the model masters, and save the freeze mask.

    Example: cpl-masks profile --mastered runs/split/mastered.jsonl --inject runs/split/inject.jsonl
    """
    if threshold is not None and keep_fraction is not None:
        raise CplError("give either --threshold or --keep-fraction, not both")
    mastered_questions, inject_questions = load_questions(mastered), load_questions(inject)
    loaded = load_model(model, dtype=dtype, device=device, threads=threads)
    mask = profile_model(
        loaded,
        mastered_questions,
        inject_questions,
        scoring=scoring or recorded_scoring(mastered) or "letter",
        batch_size=batch_size,
        threshold=0.0 if threshold is None else threshold,
        keep_fraction=keep_fraction,
        freeze_pattern=freeze_pattern,
        train_pattern=train_pattern,
        save_scores=save_scores,
        checkpointing=checkpointing,
        seed=seed,
        task=name,
        data_paths={"mastered": str(mastered), "inject": str(inject)},
    )
    print_summary(mask)
    run = mask.metadata["profile"]
    stdout.print(
        f"profiled in {run['seconds']:.1f} s, peak memory {run['peak_memory_bytes'] / 2**20:.0f} MiB "
        f"({run['peak_memory_kind']})"
    )
    save_and_register(mask, out, task=name, source="profiled")


@reports_errors
def inspect(
    mask: MaskArgument,
    as_json: JsonOption = False,
    plot: Annotated[Path | None, typer.Option(help="Write a heatmap (layers x module types) to this PNG.")] = None,
) -> None:
    """Show a mask's provenance and collaborative shares by module type and layer.

    Example: cpl-masks inspect smollm2-135m-instruct/arc@v1 --plot shares.png
    """
    loaded = Mask.load(registry.resolve_mask_path(mask), scores=False)
    summary = summarize(loaded)
    if plot is not None:
        draw_share_heatmap(loaded, plot)
    if as_json:
        metadata = {key: value for key, value in loaded.metadata.items() if key != "tensors"}
        stdout.print_json(data={"id": loaded.id, "metadata": metadata, "summary": summary})
        return
    print_provenance(loaded)
    print_summary(loaded, summary)


@reports_errors
def diff(first: MaskArgument, second: MaskArgument, as_json: JsonOption = False) -> None:
    """Compare two masks: agreement and Jaccard of their collaborative sets, by module type and layer.

    Example: cpl-masks diff smollm2-135m-instruct/arc@v1 smollm2-135m-instruct/csqa@v1
    """
    result = diff_masks(*(Mask.load(registry.resolve_mask_path(ref), scores=False) for ref in (first, second)))
    if as_json:
        stdout.print_json(data=result)
        return
    columns = ["entries", "agreement", "jaccard"]
    rows = [("overall", *_agreement_cells(result["overall"]))]
    print_table(f"{result['first'][:12]} vs {result['second'][:12]}", ["", *columns], rows)
    for title, key in (("by module type", "by_module"), ("by layer", "by_layer")):
        print_table(title, [title.split()[-1], *columns], [(k, *_agreement_cells(v)) for k, v in result[key].items()])


@reports_errors
def combine_command(
    masks: Annotated[list[str], typer.Argument(help="Two or more masks (paths, ids, names).")],
    op: Annotated[str, typer.Option(help=f"{' | '.join(OPERATIONS)}: how to merge the collaborative sets.")],
    out: OutOption = None,
    name: NameOption = None,
) -> None:
    """Mask algebra: the and / or / majority of several masks; the result records its parents.

    Example: cpl-masks combine --op and arc-mask.safetensors csqa-mask.safetensors -o both.safetensors
    """
    result = combine([Mask.load(registry.resolve_mask_path(ref), scores=False) for ref in masks], op)
    stdout.print(f"{op} of {len(masks)} masks: {result.collaborative_share():.1%} collaborative")
    save_and_register(result, out, task=name, source="combined")


@reports_errors
def threshold(
    mask: MaskArgument,
    threshold: ThresholdOption = None,
    keep_fraction: KeepFractionOption = None,
    out: OutOption = None,
    name: NameOption = None,
) -> None:
    """Re-cut a mask's stored scores at another threshold or keep fraction, without profiling again.

    Example: cpl-masks threshold smollm2-135m-instruct/arc@v1 --keep-fraction 0.3 -o arc-30.safetensors
    """
    if (threshold is None) == (keep_fraction is None):
        raise CplError("give exactly one of --threshold and --keep-fraction")
    result = recut(Mask.load(registry.resolve_mask_path(mask)), threshold=threshold, keep_fraction=keep_fraction)
    print_summary(result)
    save_and_register(result, out, task=name, source="combined")


def save_and_register(mask: Mask, out: Path | None, *, task: str | None, source: str) -> None:
    """Save ``mask`` to ``out`` (or a temporary file the registry copies) and print its registry name."""
    with tempfile.TemporaryDirectory(prefix="cpl-mask-") as folder:
        saved = mask.save(out if out is not None else Path(folder) / "mask.safetensors")
        registered = registry.register_mask(saved, task=task, source=source, parents=mask.metadata["parents"])
    _print_saved(mask, out, registered)


def _print_saved(mask: Mask, out: Path | None, registered: str | None) -> None:
    where = [f"saved {out}"] if out is not None else []
    where += [f"registered as {registered}"] if registered else []
    stdout.print(f"mask {mask.id[:12]}: {', '.join(where)}", highlight=False)


def print_provenance(mask: Mask) -> None:
    """Print where a mask came from: model, data, scoring, rule, parents."""
    meta = mask.metadata
    data = meta.get("data") or {}
    rows: list[tuple[str, Any]] = [
        ("id", mask.id),
        (
            "model",
            f"{meta.get('model', {}).get('ref')} ({str(meta.get('model', {}).get('fingerprint'))[:12]})",
        ),
        ("scoring", meta.get("scoring")),
        ("rule", json.dumps(meta.get("rule"))),
        *(
            (f"{key} data", f"{value.get('rows')} rows, sha256 {value.get('sha256', '')[:12]}")
            for key, value in data.items()
        ),
        ("parents", ", ".join(parent[:12] for parent in meta.get("parents") or []) or "-"),
        ("created", meta.get("created")),
    ]
    print_table("mask", ["field", "value"], rows)


def print_summary(mask: Mask, summary: dict[str, Any] | None = None) -> None:
    """Print collaborative shares (of all and of touched entries) and g_M·g_I by module and layer."""
    summary = summary or summarize(mask)
    columns = ["entries", "collab", "collab of touched", "g_M·g_I", "positive", "negative"]
    overall = summary["overall"]
    cosine = "-" if overall["cosine"] is None else f"{overall['cosine']:.3f}"
    print_table(f"mask {mask.id[:12]}", ["", *columns, "cosine"], [("overall", *_share_cells(overall), cosine)])
    for title, key in (("by module type", "by_module"), ("by layer", "by_layer")):
        print_table(title, [title.split()[-1], *columns], [(k, *_share_cells(v)) for k, v in summary[key].items()])


def _share_cells(group: dict[str, Any]) -> tuple[Any, ...]:
    return (
        group["entries"],
        f"{group['share']:.1%}",
        "-" if group["touched_share"] is None else f"{group['touched_share']:.1%}",
        *("-" if group[key] is None else f"{group[key]:.2g}" for key in ("dot", "dot_positive", "dot_negative")),
    )


def _agreement_cells(group: dict[str, Any]) -> tuple[Any, ...]:
    return group["entries"], f"{group['agreement']:.2%}", f"{group['jaccard']:.2%}"
