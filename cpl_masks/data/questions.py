"""Multiple-choice question sets: loading, validation and writing.

Questions come from a JSONL, JSON, CSV or Parquet file, a ``datasets`` folder written by
``save_to_disk``, or a hub dataset name with a split. Two row shapes are understood:

* ``{"id"?, "question", "choices": [...], "answer": "B" | 1}`` (``answer`` a letter or a 0-based index);
* ``{"question": "<full prompt with lines 'A: ...'>", "label": "B"}``, the pre-formatted shape
  of the CPL authors' files; its options are read back from the prompt.

Every problem is reported as a one-line :class:`~cpl_masks.errors.CplError` naming the source and
the row (1-based: the line number for JSONL files, blank lines included; the record's position
otherwise). Each loaded :class:`Question` remembers that source and row, so later checks (such as
the model's context length) can name them too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpl_masks.data.completions import FREE_FORMS, Completion, free_form_of, parse_completion
from cpl_masks.data.demo import chat_rows, completion_rows, demo_rows
from cpl_masks.data.fields import MAX_TEXT_CHARS, FieldNames, Located, capped, kind_of, row_id, shown, text_of
from cpl_masks.data.sources import (
    LongNumber,
    Rows,
    is_local,
    loads,
    numbered,
    read_file,
    read_hub_dataset,
    read_saved_dataset,
)
from cpl_masks.errors import CplError
from cpl_masks.utils.files import write_jsonl

LETTERS = string.ascii_uppercase
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)
BUILTIN_DEMO = "builtin:demo"  # the generated demo set (cpl_masks.data.demo)
BUILTIN_SETS = {  # name -> the generated rows (cpl_masks.data.demo): the demo facts in each format
    BUILTIN_DEMO: demo_rows,
    "builtin:demo-completions": completion_rows,
    "builtin:demo-chat": chat_rows,
}
MULTIPLE_CHOICE = "multiple-choice"
DATA_FORMATS = (MULTIPLE_CHOICE, *FREE_FORMS)  # what --format names; left out, each file's columns say
_INDEX = re.compile(r"^-?[0-9]+$")
_MAX_INDEX_DIGITS = 18  # a longer string of digits (zero-padded or not) is refused as out of range
_OPTION_LINE = re.compile(r"^\s*([A-Z])\s*[:.)]\s+(.*\S)\s*$")


@dataclass(frozen=True)
class Question(Located):
    """One multiple-choice question.

    ``question`` is the question text, or the whole prompt when ``preformatted`` is set (then
    the options already appear in it and ``choices`` are the texts read back from it).
    ``source`` and ``row`` say where a loaded question came from, for error messages; they take
    no part in equality, hashing or the written record, so the same question from two files is
    the same question.
    """

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    preformatted: bool = False
    source: str = field(default="", compare=False, repr=False)
    row: int = field(default=0, compare=False, repr=False)

    @property
    def form(self) -> str:
        """The item's data format: always :data:`MULTIPLE_CHOICE` (a free-form item says its own)."""
        return MULTIPLE_CHOICE

    @property
    def content(self) -> tuple[Any, ...]:
        """What the question says, without its id: two questions with the same content are the same question."""
        return (self.question, self.choices)

    @property
    def text_length(self) -> int:
        """Characters of text the question holds (its text and its choices)."""
        return len(self.question) + sum(len(choice) for choice in self.choices)

    @property
    def answer_letter(self) -> str:
        """The correct option's letter (``"A"`` for index 0)."""
        return LETTERS[self.answer]

    def to_record(self) -> dict[str, Any]:
        """The canonical JSON row this question is written and hashed as."""
        record: dict[str, Any] = {
            "id": self.id,
            "question": self.question,
            "choices": list(self.choices),
            "answer": self.answer_letter,
        }
        if self.preformatted:
            record["preformatted"] = True
        return record


Item = Question | Completion  # one row of any data format; "questions" below are items of any format


