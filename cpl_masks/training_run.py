"""A training run on disk: its folder, per-epoch checkpoints and evaluation, resume, and ``run.json``.

The output folder holds ``config.json`` (the request, written first so a killed run can resume),
``checkpoint/`` (weights, optimizer and RNG state, metrics and the epoch-0 baseline of the last
finished epoch), ``metrics.jsonl`` and ``curves.png`` (rewritten after every epoch), and at the
end ``model/`` (the method's ``save``: safetensors weights, or a LoRA adapter, and the tokenizer)
and ``run.json``.

Under ``torchrun`` every rank runs all of this (trains its share, evaluates its share), but only
rank 0 writes files and registry rows; the others wait for it (:func:`cpl_masks.distributed.on_main`).

Epoch 0 is the untouched model. When the run trains on a split's own files with the split's model
and scoring, it is read from the split's ``scores.jsonl`` rather than scored again.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cpl_masks import distributed
from cpl_masks.data import Question, load_questions, questions_sha256
from cpl_masks.errors import CplError
from cpl_masks.evaluate import draw_curves, epoch_metrics, evaluate_sets, text_loss
from cpl_masks.files import atomic_write, check_output_dir, prepare_output_dir, write_json, write_jsonl
from cpl_masks.masks import Mask
from cpl_masks.methods import METHODS, Method, MethodContext, make_method, method_options
from cpl_masks.models import load_model, model_fingerprint
from cpl_masks.profile import peak_memory, sign_agreement
from cpl_masks.scoring import Scores, make_scorer
from cpl_masks.split import recorded_scoring, split_scores
from cpl_masks.train import TrainConfig, Trainer, TrainingDiverged, optimizer_state_bytes
from cpl_masks.versions import package_versions

CONFIG, METRICS, CURVES, RUN, MODEL_DIR, CHECKPOINT = (
    "config.json",
    "metrics.jsonl",
    "curves.png",
    "run.json",
    "model",
    "checkpoint",
)
STATE = "state.json"
FINAL_KEYS = (
    "learned",
    "forgotten",
    "heldout_forgotten",
    "totals",
    "accuracy",
    "delta_logprob",
    "delta_margin",
    "retain_loss_delta",
    "mask_agreement",
)
OnEpoch = Callable[[list[dict[str, Any]]], None]


@dataclass
class RunRequest:
    """Everything a training run needs; saved as ``config.json`` so ``--resume`` can replay it."""

    inject: str
    mastered: str
    out: str
    model: str
    heldout: str | None = None
    mask: str | None = None  # as given: a path, an id, name@vN or name
    mode: str | None = None  # a name of cpl_masks.methods.METHODS (mask when --mask is given)
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own options, by field name
    scoring: str | None = None  # default: the mask's, else split.json's, else letter
    force: bool = False
    task: str | None = None
    allow_other_weights: bool = False
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None
    retain_text: str | None = None  # a general text whose loss is tracked as a measure of forgetting
    track_drift: bool = False  # with a mask: record its agreement with the sign rule after every epoch
    keep_weights: bool = True  # write model/ at the end (a sweep keeps only the metrics)
    config: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> None:
        """Refuse bad options before any model loads, naming the option."""
        mode = self.resolved_mode()
        method_options(mode, self.method_options)
        self.config.check()
        if self.retain_text is not None and not Path(self.retain_text).is_file():
            raise CplError(f"--retain-text {self.retain_text}: no such file")
        if self.track_drift and mode != "mask":
            raise CplError("--track-drift needs --mask (it measures how a static mask drifts from the sign rule)")
        if self.track_drift and self.config.distributed == "fsdp2":
            raise CplError("--track-drift needs whole gradients: use --distributed ddp with it, not fsdp2")

    def resolved_mode(self) -> str:
        """The training mode, refusing contradictory or missing choices."""
        if self.mode is not None and self.mode not in METHODS:
            raise CplError(f"--mode {self.mode}: choose one of {', '.join(METHODS)}")
        if self.mask is not None:
            if self.mode not in (None, "mask"):
                raise CplError(f"--mask and --mode {self.mode} exclude each other; give one of them")
            return "mask"
        if self.mode is None:
            raise CplError(f"choose how to train: --mask MASK or --mode {'|'.join(m for m in METHODS if m != 'mask')}")
        if self.mode == "mask":
            raise CplError("--mode mask needs --mask MASK")
        return self.mode

    @property
    def task_name(self) -> str:
        """The task the run is recorded under: ``--task``, else named after the injection file.

        A split's ``inject.jsonl`` says nothing about the task, so its folder names it instead
        (``runs/arc/inject.jsonl`` is task ``arc``); any other file is named by its stem.
        """
        inject = Path(self.inject)
        return self.task or (inject.parent.name if inject.stem == "inject" and inject.parent.name else inject.stem)

    def to_dict(self) -> dict[str, Any]:
        """The request as plain JSON values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunRequest:
        """Rebuild a request saved by :meth:`to_dict`."""
        return cls(**{**values, "config": TrainConfig(**values["config"])})


