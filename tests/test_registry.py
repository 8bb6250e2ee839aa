"""The mask registry: names and versions, references, runs, lineage, integrity, concurrency and crashes."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpl_masks import registry
from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.masks import Mask
from cpl_masks.registry import schema, store


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty registry."""
    folder = tmp_path / "home"
    monkeypatch.setenv("CPL_MASKS_HOME", str(folder))
    return folder


def make_mask(folder: Path, seed: int, *, model: str = "org/Tiny-Model", parents: list[str] | None = None) -> Path:
    """Save a small random mask whose provenance names a model and an injection file."""
    generator = torch.Generator().manual_seed(seed)
    bits = {
        "layer.weight": torch.rand(4, 8, generator=generator) > 0.5,
        "layer.bias": torch.rand(8, generator=generator) > 0.5,
    }
    metadata = {
        "model": {"ref": model, "fingerprint": "f" * 64},
        "data": {"inject": {"sha256": "a" * 64, "rows": 3, "path": "data/arc.jsonl"}},
        "parents": parents or [],
    }
    return Mask.from_bool(bits, metadata).save(folder / f"mask-{seed}.safetensors")


def run_payload(task: str, learned: int) -> dict:
    """A train command's run.json payload, as far as the registry reads it (counts out of totals)."""
    return {
        "out_dir": f"runs/{task}",
        "mode": "mask",
        "task": task,
        "data": {"inject": {"sha256": "b" * 64, "rows": 10, "path": f"{task}/inject.jsonl"}},
        "final": {
            "learned": learned,
            "forgotten": 1,
            "heldout_forgotten": 0,
            "totals": {"inject_wrong": 10, "mastered_right": 20, "heldout_right": 5},
        },
    }


def cli(*args: str):
    """Invoke the CLI in-process."""
    return CliRunner().invoke(app, list(args))


def test_names_versions_and_every_kind_of_reference(tmp_path):
    first, second = make_mask(tmp_path, 1), make_mask(tmp_path, 2)
    assert registry.register_mask(first) == "tiny-model/arc@v1"
    assert registry.register_mask(second) == "tiny-model/arc@v2"
    assert registry.register_mask(first) == "tiny-model/arc@v1"  # same content: same name
    first_id = Mask.load(first).id
    stored = registry.resolve_mask_path("tiny-model/arc@v1")
    assert stored == store.artifact_path(first_id) and stored.read_bytes() == first.read_bytes()
    assert registry.resolve_mask_path("tiny-model/arc").read_bytes() == second.read_bytes()
    assert registry.resolve_mask_path(first_id) == stored
    assert registry.resolve_mask_path(first_id[:10].upper()) == stored
    assert registry.resolve_mask_path(str(second)) == second
    assert registry.register_mask(make_mask(tmp_path, 3), task="csqa") == "tiny-model/csqa@v1"


def test_unknown_and_ambiguous_references_are_clear_errors(tmp_path):
    ids = [Mask.load(make_mask(tmp_path, seed)).id for seed in range(17)]  # 17 ids: two share a first digit
    for seed in range(17):
        registry.register_mask(tmp_path / f"mask-{seed}.safetensors")
    shared = next(char for char in "0123456789abcdef" if sum(item.startswith(char) for item in ids) > 1)
    with pytest.raises(CplError, match="ambiguous id prefix"):
        registry.resolve_mask_path(shared)
    for ref in ("nothing/here", "tiny-model/arc@v99", "zz"):
        with pytest.raises(CplError, match=r"^mask "):
            registry.resolve_mask_path(ref)
    with pytest.raises(CplError, match="--name"):
        registry.register_mask(tmp_path / "mask-0.safetensors", task="a/b")


def test_runs_on_other_tasks_show_up_with_their_results(tmp_path):
    path = make_mask(tmp_path, 1)
    registry.register_mask(path)
    registry.record_run(registry.resolve_mask_path("tiny-model/arc"), run_payload("arc", 9))
    registry.record_run(path, run_payload("csqa", 7))
    registry.record_run(path, {"out_dir": "runs/bare"})  # tolerant of missing keys
    runs = registry.show("tiny-model/arc@v1")["runs"]
    assert [(run["task"], run["learned"]) for run in runs] == [("arc", 9), ("csqa", 7), (None, None)]
    result = cli("registry", "show", "tiny-model/arc@v1")
    assert result.exit_code == 0, result.output
    assert "used in 3 training runs" in result.output and "csqa" in result.output and "7/10" in result.output
    assert registry.list_masks()[0]["runs"] == 3


def test_record_run_registers_an_unknown_mask_file(tmp_path):
    path = make_mask(tmp_path, 4)
    registry.record_run(path, run_payload("mmlu", 5))
    [entry] = registry.list_masks()
    assert entry["ref"] == "tiny-model/arc@v1" and entry["runs"] == 1 and entry["source"] == "profiled"


