"""Free-form items: the rows TRL's ``SFTTrainer`` reads, as items to split, profile, train on and score.

Four row shapes, TRL's dataset types in its two formats:

* language modeling: ``{"text": str}`` (every token is scored) and ``{"messages": [...]}`` (the
  assistant turns are the completion);
* prompt-completion: ``{"prompt": str, "completion": str}`` and the conversational
  ``{"prompt": [messages], "completion": [messages]}``.

A message is ``{"role": "system" | "user" | "assistant", "content": str}``. A :class:`Completion` keeps
what it was read as, and writes the same canonical row back (:meth:`Completion.to_record`), so a split's
files load again as what they were. How a row becomes tokens is the scorer's
(:mod:`cpl_masks.scoring.completion`); only the row's content is checked here, each problem a one-line
:class:`~cpl_masks.errors.CplError` naming the file and the row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cpl_masks.data.fields import MAX_TEXT_CHARS, FieldNames, Located, capped, kind_of, row_id, shown, text_of
from cpl_masks.data.sources import loads
from cpl_masks.errors import CplError

TEXT, MESSAGES, PROMPT_COMPLETION = "text", "messages", "prompt-completion"
FREE_FORMS = (TEXT, MESSAGES, PROMPT_COMPLETION)
ROLES = ("system", "user", "assistant")

Message = tuple[str, str]  # (role, content)
Body = str | tuple[Message, ...]  # a standard text or a conversation


@dataclass(frozen=True)
class Completion(Located):
    """One free-form item: a completion to learn or keep, after an optional prompt.

    ``form`` is one of :data:`FREE_FORMS`. For ``text`` the completion is the whole text and the
    prompt is empty; for ``messages`` the completion is the conversation (its assistant turns are
    what is scored) and the prompt is empty; for ``prompt-completion`` both are texts, or both
    conversations. ``source`` and ``row`` say where it was read, for messages only.
    """

    id: str
    form: str
    prompt: Body
    completion: Body
    source: str = field(default="", compare=False, repr=False)
    row: int = field(default=0, compare=False, repr=False)
    noun: ClassVar[str] = "item"

    @property
    def conversational(self) -> bool:
        """Whether the item is a conversation, which the tokenizer's chat template renders."""
        return not isinstance(self.completion, str)

    @property
    def content(self) -> tuple[Any, ...]:
        """What the item says, without its id: two items with the same content are the same item."""
        return (self.form, self.prompt, self.completion)

    @property
    def text_length(self) -> int:
        """Characters of text the item holds (its prompt and completion)."""
        return sum(len(text) for text in _texts(self.prompt) + _texts(self.completion))

    def to_record(self) -> dict[str, Any]:
        """The canonical JSON row this item is written and hashed as (TRL's column names)."""
        if self.form == TEXT:
            return {"id": self.id, "text": self.completion}
        if self.form == MESSAGES:
            return {"id": self.id, "messages": _message_records(self.completion)}
        return {"id": self.id, "prompt": _body_record(self.prompt), "completion": _body_record(self.completion)}


def free_form_of(row: dict, fields: FieldNames) -> str | None:
    """The free-form shape a row's fields say it has (``messages``, ``prompt-completion``, ``text``), or None."""
    if row.get(fields.messages) is not None:
        return MESSAGES
    if row.get(fields.prompt) is not None or row.get(fields.completion) is not None:
        return PROMPT_COMPLETION
    if row.get(fields.text) is not None:
        return TEXT
    return None


def parse_completion(row: dict, number: int, name: str, form: str, fields: FieldNames) -> Completion:
    """A row read as a free-form item of shape ``form``; every problem is a one-line error naming the row."""
    where = f"{name}: row {number}"
    if form == TEXT:
        prompt: Body = ""
        completion: Body = _text(row.get(fields.text), where, fields.text)
    elif form == MESSAGES:
        prompt, completion = "", _conversation(row.get(fields.messages), where, fields.messages, whole=True)
    else:
        prompt, completion = _prompt_completion(row, where, fields)
    return Completion(row_id(row.get("id"), number, where), form, prompt, completion, source=name, row=number)


