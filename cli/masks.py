"""``cpl-masks profile | inspect | diff | combine | threshold``: make freeze masks and work with them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from cpl_masks import distributed
from cpl_masks.algebra import OPERATIONS, combine, recut
from cpl_masks.cli.common import (
    BatchSizeOption,
    DeviceOption,
    DtypeOption,
    ModelOption,
    ThreadsOption,
    print_json,
    print_table,
    reports_errors,
    say,
    stdout,
)
from cpl_masks.cli.retain import KINDS, check_retain_options, make_retain_set, print_retain
from cpl_masks.controls import CONTROLS, control_mask
from cpl_masks.data import load_questions
from cpl_masks.errors import CplError
from cpl_masks.files import atomic_write, check_output_file
from cpl_masks.mask_stats import diff as diff_masks
from cpl_masks.mask_stats import draw_share_heatmap, summarize
from cpl_masks.masks import Mask
from cpl_masks.models import DEFAULT_MODEL, load_model
from cpl_masks.profile import check_rule_runs
from cpl_masks.profile import profile as profile_model
from cpl_masks.registry import Registry
from cpl_masks.registry.names import check_task
from cpl_masks.selection import Rule
from cpl_masks.split import resolve_scoring

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
RULES = ("sign", *CONTROLS)


@reports_errors
@distributed.reports_rank_errors
def profile(
    mastered: Annotated[
        Path | None, typer.Option(help="Questions the model answers right (mastered.jsonl); --rule sign only.")
    ] = None,
    inject: Annotated[
        Path | None, typer.Option(help="Questions to teach it (inject.jsonl); not used by --rule random.")
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    scoring: Annotated[
        str | None,
        typer.Option(help="letter, loglik or loglik-norm (default: --like's, else split.json's, else letter)."),
    ] = None,
    rule: Annotated[
        str, typer.Option(help="sign (CPL: g_M*g_I >= T), or a control with --like: random, gradient-magnitude.")
    ] = "sign",
    like: Annotated[
        str | None, typer.Option(help="Control rules: the mask whose per-tensor collaborative counts to copy.")
    ] = None,
    batch_size: BatchSizeOption = 16,
    threshold: ThresholdOption = None,
    keep_fraction: KeepFractionOption = None,
    freeze_pattern: Annotated[str | None, typer.Option(help="Regex of parameter names always frozen.")] = None,
    train_pattern: Annotated[str | None, typer.Option(help="Regex of parameter names always trainable.")] = None,
    save_scores: Annotated[bool, typer.Option(help="Store the scores (bfloat16) for `cpl-masks threshold`.")] = False,
    confidence: Annotated[
        float | None,
        typer.Option(
            help="Freeze an entry only where it conflicts with confidence: the t-statistic of g_M*g_I below -K "
            "(one backward pass per question; --keep-fraction then ranks by t).",
        ),
    ] = None,
    checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in backward: same gradients, much less memory.")
    ] = True,
    out: OutOption = None,
    overwrite: OverwriteMaskOption = False,
    name: NameOption = None,
    seed: Annotated[int, typer.Option(help="Torch seed (--rule random: the positions' seed), recorded.")] = 0,
    wrapping: Annotated[
        str | None,
        typer.Option(
            "--distributed",
            help="Under torchrun/accelerate launch: ddp (default; whole model per rank, all-reduced "
            "gradient sums) or fsdp2 (sharded model and gradients; --rule sign only).",
        ),
    ] = None,
    kind: Annotated[
        str,
        typer.Option(
            help="mask (a freeze mask from --mastered and --inject) or retain (a retain set: the signs of g_M "
            "over --mastered alone, for train --retain; reusable for any task on these weights).",
        ),
    ] = "mask",
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Measure which parameters conflict with what the model masters, and save the freeze mask.

    --rule random|gradient-magnitude --like MASK: a control with MASK's count in every tensor instead.
    --kind retain: the signs of g_M over --mastered, for the per-step rule (train --retain).
    Under torchrun (or accelerate launch) each rank profiles its share and rank 0 saves and registers.

    Example: cpl-masks profile --mastered runs/split/mastered.jsonl --inject runs/split/inject.jsonl
    """
    if kind not in KINDS:
        raise CplError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    sign_only = {
        "--threshold": threshold,
        "--keep-fraction": keep_fraction,
        "--freeze-pattern": freeze_pattern,
        "--train-pattern": train_pattern,
        "--save-scores": save_scores or None,
        "--confidence": confidence,
    }
    if kind == "retain":
        given = {**sign_only, "--like": like, "--rule": None if rule == "sign" else rule}
        check_retain_options(
            inject=inject, mastered=mastered, given={**given, "--distributed fsdp2": wrapping == "fsdp2" or None}
        )
        _profile_retain(
            mastered,
            model=model,
            scoring=scoring,
            batch_size=batch_size,
            checkpointing=checkpointing,
            task=name,
            out=out,
            overwrite=overwrite,
            dtype=dtype,
            device=device,
            threads=threads,
        )
        return
    check_rule_options(rule, like, mastered=mastered, inject=inject, sign_only={**sign_only, "--distributed": wrapping})
    distributed.wrapping_for(wrapping)  # refuses an unknown name before any model loads
    cut = Rule.from_options(
        threshold, keep_fraction, confidence, freeze_pattern=freeze_pattern, train_pattern=train_pattern
    )
    if name is not None:
        check_task(name)
    registry = Registry()
    check_outputs(out, overwrite, registry, inputs=[mastered, inject, registry.resolve(like) if like else None])
    distributed.setup(device)  # under torchrun: join the other ranks; rank 0 alone prints and writes
    stdout.quiet = not distributed.is_main()
    if rule != "sign":
        control = ControlRequest(rule, like, inject, scoring, seed=seed, task=name, batch_size=batch_size)
        mask = make_control(control, registry, model=model, dtype=dtype, device=device, threads=threads)
        distributed.on_main(lambda: save_and_register(mask, out, task=name, registry=registry, overwrite=overwrite))
        return
    check_rule_runs(cut, wrapping)
    scoring = resolve_scoring(scoring, data_path=mastered)
    mastered_questions, inject_questions = load_questions(mastered), load_questions(inject)
    loaded = distributed.main_first(lambda: load_model(model, dtype=dtype, device=device, threads=threads))
    mask = profile_model(
        loaded,
        mastered_questions,
        inject_questions,
        rule=cut,
        scoring=scoring,
        batch_size=batch_size,
        save_scores=save_scores,
        checkpointing=checkpointing,
        seed=seed,
        task=name,
        data_paths={"mastered": str(mastered), "inject": str(inject)},
        wrapping=wrapping,
    )
    distributed.on_main(lambda: _report_and_save(mask, out, task=name, registry=registry, overwrite=overwrite))


