"""``cpl-masks train`` (fine-tune with a mask, the dynamic rule or plainly) and ``cpl-masks compare``."""

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
    OverwriteOption,
    ThreadsOption,
    TrackTextOption,
    fail,
    old_spelling,
    print_table,
    renamed,
    reports_errors,
    reports_interrupts,
    say,
    stdout,
)
from cpl_masks.data.questions import load_questions
from cpl_masks.errors import CplError
from cpl_masks.evaluation.harness import TASK_COLUMNS, parse_tasks, task_table_rows
from cpl_masks.evaluation.outcomes import (
    COMPARE_COLUMNS,
    METRIC_COLUMNS,
    OUTCOMES,
    QUESTIONS,
    compare_outcomes,
    comparison_rows,
    describe_difference,
    draw_comparison,
    metrics_table_rows,
    outcome_differences,
    question_outcomes,
    read_question_records,
)
from cpl_masks.methods import METHODS
from cpl_masks.models import DEFAULT_MODEL
from cpl_masks.registry.names import check_task
from cpl_masks.scoring.base import SCORINGS_HELP
from cpl_masks.training.folder import restartable, resumable, saved_config, saved_request
from cpl_masks.training.loop import TrainConfig
from cpl_masks.training.record import RUN, RunRecord
from cpl_masks.training.request import RunRequest
from cpl_masks.training.run import resume_run, start_run
from cpl_masks.utils import distributed
from cpl_masks.utils.files import check_output_file, folder_in_use

DEFAULTS = TrainConfig()  # the options' defaults are the config's, written once there
RESUME_CHANGES = ("lr", "epochs")  # the options --resume accepts; all others are the run's saved ones
METHOD_HELP = "How to train (--mask alone implies mask): " + ", ".join(
    f"{name} ({spec.summary})" for name, spec in METHODS.items()
)


def _print_epoch(rows: list[dict[str, Any]]) -> None:
    print_table(f"epoch {rows[-1]['epoch']}", METRIC_COLUMNS, metrics_table_rows(rows[-1:]))
    _print_tasks(rows[-1])


def _print_tasks(row: dict[str, Any]) -> None:
    """The lm-eval tasks' figures of a metrics row that scored them (nothing otherwise)."""
    if row.get("lm_eval"):
        print_table(f"lm-eval tasks at epoch {row['epoch']} (against epoch 0)", TASK_COLUMNS, task_table_rows(row))


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line or through the environment).

    Typer carries its own copy of click, so the source is compared by name, not by click's enum.
    """
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _resume_changes(ctx: typer.Context, saved: dict[str, Any]) -> dict[str, Any]:
    """The options given with ``--resume`` that may change (``--lr``, ``--epochs``), by name.

    Another option is accepted only when it repeats the run's saved value (``saved``: its request).

    Raises:
        CplError: naming the first other option given (its long spelling), which a resumed run cannot change.
    """
    for param in ctx.command.params:
        name = param.name
        if name in ("resume", *RESUME_CHANGES) or not _given(ctx, name):
            continue
        given = parse_tasks(ctx.params[name]) if name == "lm_eval_tasks" else ctx.params[name]  # saved as a list
        if not _same(given, _saved_value(saved, name)):
            raise CplError(f"{max(param.opts, key=len)} cannot change on --resume; only --lr and --epochs can")
    return {name: ctx.params[name] for name in RESUME_CHANGES if _given(ctx, name)}


# option name -> its name in the saved request (the old spellings too)
_REQUEST_FIELDS = {
    "method": "mode",
    "track_text": "retain_text",
    "data": "inject",
    "wrapping": "distributed",
}


def _saved_value(saved: dict[str, Any], name: str) -> Any:
    """An option's value in a saved request: a request field, a training setting or a method option."""
    field = _REQUEST_FIELDS.get(name, name)
    for section in (saved, saved.get("config") or {}, saved.get("method_options") or {}):
        if field in section:
            return section[field]
    return object()  # not saved (e.g. --overwrite): any given value is a change


