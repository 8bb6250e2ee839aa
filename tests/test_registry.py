"""The mask registry: names and versions, references, runs, lineage, integrity, concurrency and crashes."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.cli.common import stdout
from cpl_masks.cli.masks import save_and_register
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.registry import Registry, schema, store
from cpl_masks.registry.names import default_task, run_task, task_name
from cpl_masks.utils.files import sha256_file


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty registry."""
    folder = tmp_path / "home"
    monkeypatch.setenv("CPL_MASKS_HOME", str(folder))
    return folder


@pytest.fixture
def registry(home) -> Registry:
    """The registry in the test's home folder (the one the CLI opens too)."""
    return Registry(home)


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


def test_names_versions_and_every_kind_of_reference(tmp_path, registry):
    first, second = make_mask(tmp_path, 1), make_mask(tmp_path, 2)
    assert registry.register(first) == "tiny-model/arc@v1"
    assert registry.register(second) == "tiny-model/arc@v2"
    assert registry.register(first) == "tiny-model/arc@v1"  # same content: same name
    first_id = Mask.load(first).id
    stored = registry.resolve("tiny-model/arc@v1")
    assert stored == registry.store.path_of(first_id) and stored.read_bytes() == first.read_bytes()
    assert registry.resolve("tiny-model/arc").read_bytes() == second.read_bytes()
    assert registry.resolve(first_id) == stored
    assert registry.resolve(first_id[:10].upper()) == stored
    assert registry.resolve(str(second)) == second
    assert registry.register(make_mask(tmp_path, 3), task="csqa") == "tiny-model/csqa@v1"


def test_unknown_and_ambiguous_references_are_clear_errors(tmp_path, registry):
    ids = [Mask.load(make_mask(tmp_path, seed)).id for seed in range(17)]  # 17 ids: two share a first digit
    for seed in range(17):
        registry.register(tmp_path / f"mask-{seed}.safetensors")
    shared = next(char for char in "0123456789abcdef" if sum(item.startswith(char) for item in ids) > 1)
    with pytest.raises(CplError, match="ambiguous id prefix"):
        registry.resolve(shared)
    for ref in ("nothing/here", "tiny-model/arc@v99", "zz"):
        with pytest.raises(CplError, match=r"^mask "):
            registry.resolve(ref)
    with pytest.raises(CplError, match="--name"):
        registry.register(tmp_path / "mask-0.safetensors", task="a/b")


def test_runs_on_other_tasks_show_up_with_their_results(tmp_path, registry):
    path = make_mask(tmp_path, 1)
    registry.register(path)
    registry.record_run(registry.resolve("tiny-model/arc"), run_payload("arc", 9))
    registry.record_run(path, run_payload("csqa", 7))
    long_out = "runs/" + "a-rather-long-folder-name/" * 3 + "bare"
    registry.record_run(path, {"out_dir": long_out})  # tolerant of missing keys
    runs = registry.show("tiny-model/arc@v1")["runs"]
    assert [(run["task"], run["learned"]) for run in runs] == [("arc", 9), ("csqa", 7), ("default", None)]
    result = cli("registry", "show", "tiny-model/arc@v1")
    assert result.exit_code == 0, result.output
    assert "used in 3 training runs" in result.output and "csqa" in result.output and "7/10" in result.output
    assert long_out in result.output  # an output folder is never cut short, even in 80 columns
    assert registry.list_masks()[0]["runs"] == 3


def test_record_run_registers_an_unknown_mask_file(tmp_path, registry):
    path = make_mask(tmp_path, 4)
    registry.record_run(path, run_payload("mmlu", 5))
    [entry] = registry.list_masks()
    assert entry["ref"] == "tiny-model/arc@v1" and entry["runs"] == 1 and entry["source"] == "profiled"


