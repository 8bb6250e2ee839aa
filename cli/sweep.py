"""``cpl-masks sweep``: every method at every learning rate, judged under a forgetting budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cpl_masks.cli.common import (
    DeviceOption,
    DtypeOption,
    EvalBatchSizeOption,
    EvalEveryOption,
    LossOnOption,
    ModelOption,
    ScoringOption,
    ThreadsOption,
    old_spelling,
    print_table,
    renamed,
    reports_errors,
    reports_interrupts,
    say,
)
from cpl_masks.data.questions import check_limit
from cpl_masks.errors import CplError
from cpl_masks.models import DEFAULT_MODEL
from cpl_masks.sweep.config import DEFAULT_LR_GRID, DEFAULT_METHODS, SweepConfig
from cpl_masks.sweep.report import PAIRED_COLUMNS, SWEEP_COLUMNS, paired_table_rows, sweep_table_rows
from cpl_masks.sweep.run import PLOT_FILE, RESULT_FILE, run_sweep

DEFAULTS = SweepConfig(model="", data="", out="")  # the options' defaults are the config's, written once there


def _list(option: str, text: str, kind: type) -> list:
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise CplError(f"{option} {text}: not a comma-separated list of {kind.__name__} values") from error


def _method_grid(text: str) -> tuple[str, list[float]]:
    method, separator, grid = text.partition("=")
    if not separator or not method:
        raise CplError(f"--method-lr-grid {text}: write METHOD=LR,LR,...")
    return method, _list(f"--method-lr-grid {method}", grid, float)


@reports_errors
def sweep(
    data: Annotated[
        str, typer.Option("--data", "-d", help="Questions (file, dataset folder, hub name, builtin:demo).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder (re-run the same command to resume).")],
    model: ModelOption = DEFAULT_MODEL,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated methods; 'reuse:MASK_FILE' trains with a mask from another task, "
            "'retain:FILE' by the per-step rule from a retain set (compared with full and dynamic)."
        ),
    ] = ",".join(DEFAULT_METHODS),
    lr_grid: Annotated[str, typer.Option(help="Comma-separated learning rates.")] = ",".join(
        f"{lr:g}" for lr in DEFAULT_LR_GRID
    ),
    method_lr_grid: Annotated[
        list[str] | None,
        typer.Option(help="A method's own grid, e.g. lora=1e-3,1e-2 (repeatable); others use --lr-grid."),
    ] = None,
    keep_fraction_grid: Annotated[
        str | None,
        typer.Option(
            help="Also run each mask method (mask and the controls) cut to keep these shares, e.g. 0.9,0.5: "
            "mask@0.5 freezes the most conflicting half, and is paired with random@0.5."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the injection set per run.")] = DEFAULTS.epochs,
    optimizer: Annotated[str, typer.Option(help="sgd, momentum or adamw, for every method.")] = DEFAULTS.optimizer,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (example order, random mask).")] = "0",
    forgetting_budget: Annotated[
        float, typer.Option(help="Largest share of held-out mastered questions a method may forget.")
    ] = DEFAULTS.forgetting_budget,
    scoring: ScoringOption = DEFAULTS.scoring,
    loss_on: LossOnOption = DEFAULTS.loss_on,
    holdout_fraction: Annotated[
        float, typer.Option(help="Share of mastered questions held out.")
    ] = DEFAULTS.holdout_fraction,
    min_margin: Annotated[
        float, typer.Option(help="Mastered only when right by at least this margin.")
    ] = DEFAULTS.min_margin,
    limit: Annotated[int | None, typer.Option(help="Use only the first N questions.")] = None,
    heldout_data: Annotated[
        str | None,
        typer.Option(
            help="Questions whose confidently right ones join the held-out set: a forgetting pool "
            "(default for a builtin:demo set: its general items the split does not use)."
        ),
    ] = None,
    heldout_limit: Annotated[int | None, typer.Option(help="Keep at most N pool questions.")] = None,
    eval_every: EvalEveryOption = DEFAULTS.eval_every,
    track_text: Annotated[
        str | None, typer.Option(help="General text whose loss tracks forgetting (builtin:demo sets write their own).")
    ] = None,
    track_drift: Annotated[
        bool, typer.Option(help="Record the CPL mask's drift from the sign rule.")
    ] = DEFAULTS.track_drift,
    eval_batch_size: EvalBatchSizeOption = DEFAULTS.eval_batch_size,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    retain_text: Annotated[str | None, old_spelling("--retain-text", "--track-text")] = None,
    method_options: dict[str, Any] | None = None,
) -> None:
    """Train every method at every learning rate; report each.

    Split, profile, make control masks, and train every method at every learning rate; report each at its best.

    \b
    Example:
      cpl-masks sweep --data builtin:demo --limit 96 --lr-grid 1e-4,1e-3,3e-3 \\
          --seeds 0,1 --out runs/sweep
    """
    check_limit(limit)  # before the sweep folder records the arguments
    config = SweepConfig(
        model=model,
        data=data,
        out=str(out),
        methods=_list("--methods", methods, str),
        lr_grid=_list("--lr-grid", lr_grid, float),
        method_lr_grid=dict(_method_grid(item) for item in method_lr_grid or []),
        keep_fraction_grid=_list("--keep-fraction-grid", keep_fraction_grid, float) if keep_fraction_grid else [],
        seeds=_list("--seeds", seeds, int),
        epochs=epochs,
        optimizer=optimizer,
        forgetting_budget=forgetting_budget,
        scoring=scoring,
        loss_on=loss_on,
        holdout_fraction=holdout_fraction,
        min_margin=min_margin,
        limit=limit,
        heldout_data=heldout_data,
        heldout_limit=heldout_limit,
        eval_every=eval_every,
        retain_text=renamed(track_text, retain_text, "--retain-text", "--track-text"),
        method_options=method_options or {},
        track_drift=track_drift,
        eval_batch_size=eval_batch_size,
        dtype=dtype,
        device=device,
        threads=threads,
    )
    resume = "the same cpl-masks sweep command (it resumes)"
    with reports_interrupts(resume):
        payload = run_sweep(config, report=say)
    budget = f"{config.forgetting_budget:.0%}"
    print_table(
        f"each method at its best learning rate and epoch (held-out forgetting ≤ {budget} "
        f"of {payload['heldout_questions']} questions)",
        SWEEP_COLUMNS,
        sweep_table_rows(payload),
    )
    for key, when in (
        ("paired", "each at its best point within the budget"),
        ("paired_final", "at the end of training"),
    ):
        if payload[key]:
            print_table(
                f"paired differences, {when} (method − reference; 95 % interval, exact McNemar p)",
                PAIRED_COLUMNS,
                paired_table_rows(payload[key]),
            )
    if not payload["complete"]:
        say("other processes are still training runs of this sweep; the last to finish writes the complete results")
    say(f"results: {out / RESULT_FILE}")
    say(f"plot: {out / PLOT_FILE}")
