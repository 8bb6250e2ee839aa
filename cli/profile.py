"""``cpl-masks profile``: measure the gradients and save a freeze mask (or a control, or a retain set)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from cpl_masks.cli.common import (
    BatchSizeOption,
    DeviceOption,
    DtypeOption,
    LossOnOption,
    ModelOption,
    ThreadsOption,
    reports_errors,
    say,
    stdout,
)
from cpl_masks.cli.masks import (
    KeepFractionOption,
    NameOption,
    OutOption,
    OverwriteMaskOption,
    ThresholdOption,
    check_outputs,
    print_retain,
    print_summary,
    save_and_register,
)
from cpl_masks.data.questions import load_questions
from cpl_masks.data.split import resolve_scoring
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.masks.reading import KINDS
from cpl_masks.models import DEFAULT_MODEL, load_model
from cpl_masks.profiling.controls import CONTROLS, control_mask
from cpl_masks.profiling.freeze_mask import check_cut_runs
from cpl_masks.profiling.freeze_mask import profile as profile_model
from cpl_masks.profiling.retain import CONFIDENCE_HELP, UNCERTAIN_HELP, SignMeasure, profile_retain
from cpl_masks.profiling.selection import Cut
from cpl_masks.registry import Registry
from cpl_masks.registry.names import check_task
from cpl_masks.scoring.base import DEFAULT_SCORING, OBJECTIVE_HELP, SCORINGS_HELP
from cpl_masks.scoring.completion import DEFAULT_LOSS_ON, check_loss_on
from cpl_masks.utils import distributed, sharding
from cpl_masks.utils.distributed import Processes

RULES = ("sign", *CONTROLS)
RULE_HELP = "sign (CPL: g_M*g_I >= T), or a control with --like: " + ", ".join(
    f"{name} ({control.summary})" for name, control in CONTROLS.items()
)


def check_retain_options(*, inject: Path | None, mastered: Path | None, given: dict[str, Any]) -> None:
    """Refuse, before any model loads, what a retain set cannot take: an injection set or a mask rule's options."""
    if mastered is None:
        raise CplError("--kind retain needs --mastered (the questions the model must keep)")
    if inject is not None:
        raise CplError("--kind retain profiles the questions to keep alone; it takes no --inject")
    options = [option for option, value in given.items() if value is not None]
    if options:
        raise CplError(f"{options[0]} applies to --kind mask, not to a retain set")