def questions_sha256(questions: Sequence[Item]) -> str:
    """Content hash of a question set: the same questions hash the same from any file format."""
    digest = hashlib.sha256()
    for question in questions:
        digest.update(json.dumps(question.to_record(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def write_questions(path: str | os.PathLike, questions: Iterable[Item]) -> None:
    """Write questions as canonical JSONL (atomically), readable back by :func:`load_questions`."""
    write_jsonl(path, (question.to_record() for question in questions))


def load_questions(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    fields: FieldNames = FieldNames(),
    limit: int | None = None,
    data_format: str | None = None,
) -> list[Item]:
    """Load and validate a question set from a file, a saved dataset folder, a hub dataset or a built-in set.

    The built-in sets are the demo facts: ``builtin:demo`` (multiple choice), ``builtin:demo-completions``
    (prompt-completion) and ``builtin:demo-chat`` (conversational prompt-completion).

    The rows are multiple-choice questions or free-form items (TRL's ``text``, ``messages`` and
    ``prompt``/``completion`` rows), as each row's columns say or ``data_format`` (one of
    :data:`DATA_FORMATS`) forces; one source holds at most one free-form format, beside which
    multiple-choice rows may sit. ``limit`` keeps only the first rows; only those are validated.

    Raises:
        CplError: naming the source and row, for any unreadable or invalid input, or a ``limit`` below 1.
    """
    check_limit(limit)
    rows, name = _read_rows(source, split)
    if limit is not None:
        rows = rows[:limit]
    return _parse_rows(rows, name, fields, data_format)


def parse_questions(records: Any, name: str) -> list[Item]:
    """Validate canonical question records held elsewhere (a retain set's metadata), as a file's rows are."""
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise CplError(f"{name}: the questions are not a list of objects")
    return _parse_rows(numbered(records), name, FieldNames())


def _parse_rows(rows: Rows, name: str, fields: FieldNames, data_format: str | None = None) -> list[Item]:
    if not rows:
        raise CplError(f"{name}: no questions (the data is empty)")
    check_data_format(data_format)
    items = [_parse_item(row, number, name, fields, data_format) for number, row in rows]
    _check_one_free_form(items, name)
    _check_unique_ids(items)
    return items


def _check_one_free_form(items: list[Item], name: str) -> None:
    """Refuse two free-form shapes in one source: text beside prompt-completion rows, conversations beside texts.

    Multiple-choice rows may sit beside free-form rows (a split's held-out file holds a pool of questions
    next to held-out items): each row says what it is, and each is scored by its own rule.
    """
    free = [item for item in items if isinstance(item, Completion)]
    for item in free[1:]:
        first = free[0]
        if item.form != first.form:
            raise CplError(
                f"{name}: row {item.row} is a {item.form} row but row {first.row} is {first.form};"
                " one file holds one free-form format"
            )
        if item.conversational != first.conversational:
            raise CplError(
                f"{name}: row {item.row} {'is' if item.conversational else 'is not'} a conversation but row"
                f" {first.row} {'is not' if item.conversational else 'is'}; one file holds one free-form format"
            )


def check_data_format(data_format: str | None, option: str = "--format") -> None:
    """Refuse a data format that is none of :data:`DATA_FORMATS` (None lets each source's columns say)."""
    if data_format is not None and data_format not in DATA_FORMATS:
        raise CplError(f"{option} {str(data_format)[:40]}: choose one of {', '.join(DATA_FORMATS)}")


def _row_format(row: dict, fields: FieldNames) -> str:
    """The format a row's columns say: a question field means multiple choice, else TRL's free-form columns."""
    if row.get(fields.question) is not None:
        return MULTIPLE_CHOICE
    return free_form_of(row, fields) or MULTIPLE_CHOICE


def _parse_item(row: dict, number: int, name: str, fields: FieldNames, data_format: str | None) -> Item:
    """A row as an item of the forced ``data_format``, else of the format its columns say."""
    form = data_format or _row_format(row, fields)
    if form == MULTIPLE_CHOICE:
        return _parse_row(row, number, name, fields)
    return parse_completion(row, number, name, form, fields)


def check_limit(limit: int | None, option: str = "--limit") -> None:
    """Refuse a ``--limit`` below 1, which would silently drop questions (a negative slice) or all of them.

    Raises:
        CplError: naming ``option`` and its value.
    """
    if limit is not None and limit < 1:
        raise CplError(f"{option} {limit}: must be at least 1 (or left out for all questions)")


def _read_rows(source: str | os.PathLike, split: str | None) -> tuple[Rows, str]:
    """The source's rows, each with the number error messages give it, and the source's name."""
    if str(source) in BUILTIN_SETS:
        return numbered(BUILTIN_SETS[str(source)]()), str(source)
    path = Path(source)
    if path.is_file():
        return read_file(path), str(path)
    if path.is_dir():
        return numbered(read_saved_dataset(path, split)), str(path)
    if is_local(source):
        raise CplError(f"{source}: no such file or folder")
    return numbered(read_hub_dataset(str(source), split)), str(source)


def _parse_row(row: dict, number: int, name: str, fields: FieldNames) -> Question:
    where = f"{name}: row {number}"
    text = _question_text(row.get(fields.question), where, fields.question)
    answer_field = fields.answer if row.get(fields.answer) is not None else "label"
    answer = row.get(answer_field)
    if answer is None:
        raise CplError(f"{where}: missing field '{fields.answer}'")
    raw_choices = row.get(fields.choices)
    preformatted = raw_choices is None
    choices = _options_from_prompt(text, where) if preformatted else _parse_choices(raw_choices, where, fields)
    _check_count(len(choices), where)
    _check_distinct(choices, where)
    return Question(
        id=row_id(row.get("id"), number, where),
        question=text,
        choices=choices,
        answer=_parse_answer(answer, choices, where, answer_field),
        preformatted=_preformatted(row.get("preformatted"), where) or preformatted,
        source=name,
        row=number,
    )


def _question_text(value: Any, where: str, field_name: str) -> str:
    """The question (or whole prompt): non-empty text of at most :data:`MAX_TEXT_CHARS` characters."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise CplError(f"{where}: missing field '{field_name}' (a non-empty string)")
    if not isinstance(value, str):
        raise CplError(f"{where}: field '{field_name}' must be text (a non-empty string), not {kind_of(value)}")
    return capped(value, where, f"field '{field_name}'", MAX_TEXT_CHARS)


def _preformatted(value: Any, where: str) -> bool:
    """The optional ``preformatted`` flag: true, false or absent; any other value is refused, not read as truthy."""
    if value is None or isinstance(value, bool):
        return bool(value)
    raise CplError(f"{where}: field 'preformatted' must be true or false, not {kind_of(value)}")


def _check_count(count: int, where: str) -> None:
    """Refuse fewer than :data:`MIN_CHOICES` or more than :data:`MAX_CHOICES` choices (one letter each)."""
    if not MIN_CHOICES <= count <= MAX_CHOICES:
        raise CplError(f"{where}: {count} choices; between {MIN_CHOICES} and {MAX_CHOICES} are supported")


def _check_distinct(choices: tuple[str, ...], where: str) -> None:
    """Refuse a choice listed twice: which option is the answer would be ambiguous.

    Choices arrive stripped of surrounding whitespace; they are compared case-sensitively.
    """
    first: dict[str, int] = {}
    for index, choice in enumerate(choices):
        if choice in first:
            letters = f"{LETTERS[first[choice]]} and {LETTERS[index]}"
            raise CplError(f"{where}: duplicate choice {shown(choice)} (options {letters}); every choice must differ")
        first[choice] = index


def _parse_choices(raw: Any, where: str, fields: FieldNames) -> tuple[str, ...]:
    """The choices: a list (or a CSV cell's JSON list, or the hub's ``{"text": [...]}``) of texts or numbers."""
    name = fields.choices
    if isinstance(raw, str):  # CSV cells hold the list as JSON text
        try:
            raw = loads(raw, where)
        except CplError:
            raise CplError(f"{where}: field '{name}' is not a list (nor a JSON list)") from None
    if isinstance(raw, dict) and "text" in raw:  # the hub's {"label": [...], "text": [...]} shape
        raw = raw["text"]
    if not isinstance(raw, (list, tuple)):
        raise CplError(f"{where}: field '{name}' is not a list")
    _check_count(len(raw), where)
    texts = (text_of(value, where, f"field '{name}': choice {letter}") for letter, value in zip(LETTERS, raw))
    choices = tuple(text.strip() for text in texts)
    if any(not choice for choice in choices):
        raise CplError(f"{where}: field '{name}' has an empty choice")
    for choice in choices:
        capped(choice, where, f"field '{name}'", MAX_TEXT_CHARS)
    return choices


def _options_from_prompt(prompt: str, where: str) -> tuple[str, ...]:
    options = [match.groups() for line in prompt.splitlines() if (match := _OPTION_LINE.match(line))]
    letters = [letter for letter, _ in options]
    if not options or letters != list(LETTERS[: len(letters)]):
        raise CplError(
            f"{where}: no 'choices' field, and the question does not list its options as lines 'A: ...', 'B: ...'"
        )
    return tuple(text for _, text in options)


def _parse_answer(answer: Any, choices: tuple[str, ...], where: str, field: str) -> int:
    """The correct choice's index from a letter, a 0-based index (a number or its digits) or the choice's text.

    A number is always an index, from any source; a string is a letter first, then digits, then a choice's text.
    """
    count = len(choices)
    if isinstance(answer, bool):
        raise CplError(f"{where}: field '{field}' is a boolean, expected a letter or a 0-based index")
    if isinstance(answer, str):
        key = capped(answer, where, f"field '{field}'", MAX_TEXT_CHARS).strip()
        if len(key) == 1 and key.upper() in LETTERS:
            index = LETTERS.index(key.upper())
        elif _INDEX.match(key):
            index = int(key) if len(key) <= _MAX_INDEX_DIGITS else -1  # never int() of thousands of digits
        elif key in choices:
            index = choices.index(key)
        else:
            raise CplError(f"{where}: answer {shown(answer)} is neither a letter, an index nor one of the choices")
    elif isinstance(answer, int) or (isinstance(answer, float) and answer.is_integer()):
        index = int(answer)
    elif isinstance(answer, LongNumber):
        raise CplError(f"{where}: field '{field}' is {answer!r}, not one of the {count} choices' indexes")
    else:
        raise CplError(f"{where}: field '{field}' must be a letter or a 0-based index, got {shown(answer)}")
    if not 0 <= index < count:
        valid = f"A-{LETTERS[count - 1]} or 0-{count - 1}"
        raise CplError(f"{where}: answer {shown(answer)} is not among the {count} choices ({valid})")
    return index


def _check_unique_ids(questions: list[Item]) -> None:
    seen: dict[str, int] = {}
    for question in questions:
        if question.id in seen:
            raise CplError(f"{question.where}: duplicate id {shown(question.id)} (first at row {seen[question.id]})")
        seen[question.id] = question.row