def _profile_retain(mastered: Path, *, task: str | None, out: Path | None, overwrite: bool, **loading: Any) -> None:
    """``profile --kind retain``: the checks, then the pass over the questions; rank 0 saves and registers."""
    if task is not None:
        check_task(task)
    registry = Registry()
    check_outputs(out, overwrite, registry, inputs=[mastered])
    distributed.setup(loading["device"])
    stdout.quiet = not distributed.is_main()
    retain = make_retain_set(mastered, task=task, **loading)

    def save() -> None:
        print_retain(retain)
        save_and_register(retain, out, task=task, registry=registry, overwrite=overwrite)

    distributed.on_main(save)


def _report_and_save(mask: Mask, out: Path | None, *, task: str | None, registry: Registry, overwrite: bool) -> None:
    print_summary(mask)
    print_run(mask)
    save_and_register(mask, out, task=task, registry=registry, overwrite=overwrite)


def check_outputs(out: Path | None, overwrite: bool, registry: Registry, *, inputs: list[Path | None]) -> None:
    """Before any model loads: refuse an ``--out`` that would destroy a file, and a broken registry."""
    if out is not None:
        check_output_file(out, overwrite=overwrite, inputs=inputs)
    registry.check()


def check_rule_options(
    rule: str,
    like: str | None,
    *,
    mastered: Path | None,
    inject: Path | None,
    sign_only: dict[str, Any],
) -> None:
    """Refuse, in one line and before any model loads, a rule without the inputs it needs.

    ``sign`` needs both question files and no ``--like``; a control needs ``--like``, no option of
    the sign rule's cut (``sign_only``, None when not given), and ``--inject`` for gradient-magnitude.
    """
    if rule not in RULES:
        raise CplError(f"--rule {rule}: choose one of {', '.join(RULES)}")
    if rule == "sign":
        if like is not None:
            raise CplError("--like applies only to a control rule (--rule random or --rule gradient-magnitude)")
        missing = [option for option, path in (("--mastered", mastered), ("--inject", inject)) if path is None]
        if missing:
            raise CplError(f"--rule sign needs {' and '.join(missing)} (the split's question files)")
        return
    if like is None:
        raise CplError(f"--rule {rule} needs --like MASK (the mask whose per-tensor counts it copies)")
    given = [option for option, value in sign_only.items() if value is not None]
    if given:
        raise CplError(f"{given[0]} applies only to --rule sign, not to the {rule} control")
    if rule == "gradient-magnitude" and inject is None:
        raise CplError("--rule gradient-magnitude needs --inject (the questions whose gradient ranks the entries)")