def test_lineage_links_combined_masks_to_their_parents(tmp_path, registry):
    parents = [make_mask(tmp_path, seed) for seed in (1, 2)]
    parent_ids = [Mask.load(path).id for path in parents]
    registry.register(parents[0])
    child = make_mask(tmp_path, 3, parents=parent_ids)
    assert registry.register(child, task="merged") == "tiny-model/merged@v1"
    tree = registry.lineage("tiny-model/merged")
    assert [node["id"] for node in tree["parents"]] == parent_ids
    assert [node["ref"] for node in tree["parents"]] == [
        "tiny-model/arc@v1",
        None,
    ]  # second parent unregistered
    assert [node["ref"] for node in registry.lineage(parent_ids[0])["children"]] == ["tiny-model/merged@v1"]
    result = cli("registry", "lineage", "tiny-model/merged")
    assert result.exit_code == 0 and "tiny-model/arc@v1" in result.output and "not registered" in result.output


def test_list_filters_and_json(tmp_path, registry):
    registry.register(make_mask(tmp_path, 1))
    registry.register(make_mask(tmp_path, 2, model="other-model"), task="csqa")
    assert [item["ref"] for item in registry.list_masks(model="other-model")] == ["other-model/csqa@v1"]
    assert [item["ref"] for item in registry.list_masks(task="arc")] == ["tiny-model/arc@v1"]
    result = cli("registry", "list", "--model", "org/Tiny-Model", "--json")
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)
    assert entry["ref"] == "tiny-model/arc@v1" and 0.0 < entry["collaborative_share"] < 1.0
    assert entry["n_params"] == 40


def test_verify_reports_missing_and_corrupt_files_and_rm_removes(tmp_path, registry):
    for seed in (1, 2, 3):
        registry.register(make_mask(tmp_path, seed))
    assert cli("registry", "verify").exit_code == 0
    registry.resolve("tiny-model/arc@v1").unlink()
    corrupt = registry.resolve("tiny-model/arc@v2")
    corrupt.write_bytes(corrupt.read_bytes()[:-1] + b"\x7f")
    health = registry.verify()
    assert health.checked == 3 and len(health.missing) == 1 and len(health.corrupt) == 1
    assert "tiny-model/arc@v1" in health.missing[0] and "tiny-model/arc@v2" in health.corrupt[0]
    result = cli("registry", "verify")
    assert result.exit_code == 1 and "missing file" in result.output and "corrupt file" in result.output
    with pytest.raises(CplError, match="file is missing"):
        registry.resolve("tiny-model/arc@v1")
    stored = registry.resolve("tiny-model/arc@v3")
    stored_id = Mask.load(stored).id
    removed = cli("registry", "rm", "tiny-model/arc@v3")
    assert removed.exit_code == 0 and f"removed tiny-model/arc@v3 ({stored_id[:12]})" in removed.output
    assert not stored.exists() and [item["version"] for item in registry.list_masks()] == [1, 2]


def _register_many(paths: list[str], home: str) -> list[str]:
    registry = Registry(Path(home))
    return [registry.register(Path(path)) for path in paths]


def test_concurrent_processes_get_distinct_versions(tmp_path, home, registry):
    paths = [str(make_mask(tmp_path, seed)) for seed in range(12)]
    context = multiprocessing.get_context("fork")
    with context.Pool(4) as pool:
        batches = pool.starmap(_register_many, [(paths[index::4], str(home)) for index in range(4)])
    names = [name for batch in batches for name in batch]
    assert sorted(names) == sorted(f"tiny-model/arc@v{version}" for version in range(1, 13))
    assert registry.verify().ok and not registry.verify().strays


def _die_after_placing(path: str, home: str) -> None:
    place = store.Store.place

    def place_then_die(self, staged, mask_id):
        place(self, staged, mask_id)
        os._exit(9)  # killed after the file landed, before the row committed

    store.Store.place = place_then_die
    Registry(Path(home)).register(Path(path))


