"""The registry against files that change under it, processes that die or collect garbage beside it,
references that are not what they look like, and metadata that claims another kind of mask.

Fixed cases reproduce the defects the "trust nothing a file, a folder or a repo claims" issue found;
property-based cases (hypothesis) feed generated references and metadata and require a result or the
project's own one-line error, never another exception.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.masks.signs import PackedSigns
from cpl_masks.registry import Registry, store
from cpl_masks.registry.catalog import source_of
from cpl_masks.registry.names import mask_name
from cpl_masks.utils.files import sha256_file

PROPERTY = settings(
    max_examples=int(os.environ.get("CPL_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SHAPES = {"layer.weight": (4, 8), "layer.bias": (8,)}
BASE_METADATA = {
    "model": {"ref": "org/Tiny-Model", "fingerprint": "f" * 64},
    "data": {"inject": {"sha256": "a" * 64, "rows": 3, "path": "data/arc.jsonl"}},
}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty registry."""
    folder = tmp_path / "home"
    monkeypatch.setenv("CPL_MASKS_HOME", str(folder))
    return folder


@pytest.fixture
def registry(home) -> Registry:
    return Registry(home)


def freeze_mask(seed: int, metadata: dict | None = None) -> Mask:
    generator = torch.Generator().manual_seed(seed)
    bits = {
        "layer.weight": torch.rand(4, 8, generator=generator) > 0.5,
        "layer.bias": torch.rand(8, generator=generator) > 0.5,
    }
    return Mask.from_bool(bits, BASE_METADATA | (metadata or {}))


def retain_set(seed: int, metadata: dict | None = None) -> Mask:
    generator = torch.Generator().manual_seed(seed)
    gradients = {
        "layer.weight": torch.randn(4, 8, generator=generator),
        "layer.bias": torch.randn(8, generator=generator),
    }
    return Mask.from_signs(PackedSigns.of(gradients), BASE_METADATA | (metadata or {}))


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line_error(result) -> None:
    """A refused command: exit status 2, one ``error:`` line, no traceback."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and result.output.startswith("error:"), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


# --- defect 4: registration reads the file once, and verifies what it stored -------------------------------------


def swap_once(path: Path, replacement: bytes):
    """A hook that replaces ``path``'s bytes the first time it is called, as another process might."""
    done = []

    def swap() -> None:
        if not done:
            done.append(True)
            path.write_bytes(replacement)

    return swap


@pytest.mark.parametrize("moment", ["after_load", "before_copy"])
def test_a_file_swapped_during_registration_is_stored_as_what_was_read(tmp_path, registry, monkeypatch, moment):
    original, other = freeze_mask(1), freeze_mask(2)
    path = original.save(tmp_path / "mask.safetensors")
    swap = swap_once(path, other.save(tmp_path / "other.safetensors").read_bytes())
    if moment == "after_load":
        load = Mask.load.__func__

        def load_then_swap(cls, *args, **kwargs):
            loaded = load(cls, *args, **kwargs)
            swap()
            return loaded

        monkeypatch.setattr(Mask, "load", classmethod(load_then_swap))
    else:
        copy = shutil.copyfileobj

        def swap_then_copy(*args, **kwargs):
            swap()
            return copy(*args, **kwargs)

        monkeypatch.setattr(shutil, "copyfileobj", swap_then_copy)
    name = registry.register(path)
    monkeypatch.undo()
    [row] = registry.list_masks()
    stored = registry.store.path_of(row["id"])
    assert Mask.load(stored, scores=False).id == row["id"]  # the stored bits are the registered id
    assert sha256_file(stored) == row["sha256"] and registry.verify().ok
    assert name == row["ref"]


def test_a_registration_that_expects_an_id_refuses_other_bits(tmp_path, registry):
    path = freeze_mask(1).save(tmp_path / "mask.safetensors")
    with pytest.raises(CplError, match="changed while it was being registered"):
        registry.register(path, expected_id=freeze_mask(2).id)
    assert registry.list_masks() == [] and registry.store.files() == []


