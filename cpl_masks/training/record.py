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

from collections.abc import Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError
from cpl_masks.utils.files import read_json, write_json

RUN = "run.json"


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
        if not isinstance(payload, Mapping):
            raise CplError("not a run record (not a JSON object)")
        missing = [item.name for item in fields(cls) if item.name not in payload and _required(item)]
        if missing:
            raise CplError(f"not a run record (no {', '.join(missing)})")
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