def test_a_process_killed_mid_registration_leaves_only_a_stray_file_that_gc_removes(tmp_path, home, registry):
    path = make_mask(tmp_path, 5)
    process = multiprocessing.get_context("fork").Process(target=_die_after_placing, args=(str(path), str(home)))
    process.start()
    process.join(60)
    assert process.exitcode == 9
    assert registry.list_masks() == []  # the transaction never committed: no row
    mask_id = Mask.load(path).id
    [stray] = registry.verify().strays
    assert (stray.path, stray.problem, stray.mask_id) == (
        registry.store.path_of(mask_id),
        "not registered",
        mask_id,
    )
    with pytest.raises(CplError):
        registry.resolve(mask_id)
    staged = registry.store.folder / f"{store.TEMP_PREFIX}dead{store.SUFFIX}"  # a copy abandoned mid-way
    staged.write_bytes(b"partial")
    os.utime(staged, (time.time() - 3600, time.time() - 3600))
    result = cli("registry", "gc")
    assert result.exit_code == 0, result.output
    assert f"removed {staged}" in result.output and "removed 0 stray files and 1 temporary copies" in result.output
    assert "kept 1 stray files that are valid masks" in result.output and stray.path.is_file()  # the only copy
    added = cli("registry", "add", str(stray.path))
    assert added.exit_code == 0 and "as tiny-model/arc@v1" in added.output
    assert not staged.exists() and not registry.verify().strays


def test_a_corrupt_database_is_a_one_line_error(tmp_path, registry):
    registry.register(make_mask(tmp_path, 1))
    registry.database.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(f"{registry.database}{suffix}").unlink(missing_ok=True)
    with pytest.raises(CplError, match=r"registry database .*move it aside"):
        registry.list_masks()
    result = cli("registry", "list")
    assert result.exit_code == 2 and "registry database" in result.output and "Traceback" not in result.output


def test_a_database_from_a_newer_release_is_refused(registry):
    registry.list_masks()  # creates the database at the current version
    with sqlite3.connect(registry.database) as connection:
        connection.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    with pytest.raises(CplError, match="newer than this cpl-masks"):
        registry.list_masks()


def test_the_database_uses_wal_and_foreign_keys(registry):
    with schema.connect(registry.database) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert schema.schema_version(connection) == schema.SCHEMA_VERSION
        with pytest.raises(sqlite3.IntegrityError):
            connection.execute("INSERT INTO transfers (mask_id, direction, repo_id) VALUES ('nope', 'push', 'a/b')")


def test_a_profiled_mask_and_its_runs_share_a_task_and_runs_go_to_the_registry_passed_in(
    tmp_path, tiny_model_dir, registry
):
    from cpl_masks.training.loop import TrainConfig
    from cpl_masks.training.request import RunRequest
    from cpl_masks.training.run import start_run
    from tests.conftest import make_questions, write_rows

    files = {}
    for task, seed in (("arc_train", 1), ("task-b", 2)):
        for role, offset in (("mastered", 0), ("inject", 100)):
            rows = [q.to_record() for q in make_questions(4, seed=seed + offset, prefix=f"{task}-{role}-")]
            name = f"{task}.jsonl" if role == "inject" else f"{task}-{role}.jsonl"
            files[task, role] = str(write_rows(tmp_path / name, rows))
    model = str(tiny_model_dir)
    args = ["--mastered", files["arc_train", "mastered"], "--inject", files["arc_train", "inject"], "--model", model]
    result = cli("profile", *args, "--device", "cpu")  # no --name: the task comes from arc_train.jsonl
    assert result.exit_code == 0, result.output
    [entry] = registry.list_masks(task="arc_train")
    assert entry["source"] == "profiled" and entry["model_ref"] == model
    elsewhere = Registry(tmp_path / "elsewhere")
    for task, into in (("arc_train", registry), ("task-b", elsewhere)):
        start_run(
            RunRequest(
                inject=files[task, "inject"],
                mastered=files[task, "mastered"],
                out=str(tmp_path / f"run-{task}"),
                model=model,
                mask=entry["name"] if into is registry else str(registry.resolve(entry["ref"])),
                device="cpu",
                config=TrainConfig(epochs=1, show_progress=False),
            ),
            registry=into,
        )
    [run] = registry.show(entry["ref"])["runs"]  # the run on the mask's own data, under the mask's task
    assert run["task"] == "arc_train" and run["learned"] is not None and run["forgotten"] is not None
    [other] = elsewhere.runs()  # recorded in the registry it was given, which registered the mask first
    assert other["task"] == "task-b" and other["mask_ref"] == entry["ref"]
    assert other["out_dir"] == str((tmp_path / "run-task-b").resolve())
    shown = cli("registry", "show", entry["ref"])
    assert shown.exit_code == 0 and "arc_train" in shown.output and "task-b" not in shown.output


