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

from cpl_masks.data.demo import demo_rows
from cpl_masks.errors import CplError
from cpl_masks.utils.files import write_jsonl

LETTERS = string.ascii_uppercase
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN_DEMO = "builtin:demo"  # the generated demo set (cpl_masks.data.demo)
MAX_TEXT_CHARS = 100_000  # far beyond any model's context; refuses runaway fields before tokenizing
_INDEX = re.compile(r"^-?[0-9]+$")
_OPTION_LINE = re.compile(r"^\s*([A-Z])\s*[:.)]\s+(.*\S)\s*$")


@dataclass(frozen=True)
class Question:
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
    def where(self) -> str:
        """Where the question came from, as error messages name it: ``FILE: row N`` (or its id when not loaded)."""
        return f"{self.source}: row {self.row}" if self.source else f"question {self.id!r}"

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


@dataclass(frozen=True)
class FieldNames:
    """Which row fields hold the question, the choices and the answer."""

    question: str = "question"
    choices: str = "choices"
    answer: str = "answer"


def questions_sha256(questions: Sequence[Question]) -> str:
    """Content hash of a question set: the same questions hash the same from any file format."""
    digest = hashlib.sha256()
    for question in questions:
        digest.update(json.dumps(question.to_record(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def write_questions(path: str | os.PathLike, questions: Iterable[Question]) -> None:
    """Write questions as canonical JSONL (atomically), readable back by :func:`load_questions`."""
    write_jsonl(path, (question.to_record() for question in questions))


def load_questions(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    fields: FieldNames = FieldNames(),
    limit: int | None = None,
) -> list[Question]:
    """Load and validate a question set from a file, a saved dataset folder, a hub dataset or ``builtin:demo``.

    ``limit`` keeps only the first rows; only those are validated.

    Raises:
        CplError: naming the source and row, for any unreadable or invalid input, or a ``limit`` below 1.
    """
    check_limit(limit)
    rows, name = _read_rows(source, split)
    if limit is not None:
        rows = rows[:limit]
    return _parse_rows(rows, name, fields)


def parse_questions(records: Any, name: str) -> list[Question]:
    """Validate canonical question records held elsewhere (a retain set's metadata), as a file's rows are."""
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise CplError(f"{name}: the questions are not a list of objects")
    return _parse_rows(_numbered(records), name, FieldNames())


def _parse_rows(rows: list[tuple[int, dict]], name: str, fields: FieldNames) -> list[Question]:
    if not rows:
        raise CplError(f"{name}: no questions (the data is empty)")
    questions = [_parse_row(row, number, name, fields) for number, row in rows]
    _check_unique_ids(questions)
    return questions


def check_limit(limit: int | None, option: str = "--limit") -> None:
    """Refuse a ``--limit`` below 1, which would silently drop questions (a negative slice) or all of them.

    Raises:
        CplError: naming ``option`` and its value.
    """
    if limit is not None and limit < 1:
        raise CplError(f"{option} {limit}: must be at least 1 (or left out for all questions)")


def _read_rows(source: str | os.PathLike, split: str | None) -> tuple[list[tuple[int, dict]], str]:
    """The source's rows, each with the number error messages give it, and the source's name."""
    if str(source) == BUILTIN_DEMO:
        return _numbered(demo_rows()), BUILTIN_DEMO
    path = Path(source)
    if path.is_file():
        return _read_file(path), str(path)
    if path.is_dir():
        return _numbered(_read_saved_dataset(path, split)), str(path)
    if path.suffix.lower() in FILE_FORMATS or os.sep in str(source) or str(source).startswith("."):
        raise CplError(f"{source}: no such file or folder")
    return _numbered(_read_hub_dataset(str(source), split)), str(source)


def _numbered(rows: list[dict], numbers: Sequence[int] | None = None) -> list[tuple[int, dict]]:
    """Pair each row with its number: the given ones (JSONL line numbers), else its 1-based position."""
    return list(zip(numbers or range(1, len(rows) + 1), rows))


def _read_file(path: Path) -> list[tuple[int, dict]]:
    """A local file's rows: JSON and JSONL parsed here (every row checked), CSV and Parquet by ``datasets``."""
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        known = ", ".join(sorted(FILE_FORMATS))
        raise CplError(f"{path}: unknown file type {suffix or '(none)'}; use one of {known}")
    if path.stat().st_size == 0:
        raise CplError(f"{path}: no questions (the file is empty)")
    if suffix in (".jsonl", ".json", ".csv"):
        raw_lines = _utf8_lines(path)
        if suffix == ".jsonl":
            return _read_jsonl(path, raw_lines)
        if suffix == ".json":
            return _numbered(_read_json_document(path))
    return _numbered(_read_with_datasets(path, suffix))


def _utf8_lines(path: Path) -> list[bytes]:
    """The file's lines, after finding non-UTF-8 bytes (``datasets`` would report them vaguely)."""
    with open(path, "rb") as handle:
        raw_lines = handle.read().splitlines()
    for number, raw in enumerate(raw_lines, start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CplError(f"{path}: row {number}: not valid UTF-8 (byte {error.start + 1})") from error
    return raw_lines


def _read_jsonl(path: Path, raw_lines: list[bytes]) -> list[tuple[int, dict]]:
    """Each non-blank line as a JSON object, numbered by its line (blank lines count, as editors show)."""
    rows = []
    for number, raw in enumerate(raw_lines, start=1):
        if raw.strip():
            rows.append((number, _json_object(raw, f"{path}: row {number}")))
    if not rows:
        raise CplError(f"{path}: no questions (the file has only blank lines)")
    return rows


def _json_object(text: str | bytes, where: str) -> dict:
    """One JSON object of a question file: valid JSON, not nested absurdly deep, valid Unicode throughout."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise CplError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from error
    except RecursionError as error:
        raise CplError(f"{where}: JSON nested too deeply") from error
    if not isinstance(row, dict):
        raise CplError(f"{where}: expected a JSON object, got {type(row).__name__}")
    _check_unicode(row, where)
    return row


def _check_unicode(row: dict, where: str) -> None:
    """Refuse a string holding a lone surrogate (JSON lets ``\\ud800`` through; no text can contain it)."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        bad = ord(error.object[error.start])
        raise CplError(f"{where}: a string holds a lone surrogate (\\u{bad:04x}), which is not valid Unicode") from None
    except (RecursionError, ValueError) as error:
        raise CplError(f"{where}: JSON nested too deeply") from error


def _read_json_document(path: Path) -> list[dict]:
    """A ``.json`` file: a list of question objects, or an object of equal-length columns."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CplError(f"{path}: invalid JSON ({error.msg} at line {error.lineno})") from error
    except RecursionError as error:
        raise CplError(f"{path}: JSON nested too deeply") from error
    if isinstance(document, dict) and document and all(isinstance(column, list) for column in document.values()):
        lengths = {len(column) for column in document.values()}
        if len(lengths) != 1:
            raise CplError(f"{path}: the columns of the JSON object differ in length ({sorted(lengths)})")
        document = [dict(zip(document, values)) for values in zip(*document.values())]
    if not isinstance(document, list):
        raise CplError(f"{path}: expected a list of question objects (or an object of columns)")
    if not document:
        raise CplError(f"{path}: no questions (the file is empty)")
    for number, row in enumerate(document, start=1):
        if not isinstance(row, dict):
            raise CplError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
        _check_unicode(row, f"{path}: row {number}")
    return document


def _read_with_datasets(path: Path, suffix: str) -> list[dict]:
    """A CSV or Parquet file's rows through ``datasets``, with a cache that lives only for this read.

    ``datasets`` keys its cache of a local file by path and modification time, so a file rewritten
    with the same size and an old mtime would give the old rows; a fresh cache cannot be stale.
    """
    import tempfile

    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="cpl-masks-datasets-") as cache:
        try:
            dataset = datasets.load_dataset(FILE_FORMATS[suffix], data_files=str(path), split="train", cache_dir=cache)
            return dataset.to_list()
        except Exception as error:  # datasets wraps parser errors in many types
            raise CplError(f"{path}: cannot be read as {suffix[1:]}: {_first_line(error)}") from error


def _read_saved_dataset(path: Path, split: str | None) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise CplError(f"{path}: not a dataset folder written by save_to_disk ({_first_line(error)})") from error
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, split, str(path))
    return loaded.to_list()


def _read_hub_dataset(name: str, split: str | None) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:
        raise CplError(f"{name}: cannot load this dataset ({_first_line(error)})") from error
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, split, name)
    return loaded.to_list()


def _pick_split(dataset_dict: Any, split: str | None, name: str) -> Any:
    splits = list(dataset_dict)
    if split is None and len(splits) == 1:
        return dataset_dict[splits[0]]
    if split not in dataset_dict:
        raise CplError(f"{name}: choose a split with --split (available: {', '.join(splits)})")
    return dataset_dict[split]


def _parse_row(row: dict, number: int, name: str, fields: FieldNames) -> Question:
    where = f"{name}: row {number}"
    text = row.get(fields.question)
    if not isinstance(text, str) or not text.strip():
        raise CplError(f"{where}: missing field '{fields.question}' (a non-empty string)")
    answer_field = fields.answer if row.get(fields.answer) is not None else "label"
    answer = row.get(answer_field)
    if answer is None:
        raise CplError(f"{where}: missing field '{fields.answer}'")
    raw_choices = row.get(fields.choices)
    preformatted = raw_choices is None
    choices = _options_from_prompt(text, where) if preformatted else _parse_choices(raw_choices, where, fields)
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise CplError(f"{where}: {len(choices)} choices; between {MIN_CHOICES} and {MAX_CHOICES} are supported")
    _check_lengths(text, choices, where, fields)
    _check_distinct(choices, where)
    question_id = row.get("id")
    return Question(
        id=f"row-{number}" if question_id in (None, "") else str(question_id),
        question=text,
        choices=choices,
        answer=_parse_answer(answer, choices, where, answer_field),
        preformatted=preformatted or bool(row.get("preformatted")),
        source=name,
        row=number,
    )


def _check_lengths(text: str, choices: tuple[str, ...], where: str, fields: FieldNames) -> None:
    """Refuse a field longer than :data:`MAX_TEXT_CHARS` before anything tokenizes it."""
    for field_name, value in ((fields.question, text), *((fields.choices, choice) for choice in choices)):
        if len(value) > MAX_TEXT_CHARS:
            limit = f"at most {MAX_TEXT_CHARS:,} are allowed"
            raise CplError(f"{where}: field '{field_name}' is {len(value):,} characters long; {limit}")


def _check_distinct(choices: tuple[str, ...], where: str) -> None:
    """Refuse a choice listed twice: which option is the answer would be ambiguous.

    Choices arrive stripped of surrounding whitespace; they are compared case-sensitively.
    """
    first: dict[str, int] = {}
    for index, choice in enumerate(choices):
        if choice in first:
            letters = f"{LETTERS[first[choice]]} and {LETTERS[index]}"
            raise CplError(f"{where}: duplicate choice {choice!r} (options {letters}); every choice must differ")
        first[choice] = index


def _parse_choices(raw: Any, where: str, fields: FieldNames) -> tuple[str, ...]:
    if isinstance(raw, str):  # CSV cells hold the list as JSON text
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raise CplError(f"{where}: field '{fields.choices}' is not a list (nor a JSON list)") from None
    if isinstance(raw, dict) and "text" in raw:  # the hub's {"label": [...], "text": [...]} shape
        raw = raw["text"]
    if not isinstance(raw, (list, tuple)):
        raise CplError(f"{where}: field '{fields.choices}' is not a list")
    choices = tuple(str(choice).strip() for choice in raw)
    if any(not choice for choice in choices):
        raise CplError(f"{where}: field '{fields.choices}' has an empty choice")
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
    count = len(choices)
    if isinstance(answer, bool):
        raise CplError(f"{where}: field '{field}' is a boolean, expected a letter or a 0-based index")
    if isinstance(answer, str):
        key = answer.strip()
        if len(key) == 1 and key.upper() in LETTERS:
            index = LETTERS.index(key.upper())
        elif _INDEX.match(key):
            index = int(key)
        elif key in choices:
            index = choices.index(key)
        else:
            raise CplError(f"{where}: answer {answer!r} is neither a letter, an index nor one of the choices")
    elif isinstance(answer, int) or (isinstance(answer, float) and answer.is_integer()):
        index = int(answer)
    else:
        raise CplError(f"{where}: field '{field}' must be a letter or a 0-based index, got {answer!r}")
    if not 0 <= index < count:
        valid = f"A-{LETTERS[count - 1]} or 0-{count - 1}"
        raise CplError(f"{where}: answer {answer!r} is not among the {count} choices ({valid})")
    return index


def _check_unique_ids(questions: list[Question]) -> None:
    seen: dict[str, int] = {}
    for question in questions:
        if question.id in seen:
            raise CplError(f"{question.where}: duplicate id {question.id!r} (first at row {seen[question.id]})")
        seen[question.id] = question.row


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