def _same(given: Any, saved: Any) -> bool:
    if isinstance(given, Path) or (isinstance(given, str) and isinstance(saved, str) and Path(given).exists()):
        return isinstance(saved, str) and Path(given).resolve() == Path(saved).resolve()
    return given == saved


def _resume_hint(out: Path) -> str | None:
    """The command that resumes the run in ``out``, or None when ``--resume`` would be refused there (no
    readable ``config.json`` yet: the run had not started)."""
    return f"cpl-masks train --resume {out}" if resumable(out) else None


@reports_errors
@distributed.reports_rank_errors
def train(
    ctx: typer.Context,
    inject: Annotated[
        str | None, typer.Option("--inject", "-i", help="Injection set I (inject.jsonl): facts to learn.")
    ] = None,
    mastered: Annotated[
        str | None, typer.Option(help="Mastered set M (mastered.jsonl): what must not be forgotten.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder for the run.")] = None,
    mask: Annotated[str | None, typer.Option(help="Freeze mask: file, id, name@vN or name (static CPL).")] = None,
    method: Annotated[str | None, typer.Option(help=METHOD_HELP)] = None,
    retain: Annotated[
        str | None,
        typer.Option(
            help="Retain set (profile --kind retain): file, id, name@vN or name; trains with the per-step rule, "
            "starting from its stored signs and refreshing them from its questions.",
        ),
    ] = None,
    heldout: Annotated[
        str | None, typer.Option(help="Held-out mastered set, to measure forgetting on unseen questions.")
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    epochs: Annotated[int, typer.Option(help="Passes over the injection set.")] = DEFAULTS.epochs,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = DEFAULTS.lr,
    optimizer: Annotated[str, typer.Option(help="sgd (the paper's), momentum or adamw.")] = DEFAULTS.optimizer,
    batch_size: Annotated[
        int, typer.Option(help="Questions per training step (the paper uses 1).")
    ] = DEFAULTS.batch_size,
    eval_batch_size: EvalBatchSizeOption = DEFAULTS.eval_batch_size,
    seed: Annotated[int, typer.Option(help="Seed of the example order.")] = DEFAULTS.seed,
    weight_decay: Annotated[
        float, typer.Option(help="Weight decay (never applied to frozen entries).")
    ] = DEFAULTS.weight_decay,
    momentum: Annotated[float, typer.Option(help="Momentum of --optimizer momentum.")] = DEFAULTS.momentum,
    scoring: Annotated[
        str | None,
        typer.Option(help=f"{SCORINGS_HELP}; default: the mask's, else split.json's."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Train with a scoring other than the mask's.")] = False,
    loss_on: LossOnOption = RunRequest.loss_on,
    task: Annotated[
        str | None,
        typer.Option(
            help="Task recorded with the run (default: the --inject file's stem; a split's folder for inject.jsonl)."
        ),
    ] = None,
    allow_other_weights: Annotated[
        bool, typer.Option(help="Use a mask profiled on other weights of the same architecture.")
    ] = False,
    track_text: TrackTextOption = None,
    track_drift: Annotated[
        bool, typer.Option(help="With --mask: record the mask's agreement with the sign rule after every epoch.")
    ] = False,
    eval_every: EvalEveryOption = RunRequest.eval_every,
    lm_eval_tasks: Annotated[
        str | None,
        typer.Option(
            metavar="TASK[,TASK...]",
            help="Also score these lm-evaluation-harness tasks (names as lm-eval's registry knows them) at epoch 0 "
            "and after the last epoch; each becomes the set lm-eval:<task> of questions.jsonl "
            "(needs pip install 'cpl-masks[lm-eval]').",
        ),
    ] = None,
    lm_eval_include: Annotated[
        str | None,
        typer.Option(help="A folder of local lm-eval task YAML for --lm-eval-tasks (lm-eval's include_path)."),
    ] = None,
    lm_eval_limit: Annotated[
        int | None, typer.Option(help="Score only the first N docs of each --lm-eval-tasks task.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the stopped run in this folder with its saved options; only --lr and --epochs may change."
        ),
    ] = None,
    wrapping: Annotated[
        str | None,
        typer.Option(
            "--distributed",
            help="Under torchrun/accelerate launch: ddp (default; replicated weights) or fsdp2 "
            "(sharded weights, gradients, masks and optimizer state; --mask or --method full).",
        ),
    ] = None,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    overwrite: OverwriteOption = False,
    data: Annotated[str | None, old_spelling("--data", "--inject", "-d")] = None,
    mode: Annotated[str | None, old_spelling("--mode", "--method")] = None,
    retain_text: Annotated[str | None, old_spelling("--retain-text", "--track-text")] = None,
    method_options: dict[str, Any] | None = None,
) -> None:
    """Fine-tune on the injection set; count learned and forgotten.

    Learned and forgotten questions are evaluated after every epoch (or every --eval-every epochs);
    questions.jsonl keeps each question's result at every evaluation. --lm-eval-tasks also scores
    lm-evaluation-harness tasks at epoch 0 and after the last epoch, item by item.

    Under torchrun (or accelerate launch) each rank trains and evaluates its share; rank 0 writes.

    \b
    Example:
      cpl-masks train --mask runs/mask.safetensors \\
          --inject runs/split/inject.jsonl --mastered runs/split/mastered.jsonl \\
          --heldout runs/split/mastered_heldout.jsonl --epochs 3 --lr 1e-4 \\
          --out runs/cpl
    """
    stdout.quiet = distributed.launch_env().rank != 0  # rank 0 alone prints
    if resume is not None:
        saved = saved_config(resume)
        saved_request(resume, saved)  # a damaged config.json is refused naming it, before any option is compared
        changes = _resume_changes(ctx, saved["request"])
        with reports_interrupts(lambda: _resume_hint(resume)):
            run = resume_run(resume, on_epoch=_print_epoch, **changes)
    else:
        inject = renamed(inject, data, "--data", "--inject")
        method = renamed(method, mode, "--mode", "--method")
        track_text = renamed(track_text, retain_text, "--retain-text", "--track-text")
        missing = [
            option
            for option, value in (("--inject", inject), ("--mastered", mastered), ("--out", out))
            if value is None
        ]
        if missing:
            fail(f"{', '.join(missing)} required (or --resume DIR to continue a run)")
        config = TrainConfig(
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            momentum=momentum,
            weight_decay=weight_decay,
            distributed=wrapping,
        )
        request = RunRequest(
            inject=str(inject),
            mastered=str(mastered),
            heldout=heldout,
            out=str(out),
            model=model,
            mask=mask,
            mode=method,
            retain=retain,
            method_options=method_options or {},
            scoring=scoring,
            loss_on=loss_on,
            force=force,
            task=task,
            allow_other_weights=allow_other_weights,
            dtype=dtype,
            device=device,
            threads=threads,
            retain_text=track_text,
            track_drift=track_drift,
            eval_every=eval_every,
            lm_eval_tasks=parse_tasks(lm_eval_tasks),
            lm_eval_include=lm_eval_include,
            lm_eval_limit=lm_eval_limit,
            config=config,
        )
        if task is not None:
            check_task(task, "--task")
        if not overwrite and restartable(out) and not folder_in_use(out):  # a live writer is refused below
            say(f"{out}: a run that stopped before its first checkpoint; starting it again")
        with reports_interrupts(lambda: _resume_hint(out)):
            run = start_run(request, overwrite=overwrite, on_epoch=_print_epoch)
    print_table(f"{run.mode} training: all epochs", METRIC_COLUMNS, metrics_table_rows(run.metrics))
    _print_tasks(run.metrics[-1])
    say(f"model: {run.model_dir}")
    say(f"run: {Path(run.out_dir) / RUN}")


@reports_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Finished run folders (each with run.json).")],
    plot: Annotated[Path | None, typer.Option(help="Also draw learned vs forgotten per run to this PNG.")] = None,
    questions: Annotated[
        bool, typer.Option("--questions", help="List the questions two runs disagree on (learned, forgotten).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --plot file.")] = False,
) -> None:
    """Compare finished runs, question by question.

    Compare finished runs: learned, forgotten, held-out forgotten, time and peak memory.

    Runs of one split are also compared question by question with the first run: each difference
    with its 95 % bootstrap interval and exact McNemar p ("no detectable difference" when the
    interval holds 0). Runs scored on lm-eval tasks (train --lm-eval-tasks) add one column per task:
    its items forgotten, paired by item.

    \b
    Example:
      cpl-masks compare runs/cpl runs/full --questions --plot runs/compare.png
    """
    if questions and len(runs) != 2:
        raise CplError(f"--questions compares two runs; {len(runs)} were given")
    if plot is not None:
        read = [folder / name for folder in runs for name in (RUN, QUESTIONS)]
        check_output_file(plot, overwrite=overwrite, inputs=read, option="--plot")
    names = [folder.name for folder in runs]
    unique = len(set(names)) == len(names)
    records = {(folder.name if unique else str(folder)): RunRecord.read(folder) for folder in runs}
    print_table("runs compared", COMPARE_COLUMNS, comparison_rows(records))
    labels = list(records)
    outcomes = {label: _final_outcomes(folder) for label, folder in zip(labels, runs)}
    if len(runs) > 1 and all(found is not None for found in outcomes.values()):
        reference = labels[0]
        measured = {**OUTCOMES, **{name: name for name in outcomes[reference] if name not in OUTCOMES}}  # + lm-eval
        rows = [
            (label, *_paired_cells(compare_outcomes([(outcomes[reference], outcomes[label])], measured), measured))
            for label in labels[1:]
        ]
        columns = [*PAIRED_COLUMNS, *(f"forgotten ({name})" for name in measured if name not in OUTCOMES)]
        print_table(f"paired by question against {reference} (run − {reference})", columns, rows)
    if questions:
        _print_question_differences(labels, [outcomes[label] for label in labels], records)
    if plot is not None:
        draw_comparison(records, plot, replace=overwrite)
        say(f"plot: {plot}")


PAIRED_COLUMNS = ("run", "learned", "forgotten (M)", "held-out forgotten")


def _final_outcomes(folder: Path) -> dict[str, dict[str, bool]] | None:
    records = read_question_records(folder, missing_ok=True)
    return None if records is None else question_outcomes(records)


def _paired_cells(comparison: dict[str, dict], measured: dict[str, str]) -> list[str]:
    return [describe_difference(comparison[name]) if name in comparison else "-" for name in measured]


def _print_question_differences(labels: list[str], outcomes: list, records: dict[str, RunRecord]) -> None:
    """One row per question the two runs disagree on, with its text from the run's question files."""
    if any(found is None for found in outcomes):
        raise CplError("--questions: a run has no questions.jsonl (made before per-question records were kept)")
    texts = _question_texts(records[labels[0]])
    differences = outcome_differences(outcomes[0], outcomes[1])
    rows = [
        (outcome.replace("_", " "), key, "yes" if first else "no", "yes" if second else "no", texts.get(key, ""))
        for outcome, key, first, second in differences
    ]
    print_table(f"questions the runs disagree on ({len(rows)})", ["outcome", "question id", *labels, "question"], rows)


def _question_texts(run: RunRecord) -> dict[str, str]:
    """Question id -> text, from the run's question files where they are still readable."""
    texts: dict[str, str] = {}
    for entry in run.data.values():
        path = entry.get("path") if isinstance(entry, dict) else None
        if path and Path(path).is_file():
            try:
                texts.update((question.id, question.question) for question in load_questions(path))
            except CplError:
                continue
    return texts
