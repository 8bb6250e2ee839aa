"""A training run on disk: its folder, per-epoch checkpoints and evaluation, resume, and ``run.json``.

The output folder holds ``config.json`` (the request with absolute paths, the inputs' content
hashes and the mask's id; written once every check has passed, before the first epoch, so a killed
run resumes from any working directory), ``checkpoint/`` (weights, optimizer and RNG state, metrics
and the epoch-0 baseline of the last finished epoch), ``metrics.jsonl``, ``questions.jsonl`` (each
question's correctness, score and margin at every evaluated epoch) and ``curves.png`` (rewritten
after every evaluated epoch), and at the end ``model/`` (the method's ``save``: safetensors
weights, or a LoRA adapter, and the tokenizer) and ``run.json``.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cpl_masks import distributed
from cpl_masks.data import Question, load_questions, questions_sha256
from cpl_masks.errors import CplError
from cpl_masks.evaluate import QUESTIONS, draw_curves, epoch_metrics, evaluate_sets, question_records, text_loss
from cpl_masks.files import atomic_write, check_output_dir, check_writable_folder, sha256_file, write_json, write_jsonl
from cpl_masks.masks import Mask, read_header
from cpl_masks.methods import METHODS, Method, MethodContext, make_method, method_options
from cpl_masks.models import LoadedModel, load_model, model_fingerprint
from cpl_masks.profile import peak_memory, sign_agreement
from cpl_masks.registry import Registry
from cpl_masks.registry.names import run_task
from cpl_masks.scoring import Scores, make_scorer
from cpl_masks.split import resolve_scoring, split_scores
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
    eval_every: int = 1  # evaluate after every K-th epoch (and always after the last)
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
        if not (isinstance(self.eval_every, int) and self.eval_every >= 1):
            raise CplError(f"--eval-every {self.eval_every}: must be a whole number of epochs, at least 1")
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

    def to_dict(self) -> dict[str, Any]:
        """The request as plain JSON values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunRequest:
        """Rebuild a request saved by :meth:`to_dict`."""
        return cls(**{**values, "config": TrainConfig(**values["config"])})

    def evaluates_after(self, epoch: int) -> bool:
        """Whether ``epoch`` is evaluated: every ``eval_every``-th epoch and the last one."""
        return epoch % self.eval_every == 0 or epoch == self.config.epochs


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


def start_run(
    request: RunRequest,
    *,
    overwrite: bool = False,
    on_epoch: OnEpoch | None = None,
    registry: Registry | None = None,
) -> dict[str, Any]:
    """Train as ``request`` says into a fresh output folder; returns the ``run.json`` payload.

    Every check runs before the folder is touched: the options, the folder (it can be created and
    written), the data, the mask, the model and the mask against the model. Only then is
    ``config.json`` written, so a refused run leaves nothing behind. A folder holding only a run that
    stopped before its first checkpoint (:func:`restartable`) is started again without ``overwrite``.
    Local files are saved by absolute path with their content hashes, so the run resumes from anywhere.
    ``registry`` (None: the one in ``$CPL_MASKS_HOME``) is checked first, looks up a mask given by
    name and records the finished run with its mask.

    Raises:
        CplError: for bad options, data or mask, a non-empty folder without ``overwrite``, a folder
            that cannot be written, a broken registry, or a diverged loss (the last good checkpoint is kept).
    """
    request.check()
    registry = registry or Registry()
    distributed.setup(request.device)
    mask_path = distributed.on_main(lambda: _check_out_and_mask(request, overwrite, registry))
    request = _with_absolute_paths(request)
    session = _open(request, load_run_data(request), mask_path)
    out = distributed.on_main(lambda: _prepare_out(session, overwrite))
    return _run(session, out, on_epoch, registry=registry)


