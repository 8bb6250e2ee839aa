"""A training run's folder on disk: its layout, the checkpoint kept after every epoch, and the finished record.

The folder holds ``config.json`` (the request with absolute paths, the inputs' content hashes and
the mask's id; written once every check has passed, before the first epoch, so a killed run resumes
from any working directory), ``checkpoint/`` (weights, optimizer and RNG state, metrics, per-question
records and the epoch-0 baseline of the last finished epoch; ``state.json`` is written last, so a
crash leaves the previous checkpoint in force), ``metrics.jsonl``, ``questions.jsonl`` and
``curves.png`` (rewritten after every evaluated epoch), ``masks/`` (masks the method made while
training, ``e<epoch>-s<step>.safetensors``, written after each epoch), and at the end ``model/`` (the
method's ``save``: safetensors weights, or a LoRA adapter, and the tokenizer) and ``run.json``
(:class:`cpl_masks.training.record.RunRecord`, which alone reads and writes it).

Also the folder's claim: finding the run's mask or retain set (:func:`check_out_and_mask_file`, and
:func:`find_mask_file` on resume) and holding the folder's lock and the registered file
(:func:`claimed`) while the run writes.

These are the components both recipes use (:mod:`cpl_masks.training.run` and, through it,
:mod:`cpl_masks.sweep.run`); under ``torchrun`` only rank 0 writes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from cpl_masks.errors import CplError
from cpl_masks.evaluation.outcomes import QUESTIONS
from cpl_masks.masks.format import Mask, read_header
from cpl_masks.methods import Method
from cpl_masks.registry import Registry
from cpl_masks.training.loop import TrainConfig, TrainingLoop
from cpl_masks.training.record import RUN, field_problem, matches, state_problem
from cpl_masks.training.request import RunRequest
from cpl_masks.utils.distributed import Processes
from cpl_masks.utils.files import (
    LOCK_NAME,
    atomic_write,
    check_output_dir,
    check_writable_folder,
    default_file_mode,
    describe_os_error,
    lock_folder,
    read_json,
    write_json,
)

CONFIG, METRICS, CURVES, MODEL_DIR, CHECKPOINT = (
    "config.json",
    "metrics.jsonl",
    "curves.png",
    "model",
    "checkpoint",
)


STATE = "state.json"
MADE_MASKS = "masks"


def keep_made_masks(out: Path, masks: Iterable[Mask]) -> None:
    """Write each mask a method made while training into ``out/masks/``, once (named by its epoch and step)."""
    for mask in masks:
        at = mask.metadata.get("reprofiled_at") or {}
        path = out / MADE_MASKS / f"e{at.get('epoch')}-s{at.get('step')}.safetensors"
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            mask.save(path)


def made_masks(out: Path) -> list[dict[str, Any]]:
    """What ``run.json`` records of the masks in ``out/masks/``, in training order."""
    rows = []
    for path in (out / MADE_MASKS).glob("*.safetensors"):
        mask = Mask.load(path, scores=False)
        at = mask.metadata.get("reprofiled_at") or {}
        rows.append({**at, "path": str(path), "mask_id": mask.id, "collaborative_share": mask.collaborative_share()})
    return sorted(rows, key=lambda row: (row.get("epoch", 0), row.get("step", 0)))


def check_out_folder(out: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse an output folder that holds other work (unless ``overwrite``), that would write over one of
    the run's ``inputs`` (its data, model folder or mask; even with ``overwrite``), or that cannot be
    created and written."""
    check_output_dir(out, overwrite=overwrite or restartable(out), inputs=inputs)
    check_writable_folder(out, what=f"--out {out}")


def restartable(folder: str | Path) -> bool:
    """Whether ``folder`` holds only a run that stopped before its first checkpoint, so it may start again.

    Such a folder has our ``config.json``, at most epoch 0's ``metrics.jsonl``, ``questions.jsonl`` and
    ``curves.png``, masks made in the unfinished first epoch, and a ``checkpoint/`` whose ``state.json`` was
    never written: no finished epoch, nothing of the user's, so starting the run again there needs no
    ``--overwrite``.
    """
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or (folder / CHECKPOINT / STATE).exists():
        return False
    ours = (CONFIG, METRICS, QUESTIONS, CURVES, CHECKPOINT, MADE_MASKS, LOCK_NAME)
    if any(path.name not in ours for path in folder.iterdir()):
        return False
    try:
        return isinstance(json.loads((folder / CONFIG).read_text(encoding="utf-8")).get("request"), dict)
    except (ValueError, AttributeError):  # not JSON, or not an object: not our config.json
        return False


