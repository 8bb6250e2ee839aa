"""``cpl-masks inspect | diff | combine | threshold``: work with masks.

Also the options, output checks and printing these share with ``profile`` (:mod:`cpl_masks.cli.profile`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cpl_masks.cli.common import (
    print_json,
    print_table,
    reports_errors,
    say,
)
from cpl_masks.errors import CplError
from cpl_masks.masks.algebra import OPERATIONS, combine, recut
from cpl_masks.masks.format import Mask
from cpl_masks.masks.stats import diff as diff_masks
from cpl_masks.masks.stats import draw_share_heatmap, summarize
from cpl_masks.models import model_locations
from cpl_masks.profiling.retain import retain_measure
from cpl_masks.profiling.selection import Cut
from cpl_masks.registry import Registry
from cpl_masks.utils.files import atomic_write, check_output_file

MaskArgument = Annotated[str, typer.Argument(help="Mask: file path, id or id prefix, name@vN, or name (latest).")]
OutOption = Annotated[
    Path | None, typer.Option("--out", "-o", help="Mask file to write (default: only into the registry).")
]
OverwriteMaskOption = Annotated[
    bool, typer.Option(help="Replace an existing --out file (never one of the command's own inputs).")
]
NameOption = Annotated[str | None, typer.Option("--name", help="Task name the registry files the mask under.")]
ThresholdOption = Annotated[float | None, typer.Option(help="Collaborative where s = g_M*g_I >= T (default 0).")]
KeepFractionOption = Annotated[
    float | None, typer.Option(help="Instead of a threshold: keep this share of the most positive scores.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@reports_errors
def inspect(
    mask: MaskArgument,
    as_json: JsonOption = False,
    plot: Annotated[Path | None, typer.Option(help="Write a heatmap (layers x module types) to this PNG.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --plot file (never the mask itself).")] = False,
) -> None:
    """Show a mask's provenance and shares by module and layer.

    Show a mask's provenance and collaborative shares by module type and layer.

    \b
    Example:
      cpl-masks inspect smollm2-135m-instruct/arc@v1 --plot shares.png
    """
    path = Registry().resolve(mask)
    if plot is not None:
        check_output_file(plot, overwrite=overwrite, inputs=[path], option="--plot")
    loaded = Mask.load(path, scores=False)
    if loaded.kind == "retain":
        if plot is not None:
            raise CplError(f"--plot: {loaded.id[:12]} is a retain set; the heatmap draws a freeze mask's shares")
        _inspect_retain(loaded, as_json)
        return
    summary = summarize(loaded)
    if plot is not None:
        with atomic_write(plot, "wb", replace=overwrite) as handle:
            draw_share_heatmap(loaded, handle)
    if as_json:
        metadata = {key: value for key, value in loaded.metadata.items() if key != "tensors"}
        print_json({"id": loaded.id, "metadata": metadata, "summary": summary})
        return
    print_provenance(loaded)
    print_summary(loaded, summary)


def _inspect_retain(retain: Mask, as_json: bool) -> None:
    if as_json:
        metadata = {key: value for key, value in retain.metadata.items() if key != "retain"}
        print_json({"id": retain.id, "kind": retain.kind, "metadata": metadata})
        return
    print_provenance(retain)
    print_retain(retain)


@reports_errors
def diff(first: MaskArgument, second: MaskArgument, as_json: JsonOption = False) -> None:
    """Compare two masks by module type and layer.

    Compare two masks: agreement and Jaccard of their collaborative sets, by module type and layer.

    \b
    Example:
      cpl-masks diff smollm2-135m-instruct/arc@v1 smollm2-135m-instruct/csqa@v1
    """
    registry = Registry()
    result = diff_masks(*(Mask.load(registry.resolve(ref), scores=False) for ref in (first, second)))
    if as_json:
        print_json(result)
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
    overwrite: OverwriteMaskOption = False,
    name: NameOption = None,
) -> None:
    """Combine masks: and / or / majority.

    Mask algebra: the and / or / majority of several masks; the result records its parents.

    \b
    Example:
      cpl-masks combine --op and arc-mask.safetensors csqa-mask.safetensors \\
          -o both.safetensors
    """
    registry = Registry()
    paths = [registry.resolve(ref) for ref in masks]
    check_outputs(out, overwrite, registry, inputs=paths)
    result = combine([Mask.load(path, scores=False) for path in paths], op)
    say(f"{op} of {len(masks)} masks: {result.collaborative_share():.1%} collaborative")
    save_and_register(result, out, task=name, registry=registry, overwrite=overwrite)


@reports_errors
def threshold(
    mask: MaskArgument,
    threshold: ThresholdOption = None,
    keep_fraction: KeepFractionOption = None,
    out: OutOption = None,
    overwrite: OverwriteMaskOption = False,
    name: NameOption = None,
) -> None:
    """Re-cut a mask from its stored scores, without profiling.

    Re-cut a mask's stored scores at another threshold or keep fraction, without profiling again.

    Without --name the re-cut is filed as <model>/<task>.recut, so the task's bare name keeps
    meaning its latest profiled mask.

    \b
    Example:
      cpl-masks threshold smollm2-135m-instruct/arc@v1 --keep-fraction 0.3 \\
          -o arc-30.safetensors
    """
    Cut(threshold=threshold, keep_fraction=keep_fraction)  # refuses a bad cut before the scores load
    registry = Registry()
    path = registry.resolve(mask)
    check_outputs(out, overwrite, registry, inputs=[path])
    result = recut(Mask.load(path), threshold=threshold, keep_fraction=keep_fraction)
    print_summary(result)
    save_and_register(result, out, task=name, registry=registry, overwrite=overwrite)


def check_outputs(
    out: Path | None, overwrite: bool, registry: Registry, *, inputs: list[Path | None], model: str | None = None
) -> None:
    """Before any model loads: refuse an ``--out`` that would destroy a file or write into ``model``'s
    folder (:func:`cpl_masks.models.model_locations`), and a broken registry."""
    if out is not None:
        check_output_file(out, overwrite=overwrite, inputs=[*inputs, *(model_locations(model) if model else [])])
    registry.check()


def save_and_register(
    mask: Mask, out: Path | None, *, task: str | None, registry: Registry, overwrite: bool = False
) -> None:
    """Save ``mask`` to ``out`` when given, register it (straight into the store) and print its name.

    The registry files it by its own metadata: profiled, control, combined or re-cut. Without
    ``overwrite`` a file created at ``out`` while the command ran is not replaced.
    """
    if out is not None:
        mask.save(out, overwrite=overwrite)
    registered = registry.register(mask, task=task)
    _print_saved(mask, out, registered, first_name=registry.names(mask.id)[0])


def _print_saved(mask: Mask, out: Path | None, registered: str, *, first_name: str) -> None:
    """One line: where the mask was saved and the name it is registered under (and whose bits it shares)."""
    where = [f"saved {out}"] if out is not None else []
    where += [f"registered as {registered}"]
    if first_name != registered:
        where += [f"the same bits as {first_name}, registered before"]
    say(f"{'retain set' if mask.kind == 'retain' else 'mask'} {mask.id[:12]}: {', '.join(where)}")


def print_provenance(mask: Mask) -> None:
    """Print where a mask came from: model, data, scoring, rule, parents."""
    meta = mask.metadata
    data = meta.get("data") or {}
    model = meta.get("model") or {}
    rows: list[tuple[str, Any]] = [
        ("id", mask.id),
        ("model", f"{model.get('ref')} ({str(model.get('fingerprint'))[:12]})"),
        ("scoring", meta.get("scoring")),
        ("rule", json.dumps(meta.get("rule"))),
        *(
            (f"{key} data", f"{value.get('rows')} rows, sha256 {(value.get('sha256') or '')[:12]}")
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


def print_retain(retain: Mask) -> None:
    """A retain set in a few lines: its questions, and how many entries g_M pushes up, down or not at all."""
    counts = retain.metadata.get("counts") or {}
    entries, positive, negative, frozen = (
        int(counts.get(key) or 0) for key in ("entries", "positive", "negative", "frozen")
    )
    mastered = (retain.metadata.get("data") or {}).get("mastered") or {}
    measure = retain_measure(retain)

    def share(count: int) -> str:
        return f"{count / entries:.1%}" if entries else "-"

    model, scoring = (retain.metadata.get("model") or {}).get("ref"), retain.metadata.get("scoring")
    loss = (
        f"{scoring} scoring"
        if "format" not in mastered
        else f"{mastered['format']}, loss on {retain.metadata.get('loss_on')}"
    )
    say(f"retain set {retain.id[:12]}: {mastered.get('rows')} questions, model {model}, {loss}")
    confident = measure.confidence is not None
    if confident:
        say(measure.describe())
    positive, negative = positive - frozen, negative - frozen
    passing = entries - positive - negative - frozen
    rows = [("entries", entries, share(entries)), ("g_M > 0", positive, share(positive))]
    rows += [("g_M < 0", negative, share(negative))]
    rows += [("uncertain: frozen", frozen, share(frozen))] if frozen else []
    rows += [("g_M = 0 or uncertain" if confident else "g_M = 0", passing, share(passing))]
    print_table(f"retain set {retain.id[:12]}", ["", "entries", "share"], rows)
