"""Model loading through the real code path, and weight fingerprints."""

from __future__ import annotations

import pytest
import torch

from cpl_masks.errors import CplError
from cpl_masks.models import load_model, model_fingerprint, resolve_device


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
