"""``cpl-masks split``: which questions does the model already master?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cpl_masks.cli.common import (
    AnswerFieldOption,
    BatchSizeOption,
    ChoicesFieldOption,
    CompletionFieldOption,
    DeviceOption,
    DtypeOption,
    FormatOption,
    MessagesFieldOption,
    ModelOption,
    OverwriteOption,
    PromptFieldOption,
    QuestionFieldOption,
    ScoringOption,
    SplitOption,
    TextFieldOption,
    ThreadsOption,
    fields,
    print_table,
    reports_errors,
)
from cpl_masks.data.questions import check_limit, load_questions
from cpl_masks.data.split import HELDOUT, INJECT, MASTERED, SCORES, SUMMARY, split_questions, write_split
from cpl_masks.models import DEFAULT_MODEL, load_model, model_locations
from cpl_masks.scoring.base import DEFAULT_SCORING
from cpl_masks.utils.files import check_output_dir

SPLIT_FILES = (MASTERED, INJECT, HELDOUT, SCORES, SUMMARY)  # what split writes into --out


@reports_errors
def split(
    data: Annotated[
        str, typer.Option("--data", "-d", help="Questions: JSONL/JSON/CSV/Parquet file, dataset folder or hub name.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for mastered/inject files and split.json.")],
    model: ModelOption = DEFAULT_MODEL,
    scoring: ScoringOption = DEFAULT_SCORING,
    holdout_fraction: Annotated[float, typer.Option(help="Share of mastered questions kept out of profiling.")] = 0.0,
    min_margin: Annotated[
        float, typer.Option(help="Mastered only when right by at least this score margin (keeps out lucky guesses).")
    ] = 0.0,
    limit: Annotated[int | None, typer.Option(help="Use only the first N questions.")] = None,
    heldout_data: Annotated[
        str | None,
        typer.Option(help="A second question set whose confidently right questions join the held-out file (a pool)."),
    ] = None,
    heldout_limit: Annotated[int | None, typer.Option(help="Keep at most N pool questions.")] = None,
    batch_size: BatchSizeOption = 16,
    seed: Annotated[int, typer.Option(help="Seed for the held-out sample.")] = 0,
    data_split: SplitOption = None,
    question_field: QuestionFieldOption = "question",
    choices_field: ChoicesFieldOption = "choices",
    answer_field: AnswerFieldOption = "answer",
    text_field: TextFieldOption = "text",
    messages_field: MessagesFieldOption = "messages",
    prompt_field: PromptFieldOption = "prompt",
    completion_field: CompletionFieldOption = "completion",
    data_format: FormatOption = None,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Split questions into mastered (M) and injection (I) sets.

    Score every question and split them into mastered (M) and injection (I) sets. Multiple-choice questions
    are right when the model picks the answer; free-form items (TRL's prompt/completion, messages or text
    rows) when greedy decoding reproduces the completion.

    \b
    Examples:
      cpl-masks split --data questions.jsonl --out runs/split \\
          --holdout-fraction 0.2
      cpl-masks split --data facts.jsonl --heldout-data mmlu.jsonl \\
          --out runs/facts
    """
    # before the slow model load: a non-empty folder, the registry's, the model's, or one whose files are the inputs
    inputs = [data, heldout_data, *model_locations(model)]
    check_output_dir(out, overwrite=overwrite, inputs=inputs, writes=SPLIT_FILES)
    check_limit(heldout_limit, "--heldout-limit")
    names = fields(
        question=question_field,
        choices=choices_field,
        answer=answer_field,
        text=text_field,
        messages=messages_field,
        prompt=prompt_field,
        completion=completion_field,
    )
    questions = load_questions(data, split=data_split, fields=names, limit=limit, data_format=data_format)
    pool = load_questions(heldout_data, fields=names) if heldout_data is not None else []
    loaded = load_model(model, dtype=dtype, device=device, threads=threads)
    result = split_questions(
        loaded,
        questions,
        scoring=scoring,
        holdout_fraction=holdout_fraction,
        min_margin=min_margin,
        seed=seed,
        batch_size=batch_size,
        pool=pool,
        pool_limit=heldout_limit,
    )
    folder = write_split(result, out, overwrite=overwrite)
    counts = result.summary["counts"]
    print_table(
        f"split of {len(questions)} questions ({scoring} scoring) -> {folder}",
        ["set", "questions", "share"],
        [
            (name, counts[key], "-" if key == "pool" else f"{counts[key] / len(questions):.1%}")
            for name, key in (
                ("mastered (M)", "mastered"),
                ("held-out mastered", "heldout"),
                *([("forgetting pool (held out, from --heldout-data)", "pool")] if heldout_data else []),
                ("to inject (I)", "inject"),
                ("uncertain (right by < --min-margin)", "uncertain"),
            )
        ],
    )