@dataclass
class RunData:
    """The three question sets of a run."""

    inject: list[Question]
    mastered: list[Question]
    heldout: list[Question]

    def sets(self) -> dict[str, list[Question]]:
        """The evaluation sets by name (held-out only when present)."""
        sets = {"inject": self.inject, "mastered": self.mastered}
        if self.heldout:
            sets["heldout"] = self.heldout
        return sets


def start_run(request: RunRequest, *, overwrite: bool = False, on_epoch: OnEpoch | None = None) -> dict[str, Any]:
    """Train as ``request`` says into a fresh output folder; returns the ``run.json`` payload.

    Raises:
        CplError: for bad options, data or mask, a non-empty folder without ``overwrite``, or a
            diverged loss (the last good checkpoint is kept).
    """
    request.check()
    distributed.setup(request.device)
    mask_path = distributed.on_main(lambda: _check_out_and_mask(request, overwrite))
    data = load_run_data(request)  # bad data fails before the output folder is touched
    out = distributed.on_main(lambda: _prepare_out(request, overwrite, mask_path))
    return _run(request, out, mask_path, on_epoch, data=data)


def _check_out_and_mask(request: RunRequest, overwrite: bool) -> str | None:
    check_output_dir(request.out, overwrite=overwrite)
    return _mask_path(request.mask)


def _prepare_out(request: RunRequest, overwrite: bool, mask_path: str | None) -> Path:
    out = prepare_output_dir(request.out, overwrite=overwrite)
    for stale in (CHECKPOINT, MODEL_DIR, RUN, METRICS, CURVES):
        _remove(out / stale)
    write_json(out / CONFIG, {"request": request.to_dict(), "mask_path": mask_path})
    return out