# what config.json holds besides the request: its key -> (type, needed); an older file may lack the unneeded
_SAVED = {
    "request": (dict, True),
    "mask_path": (str | None, True),
    "mask_id": (str | None, False),
    "sha256": (dict[str, str] | None, False),
    "model_fingerprint": (str | None, False),
    "resume_changes": (list[dict], False),
}
_HASHED = ("inject", "mastered", "heldout", "retain_text")  # the request fields config.json's sha256 may name


def saved_config(out: Path) -> dict[str, Any]:
    """The ``config.json`` of the stopped run in ``out``, refusing a folder that holds none or a finished run,
    and a file that is not what a run writes (in one line naming it and the value at fault)."""
    path = out / CONFIG
    if not path.is_file():
        raise CplError(f"--resume {out}: no {CONFIG} here (not a training run folder)")
    if (out / RUN).is_file():
        raise CplError(f"--resume {out}: this run already finished ({RUN} exists)")
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise CplError(f"{path}: not a run's {CONFIG} (not a JSON object)")
    for key, (kind, needed) in _SAVED.items():
        if key not in saved and needed:
            raise CplError(f"{path}: not a run's {CONFIG} (no {key!r})")
        if key in saved and not matches(saved[key], kind):
            raise CplError(f"{path}: its {key!r} is not what a run saves there")
    stray = sorted(set(saved.get("sha256") or {}) - set(_HASHED))
    if stray:
        raise CplError(f"{path}: its 'sha256' names {stray[0]!r}, which is no input of a run")
    return saved


def saved_request(out: Path, saved: dict[str, Any] | None = None) -> RunRequest:
    """The request of the stopped run in ``out`` (``saved``: its :func:`saved_config`, when already read),
    every field of the type a request has and every value one a run takes; a value that is not names
    ``config.json``, since the user gave no option.
    """
    path = out / CONFIG
    values = (saved if saved is not None else saved_config(out))["request"]
    problem = field_problem(RunRequest, {**values, "config": {}}, unknown_ok=False) or field_problem(
        TrainConfig, values.get("config"), unknown_ok=False
    )
    if problem is not None:
        raise CplError(f"{path}: its saved request is damaged ({problem})")
    request = RunRequest(**{**values, "config": TrainConfig(**values["config"])})
    try:
        request.check()
    except CplError as error:
        raise CplError(f"{path}: its saved request is refused: {error}") from None
    return request


def resumable(out: Path) -> bool:
    """Whether ``cpl-masks train --resume out`` can go on: ``out`` holds a readable ``config.json``, no ``run.json``."""
    try:
        saved_request(out)
    except (CplError, OSError):
        return False
    return True


def save_checkpoint(processes: Processes, out: Path, trainer: TrainingLoop, state: dict[str, Any]) -> None:
    """Write weights, optimizer and RNG state, then ``state.json`` naming them; drop older files.

    ``state.json`` is written last, so a crash at any point leaves the previous epoch's complete
    checkpoint in force. Every rank calls it (FSDP2 gathers the weights); rank 0 of ``processes``
    writes. Under FSDP2 a stateful optimizer's state is sharded per rank and is not kept, so such a
    run cannot resume.
    """
    payload = {
        "weights": trainer.weights(),
        "optimizer": _optimizer_state(trainer),
        "rng": torch.get_rng_state(),
    }
    processes.on_main(lambda: _write_checkpoint(out / CHECKPOINT, payload, state))


def _optimizer_state(trainer: TrainingLoop) -> dict[str, Any] | None:
    """The optimizer's state dict, or None under FSDP2 when it holds per-rank shards (momentum, Adam)."""
    state = trainer.optimizer.state_dict()
    if trainer.wrapping == "fsdp2" and any(state["state"].values()):
        return None
    return state


