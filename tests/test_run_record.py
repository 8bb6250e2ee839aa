"""A finished run's record: written and read back unchanged, older files still read, bad files refused in one line."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import pytest

from cpl_masks.errors import CplError
from cpl_masks.training.record import RUN, RunRecord

NEWER_KEYS = ("method", "made_masks", "baseline_source", "distributed", "resume_changes")


def a_record(**changes: Any) -> RunRecord:
    """A complete record of a small finished run, with ``changes`` to its fields."""
    final = {"learned": 2, "forgotten": 1, "heldout_forgotten": 0, "totals": {"inject_wrong": 3, "mastered_right": 3}}
    values: dict[str, Any] = {
        "out_dir": "/runs/cpl",
        "model_dir": None,
        "mode": "mask",
        "method": {"name": "mask", "options": {}},
        "mask_id": "ab" * 32,
        "mask_path": "/masks/cpl.safetensors",
        "collaborative_share": 0.25,
        "made_masks": [{"epoch": 2, "step": 0, "path": "/runs/cpl/masks/e2-s0.safetensors", "mask_id": "cd" * 32}],
        "task": "demo",
        "model": {"ref": "tiny", "fingerprint": "ef" * 32},
        "scoring": "letter",
        "baseline_source": "scored",
        "data": {"inject": {"sha256": "01" * 32, "rows": 3, "path": "/data/inject.jsonl"}},
        "args": {"mode": "mask", "config": {"lr": 0.01}},
        "versions": {"torch": "2.4.0"},
        "metrics": [{**final, "epoch": 0, "learned": 0, "forgotten": 0}, {**final, "epoch": 1}],
        "final": final,
        "trainable_entries": 1234,
        "optimizer_state_bytes": 0,
        "peak_memory_bytes": 2**21,
        "peak_memory_kind": "rss",
        "time_s": 3.0,
        "distributed": {"world_size": 1, "backend": None, "wrapping": None},
        "resumed": False,
        "resume_changes": [],
    }
    return RunRecord(**{**values, **changes})


def test_a_record_round_trips_through_run_json(tmp_path):
    record = a_record(resumed=True, resume_changes=[{"at_epoch": 1, "lr": [0.01, 0.005]}])
    path = record.write(tmp_path)
    assert path == tmp_path / RUN
    assert RunRecord.read(path) == record and RunRecord.read(tmp_path) == record
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert on_disk == record.to_dict() and set(on_disk) == {item.name for item in fields(RunRecord)}
    assert list(on_disk) == sorted(on_disk)  # key-sorted, as every JSON file the tool writes


def test_a_run_json_written_before_newer_keys_still_reads(tmp_path):
    older = {key: value for key, value in a_record().to_dict().items() if key not in NEWER_KEYS}
    (tmp_path / RUN).write_text(json.dumps({**older, "from_a_later_version": 1}), encoding="utf-8")
    record = RunRecord.read(tmp_path)
    assert (record.method, record.made_masks, record.baseline_source) == ({}, [], None)
    assert (record.distributed, record.resume_changes) == ({}, [])
    assert record.final == older["final"] and record.metrics == older["metrics"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"out_dir": "/runs/cpl", "mode": ', "not valid JSON"),
        (b"\xff\xfe not text", "not valid JSON"),
        ("[1, 2]", "not a run record"),
        (json.dumps({"out_dir": "/runs/cpl", "mode": "full"}), "not a run record (no model_dir, mask_id"),
    ],
)
def test_a_corrupt_run_json_is_one_line_naming_the_file(tmp_path, content, reason):
    path = tmp_path / RUN
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CplError) as error:
        RunRecord.read(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{path}: {reason}") and "\n" not in message


def test_a_folder_without_run_json_is_not_a_finished_run(tmp_path):
    with pytest.raises(CplError, match=f"no {RUN} \\(not a finished training run\\)"):
        RunRecord.read(tmp_path / "missing")
