"""The training-run recipe: check a request, open its inputs, train epoch by epoch, evaluate, record.

Read top to bottom, :func:`start_run` checks everything before the run folder is touched
(:mod:`cpl_masks.training.request`, :mod:`cpl_masks.training.folder`), loads the model and mask and checks
them against each other (:func:`_open`), then :func:`_run` trains the epochs, evaluates after each
evaluated epoch (:mod:`cpl_masks.training.evaluation`), checkpoints, and writes ``run.json`` (a
:class:`~cpl_masks.training.record.RunRecord`).
:func:`resume_run` replays a stopped run from its ``config.json`` and last checkpoint.

Under ``torchrun`` every rank runs all of this (trains its share, evaluates its share), but only
rank 0 writes files and registry rows; the others wait for it. Both entries take the
:class:`~cpl_masks.utils.distributed.Processes` from :func:`~cpl_masks.utils.distributed.setup` once and hand it
to the helpers, which write through its ``on_main``.

Epoch 0 is the untouched model. When the run trains on a split's own files with the split's model
and scoring, it is read from the split's ``scores.jsonl`` rather than scored again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpl_masks.data.questions import questions_sha256
from cpl_masks.data.split import resolve_scoring
from cpl_masks.errors import CplError
from cpl_masks.evaluation.outcomes import QUESTIONS, draw_curves
from cpl_masks.masks.format import Mask
from cpl_masks.methods import Method, MethodContext, make_method, method_options
from cpl_masks.models import LoadedModel, load_model, model_fingerprint
from cpl_masks.profiling.freeze_mask import peak_memory
from cpl_masks.profiling.retain import retain_measure, retain_questions
from cpl_masks.registry import Registry
from cpl_masks.registry.names import run_task
from cpl_masks.scoring.scorers import check_scoring_name, make_scorer
from cpl_masks.training.evaluation import Baseline, RunEvaluation, epoch_zero
from cpl_masks.training.folder import (
    CHECKPOINT,
    CONFIG,
    CURVES,
    MADE_MASKS,
    METRICS,
    MODEL_DIR,
    check_out_and_mask_file,
    check_out_folder,
    checkpoint_state,
    claimed,
    find_mask_file,
    keep_made_masks,
    made_masks,
    read_checkpoint,
    remove_path,
    restore_checkpoint,
    run_inputs,
    save_checkpoint,
    save_model,
    saved_config,
    saved_request,
)
from cpl_masks.training.loop import TrainingDiverged, TrainingLoop, optimizer_state_bytes
from cpl_masks.training.record import FINAL_KEYS, RUN, RunRecord
from cpl_masks.training.request import (
    RunData,
    RunRequest,
    change_config,
    input_hashes,
    load_run_data,
    reload_data,
    with_absolute_paths,
)
from cpl_masks.utils import distributed
from cpl_masks.utils.distributed import Processes
from cpl_masks.utils.files import check_writable_folder, write_json, write_jsonl
from cpl_masks.utils.versions import package_versions

OnEpoch = Callable[[list[dict[str, Any]]], None]


def start_run(
    request: RunRequest,
    *,
    overwrite: bool = False,
    on_epoch: OnEpoch | None = None,
    registry: Registry | None = None,
) -> RunRecord:
    """Train as ``request`` says into a fresh output folder; returns its record (what ``run.json`` holds).

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
    processes = distributed.setup(request.device)
    mask_path = processes.on_main(lambda: check_out_and_mask_file(request, overwrite, registry))
    request = with_absolute_paths(request)
    with claimed(processes, Path(request.out), mask_path, registry):
        session = _open(processes, request, load_run_data(request), mask_path)
        out = processes.on_main(lambda: _prepare_out(session, overwrite))
        return _run(processes, session, out, on_epoch, registry=registry)