def _check_out_and_mask(request: RunRequest, overwrite: bool, registry: Registry) -> str | None:
    """Check the output folder and, for a run with a mask (which it records), the registry; find the mask."""
    _check_out(Path(request.out), overwrite)
    if request.mask is None:
        return None
    registry.check()
    return str(registry.resolve(request.mask).resolve())


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that holds other work (unless ``overwrite``) or cannot be created and written."""
    if not restartable(out):
        check_output_dir(out, overwrite=overwrite)
    check_writable_folder(out, what=f"--out {out}")


def restartable(folder: str | Path) -> bool:
    """Whether ``folder`` holds only a run that stopped before its first checkpoint, so it may start again.

    Such a folder has our ``config.json``, at most epoch 0's ``metrics.jsonl``, ``questions.jsonl`` and
    ``curves.png``, and a ``checkpoint/`` whose ``state.json`` was never written: no finished epoch, nothing of the
    user's, so starting the run again there needs no ``--overwrite``.
    """
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or (folder / CHECKPOINT / STATE).exists():
        return False
    if any(path.name not in (CONFIG, METRICS, QUESTIONS, CURVES, CHECKPOINT) for path in folder.iterdir()):
        return False
    try:
        return isinstance(json.loads((folder / CONFIG).read_text(encoding="utf-8")).get("request"), dict)
    except (ValueError, AttributeError):  # not JSON, or not an object: not our config.json
        return False


def _with_absolute_paths(request: RunRequest) -> RunRequest:
    """``request`` with its local files and folders as absolute paths, so a resume finds them from anywhere."""

    def absolute(source: str | None) -> str | None:
        return str(Path(source).resolve()) if source is not None and Path(source).exists() else source

    return replace(
        request,
        inject=absolute(request.inject),
        mastered=absolute(request.mastered),
        heldout=absolute(request.heldout),
        retain_text=absolute(request.retain_text),
        model=absolute(request.model),
        out=str(Path(request.out).resolve()),
    )


def _prepare_out(session: _Session, overwrite: bool) -> Path:
    """Create the folder, drop a stopped run's leftovers and write ``config.json``: the run starts here."""
    out = Path(session.request.out)
    _check_out(out, overwrite)  # again: the folder may have changed while the model loaded
    out.mkdir(parents=True, exist_ok=True)
    for stale in (CHECKPOINT, MODEL_DIR, RUN, METRICS, QUESTIONS, CURVES):
        _remove(out / stale)
    write_json(out / CONFIG, {"request": session.request.to_dict(), **session.saved_inputs(), "resume_changes": []})
    return out


def resume_run(
    out_dir: str | Path,
    *,
    on_epoch: OnEpoch | None = None,
    show_progress: bool = True,
    lr: float | None = None,
    epochs: int | None = None,
    registry: Registry | None = None,
) -> dict[str, Any]:
    """Continue a stopped run from its last checkpoint; it ends with the same weights as an unbroken run.

    A run stopped before its first checkpoint starts again from epoch 0 with its saved options.
    ``lr`` and ``epochs``, when given, replace the saved ones from the checkpoint on (a smaller
    learning rate after a diverged loss; more epochs to train further); each change is recorded
    under ``resume_changes`` in ``config.json`` and ``run.json``. The data, retain text and model are
    read again from their saved absolute paths and the mask from its saved path or, when that file
    is gone or holds other bits, from the registry by its content id; each must hold what it held
    when the run started.

    Raises:
        CplError: not a run folder, a finished run, fewer ``epochs`` than already trained, a bad
            value, or an input that is gone or changed (naming the file or mask).
    """
    out = Path(out_dir)
    saved = _saved_config(out)
    request = RunRequest.from_dict(saved["request"])
    request.config.show_progress = show_progress
    state = _checkpoint_state(out)
    change = _change_config(request.config, state["epoch"] if state else 0, lr=lr, epochs=epochs)
    request.check()
    check_writable_folder(out, what=f"--out {out}")
    distributed.setup(request.device)
    data = _reload_data(out, request, saved.get("sha256"))
    registry = registry or Registry()
    if saved["mask_path"] is not None:
        distributed.on_main(registry.check)  # it records the finished run
    mask_path = distributed.on_main(lambda: _find_mask(out, saved["mask_path"], saved.get("mask_id"), registry))
    session = _open(request, data, mask_path, fingerprint=saved.get("model_fingerprint"))
    changes = [*saved.get("resume_changes", []), *([change] if change else [])]
    if change:
        config = {**saved, "request": request.to_dict(), "resume_changes": changes}
        distributed.on_main(lambda: write_json(out / CONFIG, config))
    checkpoint = read_checkpoint(out)
    return _run(session, out, on_epoch, checkpoint=checkpoint, resume_changes=changes, registry=registry)