def _write_checkpoint(folder: Path, payload: dict[str, Any], state: dict[str, Any]) -> None:
    """Write ``trainer-<epoch>.pt``, then ``state.json`` naming it, then drop the older files.

    A full disk at either write is one line (:func:`cpl_masks.utils.files.disk_error`) and leaves the previous
    checkpoint in force: the new file is removed again when ``state.json`` could not name it.
    """
    name = f"trainer-{state['epoch']}.pt"
    previous = _state_file(folder)
    with atomic_write(folder / name, "wb") as handle:
        _torch_save(payload, handle)
    try:
        write_json(folder / STATE, {**state, "file": name})
    except BaseException:
        if previous != name:
            remove_path(folder / name)
        raise
    for old in folder.glob("trainer-*.pt"):
        if old.name != name:
            old.unlink()


def _state_file(folder: Path) -> str | None:
    """The file the checkpoint's ``state.json`` names now, or None (none, or unreadable)."""
    try:
        return json.loads((folder / STATE).read_text(encoding="utf-8")).get("file")
    except (OSError, ValueError, AttributeError):
        return None


def _torch_save(payload: dict[str, Any], handle: Any) -> None:
    """``torch.save`` into ``handle``; a failed write (a full disk) comes out as the ``OSError`` it was.

    torch wraps the writer's ``OSError`` into a ``RuntimeError`` of its zip writer (``inline_container.cc``),
    which :func:`atomic_write` would not recognize as a disk error.
    """
    try:
        torch.save(payload, handle)
    except RuntimeError as error:
        cause = _os_error_in(error)
        if cause is None:
            raise
        raise cause from None