def _prepare_out(session: _Session, overwrite: bool) -> Path:
    """Create the folder, drop a stopped run's leftovers and write ``config.json``: the run starts here."""
    out = Path(session.request.out)
    check_out_folder(out, overwrite, inputs=run_inputs(session.request, session.mask_path))  # it may have changed
    out.mkdir(parents=True, exist_ok=True)
    for stale in (CHECKPOINT, MODEL_DIR, RUN, METRICS, QUESTIONS, CURVES, MADE_MASKS):
        remove_path(out / stale)
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
) -> RunRecord:
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
    saved = saved_config(out)
    request = saved_request(out, saved)  # a damaged or refused saved value names config.json
    request.config.show_progress = show_progress
    state = checkpoint_state(out)
    change = change_config(request.config, state["epoch"] if state else 0, lr=lr, epochs=epochs)
    request.check()
    check_writable_folder(out, what=f"--out {out}")
    processes = distributed.setup(request.device)
    data = reload_data(out, request, saved.get("sha256"))
    registry = registry or Registry()
    if saved["mask_path"] is not None:
        processes.on_main(registry.check)  # it records the finished run
    mask_path = processes.on_main(lambda: find_mask_file(out, saved["mask_path"], saved.get("mask_id"), registry))
    with claimed(processes, out, mask_path, registry):
        session = _open(processes, request, data, mask_path, fingerprint=saved.get("model_fingerprint"))
        changes = [*saved.get("resume_changes", []), *([change] if change else [])]
        if change:
            config = {**saved, "request": request.to_dict(), "resume_changes": changes}
            processes.on_main(lambda: write_json(out / CONFIG, config))
        checkpoint = read_checkpoint(out)
        return _run(processes, session, out, on_epoch, checkpoint=checkpoint, resume_changes=changes, registry=registry)


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
    trainer: TrainingLoop
    evaluation: RunEvaluation

    def saved_inputs(self) -> dict[str, Any]:
        """What ``config.json`` keeps to find and check the inputs again on resume."""
        return {
            "mask_path": self.mask_path,
            "mask_id": self.mask.id if self.mask is not None else None,
            "sha256": input_hashes(self.request, self.data),
            "model_fingerprint": self.fingerprint,
        }