def _saved_config(out: Path) -> dict[str, Any]:
    """The ``config.json`` of the stopped run in ``out``, refusing a folder that holds none or a finished run."""
    if not (out / CONFIG).is_file():
        raise CplError(f"--resume {out}: no {CONFIG} here (not a training run folder)")
    if (out / RUN).is_file():
        raise CplError(f"--resume {out}: this run already finished ({RUN} exists)")
    try:
        return json.loads((out / CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CplError(f"{out / CONFIG}: not valid JSON ({error.msg} at line {error.lineno})") from error


def _change_config(config: TrainConfig, done: int, *, lr: float | None, epochs: int | None) -> dict[str, Any] | None:
    """Put a resume's new ``lr`` and ``epochs`` into ``config``; returns the change as recorded, or None.

    Raises:
        CplError: fewer epochs than the ``done`` ones, or a value :meth:`TrainConfig.check` refuses.
    """
    if epochs is not None and epochs < done:
        raise CplError(f"--epochs {epochs}: the run has already trained {done}; give at least {done}")
    change: dict[str, Any] = {}
    for name, value in (("lr", lr), ("epochs", epochs)):
        if value is not None and value != getattr(config, name):
            change[name] = [getattr(config, name), value]
            setattr(config, name, value)
    config.check()
    return {"at_epoch": done, **change} if change else None


def _reload_data(out: Path, request: RunRequest, hashes: dict[str, str] | None) -> RunData:
    """The question sets read again from their saved paths and checked against their saved hashes.

    A ``config.json`` written before hashes were saved (``hashes`` None) is trusted as it is.
    """
    try:
        data = load_run_data(request)
    except CplError as error:
        raise CplError(f"--resume {out}: cannot read the run's data again: {error}") from None
    if hashes is not None:
        found = _input_hashes(request, data)
        for name, expected in hashes.items():
            if found.get(name) != expected:
                raise CplError(
                    f"--resume {out}: {getattr(request, name)} ({name}) has changed since the run started "
                    f"(sha256 {expected[:12]}, now {(found.get(name) or 'nothing')[:12]})"
                )
    return data


def _input_hashes(request: RunRequest, data: RunData) -> dict[str, str]:
    """sha256 of each question set's questions and of the retain text's bytes, by request field."""
    hashes = {name: questions_sha256(questions) for name, questions in data.sets().items()}
    if request.retain_text is not None:
        hashes["retain_text"] = sha256_file(request.retain_text)
    return hashes


def _find_mask(out: Path, saved_path: str | None, mask_id: str | None, registry: Registry) -> str | None:
    """The run's mask file: the saved path while it holds mask ``mask_id``, else ``registry``'s copy of it.

    Without a saved ``mask_id`` (an older ``config.json``) the saved path is taken as it is.
    """
    if saved_path is None or mask_id is None or _mask_id_at(saved_path) == mask_id:
        return saved_path
    try:
        found = str(registry.resolve(mask_id).resolve())
    except CplError as error:
        found, reason = None, str(error)
    else:
        reason = f"the registry's {found} holds other bits"
    if found is None or _mask_id_at(found) != mask_id:
        raise CplError(
            f"--resume {out}: mask {mask_id[:12]} is no longer at {saved_path} (gone or other bits) "
            f"and cannot be found by its id: {reason}"
        )
    return found


def _mask_id_at(path: str) -> str | None:
    """The content id of the mask file at ``path``, or None when there is none."""
    try:
        return read_header(path)["id"]
    except CplError:
        return None


def load_run_data(request: RunRequest) -> RunData:
    """Read the injection, mastered and optional held-out question files."""
    return RunData(
        inject=load_questions(request.inject),
        mastered=load_questions(request.mastered),
        heldout=load_questions(request.heldout) if request.heldout else [],
    )


class _Evaluation:
    """Scores a run's question sets (and its retain text, and a mask's drift) at the current weights."""

    def __init__(
        self, request: RunRequest, trainer: Trainer, tokenizer: Any, data: RunData, mask: Mask | None, fingerprint: str
    ):
        self.request, self.trainer, self.tokenizer, self.data, self.mask = request, trainer, tokenizer, data, mask
        self.fingerprint = fingerprint
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

    def drift(self, epoch: int) -> dict[str, Any] | None:
        """Agreement of the static mask with the sign rule at the current weights (``--track-drift``).

        At epoch 0 a mask cut by the plain sign rule from these very weights and questions agrees by
        construction: that is recorded without profiling again (two gradient passes).
        """
        if not self.request.track_drift or self.mask is None:
            return None
        if epoch == 0 and self.profiled_here():
            return {"all": 1.0, "touched": 1.0, "by_construction": True}
        data, trainer = self.data, self.trainer
        return sign_agreement(
            trainer.model,
            trainer.scorer,
            self.mask,
            data.mastered,
            data.inject,
            batch_size=trainer.config.eval_batch_size,
        )

    def profiled_here(self) -> bool:
        """Whether the mask was cut by the plain sign rule from this run's weights, scoring and questions."""
        metadata = (self.mask.metadata if self.mask is not None else None) or {}
        rule, data = metadata.get("rule") or {}, metadata.get("data") or {}
        plain = rule.get("threshold") == 0.0 and not any(
            rule.get(key) for key in ("keep_fraction", "freeze_pattern", "train_pattern")
        )
        same_data = all(
            isinstance(data.get(name), dict) and data[name].get("sha256") == questions_sha256(questions)
            for name, questions in (("mastered", self.data.mastered), ("inject", self.data.inject))
        )
        same_model = (metadata.get("model") or {}).get("fingerprint") == self.fingerprint
        return plain and same_data and same_model and metadata.get("scoring") == self.trainer.scorer.name

    def evaluate(
        self, epoch: int, baseline: Baseline, train_loss: float | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The metrics row after ``epoch`` against the epoch-0 ``baseline`` (epoch 0 is the baseline itself),
        and the per-question records of that evaluation."""
        retain = baseline.retain_loss if epoch == 0 else self.retain_loss()
        current = baseline.scores if epoch == 0 else self.scores(epoch)
        row = epoch_metrics(
            epoch,
            baseline.scores,
            current,
            train_loss=train_loss,
            retain_loss=None if retain is None else (baseline.retain_loss, retain),
        )
        row["mask_agreement"] = self.drift(epoch)
        return row, question_records(epoch, self.data.sets(), current)


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


@dataclass
class _Session:
    """A run's inputs loaded and checked against each other: all it needs before its folder is written."""

    request: RunRequest
    data: RunData
    loaded: LoadedModel
    mask: Mask | None
    mask_path: str | None
    scoring: str
    fingerprint: str
    method: Method
    trainer: Trainer
    evaluation: _Evaluation

    def saved_inputs(self) -> dict[str, Any]:
        """What ``config.json`` keeps to find and check the inputs again on resume."""
        return {
            "mask_path": self.mask_path,
            "mask_id": self.mask.id if self.mask is not None else None,
            "sha256": _input_hashes(self.request, self.data),
            "model_fingerprint": self.fingerprint,
        }


def _open(request: RunRequest, data: RunData, mask_path: str | None, *, fingerprint: str | None = None) -> _Session:
    """Load the model and mask, check them against each other and build the method and trainer.

    ``fingerprint``, on resume, is the model's when the run started; other weights are refused.
    """
    config, mode = request.config, request.resolved_mode()
    mask = Mask.load(mask_path, scores=False) if mask_path else None
    mask_scoring = mask.metadata.get("scoring") if mask is not None else None
    scoring = resolve_scoring(request.scoring, mask_scoring=mask_scoring, data_path=request.inject, force=request.force)
    loaded = distributed.main_first(  # rank 0 fills the model cache, then the others read it
        lambda: load_model(request.model, dtype=request.dtype, device=request.device, threads=request.threads)
    )
    found = model_fingerprint(loaded.model)
    if mask is not None:
        mask.check_model(loaded.model, allow_other_weights=request.allow_other_weights, fingerprint=found)
    if fingerprint is not None and found != fingerprint:
        raise CplError(
            f"--resume: model {request.model} has other weights than when the run started "
            f"(fingerprint {fingerprint[:12]}, now {found[:12]})"
        )
    scorer = make_scorer(scoring, loaded.tokenizer)
    scorer.check_fits(loaded.model, [question for questions in data.sets().values() for question in questions])
    context = MethodContext(scorer, data.mastered, mask, batch_size=config.eval_batch_size, seed=config.seed)
    method = make_method(mode, context, request.method_options)
    trainer = Trainer(loaded.model, scorer, method, config)
    evaluation = _Evaluation(request, trainer, loaded.tokenizer, data, mask, found)
    return _Session(request, data, loaded, mask, mask_path, scoring, found, method, trainer, evaluation)


def _run(
    session: _Session,
    out: Path,
    on_epoch: OnEpoch | None,
    *,
    registry: Registry,
    checkpoint: dict[str, Any] | None = None,
    resume_changes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train the epochs ``session`` has left (from ``checkpoint``, if any), save the model, write ``run.json``."""
    started = time.perf_counter()
    request, trainer, evaluation = session.request, session.trainer, session.evaluation
    config, mode = request.config, request.resolved_mode()
    if checkpoint is None:
        baseline, elapsed_before, done = _baseline(evaluation, session.fingerprint), 0.0, 0
        row, records = evaluation.evaluate(0, baseline)
        rows = [row]
        _publish(out, rows, records, mode, on_epoch)
    else:
        baseline, rows = Baseline.from_dict(checkpoint["baseline"]), checkpoint["metrics"]
        records, done = checkpoint.get("records", []), checkpoint["epoch"]
        elapsed_before = checkpoint["elapsed_s"]
        restore_checkpoint(trainer, checkpoint)
        distributed.on_main(lambda: (write_jsonl(out / METRICS, rows), write_jsonl(out / QUESTIONS, records)))
    for epoch in range(done + 1, config.epochs + 1):
        try:
            loss = trainer.train_epoch(session.data.inject, epoch)
        except TrainingDiverged as error:
            raise TrainingDiverged(f"{error}; stopped, {_diverged_advice(out, epoch - 1)}") from None
        evaluated = request.evaluates_after(epoch)
        if evaluated:
            row, new_records = evaluation.evaluate(epoch, baseline, train_loss=loss)
            rows.append(row)
            records.extend(new_records)
        elapsed = elapsed_before + time.perf_counter() - started
        if epoch < config.epochs or request.keep_weights:  # the last epoch's checkpoint only guards model/
            state = {
                "epoch": epoch,
                "metrics": rows,
                "records": records,
                "baseline": baseline.to_dict(),
                "elapsed_s": elapsed,
            }
            save_checkpoint(out, trainer, state)
        if evaluated:
            _publish(out, rows, records, mode, on_epoch)
    if request.keep_weights:
        weights = trainer.final_weights()  # gathered under FSDP2: every rank takes part
        tokenizer = session.loaded.tokenizer
        distributed.on_main(lambda: save_model(session.method, trainer.model, tokenizer, out / MODEL_DIR, weights))
    payload = {
        **_payload(session, out, baseline, rows),
        "resumed": checkpoint is not None,
        "resume_changes": resume_changes or [],
        "time_s": round(elapsed_before + time.perf_counter() - started, 3),
    }
    distributed.on_main(lambda: _finish(out, payload, session.mask_path, registry, keep_weights=request.keep_weights))
    return payload


def _finish(
    out: Path, payload: dict[str, Any], mask_path: str | None, registry: Registry, *, keep_weights: bool
) -> None:
    """Write ``run.json``, drop unwanted checkpoints and record the run with its mask in ``registry`` (rank 0's job)."""
    write_json(out / RUN, payload)
    if not keep_weights:
        _remove(out / CHECKPOINT)  # the run is finished and its weights are not wanted
    if mask_path is not None:
        registry.record_run(Path(mask_path), payload)


def _diverged_advice(out: Path, done: int) -> str:
    """What a diverged run keeps, and how to go on from it with a smaller learning rate."""
    kept = f"the last good checkpoint (epoch {done}) is in {out / CHECKPOINT}" if done else "no epoch finished"
    return f"{kept}; try a smaller --lr: cpl-masks train --resume {out} --lr SMALLER"


def _payload(session: _Session, out: Path, baseline: Baseline, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``run.json`` record of a finished run: what it trained, on what, and every epoch's metrics."""
    request, mask, trainer = session.request, session.mask, session.trainer
    mode = request.resolved_mode()
    data = _data_summary(request, session.data)
    return {
        "out_dir": str(out.resolve()),
        "model_dir": str((out / MODEL_DIR).resolve()) if request.keep_weights else None,
        "mode": mode,
        "method": {
            "name": mode,
            "options": asdict(method_options(mode, request.method_options)),
            **session.method.describe(),
        },
        "mask_id": mask.id if mask is not None else None,
        "mask_path": session.mask_path,
        "collaborative_share": mask.collaborative_share() if mask is not None else None,
        "task": run_task(
            request.task,
            request.inject,
            inject_sha256=data["inject"]["sha256"],
            mask=mask.metadata if mask is not None else None,
        ),
        "model": {"ref": request.model, "fingerprint": session.fingerprint},
        "scoring": session.scoring,
        "baseline_source": baseline.source,
        "data": data,
        "args": request.to_dict(),
        "versions": package_versions(),
        "metrics": rows,
        "final": {key: rows[-1][key] for key in FINAL_KEYS},
        "trainable_entries": trainer.trainable_entries,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        **peak_memory(session.loaded.device),
        "distributed": {**distributed.describe(), "wrapping": trainer.wrapping},
    }


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


def _publish(
    out: Path, rows: list[dict[str, Any]], records: list[dict[str, Any]], mode: str, on_epoch: OnEpoch | None
) -> None:
    """Rewrite ``metrics.jsonl``, ``questions.jsonl`` and ``curves.png`` with every evaluated epoch so far,
    then report (rank 0 only)."""

    def publish() -> None:
        write_jsonl(out / METRICS, rows)
        write_jsonl(out / QUESTIONS, records)
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
    state = _checkpoint_state(out)
    if state is not None:
        state["payload"] = torch.load(out / CHECKPOINT / state["file"], map_location="cpu", weights_only=True)
    return state


def _checkpoint_state(out: Path) -> dict[str, Any] | None:
    """The last checkpoint's ``state.json`` (its epoch, metrics and baseline; no tensors), or None."""
    state_file = out / CHECKPOINT / STATE
    return json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else None


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
    for group in trainer.optimizer.param_groups:  # the saved state carries the old rate; a resume may change it
        group["lr"] = trainer.config.lr
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
