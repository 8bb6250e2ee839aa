"""Hostile mask files, part two: ids that cover what a retain set does, and numbers and bits in range.

* A retain set's content id covers its questions and how its signs are measured and used, so an
  edited copy never shares an id (nor, in the registry, a name) with the original; retain sets
  written before (format 2.0, an id over the sign planes alone) are refused with what to do.
* Every packed plane's padding bits are zero, every count is within its mask, and the header's
  JSON holds no NaN or Infinity: a file either loads to a mask whose statistics are in range (and
  ``inspect --json`` prints JSON) or is refused in one line.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.data.questions import questions_sha256
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask, content_id
from cpl_masks.masks.reading import FORMAT_VERSION, read_header
from cpl_masks.masks.signs import PackedSigns
from cpl_masks.masks.stats import summarize
from cpl_masks.profiling.retain import retain_questions
from cpl_masks.registry import Registry
from tests.conftest import make_questions
from tests.test_untrusted_masks import valid_mask

SHAPES = {"model.layers.0.mlp.up_proj.weight": (3, 5), "model.norm.weight": (9,)}  # 15 and 9 entries: both padded
QUESTIONS = make_questions(4, seed=3)
GOLDEN = Path(__file__).parent / "data" / "golden_mask.safetensors"
PROPERTY = settings(
    max_examples=int(os.environ.get("CPL_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
runner = CliRunner()


def retain_metadata(questions=QUESTIONS) -> dict[str, Any]:
    """The metadata a profiled retain set carries (profiling.retain.profile_retain), without the model."""
    return {
        "model": {"ref": "org/tiny", "fingerprint": "f" * 64, "fingerprint_bf16": "b" * 64, "dtype": "float32"},
        "scoring": "letter",
        "loss": "the answer's loss",
        "data": {"mastered": {"sha256": questions_sha256(questions), "rows": len(questions), "path": None}},
        "task": "facts",
        "created": "2026-01-01T00:00:00+00:00",
        "parents": [],
        "retain": {
            "questions": [question.to_record() for question in questions],
            "objective": "answer",
            "confidence": None,
            "uncertain": "pass",
        },
        "profile": {"batch_size": 4, "seconds": 1.5},
    }


def retain_set(metadata: dict[str, Any] | None = None) -> Mask:
    generator = torch.Generator().manual_seed(1)
    gradients = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    gradients["model.norm.weight"][:2] = 0  # some g_M = 0: neither plane set
    return Mask.from_signs(PackedSigns.of(gradients), metadata or retain_metadata())


def edited(metadata: dict[str, Any], change) -> dict[str, Any]:
    copied = copy.deepcopy(metadata)
    change(copied)
    return copied


def edit_questions(metadata: dict[str, Any]) -> None:
    """The questions edited and re-hashed, so the copy passes retain_questions' own check."""
    questions = [*QUESTIONS[:-1], make_questions(1, seed=99, prefix="other")[0]]
    metadata["retain"]["questions"] = [question.to_record() for question in questions]
    metadata["data"]["mastered"]["sha256"] = questions_sha256(questions)


BEHAVIOUR_EDITS = {
    "questions": edit_questions,
    "objective": lambda m: m["retain"].update(objective="choices"),
    "confidence": lambda m: m["retain"].update(confidence=2.0, uncertain="freeze"),
    "uncertain": lambda m: m["retain"].update(confidence=1.0),
    "scoring": lambda m: m.update(scoring="loglik"),
    "fingerprint": lambda m: m["model"].update(fingerprint="e" * 64),
    "fingerprint_bf16": lambda m: m["model"].update(fingerprint_bf16="e" * 64),
}
PROVENANCE_EDITS = {
    "created": lambda m: m.update(created="2030-01-01T00:00:00+00:00"),
    "task": lambda m: m.update(task="other"),
    "profile": lambda m: m["profile"].update(seconds=99.0),
    "loss": lambda m: m.update(loss="another description"),
    "model.ref": lambda m: m["model"].update(ref="org/renamed"),
}