def fill_old_registry(registry: Registry, version: int, parent: Path, child: Path) -> None:
    """Write a registry as schema ``version`` left it: a mask, a child combined from it, and one run."""
    registry.home.mkdir(parents=True)
    with sqlite3.connect(registry.database) as connection:
        for statement in (statement for migration in schema.MIGRATIONS[:version] for statement in migration):
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {version}")
        for path, name, source in ((parent, "tiny-model/arc", "profiled"), (child, "tiny-model/merged", "combined")):
            mask = Mask.load(path)
            connection.execute(
                "INSERT INTO masks (id, name, version, n_params, collaborative_share, source, sha256, size,"
                " provenance) VALUES (?, ?, 1, ?, 0.5, ?, ?, ?, ?)",
                (
                    mask.id,
                    name,
                    mask.entries,
                    source,
                    sha256_file(path),
                    path.stat().st_size,
                    json.dumps(mask.metadata),
                ),
            )
            registry.store.path_of(mask.id).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, registry.store.path_of(mask.id))
        parent_id, child_id = Mask.load(parent).id, Mask.load(child).id
        connection.execute("INSERT INTO mask_parents VALUES (?, ?, 0)", (child_id, parent_id))
        connection.execute(
            "INSERT INTO runs (mask_id, task, learned, payload) VALUES (?, 'arc', 4, ?)",
            (parent_id, json.dumps(run_payload("arc", 4))),
        )
        if version >= 3:  # what registering wrote from version 3 on
            connection.execute("UPDATE runs SET mask_ref = 'tiny-model/arc@v1'")
            connection.execute("INSERT INTO name_versions SELECT name, MAX(version) FROM masks GROUP BY name")


def masks_table_sql(registry: Registry) -> str:
    with schema.connect(registry.database) as connection:
        return connection.execute("SELECT sql FROM sqlite_master WHERE name = 'masks'").fetchone()[0]


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_an_older_database_migrates_keeping_masks_parents_and_runs(tmp_path, registry, version):
    parent = make_mask(tmp_path, 1)
    child = make_mask(tmp_path, 2, parents=[Mask.load(parent).id])
    fill_old_registry(registry, version, parent, child)
    assert "'reprofiled'" in masks_table_sql(registry)  # the current code migrated it
    assert [entry["ref"] for entry in registry.list_masks()] == ["tiny-model/arc@v1", "tiny-model/merged@v1"]
    shown = registry.show("tiny-model/arc@v1")
    assert len(shown["runs"]) == 1 and shown["children"][0]["ref"] == "tiny-model/merged@v1"
    with schema.connect(registry.database) as connection:
        assert schema.schema_version(connection) == schema.SCHEMA_VERSION
        assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert registry.remove("tiny-model/arc@v1", force=True).runs == 1
    [run] = registry.runs()  # the old run outlived its mask, with the name@vN the migration gave it
    assert (run["mask_ref"], run["removed"], run["learned"]) == ("tiny-model/arc@v1", True, 4)
    assert registry.register(make_mask(tmp_path, 3)) == "tiny-model/arc@v2"  # v1 is never issued again
    assert registry.register(child, task="csqa") == "tiny-model/csqa@v1"  # aliases work after the migration


