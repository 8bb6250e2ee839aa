"""Where question rows come from: files, saved dataset folders, hub datasets, read as untrusted input.

Each source gives its rows as plain dicts, each with the number error messages call it by (1-based: the
line number for JSONL files, blank lines included; the record's position otherwise). Only the reading is
checked here (the bytes are UTF-8, the JSON parses, the CSV has one header); what a row's fields hold is
:mod:`cpl_masks.data.questions`' to judge.

A number longer than :data:`MAX_INT_DIGITS` digits in a JSON text is kept as a :class:`LongNumber` instead
of reaching Python's ``int``, which refuses more than 4,300 digits with a traceback; the row check then
names it by row and field, or ignores it in a column no question reads.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_INT_DIGITS = 4_300  # Python's own limit for int(text); no index or id needs a hundredth of it

Rows = list[tuple[int, dict]]


@dataclass(frozen=True)
class LongNumber:
    """A JSON integer of more digits than :data:`MAX_INT_DIGITS`, kept unparsed (only its length is known)."""

    digits: int

    def __repr__(self) -> str:
        return f"a number of {self.digits:,} digits (at most {MAX_INT_DIGITS:,} are read)"


def _json_int(text: str) -> int | LongNumber:
    """JSON's integers as ``int``, except one too long to parse safely, which becomes a :class:`LongNumber`."""
    digits = len(text.lstrip("-"))
    return LongNumber(digits) if digits > MAX_INT_DIGITS else int(text)


def loads(text: str | bytes, where: str) -> Any:
    """Parse JSON text of a question source; every way it can fail is a one-line CplError starting with ``where``."""
    try:
        return json.loads(text, parse_int=_json_int)
    except json.JSONDecodeError as error:
        raise CplError(f"{where}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except RecursionError:
        raise CplError(f"{where}: JSON nested too deeply") from None
    except ValueError as error:  # anything else the parser refuses
        raise CplError(f"{where}: invalid JSON ({first_line(error)})") from None


def numbered(rows: list[dict], numbers: Sequence[int] | None = None) -> Rows:
    """Pair each row with its number: the given ones (JSONL line numbers), else its 1-based position."""
    return list(zip(numbers or range(1, len(rows) + 1), rows))


def read_file(path: Path) -> Rows:
    """A local file's rows: JSON, JSONL and CSV parsed here (every row checked), Parquet by ``datasets``."""
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        known = ", ".join(sorted(FILE_FORMATS))
        raise CplError(f"{path}: unknown file type {suffix or '(none)'}; use one of {known}")
    if path.stat().st_size == 0:
        raise CplError(f"{path}: no questions (the file is empty)")
    if suffix == ".parquet":
        return numbered(_read_parquet(path))
    raw_lines = _utf8_lines(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, raw_lines)
    if suffix == ".json":
        return numbered(_read_json_document(path))
    return _read_csv(path)


def _utf8_lines(path: Path) -> list[bytes]:
    """The file's lines, after finding non-UTF-8 bytes (and naming the row that holds them)."""
    with open(path, "rb") as handle:
        raw_lines = handle.read().splitlines()
    for number, raw in enumerate(raw_lines, start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CplError(f"{path}: row {number}: not valid UTF-8 (byte {error.start + 1})") from error
    return raw_lines


def _read_jsonl(path: Path, raw_lines: list[bytes]) -> Rows:
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
    row = loads(text, where)
    if not isinstance(row, dict):
        raise CplError(f"{where}: expected a JSON object, got {type(row).__name__}")
    _check_unicode(row, where)
    return row


def _check_unicode(row: dict, where: str) -> None:
    """Refuse a string holding a lone surrogate (JSON lets ``\\ud800`` through; no text can contain it)."""
    try:
        json.dumps(row, ensure_ascii=False, default=repr).encode("utf-8")
    except UnicodeEncodeError as error:
        bad = ord(error.object[error.start])
        raise CplError(f"{where}: a string holds a lone surrogate (\\u{bad:04x}), which is not valid Unicode") from None
    except (RecursionError, ValueError) as error:
        raise CplError(f"{where}: JSON nested too deeply") from error


def _read_json_document(path: Path) -> list[dict]:
    """A ``.json`` file: a list of question objects, or an object of equal-length columns."""
    document = loads(path.read_text(encoding="utf-8"), str(path))
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


def _read_csv(path: Path) -> Rows:
    """A CSV file's records as text, by their position: a cell is the text it holds, never a guessed type
    (a type-guessing reader turns the ids 1, 2 of a column with a blank cell into '1.0', '2.0').
    An empty cell is a missing value; blank lines are skipped; a record longer than the header is refused."""
    text = path.read_text(encoding="utf-8-sig")
    previous = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # the caps are checked per field
    rows: list[dict] = []
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = _csv_header(path, reader)
        for cells in reader:
            if not cells:
                continue
            if len(cells) > len(header):
                where = f"{path}: row {len(rows) + 1}"
                raise CplError(f"{where}: {len(cells)} cells, but the header names {len(header)} columns")
            rows.append({name: (cells[i] or None) if i < len(cells) else None for i, name in enumerate(header)})
    except csv.Error as error:
        raise CplError(f"{path}: row {len(rows) + 1}: not valid CSV ({first_line(error)})") from None
    finally:
        csv.field_size_limit(previous)
    if not rows:
        raise CplError(f"{path}: no questions (the file has only a header)")
    return numbered(rows)


def _csv_header(path: Path, reader: Any) -> list[str]:
    """The CSV header's column names, each named once."""
    try:
        header = next(reader, None)
    except csv.Error as error:
        raise CplError(f"{path}: the header is not valid CSV ({first_line(error)})") from None
    if not header:
        raise CplError(f"{path}: no header row (the first line must name the columns)")
    for index, name in enumerate(header):
        if name in header[:index]:
            raise CplError(f"{path}: the header names column {name[:60]!r} twice")
    return header


def _read_parquet(path: Path) -> list[dict]:
    """A Parquet file's rows through ``datasets``, with a cache that lives only for this read.

    ``datasets`` keys its cache of a local file by path and modification time, so a file rewritten
    with the same size and an old mtime would give the old rows; a fresh cache cannot be stale.
    """
    import tempfile

    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="cpl-masks-datasets-") as cache:
        try:
            dataset = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache)
            return dataset.to_list()
        except Exception as error:  # datasets wraps parser errors in many types
            raise CplError(f"{path}: cannot be read as parquet: {first_line(error)}") from error


def read_saved_dataset(path: Path, split: str | None) -> list[dict]:
    """The rows of a dataset folder written by ``save_to_disk`` (its ``split`` when it holds several)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise CplError(f"{path}: not a dataset folder written by save_to_disk ({first_line(error)})") from error
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, split, str(path))
    return loaded.to_list()


def read_hub_dataset(name: str, split: str | None) -> list[dict]:
    """The rows of a hub dataset (its ``split`` when it has several)."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:
        raise CplError(f"{name}: cannot load this dataset ({first_line(error)})") from error
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


def is_local(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a local file or folder (so a missing one is not looked up on the hub)."""
    text = str(source)
    return Path(source).suffix.lower() in FILE_FORMATS or os.sep in text or text.startswith(".")


def first_line(error: BaseException) -> str:
    """An exception's first line, at most 200 characters: enough to say what failed, in one line."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