def write_mask(
    path: Path,
    packed: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    *,
    negative: dict[str, torch.Tensor] | None = None,
    version: str | None = None,
    mask_id: str | None = None,
    replace: tuple[str, str] | None = None,
) -> Path:
    """A mask file written byte by byte, with whatever bits and metadata (NaN included) it is given.

    Its id is the one the code under test computes for those bits and metadata, unless ``mask_id``;
    ``replace`` edits the header's JSON text before it is written.
    """
    shapes = {name: SHAPES_OF[name] for name in packed}
    retain = negative is not None
    header = {
        "format": "cpl-mask",
        "version": version or (FORMAT_VERSION if retain else "1.0"),
        **({"kind": "retain"} if retain else {}),
        "id": mask_id or Mask(dict(packed), shapes, metadata, negative=negative).id,
        "shapes": {name: list(shape) for name, shape in shapes.items()},
        "scores": False,
        "metadata": metadata,
    }
    tensors = {**packed, **{f"negative/{name}": plane for name, plane in (negative or {}).items()}}
    text = json.dumps(header)
    text = text if replace is None else text.replace(*replace)
    path.write_bytes(save(tensors, metadata={"cpl_mask": text}))
    return path


SHAPES_OF = {**SHAPES, "w": (3,)}


def refused_in_one_line(path: Path, match: str) -> None:
    with pytest.raises(CplError, match=match) as error:
        Mask.load(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 2 and result.output.startswith("error: "), result.output


# --- 3: a retain set's id covers what it does ---------------------------------------------------


@pytest.mark.parametrize("field", sorted(BEHAVIOUR_EDITS))
def test_a_retain_sets_id_covers_everything_that_changes_what_it_does(field, tmp_path):
    original = retain_set()
    changed = retain_set(edited(original.metadata, BEHAVIOUR_EDITS[field]))
    assert changed.id != original.id
    path = write_mask(tmp_path / "claimed.safetensors", changed.packed, changed.metadata, negative=changed.negative)
    path.write_bytes(path.read_bytes().replace(changed.id.encode(), original.id.encode()))  # claims the original id
    refused_in_one_line(path, "content id mismatch")


@pytest.mark.parametrize("field", sorted(PROVENANCE_EDITS))
def test_provenance_that_changes_nothing_it_does_keeps_the_id(field):
    original = retain_set()
    assert retain_set(edited(original.metadata, PROVENANCE_EDITS[field])).id == original.id


def test_a_pulled_retain_set_with_edited_questions_never_takes_the_local_name(tmp_path):
    local = retain_set()
    pulled = retain_set(edited(local.metadata, edit_questions))
    assert retain_questions(pulled) != QUESTIONS  # a consistent copy: its own check passes
    registry = Registry()
    registry.register(pulled.save(tmp_path / "pulled.safetensors"), task="hub.someone.facts")
    name = registry.register(local.save(tmp_path / "local.safetensors"), task="facts")
    assert retain_questions(Mask.load(registry.resolve(name))) == QUESTIONS
    assert {row["id"] for row in registry.list_masks()} == {local.id, pulled.id}


def test_a_retain_set_is_written_in_the_format_whose_id_covers_it_and_reads_back(tmp_path):
    retain = retain_set()
    path = retain.save(tmp_path / "retain.safetensors")
    header = read_header(path)
    assert (header["kind"], header["version"], header["id"]) == ("retain", "3.0", retain.id)
    again = Mask.load(path)
    assert again.id == retain.id and retain_questions(again) == QUESTIONS
    assert again.id != content_id(retain.packed, retain.shapes, retain.negative)  # not the planes alone


def test_a_retain_set_written_before_its_id_covered_its_questions_is_refused(tmp_path):
    retain = retain_set()
    old_id = content_id(retain.packed, retain.shapes, retain.negative)  # format 2.0: the planes alone
    path = write_mask(
        tmp_path / "old.safetensors",
        retain.packed,
        retain.metadata,
        negative=retain.negative,
        version="2.0",
        mask_id=old_id,
    )
    refused_in_one_line(path, r"format '2\.0'.*profile it again")


def test_freeze_mask_ids_stay_what_they_were(tmp_path):
    golden = Mask.load(GOLDEN)
    assert golden.id == "9993d4811efc7234a69ca87778bf82d14d7e7a74340c02e10d1bae8132879dd6"
    assert read_header(GOLDEN)["version"] == "1.0"
    mask = valid_mask()
    assert mask.id == content_id(mask.packed, mask.shapes)
    assert Mask.load(mask.save(tmp_path / "m.safetensors")).id == mask.id


QUESTION_TEXT = st.text(min_size=1, max_size=20).filter(lambda text: text.strip() == text and text.strip())


@PROPERTY
@given(
    text=QUESTION_TEXT,
    index=st.integers(0, len(QUESTIONS) - 1),
    objective=st.sampled_from(["answer", "choices"]),
    confidence=st.none() | st.floats(0, 10, allow_nan=False),
    scoring=st.sampled_from(["letter", "loglik"]),
)
def test_any_edit_of_what_a_retain_set_does_changes_its_id_and_round_trips(text, index, objective, confidence, scoring):
    original = retain_set()

    def change(metadata: dict[str, Any]) -> None:
        metadata["retain"]["questions"][index]["question"] = text
        metadata["retain"].update(objective=objective, confidence=confidence)
        metadata["scoring"] = scoring

    metadata = edited(original.metadata, change)
    changed = retain_set(metadata)
    assert (changed.id == original.id) == (metadata == original.metadata)
    with tempfile.TemporaryDirectory() as folder:
        assert Mask.load(changed.save(Path(folder) / "r.safetensors")).id == changed.id


# --- 17: padding bits, and counts that must agree with the bits ---------------------------------


def test_padding_bits_of_a_freeze_mask_are_refused(tmp_path):
    path = write_mask(tmp_path / "padded.safetensors", {"w": torch.tensor([0xFF], dtype=torch.uint8)}, {})
    refused_in_one_line(path, "padding bits")


@pytest.mark.parametrize("plane", ["positive", "negative"])
def test_padding_bits_of_either_retain_plane_are_refused(plane, tmp_path):
    retain = retain_set()
    planes = {"positive": dict(retain.packed), "negative": dict(retain.negative)}
    planes[plane]["model.norm.weight"] = planes[plane]["model.norm.weight"].clone()
    planes[plane]["model.norm.weight"][-1] |= 0x80  # entry 15 of a 9-entry tensor
    path = write_mask(tmp_path / "padded.safetensors", planes["positive"], retain.metadata, negative=planes["negative"])
    refused_in_one_line(path, "padding bits")


COUNT_EDITS = [
    ("mask", lambda m: m["counts"].update(collaborative=99), "counts.collaborative"),
    ("mask", lambda m: m["counts"].update(entries=25), "counts.entries"),
    ("mask", lambda m: m["counts"].update(touched=25), "counts.touched"),
    ("mask", lambda m: m["tensors"]["model.norm.weight"].update(touched=10), "tensors.model.norm.weight.touched"),
    (
        "mask",
        lambda m: m["tensors"]["model.norm.weight"].update(touched_collaborative=5),
        "tensors.model.norm.weight.touched_collaborative",
    ),
    (
        "mask",
        lambda m: m["tensors"]["model.norm.weight"].update(dot_positive=-1.0),
        "tensors.model.norm.weight.dot_positive",
    ),
    (
        "mask",
        lambda m: m["tensors"]["model.norm.weight"].update(dot_negative=1.0),
        "tensors.model.norm.weight.dot_negative",
    ),
    ("mask", lambda m: m["data"]["inject"].update(rows=-3), "data.inject.rows"),
    ("retain", lambda m: m["counts"].update(positive=30), "counts.positive"),
    ("retain", lambda m: m["counts"].update(frozen=1), "counts.frozen"),
    ("retain", lambda m: m["counts"].update(negative=-1), "counts.negative"),
    ("retain", lambda m: m["data"]["mastered"].update(rows=400), "data.mastered.rows"),
    ("retain", lambda m: m["retain"].update(confidence=-1.0), "retain.confidence"),
]


@pytest.mark.parametrize(("kind", "change", "field"), COUNT_EDITS)
def test_counts_out_of_range_or_against_the_bits_are_refused(kind, change, field, tmp_path):
    mask = valid_mask(scores=False) if kind == "mask" else retain_set()
    metadata = edited(mask.metadata, change)
    path = write_mask(tmp_path / "counted.safetensors", mask.packed, metadata, negative=mask.negative)
    refused_in_one_line(path, f"'{field}'")


# --- 19: no NaN or Infinity anywhere in a header ------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["tensors"]["model.norm.weight"].update(touched=math.inf),
        lambda m: m["tensors"]["model.norm.weight"].update(dot_positive=math.nan),
        lambda m: m["tensors"]["model.norm.weight"].update(norm_m_sq=math.inf),
        lambda m: m.update(seed=-math.inf),
        lambda m: m["rule"].update(threshold=math.nan),
        lambda m: m.update(extra={"deep": [1, {"x": math.inf}]}),
    ],
)
def test_non_finite_numbers_anywhere_in_a_header_are_refused(change, tmp_path):
    mask = valid_mask(scores=False)
    path = write_mask(tmp_path / "infinite.safetensors", mask.packed, edited(mask.metadata, change))
    refused_in_one_line(path, "not a finite number")