def test_an_empty_database_file_is_an_error_and_gc_deletes_nothing(tmp_path, registry):
    registry.register(make_mask(tmp_path, 1))
    stored = registry.resolve("tiny-model/arc@v1")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{registry.database}{suffix}").unlink(missing_ok=True)
    registry.database.write_bytes(b"")  # zero bytes, as a crashed copy or a `touch` leaves it
    for command in (("registry", "gc", "--force"), ("registry", "verify"), ("registry", "list")):
        result = cli(*command)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert f"registry database {registry.database}: the file is empty (0 bytes); move it aside" in " ".join(
            result.output.split()
        )
    with pytest.raises(CplError, match="the file is empty"):
        registry.check()  # what profile, combine, threshold, train and sweep run before any model loads
    assert stored.is_file() and registry.database.stat().st_size == 0  # nothing deleted, nothing written
    registry.database.unlink()
    with sqlite3.connect(registry.database) as connection:  # a database without any table
        connection.execute("CREATE TABLE scratch (x)")
        connection.execute("DROP TABLE scratch")
    with pytest.raises(CplError, match=r"registry database .*: it holds no tables; move it aside"):
        registry.verify()


def test_a_new_database_appears_complete_or_not_at_all(tmp_path, registry, monkeypatch):
    monkeypatch.setattr(schema.os, "link", lambda *args: (_ for _ in ()).throw(FileExistsError()))
    Path(registry.home).mkdir()
    with sqlite3.connect(registry.database) as connection:  # another process linked its complete database first
        for statement in (statement for migration in schema.MIGRATIONS for statement in migration):
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")
    registry.database.rename(registry.home / "theirs")
    real_create = schema.create

    def lose_the_race(path):
        (registry.home / "theirs").rename(path)  # the winner's file lands while we build ours
        real_create(path)

    monkeypatch.setattr(schema, "create", lose_the_race)
    registry.check()
    assert sorted(path.name for path in registry.home.iterdir() if path.name.startswith(".")) == []  # temp removed
    with schema.connect(registry.database) as connection:
        assert schema.schema_version(connection) == schema.SCHEMA_VERSION


def test_gc_keeps_valid_stray_masks_unless_forced_and_verify_reports_misplaced_files(tmp_path, registry):
    registry.check()
    valid, other = Mask.load(make_mask(tmp_path, 1)), Mask.load(make_mask(tmp_path, 2))
    folder = registry.store.folder
    misplaced = valid.save(folder / "elsewhere" / f"{valid.id}.safetensors")
    badly_named = other.save(folder / other.id[:2] / "copy.safetensors")
    misnamed = valid.save(registry.store.path_of(other.id))  # valid bits under another id's name
    junk = folder / "ab" / ("ab" + "0" * 62 + ".safetensors")
    junk.parent.mkdir(exist_ok=True)
    junk.write_bytes(b"not a mask")
    problems = {stray.path: stray.problem for stray in registry.verify().strays}
    assert problems[misplaced].startswith("misplaced") and problems[badly_named].startswith("misplaced")
    assert problems[misnamed].startswith(f"misnamed: its content id is {valid.id[:12]}")
    assert problems[junk] == "not registered"
    verified = cli("registry", "verify")
    assert "misnamed" in verified.output and str(misplaced) in verified.output
    result = cli("registry", "gc")
    assert result.exit_code == 0 and f"removed {junk}" in result.output
    assert "kept 3 stray files that are valid masks" in " ".join(result.output.split())
    assert misplaced.is_file() and badly_named.is_file() and misnamed.is_file() and not junk.exists()
    forced = cli("registry", "gc", "--force")
    assert forced.exit_code == 0 and all(f"removed {path}" in forced.output for path in (misplaced, misnamed))
    assert not registry.verify().strays


