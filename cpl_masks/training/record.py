"""A finished training run's record, ``DIR/run.json``: one typed dataclass, read and written only here.

:func:`cpl_masks.training.run.start_run` builds a :class:`RunRecord` when the last epoch ends and
writes it last into the run folder; the sweep, ``cpl-masks compare`` and ``cpl-masks train`` read
it back with :meth:`RunRecord.read`. Its JSON keys are the field names, key-sorted as every file
the tool writes, so a file written before this class existed reads the same. Fields a run record
gained later (``method``, ``made_masks``, ``baseline_source``, ``distributed``, ``resume_changes``)
default to None or empty, so an older ``run.json`` still reads. The registry keeps each run's
record as JSON of whatever version wrote it and reads that on its own terms.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError
from cpl_masks.evaluation.harness import TaskScores
from cpl_masks.scoring.base import Scores
from cpl_masks.utils.files import read_json, write_json

RUN = "run.json"
FINAL_KEYS = (  # the last metrics row's figures run.json keeps as its final ones; every saved row holds them
    "learned",
    "forgotten",
    "heldout_forgotten",
    "totals",
    "accuracy",
    "delta_logprob",
    "delta_margin",
    "retain_loss_delta",
    "mask_agreement",
)
# a checkpoint's state.json: its epoch, the trainer file, every evaluated epoch's metrics and records so far,
# epoch 0's scores (the baseline) and the seconds spent
STATE_FIELDS = {
    "epoch": int,
    "file": str,
    "metrics": list[dict[str, Any]],
    "records": list[dict[str, Any]],
    "baseline": dict[str, Any],
    "elapsed_s": float,
}


@dataclass(kw_only=True)
class RunRecord:
    """What a finished run trained, on what, what every evaluated epoch measured, and what it cost."""

    # Where the run is: its folder, and the saved model (None unless the run kept its weights).
    out_dir: str
    model_dir: str | None

    # How it trained: the mode and the method with its options (plus what the method reports about itself), the mask
    # it started from (id, path, collaborative share) and the masks it made while training (one row each: epoch,
    # step, path, mask id, collaborative share).
    mode: str
    method: dict[str, Any] = field(default_factory=dict)
    mask_id: str | None
    mask_path: str | None
    collaborative_share: float | None
    made_masks: list[dict[str, Any]] = field(default_factory=list)

    # On what: the task name, the model (``ref`` and weights ``fingerprint``), the scoring, where epoch 0 came from
    # (``split`` or ``scored``), each question file's hash, rows and path, the whole request and the package
    # versions.
    task: str
    model: dict[str, Any]
    scoring: str
    baseline_source: str | None = None
    data: dict[str, dict[str, Any]]
    args: dict[str, Any]
    versions: dict[str, Any]

    # What it measured: one metrics row per evaluated epoch (epoch 0 first, as in ``metrics.jsonl``) and the last
    # row's figures named in ``training_run.FINAL_KEYS`` (counts with their totals, accuracy, score deltas).
    metrics: list[dict[str, Any]]
    final: dict[str, Any]

    # What it cost: trainable entries, optimizer state, peak memory (``cuda`` or ``rss``), seconds (over every
    # resume) and the processes (world size, backend, wrapping).
    trainable_entries: int
    optimizer_state_bytes: int
    peak_memory_bytes: int
    peak_memory_kind: str
    time_s: float
    distributed: dict[str, Any] = field(default_factory=dict)

    # Whether it was resumed from a checkpoint, and each ``--lr``/``--epochs`` change a resume made.
    resumed: bool
    resume_changes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The record as ``run.json`` holds it (the field names are its keys); the registry stores this too."""
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> RunRecord:
        """The record a ``run.json`` payload describes; keys a newer version added are ignored, ones an
        older version lacked take their defaults.

        Raises:
            CplError: ``payload`` is not an object or lacks a key every run record has had.
        """
        problem = field_problem(cls, payload)
        if problem is not None:
            raise CplError(f"not a run record ({problem})")
        return cls(**{item.name: payload[item.name] for item in fields(cls) if item.name in payload})

    @classmethod
    def read(cls, where: str | Path) -> RunRecord:
        """The record of the finished run in folder ``where`` (or in the ``run.json`` file ``where``).

        Raises:
            CplError: no ``run.json`` there (not a finished run), or one that is not valid JSON or not
                a run record (naming the file).
        """
        path = Path(where)
        file = path / RUN if path.is_dir() else path
        if not file.is_file():
            raise CplError(f"{path}: no {RUN} (not a finished training run)")
        payload = read_json(file)  # a file that is not JSON is refused there, by name
        try:
            return cls.from_dict(payload)
        except CplError as error:
            raise CplError(f"{file}: {error}") from None

    def write(self, folder: str | Path) -> Path:
        """Write the record as ``folder/run.json`` (atomically: a crash leaves none, never half of one);
        returns its path."""
        path = Path(folder) / RUN
        write_json(path, self.to_dict())
        return path