@dataclass
class ControlRequest:
    """What a control mask is made from: the rule, the mask it mirrors and, for gradients, the data."""

    rule: str  # one of CONTROLS
    like: str  # mask reference: path, id, name@vN or name
    inject: Path | None
    scoring: str | None
    seed: int = 0
    task: str | None = None
    batch_size: int = 16


def make_control(
    request: ControlRequest, registry: Registry, *, model: str, dtype: str, device: str, threads: int | None
) -> Mask:
    """Build a control mask and print its summary; the model loads only for gradient-magnitude."""
    like = Mask.load(registry.resolve(request.like), scores=False)
    scoring = resolve_scoring(
        request.scoring, mask_scoring=like.metadata.get("scoring"), data_path=request.inject, force=None
    )  # a control scores answers as the mask it mirrors
    mask = control_mask(
        request.rule,
        like,
        seed=request.seed,
        task=request.task,
        model=lambda: load_model(model, dtype=dtype, device=device, threads=threads),
        inject_path=request.inject,
        scoring=scoring,
        batch_size=request.batch_size,
    )
    print_summary(mask)
    say(
        f"{request.rule} control of mask {like.id[:12]}: {mask.collaborative_share():.1%} collaborative, "
        "its count in every tensor"
    )
    if "profile" in mask.metadata:
        print_run(mask)
    return mask


def print_run(mask: Mask) -> None:
    """Print how long measuring the gradients took and the peak memory it used."""
    run = mask.metadata["profile"]
    say(
        f"profiled in {run['seconds']:.1f} s, peak memory {run['peak_memory_bytes'] / 2**20:.0f} MiB "
        f"({run['peak_memory_kind']})"
    )


@reports_errors
def inspect(
    mask: MaskArgument,
    as_json: JsonOption = False,
    plot: Annotated[Path | None, typer.Option(help="Write a heatmap (layers x module types) to this PNG.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --plot file (never the mask itself).")] = False,
) -> None:
    """Show a mask's provenance and collaborative shares by module type and layer.

    Example: cpl-masks inspect smollm2-135m-instruct/arc@v1 --plot shares.png
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
    """Compare two masks: agreement and Jaccard of their collaborative sets, by module type and layer.

    Example: cpl-masks diff smollm2-135m-instruct/arc@v1 smollm2-135m-instruct/csqa@v1
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
    """Mask algebra: the and / or / majority of several masks; the result records its parents.

    Example: cpl-masks combine --op and arc-mask.safetensors csqa-mask.safetensors -o both.safetensors
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
    """Re-cut a mask's stored scores at another threshold or keep fraction, without profiling again.

    Without --name the re-cut is filed as <model>/<task>.recut, so the task's bare name keeps
    meaning its latest profiled mask.

    Example: cpl-masks threshold smollm2-135m-instruct/arc@v1 --keep-fraction 0.3 -o arc-30.safetensors
    """
    Rule(threshold=threshold, keep_fraction=keep_fraction)  # refuses a bad cut before the scores load
    registry = Registry()
    path = registry.resolve(mask)
    check_outputs(out, overwrite, registry, inputs=[path])
    result = recut(Mask.load(path), threshold=threshold, keep_fraction=keep_fraction)
    print_summary(result)
    save_and_register(result, out, task=name, registry=registry, overwrite=overwrite)


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