def _os_error_in(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error`` (itself, its cause or its context), or None."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def read_checkpoint(out: Path) -> dict[str, Any] | None:
    """The last checkpoint's state (its tensors under ``payload``, its file under ``path``), or None before an
    epoch ends; a file that torch cannot read, or that holds other than a checkpoint, is refused naming it."""
    state = checkpoint_state(out)
    if state is not None:
        path = out / CHECKPOINT / state["file"]
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated, not a zip, a pickle weights_only refuses: torch says it many ways
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
            raise CplError(f"{path}: not a readable checkpoint ({reason})") from None
        problem = _payload_problem(payload)
        if problem is not None:
            raise CplError(f"{path}: not a checkpoint of this tool ({problem})")
        state["payload"], state["path"] = payload, str(path)
    return state


def _payload_problem(payload: Any) -> str | None:
    """What keeps a loaded ``trainer-N.pt`` from being a checkpoint (weights, optimizer, RNG), or None."""
    if not isinstance(payload, dict) or not {"weights", "optimizer", "rng"} <= set(payload):
        return "not a dict of weights, optimizer and rng"
    weights = payload["weights"]
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        return "its weights are not a dict of tensors"
    if payload["optimizer"] is not None and not isinstance(payload["optimizer"], dict):
        return "its optimizer state is not a dict"
    if not isinstance(payload["rng"], torch.Tensor) or payload["rng"].dtype != torch.uint8:
        return "its rng state is not a byte tensor"
    return None


def checkpoint_state(out: Path) -> dict[str, Any] | None:
    """The last checkpoint's ``state.json`` (its epoch, metrics and baseline; no tensors), or None.

    Raises:
        CplError: a ``state.json`` that is not what a checkpoint writes (naming it and the value at fault).
    """
    state_file = out / CHECKPOINT / STATE
    if not state_file.is_file():
        return None
    state = read_json(state_file)
    problem = state_problem(state)
    if problem is not None:
        raise CplError(f"{state_file}: not a checkpoint's {STATE} ({problem})")
    return state


def restore_checkpoint(trainer: TrainingLoop, checkpoint: dict[str, Any]) -> None:
    """Put a checkpoint's weights, optimizer state and RNG state back; ones that do not fit the model name the file."""
    payload, path = checkpoint["payload"], checkpoint.get("path", STATE)
    names = {name for name, _ in trainer.model.named_parameters()}
    if set(payload["weights"]) != names:
        raise CplError(f"{path}: its weights are not this model's parameters")
    if payload["optimizer"] is None:
        raise CplError(
            "--resume: this run trained under --distributed fsdp2 with a stateful optimizer, whose sharded "
            "state was not checkpointed; start it again (or train with ddp or plain sgd)"
        )
    try:
        trainer.load_weights(payload["weights"])
        trainer.optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:  # shapes, groups, sizes
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise CplError(f"{path}: does not fit this run's model or optimizer ({reason})") from None
    for group in trainer.optimizer.param_groups:  # the saved state carries the old rate; a resume may change it
        group["lr"] = trainer.config.lr


def save_model(
    method: Method, model: torch.nn.Module, tokenizer: Any, folder: Path, weights: dict[str, torch.Tensor] | None = None
) -> None:
    """The method's result (weights, or an adapter) and the tokenizer into ``folder``, via a staging folder.

    ``weights``, when given, are the whole weights to save instead of the model's own parameters
    (under FSDP2, where each rank holds only shards and rank 0 has gathered them). Every file gets the mode
    the umask gives (``save_pretrained`` writes some through private temporary files); a failed write (a full
    disk) is one line naming ``folder`` and leaves no staging folder behind.
    """
    staging = folder.with_name(f".{folder.name}-staging")
    remove_path(staging)
    try:
        if weights is None:
            method.save(model, staging)
        else:
            model.save_pretrained(staging, state_dict=weights)
        tokenizer.save_pretrained(staging)
        follow_umask(staging)
    except BaseException as error:
        remove_path(staging)
        cause = _os_error_in(error)
        if cause is not None or isinstance(error, SafetensorError):
            reason = describe_os_error(cause) if cause is not None else str(error).strip()[:160]
            raise CplError(f"{folder}: cannot write the model ({reason}); nothing was replaced") from None
        raise
    remove_path(folder)
    staging.rename(folder)


def follow_umask(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open`` gives (``0o666`` less the umask)."""
    mode = default_file_mode()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree, if there is one."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def check_out_and_mask_file(request: RunRequest, overwrite: bool, registry: Registry) -> str | None:
    """The file of a run's mask or retain set (checking the registry, which records it), then the output folder
    checked against the run's inputs, that file among them."""
    mask_path = None
    if request.mask_file is not None:
        registry.check()
        mask_path = str(registry.resolve(request.mask_file).resolve())
    check_out_folder(Path(request.out), overwrite, inputs=run_inputs(request, mask_path))
    return mask_path


def run_inputs(request: RunRequest, mask_path: str | None) -> list[str | None]:
    """Every file or folder a run reads, which its output folder must never write over."""
    model = request.model if Path(request.model).exists() else None  # a Hub id is not a local input
    return [request.inject, request.mastered, request.heldout, request.retain_text, model, mask_path]


@contextlib.contextmanager
def claimed(processes: Processes, out: Path, mask_path: str | None, registry: Registry) -> Iterator[None]:
    """Rank 0 holds the run folder (a second writer is refused) and the run's registered mask (``registry
    rm`` refuses it) from the checks until ``run.json``; a run refused before it wrote ``config.json``
    leaves no folder behind. A refusal on rank 0 stops every rank."""
    existed = out.exists()
    owned = False  # only a folder this process locked is ever removed: another's may be filling it
    with contextlib.ExitStack() as held:

        def claim() -> None:
            nonlocal owned
            held.enter_context(lock_folder(out))
            owned = True
            mask_id = mask_file_id(mask_path) if mask_path else None
            if mask_id:
                held.enter_context(registry.hold(mask_id))

        try:
            processes.on_main(claim)
            yield
        except BaseException:
            held.close()
            if owned and not existed and not (out / CONFIG).exists():
                remove_path(out)
            raise


def find_mask_file(out: Path, saved_path: str | None, mask_id: str | None, registry: Registry) -> str | None:
    """A resumed run's mask (or retain set) file: the saved path while it holds ``mask_id``, else ``registry``'s copy.

    Without a saved ``mask_id`` (an older ``config.json``) the saved path is taken as it is.
    """
    if saved_path is None or mask_id is None or mask_file_id(saved_path) == mask_id:
        return saved_path
    try:
        found = str(registry.resolve(mask_id).resolve())
    except CplError as error:
        found, reason = None, str(error)
    else:
        reason = f"the registry's {found} holds other bits"
    if found is None or mask_file_id(found) != mask_id:
        raise CplError(
            f"--resume {out}: mask {mask_id[:12]} is no longer at {saved_path} (gone or other bits) "
            f"and cannot be found by its id: {reason}"
        )
    return found


def mask_file_id(path: str) -> str | None:
    """The content id of the mask-format file at ``path``, or None when there is none."""
    try:
        return read_header(path)["id"]
    except CplError:
        return None