def _required(item: Field) -> bool:
    """Whether a field has no default: a key every ``run.json`` has held."""
    return item.default is MISSING and item.default_factory is MISSING


def field_problem(cls: type, payload: Any, *, unknown_ok: bool = True) -> str | None:
    """What keeps ``payload`` (JSON read from a file) from being dataclass ``cls``'s fields, or None when nothing.

    Every field without a default must be there, and every field there must hold a value of its annotated type
    (``str``, ``int``, ``float``, ``bool``, None, lists, dicts, unions, nested dataclasses); with ``unknown_ok``
    False a key that is no field is refused too. One place for the files a run reads back (``run.json``,
    ``config.json``, ``state.json``), so a damaged file is refused in one line rather than failing deep inside.
    """
    if not isinstance(payload, Mapping):
        return f"not a JSON object but {_shown(payload)}"
    hints = typing.get_type_hints(cls)
    missing = [item.name for item in fields(cls) if item.name not in payload and _required(item)]
    if missing:
        return f"no {', '.join(missing)}"
    for item in fields(cls):
        if item.name in payload and not matches(payload[item.name], hints[item.name]):
            return f"{item.name!r} is {_shown(payload[item.name])}, not {_type_name(hints[item.name])}"
    unknown = sorted(str(key) for key in set(payload) - {item.name for item in fields(cls)})
    return None if unknown_ok or not unknown else f"unknown field {unknown[0]!r}"


def state_problem(state: Any) -> str | None:
    """What keeps the JSON of a checkpoint's ``state.json`` from being what a run writes there, or None.

    It is read back on resume (the rows and the baseline go on into ``run.json``), so each part is checked:
    the fields' types, the file matching the epoch, every metrics row's epoch and final figures, the baseline's
    scores per set (:class:`~cpl_masks.scoring.base.Scores`), retain loss, source and lm-eval items
    (:class:`~cpl_masks.evaluation.harness.TaskScores`).
    """
    if not isinstance(state, dict):
        return f"not a JSON object but {_shown(state)}"
    for key, kind in STATE_FIELDS.items():
        if key not in state or not matches(state[key], kind):
            return f"{key!r} is {_shown(state.get(key))}, not {_type_name(kind)}"
    epoch, rows, baseline = state["epoch"], state["metrics"], state["baseline"]
    if epoch < 1 or state["file"] != f"trainer-{epoch}.pt" or state["elapsed_s"] < 0:
        return f"epoch {epoch}, file {_shown(state['file'])} and elapsed_s {state['elapsed_s']} do not fit"
    if not rows or any(not matches(row.get("epoch"), int) or not set(FINAL_KEYS) <= set(row) for row in rows):
        return "a metrics row lacks its epoch or a final figure"
    if not matches(baseline.get("scores"), dict[str, Scores]) or any(
        len({len(values) for values in entry.values()}) != 1 for entry in baseline["scores"].values()
    ):
        return "its baseline holds no scores per set, or scores of unequal lengths"
    if not matches(baseline.get("retain_loss"), float | None) or not matches(baseline.get("source"), str):
        return "its baseline's retain_loss or source is not what a run saves"
    harness = baseline.get("harness", {})  # absent in a checkpoint written before lm-eval tasks were scored
    if not matches(harness, dict[str, TaskScores]) or any(not _aligned(entry) for entry in harness.values()):
        return "its baseline's lm-eval items are not what a run saves"
    return None


def _aligned(entry: Mapping[str, Any]) -> bool:
    """Whether one lm-eval task's saved items have one value per item in every list they hold."""
    lists = [entry[key] for key in ("correct", "logprobs", "margins") if entry.get(key) is not None]
    return all(len(values) == len(entry["ids"]) for values in lists)


def matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(matches(entry, args[0]) for entry in value)
    if origin is dict:
        return isinstance(value, dict) and all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if is_dataclass(hint):
        return field_problem(hint, value, unknown_ok=False) is None
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def _shown(value: Any) -> str:
    """A JSON value in a message: one line, at most 40 characters."""
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= 40 else f"{text[:37]}..."