def resume_run(out_dir: str | Path, *, on_epoch: OnEpoch | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Continue a stopped run from its last checkpoint; it ends with the same weights as an unbroken run."""
    out = Path(out_dir)
    if not (out / CONFIG).is_file():
        raise CplError(f"--resume {out}: no {CONFIG} here (not a training run folder)")
    if (out / RUN).is_file():
        raise CplError(f"--resume {out}: this run already finished ({RUN} exists)")
    saved = json.loads((out / CONFIG).read_text(encoding="utf-8"))
    request = RunRequest.from_dict(saved["request"])
    request.config.show_progress = show_progress
    distributed.setup(request.device)
    return _run(request, out, saved["mask_path"], on_epoch, checkpoint=read_checkpoint(out))


def _mask_path(ref: str | None) -> str | None:
    if ref is None:
        return None
    from cpl_masks.registry import resolve_mask_path

    return str(Path(resolve_mask_path(ref)).resolve())


def load_run_data(request: RunRequest) -> RunData:
    """Read the injection, mastered and optional held-out question files."""
    return RunData(
        inject=load_questions(request.inject),
        mastered=load_questions(request.mastered),
        heldout=load_questions(request.heldout) if request.heldout else [],
    )


def resolve_scoring(requested: str | None, mask: Mask | None, inject_path: str, *, force: bool) -> str:
    """The scoring to train with: as asked, else the mask's, else ``split.json``'s, else ``letter``.

    Raises:
        CplError: the asked scoring differs from the one the mask was profiled with (unless ``force``).
    """
    recorded = mask.metadata.get("scoring") if mask is not None else None
    if requested is None:
        return recorded or recorded_scoring(inject_path) or "letter"
    if recorded and requested != recorded and not force:
        raise CplError(
            f"--scoring {requested}: the mask was profiled with {recorded} scoring; "
            "pass --force to train with another scoring anyway"
        )
    return requested


class _Evaluation:
    """Scores a run's question sets (and its retain text, and a mask's drift) at the current weights."""

    def __init__(self, request: RunRequest, trainer: Trainer, tokenizer: Any, data: RunData, mask: Mask | None):
        self.request, self.trainer, self.tokenizer, self.data, self.mask = request, trainer, tokenizer, data, mask
        self.retain_text = Path(request.retain_text).read_text(encoding="utf-8") if request.retain_text else None

    def scores(self, epoch: int) -> dict[str, Scores]:
        """Every set's scores after ``epoch``."""
        config = self.trainer.config
        with self.trainer.autocast():
            return evaluate_sets(
                self.trainer.model,
                self.trainer.scorer,
                self.data.sets(),
                batch_size=config.eval_batch_size,
                epoch=epoch,
                show_progress=config.show_progress,
            )

    def retain_loss(self) -> float | None:
        """Loss on the retain text, if the run has one."""
        if self.retain_text is None:
            return None
        with self.trainer.autocast():
            return text_loss(self.trainer.model, self.tokenizer, self.retain_text)

    def drift(self) -> dict[str, float] | None:
        """Agreement of the static mask with the sign rule at the current weights (``--track-drift``)."""
        if not self.request.track_drift or self.mask is None:
            return None
        data, trainer = self.data, self.trainer
        return sign_agreement(
            trainer.model,
            trainer.scorer,
            self.mask,
            data.mastered,
            data.inject,
            batch_size=trainer.config.eval_batch_size,
        )

    def row(self, epoch: int, baseline: Baseline, train_loss: float | None = None) -> dict[str, Any]:
        """The metrics row after ``epoch`` against the epoch-0 ``baseline`` (epoch 0 is the baseline itself)."""
        retain = baseline.retain_loss if epoch == 0 else self.retain_loss()
        current = baseline.scores if epoch == 0 else self.scores(epoch)
        row = epoch_metrics(
            epoch,
            baseline.scores,
            current,
            train_loss=train_loss,
            retain_loss=None if retain is None else (baseline.retain_loss, retain),
        )
        row["mask_agreement"] = self.drift()
        return row


@dataclass
class Baseline:
    """The untouched model's scores of every set and its retain-text loss: what epoch 0 is measured against."""

    scores: dict[str, Scores]
    retain_loss: float | None
    source: str  # "split" (taken from the split's scores.jsonl) or "scored"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the checkpoint."""
        return {**asdict(self), "scores": {name: asdict(scores) for name, scores in self.scores.items()}}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Baseline:
        """Rebuild a baseline saved by :meth:`to_dict`."""
        scores = {name: Scores(**entry) for name, entry in values["scores"].items()}
        return cls(scores=scores, retain_loss=values["retain_loss"], source=values["source"])


def _baseline(evaluation: _Evaluation, fingerprint: str) -> Baseline:
    """Epoch 0 from the split's own scores when they fit these weights and files, else scored now."""
    trainer, request = evaluation.trainer, evaluation.request
    known = split_scores(request.inject, evaluation.data.sets(), fingerprint=fingerprint, scoring=trainer.scorer.name)
    retain = evaluation.retain_loss()
    if known is not None:
        return Baseline(scores=known, retain_loss=retain, source="split")
    return Baseline(scores=evaluation.scores(0), retain_loss=retain, source="scored")