def _prompt_completion(row: dict, where: str, fields: FieldNames) -> tuple[Body, Body]:
    """The prompt and completion of a prompt-completion row: both texts, or both conversations."""
    raw_prompt, raw_completion = row.get(fields.prompt), row.get(fields.completion)
    if raw_completion is None or raw_completion in ("", []):
        raise CplError(f"{where}: missing or empty field '{fields.completion}'")
    if raw_prompt is None:
        raise CplError(f"{where}: missing field '{fields.prompt}' (a completion needs the prompt it follows)")
    if isinstance(raw_prompt, list) != isinstance(raw_completion, list):
        raise CplError(
            f"{where}: fields '{fields.prompt}' and '{fields.completion}' must both be texts or both lists of messages"
        )
    if isinstance(raw_prompt, list):
        prompt = _conversation(raw_prompt, where, fields.prompt, whole=False)
        completion = _conversation(raw_completion, where, fields.completion, whole=False)
        if completion[0][0] != "assistant":
            raise CplError(f"{where}: field '{fields.completion}' must start with an assistant message")
        _check_order(prompt + completion, where, fields.prompt)
        return prompt, completion
    return _text(raw_prompt, where, fields.prompt, empty_ok=True), _text(raw_completion, where, fields.completion)


def _text(value: Any, where: str, name: str, *, empty_ok: bool = False) -> str:
    """A standard (non-conversational) field's text: non-empty unless ``empty_ok``, at most the text limit."""
    if value is None or (not empty_ok and isinstance(value, str) and not value.strip()):
        raise CplError(f"{where}: missing or empty field '{name}'")
    return capped(text_of(value, where, f"field '{name}'"), where, f"field '{name}'", MAX_TEXT_CHARS)


def _conversation(value: Any, where: str, name: str, *, whole: bool) -> tuple[Message, ...]:
    """A list of messages (a CSV cell's JSON list too); ``whole`` conversations need an assistant turn, in order."""
    if isinstance(value, str):  # CSV and some exports keep the list as JSON text
        value = loads(value, f"{where}: field '{name}'")
    if not isinstance(value, (list, tuple)) or not value:
        raise CplError(f"{where}: field '{name}' must be a non-empty list of messages, not {kind_of(value)}")
    messages = tuple(_message(item, where, name, index) for index, item in enumerate(value, 1))
    if whole:
        if not any(role == "assistant" for role, _ in messages):
            raise CplError(f"{where}: field '{name}' has no assistant message (nothing to learn)")
        _check_order(messages, where, name)
    return messages


def _message(item: Any, where: str, name: str, index: int) -> Message:
    what = f"field '{name}': message {index}"
    if not isinstance(item, dict):
        raise CplError(f"{where}: {what} must be an object with 'role' and 'content', not {kind_of(item)}")
    extra = sorted(set(item) - {"role", "content"})
    if extra:
        raise CplError(f"{where}: {what} has field {shown(extra[0])}; only 'role' and 'content' are supported")
    role = item.get("role")
    if role not in ROLES:
        raise CplError(f"{where}: {what} has role {shown(role)}; expected one of {', '.join(ROLES)}")
    content = item.get("content")
    if not isinstance(content, str):
        raise CplError(f"{where}: {what} content must be text, not {kind_of(content)}")
    return role, capped(content, where, what, MAX_TEXT_CHARS)


def _check_order(messages: tuple[Message, ...], where: str, name: str) -> None:
    """Refuse roles out of order: a system message only first, then user and assistant turns taking turns."""
    turns = [role for role, _ in messages]
    if turns[0] == "system":
        turns = turns[1:]
    if "system" in turns:
        raise CplError(f"{where}: field '{name}' has a system message after the first message")
    for before, after in itertools.pairwise(turns):
        if before == after:
            raise CplError(f"{where}: field '{name}' has two {before} messages in a row (roles out of order)")
    if turns and turns[0] != "user":
        raise CplError(f"{where}: field '{name}' starts with an assistant message; a user message comes first")


def _texts(body: Body) -> list[str]:
    return [body] if isinstance(body, str) else [content for _, content in body]


def _message_records(messages: Body) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]


def _body_record(body: Body) -> str | list[dict[str, str]]:
    return body if isinstance(body, str) else _message_records(body)