def relabelled(tmp_path: Path, bits_of: Mask, claimed: Mask) -> Path:
    """A file of ``bits_of``'s bits whose header claims ``claimed``'s content id (same length: edited in place)."""
    path = bits_of.save(tmp_path / "relabelled.safetensors")
    raw = path.read_bytes().replace(bits_of.id.encode(), claimed.id.encode())
    path.write_bytes(raw)
    return path


def test_verify_rehashes_the_content_id_not_only_the_recorded_sha256(tmp_path, registry):
    first = freeze_mask(1)
    registry.register(first)
    stored = registry.store.path_of(first.id)
    forged = relabelled(tmp_path, freeze_mask(2), first)  # what an old registration of a swapped file stored
    shutil.copyfile(forged, stored)
    with sqlite3.connect(registry.database) as connection:
        connection.execute("UPDATE masks SET sha256 = ? WHERE id = ?", (sha256_file(stored), first.id))
    health = registry.verify()
    assert not health.ok and health.corrupt == [f"tiny-model/arc@v1 ({first.id[:12]})"]


def test_resolve_refuses_a_stored_file_of_other_bits_even_with_its_hash_recorded(tmp_path, registry):
    first, second = freeze_mask(1), freeze_mask(2)
    registry.register(first)
    stored = registry.store.path_of(first.id)
    second.save(stored)  # swapped wholesale while an older release registered it: the hash is of these bytes
    with sqlite3.connect(registry.database) as connection:
        connection.execute("UPDATE masks SET sha256 = ? WHERE id = ?", (sha256_file(stored), first.id))
    with pytest.raises(CplError, match="differs from"):
        registry.resolve("tiny-model/arc@v1")
    one_line_error(cli("inspect", "tiny-model/arc@v1"))


def test_a_file_claiming_a_registered_id_names_nothing(tmp_path, registry):
    first = freeze_mask(1)
    registry.register(first)
    forged = relabelled(tmp_path, freeze_mask(2), first)
    for args in (("registry", "show", str(forged)), ("registry", "rm", str(forged))):
        result = cli(*args)
        one_line_error(result)
        assert "content id mismatch" in result.output
    with pytest.raises(CplError, match="content id mismatch"):
        registry.record_run(forged, {"mode": "mask"})
    assert registry.runs() == [] and [item["id"] for item in registry.list_masks()] == [first.id]


# --- defects 8 and 23: staged registrations are a live process's, until it dies ----------------------------------


def collect_during(monkeypatch, registry: Registry, module, name: str) -> list:
    """Run ``gc`` and ``gc --force`` each time ``module.name`` is called (in the middle of a registration)."""
    registry.check()  # the database exists before the hook: gc only looks at the store
    original = getattr(module, name)
    calls: list = []
    busy: list = []

    def collect_then_call(*args, **kwargs):
        if not busy:  # not again from inside gc itself
            busy.append(True)
            try:
                calls.append([registry.collect_garbage(), registry.collect_garbage(force=True)])
            finally:
                busy.clear()
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, collect_then_call)
    return calls


def test_gc_during_a_registration_leaves_its_staged_file_alone(tmp_path, registry, monkeypatch):
    mask = freeze_mask(1)
    calls = collect_during(monkeypatch, registry, os, "fchmod")  # each new temporary file gets its mode first
    name = registry.register(mask)
    monkeypatch.undo()
    assert calls and name == "tiny-model/arc@v1"
    assert all(not health.removed and not health.leftovers for pair in calls for health in pair)
    assert registry.verify().ok and Mask.load(registry.resolve(name)).id == mask.id


def test_gc_during_a_copy_into_the_store_leaves_it_alone(tmp_path, registry, monkeypatch):
    path = freeze_mask(1).save(tmp_path / "mask.safetensors")
    calls = collect_during(monkeypatch, registry, shutil, "copyfileobj")
    result = cli("registry", "add", str(path))
    monkeypatch.undo()
    assert result.exit_code == 0, result.output
    assert calls and all(not health.removed and not health.leftovers for pair in calls for health in pair)
    assert registry.verify().ok and registry.store.staged_leftovers() == []