def test_a_number_too_large_for_a_float_is_refused(tmp_path):
    mask = valid_mask(scores=False)
    path = write_mask(
        tmp_path / "huge.safetensors", mask.packed, mask.metadata, replace=('"norm_i_sq": 2.0', '"norm_i_sq": 1e999')
    )
    assert b"1e999" in path.read_bytes()
    refused_in_one_line(path, "not a finite number")


def test_a_mask_whose_metadata_is_not_finite_is_never_written(tmp_path):
    mask = valid_mask(scores=False)
    mask.metadata["tensors"]["model.norm.weight"]["dot_positive"] = math.inf
    with pytest.raises(CplError, match="not a finite number"):
        mask.save(tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


# --- the class: any mutated file loads in range or is refused in one line -----------------------

NUMBER = st.integers(-(2**63), 2**64) | st.floats() | st.sampled_from([0, 1, 2, 8, 9, 15, 24, 25, -1, 0.5, 1e308])
NUMERIC_PATHS = [
    *(("counts", key) for key in ("entries", "collaborative", "touched", "touched_collaborative")),
    *(("counts", key) for key in ("positive", "negative", "frozen")),
    *(
        ("tensors", name, key)
        for name in SHAPES
        for key in ("touched", "touched_collaborative", "dot_positive", "dot_negative", "norm_m_sq", "norm_i_sq")
    ),
    ("retain", "confidence"),
    ("data", "inject", "rows"),
    ("data", "mastered", "rows"),
    ("seed",),
    ("rule", "threshold"),
]
BYTE_EDIT = st.tuples(st.booleans(), st.sampled_from(sorted(SHAPES)), st.integers(0, 1), st.integers(0, 255))


def set_at(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


def mutated(kind: str, numbers, bytes_: list) -> tuple[dict, dict, dict | None]:
    mask = valid_mask(scores=False) if kind == "mask" else retain_set()
    planes = {name: plane.clone() for name, plane in mask.packed.items()}
    negative = None if mask.negative is None else {name: plane.clone() for name, plane in mask.negative.items()}
    for second, name, last, value in bytes_:
        target = negative if second and negative is not None else planes
        target[name][-1 if last else 0] = value
    metadata = copy.deepcopy(mask.metadata)
    for path, value in numbers:
        set_at(metadata, path, value)
    return planes, metadata, negative


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"inspect --json printed {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def assert_in_range(mask: Mask) -> None:
    """Every statistic of a loaded mask within its range, and its counts within its entries."""
    counts = mask.metadata.get("counts") or {}
    assert all(0 <= value <= mask.entries for key, value in counts.items() if isinstance(value, (int, float)))
    if mask.kind == "retain":
        assert counts["frozen"] <= min(counts["positive"], counts["negative"])
        return
    summary = summarize(mask)
    groups = [summary["overall"], *summary["by_module"].values(), *summary["by_layer"].values()]
    for group in groups:
        assert 0 <= group["share"] <= 1 and group["collaborative"] <= group["entries"]
        assert group["touched_share"] is None or 0 <= group["touched_share"] <= 1
        assert group["cosine"] is None or -1 <= group["cosine"] <= 1
        assert all(math.isfinite(value) for value in group.values() if isinstance(value, float)), group


@PROPERTY
@given(
    kind=st.sampled_from(["mask", "retain"]),
    numbers=st.lists(st.tuples(st.sampled_from(NUMERIC_PATHS), NUMBER), max_size=3),
    bytes_=st.lists(BYTE_EDIT, max_size=3),
)
def test_any_mutated_file_loads_in_range_or_is_refused_in_one_line(kind, numbers, bytes_):
    planes, metadata, negative = mutated(kind, numbers, bytes_)
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setenv("CPL_MASKS_HOME", str(Path(folder) / "home"))
        path = write_mask(Path(folder) / "m.safetensors", planes, metadata, negative=negative)
        try:
            mask = Mask.load(path)
        except CplError as error:
            assert str(error).startswith(str(path)) and "\n" not in str(error)
            loaded = False
        else:
            assert_in_range(mask)
            loaded = True
        result = runner.invoke(app, ["inspect", str(path), "--json"])
        if loaded:
            assert result.exit_code == 0, result.output
            printed = strict_json(result.output)
            assert printed["id"] == mask.id
        else:
            assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