def test_rm_refuses_a_mask_with_runs_or_children_and_force_keeps_the_runs(tmp_path, registry):
    parent = make_mask(tmp_path, 1)
    registry.register(parent)
    registry.record_run(parent, run_payload("csqa", 6))
    refused = cli("registry", "rm", "tiny-model/arc@v1")
    assert refused.exit_code == 2
    assert "registry rm tiny-model/arc@v1: tiny-model/arc@v1 has 1 recorded run; pass --force" in refused.output
    child = make_mask(tmp_path, 2, parents=[Mask.load(parent).id])
    registry.register(child, task="merged")
    with pytest.raises(CplError, match=r"has 1 recorded run and children tiny-model/merged@v1; pass --force"):
        registry.remove("tiny-model/arc@v1")
    stored = registry.resolve("tiny-model/arc@v1")
    removed = cli("registry", "rm", "tiny-model/arc@v1", "--force")
    assert removed.exit_code == 0 and not stored.exists()
    output = " ".join(removed.output.split())
    assert f"removed tiny-model/arc@v1 ({Mask.load(parent).id[:12]}) and its file {stored}" in output
    assert "kept 1 recorded runs" in output and "kept its children tiny-model/merged@v1" in output
    [run] = registry.runs(mask="tiny-model/arc@v1")  # readable after the mask is gone, by its old name
    assert (run["task"], run["learned"], run["removed"], run["mask_ref"]) == ("csqa", 6, True, "tiny-model/arc@v1")
    listed = cli("registry", "runs", "--task", "csqa")
    assert listed.exit_code == 0 and "tiny-model/arc@v1 (removed)" in listed.output and "6/10" in listed.output
    assert registry.lineage("tiny-model/merged@v1")["parents"][0]["ref"] is None  # the child stays, parent gone
    assert json.loads(cli("registry", "runs", "--mask", "tiny-model/arc@v1", "--json").output)[0]["removed"]


def test_rm_refuses_a_bare_name_and_versions_are_never_reused(tmp_path, registry):
    for seed in (1, 2):
        registry.register(make_mask(tmp_path, seed))
    refused = cli("registry", "rm", "tiny-model/arc")
    assert refused.exit_code == 2 and "give a version (name@vN) or an id" in refused.output
    assert "the latest is tiny-model/arc@v2" in refused.output
    assert cli("registry", "rm", "tiny-model/arc@v2").exit_code == 0
    assert registry.register(make_mask(tmp_path, 3)) == "tiny-model/arc@v3"  # v2 is not issued again
    assert registry.remove(Mask.load(tmp_path / "mask-1.safetensors").id[:10]).ref == "tiny-model/arc@v1"  # by id


def test_a_registry_is_an_object_with_its_own_folder_and_takes_masks_without_temporary_files(
    tmp_path, registry, monkeypatch
):
    other = Registry(tmp_path / "other")
    mask = Mask.load(make_mask(tmp_path, 1))
    saved = []
    original = Mask.save
    monkeypatch.setattr(Mask, "save", lambda self, path: saved.append(Path(path)) or original(self, path))
    assert other.register(mask) == "tiny-model/arc@v1"
    assert [path.parent for path in saved] == [other.store.folder]  # straight into the store's staging file
    assert other.resolve("tiny-model/arc@v1").read_bytes() == (tmp_path / "mask-1.safetensors").read_bytes()
    assert not registry.database.exists()  # the $CPL_MASKS_HOME one is untouched
    assert other.database == tmp_path / "other" / "registry.sqlite3"


def test_a_source_is_derived_from_the_mask_and_a_recut_never_becomes_the_latest_version(tmp_path, registry):
    profiled = Mask.load(make_mask(tmp_path, 1))
    assert registry.register(profiled) == "tiny-model/arc@v1"
    cases = {
        "recut": {"recut_of": profiled.id, "parents": [profiled.id]},
        "control": {"rule": {"control": "random"}, "parents": [profiled.id]},
        "combined": {"parents": [profiled.id]},
    }
    for seed, (source, extra) in enumerate(cases.items(), start=2):
        other = Mask.load(make_mask(tmp_path, seed))
        bits = {name: other.collaborative(name) for name in other.names}
        registered = registry.register(Mask.from_bool(bits, {**profiled.metadata, **extra}))
        assert registry.show(registered)["source"] == source
    assert registry.show("tiny-model/arc.recut@v1")["source"] == "recut"  # filed under its own name
    assert registry.resolve("tiny-model/arc.recut").is_file()
    assert registry.show("tiny-model/arc")["source"] != "recut"