def make_retain_set(
    processes: Processes,
    mastered: Path,
    *,
    model: str,
    scoring: str | None,
    loss_on: str,
    batch_size: int,
    checkpointing: bool,
    task: str | None,
    dtype: str,
    device: str,
    threads: int | None,
    measure: SignMeasure,
) -> Mask:
    """Load the questions and the model and profile the retain set (every rank; rank 0 then saves it)."""
    questions = load_questions(mastered)
    loaded = processes.main_first(lambda: load_model(model, dtype=dtype, device=device, threads=threads))
    return profile_retain(
        loaded,
        questions,
        scoring=scoring,
        loss_on=loss_on,
        batch_size=batch_size,
        checkpointing=checkpointing,
        task=task,
        data_path=str(mastered),
        measure=measure,
    )


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
        typer.Option(help=f"{SCORINGS_HELP}; default: --like's, else split.json's, else {DEFAULT_SCORING}."),
    ] = None,
    loss_on: LossOnOption = DEFAULT_LOSS_ON,
    rule: Annotated[str, typer.Option(help=RULE_HELP)] = "sign",
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
            "(one backward pass per question; --keep-fraction then ranks by t). --kind retain: "
            f"{CONFIDENCE_HELP}.",
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
    objective: Annotated[
        str | None,
        typer.Option(help=f"--kind retain: {OBJECTIVE_HELP}; default answer."),
    ] = None,
    uncertain: Annotated[str | None, typer.Option(help=f"--kind retain, {UNCERTAIN_HELP}; default pass.")] = None,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Profile a freeze mask (or a retain set) from gradients.

    Measure which parameters conflict with what the model masters, and save the freeze mask.

    \b
    --rule random|gradient-magnitude --like MASK: a control mask, with MASK's
      count of trainable entries in every tensor.
    --kind retain: the signs of g_M over --mastered, a retain set for the
      per-step rule (train --retain).

    Under torchrun (or accelerate launch) each rank profiles its share and rank 0 saves and registers.

    \b
    Example:
      cpl-masks profile --mastered runs/split/mastered.jsonl \\
          --inject runs/split/inject.jsonl
    """
    if kind not in KINDS:
        raise CplError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    check_loss_on(loss_on)
    sign_only = {
        "--threshold": threshold,
        "--keep-fraction": keep_fraction,
        "--freeze-pattern": freeze_pattern,
        "--train-pattern": train_pattern,
        "--save-scores": save_scores or None,
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
            loss_on=loss_on,
            batch_size=batch_size,
            checkpointing=checkpointing,
            task=name,
            out=out,
            overwrite=overwrite,
            dtype=dtype,
            device=device,
            threads=threads,
            measure=SignMeasure.given(objective, confidence, uncertain),
        )
        return
    if objective is not None or uncertain is not None:
        option = "--objective" if objective is not None else "--uncertain"
        raise CplError(f"{option} applies to --kind retain (a freeze mask's g_M and g_I are of the answer loss)")
    sign_only = {**sign_only, "--confidence": confidence, "--distributed": wrapping}
    check_rule_options(rule, like, mastered=mastered, inject=inject, sign_only=sign_only)
    sharding.wrapping_for(wrapping)  # refuses an unknown name before any model loads
    cut = Cut.from_options(
        threshold, keep_fraction, confidence, freeze_pattern=freeze_pattern, train_pattern=train_pattern
    )
    if name is not None:
        check_task(name)
    registry = Registry()
    like_path = registry.resolve(like) if like else None
    check_outputs(out, overwrite, registry, inputs=[mastered, inject, like_path], model=model)
    processes = distributed.setup(device)  # under torchrun: join the other ranks; rank 0 alone prints and writes
    stdout.quiet = not processes.is_main
    if rule != "sign":
        control = ControlRequest(rule, like, inject, scoring, seed=seed, task=name, batch_size=batch_size)
        mask = make_control(control, registry, model=model, dtype=dtype, device=device, threads=threads)
        processes.on_main(lambda: save_and_register(mask, out, task=name, registry=registry, overwrite=overwrite))
        return
    check_cut_runs(cut, wrapping)
    scoring = resolve_scoring(scoring, data_path=mastered)
    mastered_questions, inject_questions = load_questions(mastered), load_questions(inject)
    loaded = processes.main_first(lambda: load_model(model, dtype=dtype, device=device, threads=threads))
    mask = profile_model(
        loaded,
        mastered_questions,
        inject_questions,
        cut=cut,
        scoring=scoring,
        loss_on=loss_on,
        batch_size=batch_size,
        save_scores=save_scores,
        checkpointing=checkpointing,
        seed=seed,
        task=name,
        data_paths={"mastered": str(mastered), "inject": str(inject)},
        wrapping=wrapping,
    )
    processes.on_main(lambda: _report_and_save(mask, out, task=name, registry=registry, overwrite=overwrite))


def _profile_retain(mastered: Path, *, task: str | None, out: Path | None, overwrite: bool, **loading: Any) -> None:
    """``profile --kind retain``: the checks, then the pass over the questions; rank 0 saves and registers."""
    if task is not None:
        check_task(task)
    registry = Registry()
    check_outputs(out, overwrite, registry, inputs=[mastered], model=loading["model"])
    processes = distributed.setup(loading["device"])
    stdout.quiet = not processes.is_main
    retain = make_retain_set(processes, mastered, task=task, **loading)

    def save() -> None:
        print_retain(retain)
        save_and_register(retain, out, task=task, registry=registry, overwrite=overwrite)

    processes.on_main(save)


def _report_and_save(mask: Mask, out: Path | None, *, task: str | None, registry: Registry, overwrite: bool) -> None:
    print_summary(mask)
    print_run(mask)
    save_and_register(mask, out, task=task, registry=registry, overwrite=overwrite)


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
            raise CplError(f"--like applies only to a control rule (--rule {' or '.join(CONTROLS)})")
        missing = [option for option, path in (("--mastered", mastered), ("--inject", inject)) if path is None]
        if missing:
            raise CplError(f"--rule sign needs {' and '.join(missing)} (the split's question files)")
        return
    if like is None:
        raise CplError(f"--rule {rule} needs --like MASK (the mask whose per-tensor counts it copies)")
    given = [option for option, value in sign_only.items() if value is not None]
    if given:
        raise CplError(f"{given[0]} applies only to --rule sign, not to the {rule} control")
    if CONTROLS[rule].needs_inject and inject is None:
        raise CplError(f"--rule {rule} needs --inject (the questions whose gradient ranks the entries)")


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