def _die_while_staging(home: str) -> None:
    replace = os.replace

    def die_on_the_staged_rename(source, target, *args, **kwargs):
        if store.TEMP_PREFIX in str(source):
            os._exit(9)  # kill -9 between writing the staged file and its rename
        return replace(source, target, *args, **kwargs)

    os.replace = die_on_the_staged_rename
    Registry(Path(home)).register(freeze_mask(3))


def test_a_registration_killed_while_staging_leaves_what_gc_collects(tmp_path, home, registry):
    registry.check()
    process = multiprocessing.get_context("fork").Process(target=_die_while_staging, args=(str(home),))
    process.start()
    process.join(60)
    assert process.exitcode == 9
    health = registry.verify()
    assert health.strays == [] and health.ok  # a staged registration is no misplaced mask
    assert health.leftovers and all(store.TEMP_PREFIX in item for item in health.leftovers)
    listed = " ".join(cli("registry", "verify").output.split())
    assert "abandoned staged registration" in listed and "misplaced" not in listed
    result = cli("registry", "gc")  # at once: no live process holds it, so no waiting for it to age
    assert result.exit_code == 0, result.output
    removed = f"removed 0 stray files and {len(health.leftovers)} temporary copies"
    assert removed in " ".join(result.output.split()) and "kept" not in result.output
    assert registry.store.staged_leftovers() == [] and registry.store.files() == []
    assert registry.store.staging_entries() == []


def test_leftovers_of_older_releases_are_staged_registrations_too(registry):
    registry.check()
    folder = registry.store.folder
    older = [folder / f"{store.TEMP_PREFIX}old{store.SUFFIX}", folder / f".{store.TEMP_PREFIX}old{store.SUFFIX}.x.tmp"]
    freeze_mask(4).save(older[1])  # a complete, valid mask under a staging name
    older[0].write_bytes(b"partial")
    health = registry.verify()
    assert health.strays == [] and sorted(health.leftovers) == sorted(map(str, older))
    assert sorted(registry.collect_garbage().leftovers) == sorted(map(str, older))
    assert not any(path.exists() for path in older)


# --- defect 14 and its class: every reference gives a result or one line ------------------------------------------


@pytest.mark.parametrize("command", ["show", "rm", "lineage", "inspect"])
@pytest.mark.parametrize(
    "ref",
    [
        "tiny-model/arc@v99999999999999999999999",
        "tiny-model/arc@v9223372036854775808",
        "tiny-model/arc@v" + "9" * 5000,
        "~no-such-user-cpl/mask",
        "x" * 5000,
        "tiny-model/arc@v\u0661",
    ],
)
def test_hostile_references_are_one_line_errors(tmp_path, registry, command, ref):
    registry.register(freeze_mask(1))
    args = ("inspect", ref) if command == "inspect" else ("registry", command, ref)
    one_line_error(cli(*args))


def test_a_version_with_a_trailing_newline_or_foreign_digits_is_not_another_version(registry):
    registry.register(freeze_mask(1))
    for ref in ("tiny-model/arc@v1\n", "tiny-model/arc@v\u0661", "tiny-model/arc@v\uff11"):
        with pytest.raises(CplError):
            registry.show(ref)
    assert registry.show("tiny-model/arc@v01")["id"] == freeze_mask(1).id  # leading zeros are still the number


def test_an_empty_mask_reference_matches_no_runs(registry):
    registry.record_run(registry.resolve(registry.register(freeze_mask(1))), {"mode": "mask", "task": "arc"})
    one_line_error(cli("registry", "runs", "--mask", ""))
    with pytest.raises(CplError, match="empty"):
        registry.show("")


REFERENCES = st.one_of(
    st.text(max_size=80),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=20),  # lone surrogates: undecodable argv
    st.builds(
        lambda name, digits: f"{name}@v{digits}",
        st.sampled_from(["tiny-model/arc", "tiny-model/csqa", ""]) | st.text(max_size=12),
        st.integers(min_value=0, max_value=2**80).map(str)
        | st.text("0123456789", min_size=1, max_size=60)
        | st.text(st.characters(categories=["Nd"]), min_size=1, max_size=3)
        | st.text(max_size=4),
    ),
    st.text("0123456789abcdefABCDEF", max_size=70),
    st.builds(lambda head, tail: head + tail, st.sampled_from(["~", "~/", "~x", "./", "/", "-"]), st.text(max_size=20)),
)