def test_lineage_links_combined_masks_to_their_parents(tmp_path):
    parents = [make_mask(tmp_path, seed) for seed in (1, 2)]
    parent_ids = [Mask.load(path).id for path in parents]
    registry.register_mask(parents[0])
    child = make_mask(tmp_path, 3, parents=parent_ids)
    assert registry.register_mask(child, task="merged", source="combined") == "tiny-model/merged@v1"
    tree = registry.lineage("tiny-model/merged")
    assert [node["id"] for node in tree["parents"]] == parent_ids
    assert [node["ref"] for node in tree["parents"]] == [
        "tiny-model/arc@v1",
        None,
    ]  # second parent unregistered
    assert [node["ref"] for node in registry.lineage(parent_ids[0])["children"]] == ["tiny-model/merged@v1"]
    result = cli("registry", "lineage", "tiny-model/merged")
    assert result.exit_code == 0 and "tiny-model/arc@v1" in result.output and "not registered" in result.output


def test_list_filters_and_json(tmp_path):
    registry.register_mask(make_mask(tmp_path, 1))
    registry.register_mask(make_mask(tmp_path, 2, model="other-model"), task="csqa")
    assert [item["ref"] for item in registry.list_masks(model="other-model")] == ["other-model/csqa@v1"]
    assert [item["ref"] for item in registry.list_masks(task="arc")] == ["tiny-model/arc@v1"]
    result = cli("registry", "list", "--model", "org/Tiny-Model", "--json")
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)
    assert entry["ref"] == "tiny-model/arc@v1" and 0.0 < entry["collaborative_share"] < 1.0
    assert entry["n_params"] == 40


def test_verify_reports_missing_and_corrupt_files_and_rm_removes(tmp_path):
    for seed in (1, 2, 3):
        registry.register_mask(make_mask(tmp_path, seed))
    assert cli("registry", "verify").exit_code == 0
    registry.resolve_mask_path("tiny-model/arc@v1").unlink()
    corrupt = registry.resolve_mask_path("tiny-model/arc@v2")
    corrupt.write_bytes(corrupt.read_bytes()[:-1] + b"\x7f")
    health = registry.verify()
    assert health.checked == 3 and len(health.missing) == 1 and len(health.corrupt) == 1
    assert "tiny-model/arc@v1" in health.missing[0] and "tiny-model/arc@v2" in health.corrupt[0]
    result = cli("registry", "verify")
    assert result.exit_code == 1 and "missing file" in result.output and "corrupt file" in result.output
    with pytest.raises(CplError, match="file is missing"):
        registry.resolve_mask_path("tiny-model/arc@v1")
    stored = registry.resolve_mask_path("tiny-model/arc@v3")
    assert cli("registry", "rm", "tiny-model/arc@v3").exit_code == 0
    assert not stored.exists() and [item["version"] for item in registry.list_masks()] == [1, 2]


def _register_many(paths: list[str], home: str) -> list[str]:
    os.environ["CPL_MASKS_HOME"] = home
    return [registry.register_mask(Path(path)) for path in paths]


def test_concurrent_processes_get_distinct_versions(tmp_path, home):
    paths = [str(make_mask(tmp_path, seed)) for seed in range(12)]
    context = multiprocessing.get_context("fork")
    with context.Pool(4) as pool:
        batches = pool.starmap(_register_many, [(paths[index::4], str(home)) for index in range(4)])
    names = [name for batch in batches for name in batch]
    assert sorted(names) == sorted(f"tiny-model/arc@v{version}" for version in range(1, 13))
    assert registry.verify().ok and not registry.verify().orphans


def _die_after_placing(path: str, home: str) -> None:
    os.environ["CPL_MASKS_HOME"] = home
    place = store.place

    def place_then_die(staged, mask_id):
        place(staged, mask_id)
        os._exit(9)  # killed after the file landed, before the row committed

    store.place = place_then_die
    registry.register_mask(Path(path))


def test_a_process_killed_mid_registration_leaves_only_an_orphan_that_gc_removes(tmp_path, home):
    path = make_mask(tmp_path, 5)
    process = multiprocessing.get_context("fork").Process(target=_die_after_placing, args=(str(path), str(home)))
    process.start()
    process.join(60)
    assert process.exitcode == 9
    assert registry.list_masks() == []  # the transaction never committed: no row
    health = registry.verify()
    assert health.ok and len(health.orphans) == 1 and Path(health.orphans[0]).is_file()
    with pytest.raises(CplError):
        registry.resolve_mask_path(Mask.load(path).id)
    staged = store.store_dir() / f"{store.TEMP_PREFIX}dead{store.SUFFIX}"  # a copy abandoned mid-way
    staged.write_bytes(b"partial")
    os.utime(staged, (time.time() - 3600, time.time() - 3600))
    result = cli("registry", "gc")
    assert result.exit_code == 0 and "removed 1 orphan files and 1 temporary copies" in result.output
    assert not staged.exists() and not registry.verify().orphans
    assert registry.register_mask(path) == "tiny-model/arc@v1"


