"""Mask files from strangers: every crafted header is a one-line CplError, never another exception.

The fixed cases are the ones issue 18 found; the property-based ones (hypothesis) feed generated
headers, metadata and safetensors layouts and require a valid mask or the project's own error.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask, read_header
from cpl_masks.masks.stats import diff, summarize
from cpl_masks.registry.catalog import source_of
from cpl_masks.registry.names import default_task, mask_name

SHAPES = {"model.layers.0.mlp.up_proj.weight": (3, 5), "model.norm.weight": (9,)}
PROPERTY = settings(
    max_examples=int(os.environ.get("CPL_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def valid_mask(scores: bool = True) -> Mask:
    generator = torch.Generator().manual_seed(0)
    values = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    stats = {
        name: {
            "touched": 4,
            "touched_collaborative": 2,
            "dot_positive": 0.5,
            "dot_negative": -0.25,
            "norm_m_sq": 1.0,
            "norm_i_sq": 2.0,
        }
        for name in SHAPES
    }
    metadata = {
        "model": {"ref": "org/tiny", "fingerprint": "f" * 64},
        "data": {"inject": {"rows": 3, "sha256": "a" * 64, "path": "q.jsonl"}},
        "rule": {"threshold": 0.0},
        "task": "arc",
        "scoring": "letter",
        "parents": [],
        "tensors": stats,
        "created": "2026-01-01T00:00:00+00:00",
    }
    return Mask.from_bool({name: value > 0 for name, value in values.items()}, metadata, values if scores else None)


def split_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's JSON header and its data bytes."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_file(path: Path, header: dict[str, Any] | bytes, body: bytes) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return path


def crafted(folder: Path, change: Callable[[dict[str, Any], dict[str, Any]], Any]) -> Path:
    """A valid mask file whose safetensors header (``raw``) and cpl header (``cpl``) ``change`` edited."""
    raw, body = split_file(valid_mask().save(folder / "valid.safetensors").read_bytes())
    original = raw["__metadata__"]["cpl_mask"]
    cpl = json.loads(original)
    change(raw, cpl)
    if isinstance(raw.get("__metadata__"), dict) and raw["__metadata__"].get("cpl_mask") == original:
        raw["__metadata__"]["cpl_mask"] = json.dumps(cpl)  # the edited cpl header, unless raw's was replaced
    return write_file(folder / "crafted.safetensors", raw, body)


def use_everything(path: Path) -> None:
    """Load a mask and do with it what the commands do: it must work or raise CplError."""
    for scores in (True, False):
        mask = Mask.load(path, scores=scores)
        summarize(mask)
        diff(mask, mask)
        source_of(mask.metadata)
        default_task(mask.metadata)
        mask_name(mask.metadata, None)


def only_cpl_errors(path: Path) -> None:
    try:
        use_everything(path)
    except CplError as error:
        assert "\n" not in str(error) and str(path) in str(error)


NESTED = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw, cpl: cpl["shapes"].update({"model.norm.weight": [10**20]}), "not a list of non-negative"),
        (lambda raw, cpl: cpl["shapes"].update({"model.norm.weight": [0, 10**30]}), "not a list of non-negative"),
        (lambda raw, cpl: raw["model.norm.weight"].pop("data_offsets"), "not described by dtype, shape and data"),
        (lambda raw, cpl: raw["model.norm.weight"].update(shape=[1000]), "does not fill its 2 bytes"),
        (lambda raw, cpl: raw["__metadata__"].update(cpl_mask=5), "'__metadata__' is not an object of strings"),
        (lambda raw, cpl: raw.update(__metadata__=[1]), "'__metadata__' is not an object of strings"),
        (lambda raw, cpl: cpl["metadata"].update(model="tiny"), "metadata 'model' is not a JSON object"),
        (lambda raw, cpl: cpl["metadata"].update(model={"ref": 5}), "metadata 'model.ref' is not a string"),
        (lambda raw, cpl: cpl["metadata"].update(data=[1]), "metadata 'data' is not a JSON object"),
        (lambda raw, cpl: cpl["metadata"].update(data={"inject": 3}), "metadata 'data.inject' is not an object"),
        (lambda raw, cpl: cpl["metadata"]["data"]["inject"].update(sha256=1), "'data.inject.sha256' is not a JSON"),
        (lambda raw, cpl: cpl["metadata"].update(parents="abc"), "metadata 'parents' is not a JSON list"),
        (lambda raw, cpl: cpl["metadata"].update(parents=[1, 2]), "metadata 'parents' is not a list of mask ids"),
        (lambda raw, cpl: cpl["metadata"].update(rule=5), "metadata 'rule' is not a JSON object"),
        (lambda raw, cpl: cpl["metadata"].update(counts=[[1, 2, 3]]), "metadata 'counts' is not a JSON object"),
        (lambda raw, cpl: cpl["metadata"].update(tensors={"x": {}}), "'tensors.x' is not the statistics of one"),
        (
            lambda raw, cpl: cpl["metadata"]["tensors"]["model.norm.weight"].update(norm_m_sq=-1.0),
            "norm_m_sq' is not a non-negative number",
        ),
        (
            lambda raw, cpl: cpl["metadata"]["tensors"]["model.norm.weight"].pop("dot_negative"),
            "is not complete",
        ),
        (lambda raw, cpl: cpl.update(version=1), "version 1 is not supported"),
        (lambda raw, cpl: cpl.update(id="zz"), "'id' 'zz' is not a sha256"),
        (lambda raw, cpl: raw.update(extra={"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}), "holds tensor"),
        (lambda raw, cpl: raw["model.norm.weight"].update(dtype="XX"), "unknown dtype 'XX'"),
    ],
)
def test_crafted_headers_are_one_line_errors(tmp_path, change, message):
    path = crafted(tmp_path, change)
    with pytest.raises(CplError, match=message) as error:
        Mask.load(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_deeply_nested_header_json_is_a_one_line_error(tmp_path):
    body = valid_mask().save(tmp_path / "valid.safetensors").read_bytes()
    raw, data = split_file(body)
    cpl = json.loads(raw["__metadata__"]["cpl_mask"])
    cpl["metadata"]["deep"] = "PLACEHOLDER"
    raw["__metadata__"]["cpl_mask"] = json.dumps(cpl).replace('"PLACEHOLDER"', NESTED)
    with pytest.raises(CplError, match="nested too deeply"):
        read_header(write_file(tmp_path / "deep.safetensors", raw, data))
    text = json.dumps(raw).encode().replace(b'"__metadata__"', b'"deep": ' + NESTED.encode() + b', "__metadata__"')
    with pytest.raises(CplError, match="corrupted safetensors header"):
        read_header(write_file(tmp_path / "deep-raw.safetensors", text, data))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
NEAR_VALID = st.sampled_from([0, 1, -1, 3, 9, 10**20, 2**64, [], [9], [3, 5], [0, 2], [2, 0], "U8", "BF16", "F32"])
CPL_PATHS = [
    ("format",),
    ("version",),
    ("id",),
    ("shapes",),
    ("shapes", "model.norm.weight"),
    ("scores",),
    ("metadata",),
    *(("metadata", key) for key in ("model", "data", "parents", "rule", "task", "tensors", "counts", "scoring")),
    ("metadata", "model", "ref"),
    ("metadata", "model", "fingerprint"),
    ("metadata", "data", "inject"),
    ("metadata", "data", "inject", "rows"),
    ("metadata", "data", "inject", "sha256"),
    ("metadata", "rule", "freeze_pattern"),
    ("metadata", "tensors", "model.norm.weight"),
    *(("metadata", "tensors", "model.norm.weight", key) for key in ("touched", "dot_positive", "norm_i_sq")),
]
RAW_PATHS = [
    (name, field)
    for name in ("model.norm.weight", "scores/model.norm.weight", "__metadata__")
    for field in ("dtype", "shape", "data_offsets", "cpl_mask")
]


def set_path(target: Any, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(target, dict):
            return
        target = target.setdefault(key, {})
    if isinstance(target, dict):
        target[path[-1]] = value


@PROPERTY
@given(changes=st.lists(st.tuples(st.sampled_from(CPL_PATHS), JSON | NEAR_VALID), min_size=1, max_size=3))
def test_generated_cpl_headers_load_or_raise_cpl_error(changes):
    with tempfile.TemporaryDirectory() as folder:
        only_cpl_errors(crafted(Path(folder), lambda raw, cpl: [set_path(cpl, path, v) for path, v in changes]))


@PROPERTY
@given(changes=st.lists(st.tuples(st.sampled_from(RAW_PATHS), JSON | NEAR_VALID), min_size=1, max_size=3))
def test_generated_safetensors_layouts_load_or_raise_cpl_error(changes):
    with tempfile.TemporaryDirectory() as folder:
        only_cpl_errors(crafted(Path(folder), lambda raw, cpl: [set_path(raw, path, v) for path, v in changes]))


@PROPERTY
@given(header=st.binary(max_size=200) | JSON.map(lambda value: json.dumps(value).encode()), body=st.binary(max_size=64))
def test_generated_bytes_load_or_raise_cpl_error(header, body):
    with tempfile.TemporaryDirectory() as folder:
        only_cpl_errors(write_file(Path(folder) / "m.safetensors", header, body))


@PROPERTY
@given(metadata=st.dictionaries(st.sampled_from(sorted({path[1] for path in CPL_PATHS if len(path) > 1})), JSON))
def test_generated_metadata_is_shown_by_inspect_and_the_registry_or_refused(metadata):
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setenv("CPL_MASKS_HOME", str(Path(folder) / "home"))  # a fresh registry for every example
        path = crafted(Path(folder), lambda raw, cpl: cpl["metadata"].update(metadata))
        commands = [["inspect", str(path)], ["inspect", str(path), "--json"], ["registry", "add", str(path)]]
        commands += [["registry", "show", str(path)], ["registry", "show", str(path), "--json"], ["registry", "list"]]
        for args in commands:
            result = CliRunner().invoke(app, args)
            assert result.exit_code in (0, 2), (args, result.exception, result.output)