def test_one_task_name_rule_for_masks_runs_and_the_catalog():
    assert task_name(None, "data/arc_train.jsonl") == "arc_train"
    assert task_name("given", "data/arc_train.jsonl") == "given"
    assert task_name(None, "runs/arc/inject.jsonl") == "arc"
    assert task_name(None, "my data/what? now.jsonl") == "what-now"
    assert task_name(None, None) == task_name(None, "split/inject.jsonl") == "default"
    metadata = {"data": {"inject": {"path": "data/arc_train.jsonl", "sha256": "a" * 64}}}
    assert default_task(metadata) == run_task(None, "data/arc_train.jsonl", inject_sha256="b" * 64, mask=None)
    assert default_task(metadata) == "arc_train"


def test_a_run_on_the_questions_its_mask_was_profiled_on_takes_the_mask_task():
    named = {"task": "facts", "data": {"inject": {"path": "split/inject.jsonl", "sha256": "a" * 64}}}
    assert run_task(None, "elsewhere/inject.jsonl", inject_sha256="a" * 64, mask=named) == "facts"
    assert run_task("mine", "elsewhere/inject.jsonl", inject_sha256="a" * 64, mask=named) == "mine"
    assert run_task(None, "data/csqa.jsonl", inject_sha256="c" * 64, mask=named) == "csqa"  # other questions


def test_registry_list_never_cuts_names_or_ids_in_a_narrow_or_piped_console(tmp_path, registry, monkeypatch):
    from cpl_masks.cli import common

    long_model = "org/" + "a-very-long-model-name-" * 3
    registered = registry.register(make_mask(tmp_path, 1, model=long_model), task="a-long-task-name-too")
    mask_id = Mask.load(tmp_path / "mask-1.safetensors").id
    for width in (60, None):  # a 60-column terminal, and a pipe (rich's default of 80)
        monkeypatch.setattr(common.stdout, "_width", width)
        result = CliRunner().invoke(app, ["registry", "list"], env={"COLUMNS": str(width or "")})
        assert result.exit_code == 0 and "…" not in result.output
        assert registered in result.output and mask_id[:12] in result.output


def test_the_same_bits_under_another_task_name_can_be_found_under_that_name(tmp_path, registry):
    path = make_mask(tmp_path, 1)
    assert registry.register(path) == "tiny-model/arc@v1"
    assert registry.register(path, task="csqa") == "tiny-model/csqa@v1"  # an alias, not "arc@v1"
    assert registry.register(path, task="csqa") == "tiny-model/csqa@v1"  # asked again: the same alias
    mask_id = Mask.load(path).id
    assert registry.names(mask_id) == ["tiny-model/arc@v1", "tiny-model/csqa@v1"]
    for ref in ("tiny-model/csqa", "tiny-model/csqa@v1"):
        assert registry.resolve(ref) == registry.resolve("tiny-model/arc@v1")
    listed = {item["ref"]: item["alias_of"] for item in registry.list_masks(task="csqa")}
    assert listed == {"tiny-model/csqa@v1": "tiny-model/arc@v1"}
    assert registry.register(make_mask(tmp_path, 2), task="csqa") == "tiny-model/csqa@v2"  # versions go on
    assert registry.show("tiny-model/csqa@v1")["names"] == ["tiny-model/arc@v1", "tiny-model/csqa@v1"]


def test_removing_an_alias_keeps_the_mask_and_removing_the_mask_takes_its_aliases(tmp_path, registry):
    path = make_mask(tmp_path, 1)
    registry.register(path)
    registry.register(path, task="csqa")
    registry.register(path, task="mmlu")
    result = cli("registry", "rm", "tiny-model/csqa@v1")
    assert result.exit_code == 0, result.output
    assert "removed the name tiny-model/csqa@v1; the mask tiny-model/arc@v1 it named stays" in result.output
    assert registry.resolve("tiny-model/arc@v1").is_file()
    removal = registry.remove("tiny-model/arc@v1")
    assert removal.aliases == ["tiny-model/mmlu@v1"]
    with pytest.raises(CplError, match="no such registered name"):
        registry.resolve("tiny-model/mmlu@v1")
    assert registry.register(path, task="csqa") == "tiny-model/csqa@v2"  # csqa@v1 is never issued again


