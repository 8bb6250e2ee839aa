"""How a row's fields are read and named in messages, for every row shape (multiple choice and free-form).

One rule for every source and format: a text field is text or a finite number (as JSON spells it), never
null, a boolean or a list turned into text; it has at most :data:`MAX_TEXT_CHARS` characters; an id has at
most :data:`MAX_ID_CHARS`. A problem is a one-line :class:`~cpl_masks.errors.CplError` that starts with
``where`` (``FILE: row N``) and quotes the value shortened.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from cpl_masks.data.sources import LongNumber
from cpl_masks.errors import CplError

MAX_TEXT_CHARS = 100_000  # far beyond any model's context; refuses runaway fields before tokenizing
MAX_ID_CHARS = 1_000  # an id names a question in records and messages; far longer is not an id


class Located:
    """An item read from a source (a question or a free-form item): where messages say it came from.

    The dataclass that mixes this in has ``id``, ``source`` and ``row`` fields, and names its kind in ``noun``.
    """

    id: str
    source: str
    row: int
    noun: ClassVar[str] = "question"

    @property
    def where(self) -> str:
        """Where the item came from, as error messages name it: ``FILE: row N`` (or its id when not loaded)."""
        return f"{self.source}: row {self.row}" if self.source else f"{self.noun} {self.id!r}"


@dataclass(frozen=True)
class FieldNames:
    """Which row fields hold an item's parts: a question's text, choices and answer, or TRL's free-form columns."""

    question: str = "question"
    choices: str = "choices"
    answer: str = "answer"
    text: str = "text"
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"


def row_id(value: Any, number: int, where: str) -> str:
    """The row's id as text (``row-N`` when it has none), at most :data:`MAX_ID_CHARS` characters."""
    if value is None or value == "":
        return f"row-{number}"
    return capped(text_of(value, where, "field 'id'"), where, "field 'id'", MAX_ID_CHARS)


def text_of(value: Any, where: str, what: str) -> str:
    """A text field's value: text as it is, a number as JSON spells it (``7`` is ``"7"``, ``0.5`` is ``"0.5"``).

    The same rule for every source, so a number means the same from JSON, CSV and Parquet; null, booleans,
    lists, objects, non-finite and overlong numbers are refused rather than turned into text like ``"None"``.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return json.dumps(value)
    raise CplError(f"{where}: {what} must be text or a finite number, not {kind_of(value)}")


def kind_of(value: Any) -> str:
    """How a message names a value of the wrong type: ``null``, ``a boolean``, ``a list``, ``nan``..."""
    kinds = {type(None): "null", bool: "a boolean", list: "a list", tuple: "a list", dict: "an object"}
    if type(value) in kinds:
        return kinds[type(value)]
    if isinstance(value, (float, LongNumber)):
        return repr(value)
    return f"a value of type {type(value).__name__}"


def capped(value: str, where: str, what: str, limit: int) -> str:
    """``value`` when it has at most ``limit`` characters; refused before anything tokenizes or records it."""
    if len(value) > limit:
        raise CplError(f"{where}: {what} is {len(value):,} characters long; at most {limit:,} are allowed")
    return value


def shown(value: Any) -> str:
    """A value from a row as a message quotes it: its repr, shortened so that the message stays one short line."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}... ({len(text):,} characters)"