def _run(
    request: RunRequest,
    out: Path,
    mask_path: str | None,
    on_epoch: OnEpoch | None,
    checkpoint: dict[str, Any] | None = None,
    data: RunData | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    config, mode = request.config, request.resolved_mode()
    data = data or load_run_data(request)
    loaded = distributed.main_first(  # rank 0 fills the model cache, then the others read it
        lambda: load_model(request.model, dtype=request.dtype, device=request.device, threads=request.threads)
    )
    mask = Mask.load(mask_path, scores=False) if mask_path else None
    if mask is not None:
        mask.check_model(loaded.model, allow_other_weights=request.allow_other_weights)
    scoring = resolve_scoring(request.scoring, mask, request.inject, force=request.force)
    scorer = make_scorer(scoring, loaded.tokenizer)
    fingerprint = model_fingerprint(loaded.model)
    context = MethodContext(scorer, data.mastered, mask, batch_size=config.eval_batch_size, seed=config.seed)
    method = make_method(mode, context, request.method_options)
    trainer = Trainer(loaded.model, scorer, method, config)
    evaluation = _Evaluation(request, trainer, loaded.tokenizer, data, mask)
    if checkpoint is None:
        baseline, elapsed_before = _baseline(evaluation, fingerprint), 0.0
        rows = [evaluation.row(0, baseline)]
        _publish(out, rows, mode, on_epoch)
    else:
        baseline, rows = Baseline.from_dict(checkpoint["baseline"]), checkpoint["metrics"]
        elapsed_before = checkpoint["elapsed_s"]
        restore_checkpoint(trainer, checkpoint)
        distributed.on_main(lambda: write_jsonl(out / METRICS, rows))
    for epoch in range(len(rows), config.epochs + 1):
        try:
            loss = trainer.train_epoch(data.inject, epoch)
        except TrainingDiverged as error:
            kept = (
                f"the last good checkpoint (epoch {len(rows) - 1}) is in {out / CHECKPOINT}"
                if len(rows) > 1
                else "no epoch finished"
            )
            raise TrainingDiverged(f"{error}; stopped, {kept}; try a smaller --lr") from None
        rows.append(evaluation.row(epoch, baseline, train_loss=loss))
        elapsed = elapsed_before + time.perf_counter() - started
        if epoch < config.epochs or request.keep_weights:  # the last epoch's checkpoint only guards model/
            state = {"epoch": epoch, "metrics": rows, "baseline": baseline.to_dict(), "elapsed_s": elapsed}
            save_checkpoint(out, trainer, state)
        _publish(out, rows, mode, on_epoch)
    if request.keep_weights:
        weights = trainer.final_weights()  # gathered under FSDP2: every rank takes part
        distributed.on_main(lambda: save_model(method, trainer.model, loaded.tokenizer, out / MODEL_DIR, weights))
    payload = {
        "out_dir": str(out.resolve()),
        "model_dir": str((out / MODEL_DIR).resolve()) if request.keep_weights else None,
        "mode": mode,
        "method": {"name": mode, "options": asdict(method_options(mode, request.method_options)), **method.describe()},
        "mask_id": mask.id if mask is not None else None,
        "mask_path": mask_path,
        "collaborative_share": mask.collaborative_share() if mask is not None else None,
        "task": request.task_name,
        "model": {"ref": request.model, "fingerprint": fingerprint},
        "scoring": scoring,
        "baseline_source": baseline.source,
        "data": _data_summary(request, data),
        "args": request.to_dict(),
        "versions": package_versions(),
        "metrics": rows,
        "final": {key: rows[-1][key] for key in FINAL_KEYS},
        "trainable_entries": trainer.trainable_entries,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "resumed": checkpoint is not None,
        "time_s": round(elapsed_before + time.perf_counter() - started, 3),
        **peak_memory(loaded.device),
        "distributed": {**distributed.describe(), "wrapping": trainer.wrapping},
    }
    distributed.on_main(lambda: _finish(out, payload, mask_path, keep_weights=request.keep_weights))
    return payload


def _finish(out: Path, payload: dict[str, Any], mask_path: str | None, *, keep_weights: bool) -> None:
    """Write ``run.json``, drop unwanted checkpoints and record the run with its mask (rank 0's job)."""
    write_json(out / RUN, payload)
    if not keep_weights:
        _remove(out / CHECKPOINT)  # the run is finished and its weights are not wanted
    if mask_path is not None:
        from cpl_masks.registry import record_run

        record_run(Path(mask_path), payload)


def _data_summary(request: RunRequest, data: RunData) -> dict[str, Any]:
    files = {"inject": request.inject, "mastered": request.mastered, "heldout": request.heldout}
    return {
        name: {"sha256": questions_sha256(questions), "rows": len(questions), "path": files[name]}
        for name, questions in (
            ("inject", data.inject),
            ("mastered", data.mastered),
            ("heldout", data.heldout),
        )
        if questions
    }


def _publish(out: Path, rows: list[dict[str, Any]], mode: str, on_epoch: OnEpoch | None) -> None:
    """Rewrite ``metrics.jsonl`` and ``curves.png`` with every epoch so far, then report (rank 0 only)."""

    def publish() -> None:
        write_jsonl(out / METRICS, rows)
        draw_curves(rows, out / CURVES, title=f"{mode}: learned and forgotten per epoch")
        if on_epoch is not None:
            on_epoch(rows)

    distributed.on_main(publish)


def save_checkpoint(out: Path, trainer: Trainer, state: dict[str, Any]) -> None:
    """Write weights, optimizer and RNG state, then ``state.json`` naming them; drop older files.

    ``state.json`` is written last, so a crash at any point leaves the previous epoch's complete
    checkpoint in force. Every rank calls it (FSDP2 gathers the weights); rank 0 writes. Under FSDP2
    a stateful optimizer's state is sharded per rank and is not kept, so such a run cannot resume.
    """
    payload = {
        "weights": trainer.weights(),
        "optimizer": _optimizer_state(trainer),
        "rng": torch.get_rng_state(),
    }
    distributed.on_main(lambda: _write_checkpoint(out / CHECKPOINT, payload, state))


def _optimizer_state(trainer: Trainer) -> dict[str, Any] | None:
    """The optimizer's state dict, or None under FSDP2 when it holds per-rank shards (momentum, Adam)."""
    state = trainer.optimizer.state_dict()
    if trainer.wrapping == "fsdp2" and any(state["state"].values()):
        return None
    return state


def _write_checkpoint(folder: Path, payload: dict[str, Any], state: dict[str, Any]) -> None:
    name = f"trainer-{state['epoch']}.pt"
    with atomic_write(folder / name, "wb") as handle:
        torch.save(payload, handle)
    write_json(folder / STATE, {**state, "file": name})
    for old in folder.glob("trainer-*.pt"):
        if old.name != name:
            old.unlink()


def read_checkpoint(out: Path) -> dict[str, Any] | None:
    """The last checkpoint's state (its tensors under ``payload``), or None before an epoch ends."""
    state_file = out / CHECKPOINT / STATE
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text(encoding="utf-8"))
    state["payload"] = torch.load(out / CHECKPOINT / state["file"], map_location="cpu", weights_only=True)
    return state