def _open(
    processes: Processes, request: RunRequest, data: RunData, mask_path: str | None, *, fingerprint: str | None = None
) -> _Session:
    """Load the model and mask, check them against each other and build the method and trainer.

    ``fingerprint``, on resume, is the model's when the run started; other weights are refused.
    """
    config, mode = request.config, request.resolved_mode()
    mask = Mask.load(mask_path, scores=False) if mask_path else None
    if mask is not None:
        mask.require_kind("retain" if request.retain is not None else "mask", request.mask_file_option)
    retained = retain_questions(mask) if mask is not None and mask.kind == "retain" else None
    if retained is not None:
        retain_measure(mask, request.method_options)  # an option the file contradicts, refused before the model loads
    scoring = _scoring(request, mask, mask_path)
    loaded = processes.main_first(  # rank 0 fills the model cache, then the others read it
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
    scorer = make_scorer(scoring, loaded.tokenizer, loss_on=request.loss_on)
    steering = retained if retained is not None else data.mastered  # the questions g_M is measured on
    scorer.check_fits(
        loaded.model, [*(question for questions in data.sets().values() for question in questions), *(retained or [])]
    )
    context = MethodContext(
        scorer, steering, mask, inject=data.inject, batch_size=config.eval_batch_size, seed=config.seed
    )
    method = make_method(mode, context, request.method_options)
    trainer = TrainingLoop(loaded.model, scorer, method, config)
    evaluation = RunEvaluation(request, trainer, loaded.tokenizer, data, mask, found)
    return _Session(request, data, loaded, mask, mask_path, scoring, found, method, trainer, evaluation)


def _scoring(request: RunRequest, mask: Mask | None, mask_path: str | None) -> str:
    """The run's scoring (:func:`resolve_scoring`), a name not given as ``--scoring`` refused naming its file."""
    mask_scoring = mask.metadata.get("scoring") if mask is not None else None
    if request.scoring is None and mask_scoring is not None:
        check_scoring_name(mask_scoring, f"{request.mask_file_option} {mask_path}: the scoring its metadata records")
    scoring = resolve_scoring(request.scoring, mask_scoring=mask_scoring, data_path=request.inject, force=request.force)
    if request.scoring is None and mask_scoring is None:
        check_scoring_name(scoring, f"{Path(request.inject).parent / 'split.json'}: the scoring it records")
    return scoring


def _run(
    processes: Processes,
    session: _Session,
    out: Path,
    on_epoch: OnEpoch | None,
    *,
    registry: Registry,
    checkpoint: dict[str, Any] | None = None,
    resume_changes: list[dict[str, Any]] | None = None,
) -> RunRecord:
    """Train the epochs ``session`` has left (from ``checkpoint``, if any), save the model, write ``run.json``."""
    started = time.perf_counter()
    request, trainer, evaluation = session.request, session.trainer, session.evaluation
    config, mode = request.config, request.resolved_mode()
    if checkpoint is None:
        baseline, elapsed_before, done = epoch_zero(evaluation, session.fingerprint), 0.0, 0
        row, records = evaluation.evaluate(0, baseline)
        rows = [row]
        _publish(processes, out, rows, records, mode, on_epoch)
    else:
        baseline, rows = Baseline.from_dict(checkpoint["baseline"]), checkpoint["metrics"]
        records, done = checkpoint.get("records", []), checkpoint["epoch"]
        elapsed_before = checkpoint["elapsed_s"]
        restore_checkpoint(trainer, checkpoint)
        processes.on_main(lambda: (write_jsonl(out / METRICS, rows), write_jsonl(out / QUESTIONS, records)))
    for epoch in range(done + 1, config.epochs + 1):
        try:
            loss = trainer.train_epoch(session.data.inject, epoch)
        except TrainingDiverged as error:
            raise TrainingDiverged(f"{error}; stopped, {_diverged_advice(out, epoch - 1)}") from None
        processes.on_main(lambda: keep_made_masks(out, session.method.made_masks()))
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
            save_checkpoint(processes, out, trainer, state)
        if evaluated:
            _publish(processes, out, rows, records, mode, on_epoch)
    if request.keep_weights:
        weights = trainer.final_weights()  # gathered under FSDP2: every rank takes part
        tokenizer = session.loaded.tokenizer
        processes.on_main(lambda: save_model(session.method, trainer.model, tokenizer, out / MODEL_DIR, weights))
    record = _record(
        session,
        out,
        baseline,
        rows,
        resumed=checkpoint is not None,
        resume_changes=resume_changes or [],
        time_s=round(elapsed_before + time.perf_counter() - started, 3),
    )
    processes.on_main(lambda: _finish(out, record, session.mask_path, registry, keep_weights=request.keep_weights))
    return record


def _finish(out: Path, record: RunRecord, mask_path: str | None, registry: Registry, *, keep_weights: bool) -> None:
    """Write ``run.json``, drop unwanted checkpoints and record the run with its mask in ``registry`` (rank 0's job);
    masks the method made while training are registered as children of the run's mask."""
    record.write(out)
    if not keep_weights:
        remove_path(out / CHECKPOINT)  # the run is finished and its weights are not wanted
    if mask_path is not None:
        registry.record_run(Path(mask_path), record.to_dict())  # the registry keeps the JSON of any version
    for made in record.made_masks:
        registry.register(Path(made["path"]))  # filed as <model>/<task>.reprofiled


def _diverged_advice(out: Path, done: int) -> str:
    """What a diverged run keeps, and how to go on from it with a smaller learning rate."""
    kept = f"the last good checkpoint (epoch {done}) is in {out / CHECKPOINT}" if done else "no epoch finished"
    return f"{kept}; try a smaller --lr: cpl-masks train --resume {out} --lr SMALLER"


def _record(
    session: _Session,
    out: Path,
    baseline: Baseline,
    rows: list[dict[str, Any]],
    *,
    resumed: bool,
    resume_changes: list[dict[str, Any]],
    time_s: float,
) -> RunRecord:
    """The record of a finished run (``run.json``): what it trained, on what, every epoch's metrics and its cost."""
    request, mask, trainer = session.request, session.mask, session.trainer
    mode = request.resolved_mode()
    data = _data_summary(request, session.data)
    return RunRecord(
        out_dir=str(out.resolve()),
        model_dir=str((out / MODEL_DIR).resolve()) if request.keep_weights else None,
        mode=mode,
        method={
            "name": mode,
            "options": asdict(method_options(mode, request.method_options)),
            **session.method.describe(),
        },
        mask_id=mask.id if mask is not None else None,
        mask_path=session.mask_path,
        made_masks=made_masks(out),
        collaborative_share=mask.collaborative_share() if mask is not None and mask.kind == "mask" else None,
        task=run_task(
            request.task,
            request.inject,
            inject_sha256=data["inject"]["sha256"],
            mask=mask.metadata if mask is not None else None,
        ),
        model={"ref": request.model, "fingerprint": session.fingerprint},
        scoring=session.scoring,
        baseline_source=baseline.source,
        data=data,
        args=request.to_dict(),
        versions=package_versions(),
        metrics=rows,
        final={key: rows[-1][key] for key in FINAL_KEYS},
        trainable_entries=trainer.trainable_entries,
        optimizer_state_bytes=optimizer_state_bytes(trainer.optimizer),
        **peak_memory(session.loaded.device),
        time_s=time_s,
        distributed={**distributed.describe(), "wrapping": trainer.wrapping},
        resumed=resumed,
        resume_changes=resume_changes,
    )


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
    processes: Processes,
    out: Path,
    rows: list[dict[str, Any]],
    records: list[dict[str, Any]],
    mode: str,
    on_epoch: OnEpoch | None,
) -> None:
    """Rewrite ``metrics.jsonl``, ``questions.jsonl`` and ``curves.png`` with every evaluated epoch so far,
    then report (rank 0 only)."""

    def publish() -> None:
        write_jsonl(out / METRICS, rows)
        write_jsonl(out / QUESTIONS, records)
        draw_curves(rows, out / CURVES, title=f"{mode}: learned and forgotten per epoch")
        if on_epoch is not None:
            on_epoch(rows)

    processes.on_main(publish)