@pytest.fixture
def populated(tmp_path, registry) -> Registry:
    """Two masks under one name, one alias, a retain set, and a recorded run."""
    registry.register(freeze_mask(1))
    registry.register(freeze_mask(2))
    registry.register(freeze_mask(1), task="csqa")
    registry.register(retain_set(3))
    registry.record_run(registry.resolve("tiny-model/arc@v1"), {"mode": "mask", "task": "arc"})
    return registry


@PROPERTY
@given(ref=REFERENCES)
def test_any_reference_gives_a_result_or_a_cpl_error(populated, ref):
    reads = (populated.resolve, populated.show, populated.lineage, lambda r: populated.runs(mask=r))
    for read in reads:
        try:
            read(ref)
        except CplError as error:
            assert "\n" not in str(error)
    try:
        populated.remove(ref)  # refused: every mask here has runs or is named, or the reference is bad
    except CplError as error:
        assert "\n" not in str(error)
    else:  # an alias or an unreferenced mask went: put it back for the next example
        populated.register(freeze_mask(1), task="csqa")
        populated.register(freeze_mask(2))
        populated.register(retain_set(3))


@settings(PROPERTY, max_examples=max(10, PROPERTY.max_examples // 4))
@given(ref=REFERENCES, command=st.sampled_from(["show", "lineage", "rm"]))
def test_any_reference_on_the_command_line_gives_output_or_one_line(populated, ref, command):
    result = cli("registry", command, "--", ref)  # "--": a reference like "-0" is no option
    if result.exit_code == 0:
        populated.register(freeze_mask(1), task="csqa")  # rm removed an alias: put it back
        return
    one_line_error(result)


# --- defect 16: the kind in the header names the mask, never a metadata key ---------------------------------------


def test_a_retain_set_without_the_retain_key_is_filed_as_a_retain_set(registry):
    name = registry.register(retain_set(1))
    assert name == "tiny-model/arc.retain@v1"
    assert registry.show(name)["source"] == "retain"


def test_a_freeze_mask_with_a_retain_key_is_filed_as_a_freeze_mask(registry):
    name = registry.register(freeze_mask(1, {"retain": {}}))
    assert name == "tiny-model/arc@v1"
    assert registry.show(name)["source"] == "profiled"


def test_a_file_is_filed_by_the_kind_its_header_gives(tmp_path, registry):
    for made, expected in (
        (retain_set(1), "tiny-model/arc.retain@v1"),
        (freeze_mask(2, {"retain": {}}), "tiny-model/arc@v1"),
    ):
        path = made.save(tmp_path / f"{made.id}.safetensors")
        result = cli("registry", "add", str(path))
        assert result.exit_code == 0 and f"as {expected}" in result.output, result.output


METADATA_CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "retain": st.just({}) | st.just({"questions": []}) | st.none(),
        "reprofile_of": st.just("b" * 64) | st.none(),
        "recut_of": st.just("c" * 64) | st.none(),
        "rule": st.just({"control": "random"}) | st.just({}) | st.none(),
        "parents": st.just(["d" * 64]) | st.just([]),
        "task": st.sampled_from(["arc", "csqa", "bad task", ""]),
    },
)


@PROPERTY
@given(changes=METADATA_CHANGES, kind=st.sampled_from(["mask", "retain"]), task=st.none() | st.just("named"))
def test_the_registry_name_and_source_follow_the_kind(changes, kind, task):
    made = (retain_set if kind == "retain" else freeze_mask)(7, changes)
    with tempfile.TemporaryDirectory() as folder:
        registry = Registry(Path(folder))
        name = registry.register(made, task=task)
        source = registry.show(name)["source"]
    stem = name.split("@")[0]
    assert (source == "retain") == (kind == "retain"), (name, source)
    assert (".retain" in stem) == (kind == "retain"), name
    assert source_of(made.metadata, kind=made.kind) == source
    assert mask_name(made.metadata, task, source=source) == stem