def restore_checkpoint(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Put a checkpoint's weights, optimizer state and RNG state back."""
    payload = checkpoint["payload"]
    if payload["optimizer"] is None:
        raise CplError(
            "--resume: this run trained under --distributed fsdp2 with a stateful optimizer, whose sharded "
            "state was not checkpointed; start it again (or train with ddp or plain sgd)"
        )
    trainer.load_weights(payload["weights"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"])


def save_model(
    method: Method, model: torch.nn.Module, tokenizer: Any, folder: Path, weights: dict[str, torch.Tensor] | None = None
) -> None:
    """The method's result (weights, or an adapter) and the tokenizer into ``folder``, via a staging folder.

    ``weights``, when given, are the whole weights to save instead of the model's own parameters
    (under FSDP2, where each rank holds only shards and rank 0 has gathered them).
    """
    staging = folder.with_name(f".{folder.name}-staging")
    _remove(staging)
    if weights is None:
        method.save(model, staging)
    else:
        model.save_pretrained(staging, state_dict=weights)
    tokenizer.save_pretrained(staging)
    _remove(folder)
    staging.rename(folder)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def read_run(folder: str | Path) -> dict[str, Any]:
    """The ``run.json`` payload of a finished run folder."""
    path = Path(folder) / RUN
    if not path.is_file():
        raise CplError(f"{folder}: no {RUN} (not a finished training run)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CplError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