def test_a_corrupt_database_is_a_one_line_error(tmp_path, home):
    registry.register_mask(make_mask(tmp_path, 1))
    schema.database_path().write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(f"{schema.database_path()}{suffix}").unlink(missing_ok=True)
    with pytest.raises(CplError, match=r"registry database .*move it aside"):
        registry.list_masks()
    result = cli("registry", "list")
    assert result.exit_code == 2 and "registry database" in result.output and "Traceback" not in result.output


def test_a_database_from_a_newer_release_is_refused(home):
    registry.list_masks()  # creates the database at the current version
    with sqlite3.connect(schema.database_path()) as connection:
        connection.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    with pytest.raises(CplError, match="newer than this cpl-masks"):
        registry.list_masks()


def test_the_database_uses_wal_and_foreign_keys(home):
    with schema.connect() as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert schema.schema_version(connection) == schema.SCHEMA_VERSION
        with pytest.raises(sqlite3.IntegrityError):
            connection.execute("INSERT INTO runs (mask_id, payload) VALUES ('nope', '{}')")


def test_a_mask_profiled_on_one_task_and_reused_on_another_shows_both_runs(tmp_path, tiny_model_dir):
    from cpl_masks.train import TrainConfig
    from cpl_masks.training_run import RunRequest, start_run
    from tests.conftest import make_questions, write_rows

    files = {}
    for task, seed in (("task-a", 1), ("task-b", 2)):
        for role, offset in (("mastered", 0), ("inject", 100)):
            rows = [q.to_record() for q in make_questions(4, seed=seed + offset, prefix=f"{task}-{role}-")]
            files[task, role] = str(write_rows(tmp_path / f"{task}-{role}.jsonl", rows))
    model = str(tiny_model_dir)
    result = cli(
        "profile",
        "--mastered",
        files["task-a", "mastered"],
        "--inject",
        files["task-a", "inject"],
        "--model",
        model,
        "--name",
        "task-a",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    [entry] = registry.list_masks(task="task-a")
    assert entry["source"] == "profiled" and entry["model_ref"] == model
    for task in ("task-a", "task-b"):
        start_run(
            RunRequest(
                inject=files[task, "inject"],
                mastered=files[task, "mastered"],
                out=str(tmp_path / f"run-{task}"),
                model=model,
                mask=entry["name"],
                task=task,
                device="cpu",
                config=TrainConfig(epochs=1, show_progress=False),
            )
        )
    runs = registry.show(entry["ref"])["runs"]
    assert [run["task"] for run in runs] == ["task-a", "task-b"]
    assert all(run["learned"] is not None and run["forgotten"] is not None for run in runs)
    assert runs[1]["out_dir"] == str((tmp_path / "run-task-b").resolve())
    shown = cli("registry", "show", entry["ref"])
    assert shown.exit_code == 0 and "task-a" in shown.output and "task-b" in shown.output


def masks_table_sql() -> str:
    with schema.connect() as connection:
        return connection.execute("SELECT sql FROM sqlite_master WHERE name = 'masks'").fetchone()[0]


def test_a_version_1_database_migrates_keeping_masks_parents_and_runs(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:  # fill a registry as release 1 (schema version 1) wrote it
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        patch.setattr(schema, "SCHEMA_VERSION", 1)
        parent = make_mask(tmp_path, 1)
        registry.register_mask(parent, task="arc")
        child = make_mask(tmp_path, 2, parents=[Mask.load(parent).id])
        registry.register_mask(child, task="merged", source="combined")
        registry.record_run(parent, run_payload("arc", 4))
        assert "'control'" not in masks_table_sql()
    assert "'control'" in masks_table_sql()  # the current code migrated it
    assert [entry["ref"] for entry in registry.list_masks()] == ["tiny-model/arc@v1", "tiny-model/merged@v1"]
    shown = registry.show("tiny-model/arc@v1")
    assert len(shown["runs"]) == 1 and shown["children"][0]["ref"] == "tiny-model/merged@v1"
    with schema.connect() as connection:
        assert schema.schema_version(connection) == schema.SCHEMA_VERSION
        assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    control = make_mask(tmp_path, 3, parents=[Mask.load(parent).id])
    assert registry.register_mask(control, task="arc-random", source="control") == "tiny-model/arc-random@v1"
    with pytest.raises(CplError, match="source 'guessed'"):
        registry.register_mask(make_mask(tmp_path, 4), source="guessed")