def test_profile_cli_reports_bits_it_shares_with_a_registered_mask(tmp_path, registry):
    mask = Mask.load(make_mask(tmp_path, 1))
    registry.register(mask)
    with stdout.capture() as captured:
        save_and_register(mask, None, task="csqa", registry=registry)
    assert "registered as tiny-model/csqa@v1, the same bits as tiny-model/arc@v1" in captured.get()


def test_every_load_from_the_registry_verifies_the_stored_sha256(tmp_path, registry, tiny_model_dir):
    name = registry.register(make_mask(tmp_path, 1))
    stored = registry.resolve(name)
    original = Mask.load(stored)
    swapped = Mask(original.packed, original.shapes, {**original.metadata, "task": "other"})
    assert swapped.id == original.id  # same bits: the content id alone cannot tell
    stored.chmod(0o644)
    swapped.save(stored)
    with pytest.raises(CplError, match="differs from the sha256 recorded when it was registered"):
        registry.resolve("tiny-model/arc")
    refused = cli("inspect", "tiny-model/arc")
    assert refused.exit_code == 2 and "differs from the sha256" in " ".join(refused.output.split())
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "one two?", "choices": ["one", "two"], "answer": "A"}\n')
    train = cli(
        "train", "--mask", "tiny-model/arc", "--model", str(tiny_model_dir), "--inject", str(questions),
        "--mastered", str(questions), "--out", str(tmp_path / "run"), "--device", "cpu", "--epochs", "1",
    )  # fmt: skip
    assert train.exit_code == 2 and "differs from the sha256" in " ".join(train.output.split()), train.output


def test_a_registry_database_that_is_a_folder_or_a_home_that_is_a_file_is_one_line(tmp_path, home, monkeypatch):
    (home / "registry.sqlite3").mkdir(parents=True)
    result = cli("registry", "list")
    assert result.exit_code == 2 and "it is a folder, not a database file" in " ".join(result.output.split())
    a_file = tmp_path / "home-file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("CPL_MASKS_HOME", str(a_file))
    for args in (("registry", "list"), ("registry", "add", str(make_mask(tmp_path, 1)))):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert f"registry folder {a_file} (CPL_MASKS_HOME): is a file" in " ".join(result.output.split())
    monkeypatch.setenv("CPL_MASKS_HOME", str(a_file / "below"))
    result = cli("registry", "list")
    assert result.exit_code == 2 and f"cannot be created, {a_file} is a file" in " ".join(result.output.split())


def test_a_full_disk_under_the_registry_says_so(tmp_path, registry):
    from cpl_masks.registry.schema import database_errors

    message = r"registry database .*: cannot write \(disk I/O error; [0-9.]+ MiB free"
    with pytest.raises(CplError, match=message), database_errors(registry.database):
        raise sqlite3.OperationalError("disk I/O error")


def test_a_full_disk_while_copying_into_the_store_is_one_line(tmp_path, registry, monkeypatch):
    import errno

    path = make_mask(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    result = cli("registry", "add", str(path))
    assert result.exit_code == 2 and "cannot write (no space left on the device)" in " ".join(result.output.split())
    assert registry.list_masks() == [] and registry.store.staged_leftovers() == []


HOLDER = """
import sys, time
from pathlib import Path
from cpl_masks.registry import Registry
with Registry(Path(sys.argv[1])).hold(sys.argv[2]):
    print("holding", flush=True)
    time.sleep(60)
"""


def test_registry_rm_refuses_a_mask_a_running_command_holds(tmp_path, home, registry):
    import subprocess
    import sys

    name = registry.register(make_mask(tmp_path, 1))
    mask_id = Mask.load(registry.resolve(name)).id
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(home), mask_id], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        for flags in ((), ("--force",)):
            refused = cli("registry", "rm", name, *flags)
            assert refused.exit_code == 2 and "a running command (train, sweep) is using this mask" in " ".join(
                refused.output.split()
            )
        assert registry.resolve(name).is_file()
    finally:
        holder.kill()
        holder.wait()
    assert cli("registry", "rm", name).exit_code == 0  # the lock died with the process
    with registry.hold(mask_id):  # a removed (or never registered) mask needs no hold
        pass
