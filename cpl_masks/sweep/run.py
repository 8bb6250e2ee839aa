"""The paper's comparison in one call: every method at every learning rate, judged under a forgetting budget.

A sweep splits the data once (holding out a share of the mastered questions, plus a forgetting
pool of confidently known questions from ``heldout_data``; for ``builtin:demo`` its general
questions the split does not use), profiles the CPL mask, makes the two control masks (random and
gradient-magnitude, at the CPL mask's share in every tensor), then trains every method at every
learning rate of the grid for every seed. Each run is an ordinary training-run folder under
``runs/``, so ``cpl-masks compare`` reads it; epoch 0 of every run comes from the split's own
scores, so no question is scored twice for the same weights.

Every evaluated epoch (``eval_every``) of every run is a point; a method is reported at its best
point: the most questions learned (mean over seeds) whose held-out forgetting stays within the
budget, over learning rate × epoch. ``sweep.json`` holds every run, the points, that choice, the
area under each method's learned-vs-forgotten curve and the paired comparisons with full
fine-tuning and with the random mask (:mod:`cpl_masks.sweep.report`); ``sweep.png`` draws the
curves.

Re-running with the same arguments resumes: finished runs are skipped, an interrupted run goes on
from its last checkpoint, and a run that diverged stays recorded as diverged. Re-running with only
another ``--forgetting-budget`` judges the finished runs again without training. The same command
started in several processes (one per core, each with ``--threads 1``) shares the work: each takes
the runs no other live process is training, and whichever finishes last writes the complete ``sweep.json``.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cpl_masks.data.split import HELDOUT, INJECT, MASTERED, SUMMARY
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.models import model_locations
from cpl_masks.profiling.controls import CONTROLS
from cpl_masks.registry import Registry
from cpl_masks.sweep.config import (
    RETAIN_PREFIX,
    REUSE_PREFIX,
    RunSpec,
    SweepConfig,
    applicable_options,
    method_label,
    split_share,
    training_mode,
)
from cpl_masks.sweep.inputs import (
    Report,
    control_key,
    make_masks,
    make_split,
    share_key,
    sweep_task,
    track_text,
)
from cpl_masks.sweep.report import (
    aggregate,
    best_per_method,
    draw_sweep,
    epoch_figures,
    final_points,
    learned_forgotten_auc,
    paired_comparisons,
    pareto_front,
)
from cpl_masks.training.folder import CHECKPOINT
from cpl_masks.training.loop import TrainConfig, TrainingDiverged
from cpl_masks.training.record import RUN, RunRecord
from cpl_masks.training.request import RunRequest
from cpl_masks.training.run import resume_run, start_run
from cpl_masks.utils.files import FolderBusy, check_output_dir, folder_holder, folder_is_empty, lock_folder, write_json

CONFIG_FILE, RESULT_FILE, PLOT_FILE, DIVERGED = "sweep_config.json", "sweep.json", "sweep.png", "diverged.json"


def run_sweep(
    config: SweepConfig, *, report: Report = print, show_progress: bool = True, registry: Registry | None = None
) -> dict[str, Any]:
    """Run (or resume, or help another process run) the sweep ``config`` describes; returns the ``sweep.json``
    payload as this process leaves it (``complete`` once every run is finished, by any process).

    Every mask run is recorded in ``registry`` (None: the one in ``$CPL_MASKS_HOME``), which is
    checked before any model loads. Several processes may work on one sweep folder (the same command,
    started again): one prepares the split and the masks while the others wait, then each trains
    the runs no other live process is training, and each writes ``sweep.json`` from every finished run.

    Raises:
        CplError: bad options, a broken registry, or an output folder holding a sweep with other arguments.
    """
    config.check()
    registry = registry or Registry()
    registry.check()
    out = check_sweep_folder(config)
    with _sweep_lock(out, report):
        _claim_folder(out, config)
        split_dir = make_split(config, out / "split", report, show_progress)
        masks = make_masks(config, split_dir, out / "masks", report, show_progress)
        retain = track_text(config, out)
    specs = [  # seed by seed, so a sweep read before it ends already compares every method
        RunSpec(method, lr, seed)
        for seed in config.seeds
        for method in config.swept_methods()
        for lr in config.lr_grid_of(method)
    ]

    def train(spec: RunSpec, folder: Path) -> bool:
        return _one_run(config, spec, split_dir, masks, retain, folder, show_progress, registry)

    def summarize() -> dict[str, Any]:
        return _write_summary(config, specs, masks, split_dir, out, report)

    _train_free_runs(specs, out, train, summarize, report)
    payload = summarize()
    draw_sweep(payload, out / PLOT_FILE)
    return payload


def _train_free_runs(
    specs: Sequence[RunSpec],
    out: Path,
    train: Callable[[RunSpec, Path], bool],
    summarize: Callable[[], dict[str, Any]],
    report: Report,
) -> None:
    """Finish every run no other live process holds, in order, summarizing after each one trained here."""
    durations: list[float] = []
    for index, spec in enumerate(specs, start=1):
        folder = out / "runs" / spec.label
        heading = f"[run {index}/{len(specs)}] {spec.method} lr={spec.lr:g} seed={spec.seed}"
        if not _over(folder) and (holder := folder_holder(folder)) is not None:
            report(f"{heading}: process {holder} is training it; on to the next")
            continue
        remaining = len(specs) - index + 1
        report(heading + (f", about {_minutes(statistics.mean(durations) * remaining)} left" if durations else ""))
        started = time.perf_counter()
        try:
            trained = train(spec, folder)
        except FolderBusy:  # another process took it since the look above
            continue
        if trained:
            durations.append(time.perf_counter() - started)
            summarize()


SWEEP_FILES = (CONFIG_FILE, RESULT_FILE, PLOT_FILE, "split", "masks", "runs", "retain.txt")  # what a sweep writes


def check_sweep_folder(config: SweepConfig) -> Path:
    """Refuse, before its lock or anything else is written, a sweep folder in the registry's home, in a model's
    folder (the sweep's own model: :func:`cpl_masks.models.model_locations`) or over one of its inputs.

    Whether it is empty or a sweep with compatible arguments is :func:`_claim_folder`'s, under the lock.
    """
    inputs = [*model_locations(config.model), config.data, config.heldout_data, config.retain_text]
    return check_output_dir(config.out, overwrite=True, inputs=inputs, writes=SWEEP_FILES)


@contextlib.contextmanager
def _sweep_lock(out: Path, report: Report) -> Iterator[None]:
    """The sweep folder's lock, held while its shared files are written; another holder is waited for."""

    def waiting(owner: str) -> None:
        report(f"waiting for process {owner}, which is writing the sweep folder {out}")

    with lock_folder(out, what="sweep folder", wait=waiting):
        yield


def _write_summary(
    config: SweepConfig, specs: Sequence[RunSpec], masks: dict[str, Path], split_dir: Path, out: Path, report: Report
) -> dict[str, Any]:
    """Write ``sweep.json`` from every run finished so far, by whichever process; complete once all are."""
    with _sweep_lock(out, report):
        found = [_finished(spec, out / "runs" / spec.label, out) for spec in specs]
        runs = [summary for summary in found if summary is not None]
        payload = summarize_sweep(config, runs, masks, split_dir, complete=len(runs) == len(specs))
        write_json(out / RESULT_FILE, payload)  # after every run, so a long sweep can be read as it goes
    return payload


_SUMMARY_ONLY = ("out", "forgetting_budget")  # arguments that change the report, not the runs
_RUN_CHOICE = ("seeds", "methods", "lr_grid", "method_lr_grid")  # which runs, not how each trains


def _claim_folder(out: Path, config: SweepConfig) -> None:
    """Record the arguments in a new folder, or check that an existing sweep folder has compatible ones.

    The forgetting budget only changes which runs are reported, so a finished sweep can be judged
    again under another budget without training anything. The seeds, methods and rate grids only
    choose which runs the sweep holds, so they may change too: a sweep grows by more seeds or methods,
    or a copy of its folder runs other seeds on another machine, on the same split and masks (the
    folder then records the newest choice). How each run trains may not change, nor the kept shares,
    whose cuts need scores the CPL mask was profiled with or without.
    """
    saved = out / CONFIG_FILE
    wanted = asdict(config)
    if saved.is_file():
        previous = json.loads(saved.read_text(encoding="utf-8"))
        defaults = asdict(SweepConfig(model="", data="", out=""))  # keys an older sweep did not record yet
        recorded = {key: previous.get(key, defaults[key]) for key in wanted}
        changed = sorted(
            key for key in wanted if key not in _SUMMARY_ONLY + _RUN_CHOICE and recorded[key] != wanted[key]
        )
        if changed:
            raise CplError(
                f"--out {out}: holds a sweep with other arguments ({', '.join(changed)}); "
                "use another folder or the same arguments to resume it"
            )
        if any(recorded[key] != wanted[key] for key in _RUN_CHOICE):
            write_json(saved, wanted)
        return
    if out.exists() and not folder_is_empty(out):
        raise CplError(f"--out {out}: not empty and not a sweep folder; choose an empty or new folder")
    write_json(saved, wanted)


def _over(folder: Path) -> bool:
    """Whether a run is over: finished, or recorded as diverged."""
    return (folder / RUN).is_file() or (folder / DIVERGED).is_file()


def _finished(spec: RunSpec, folder: Path, sweep_dir: Path) -> dict[str, Any] | None:
    """A run's summary if it is over (finished or diverged), else None."""
    if (folder / RUN).is_file():
        return _run_summary(spec, RunRecord.read(folder), folder, sweep_dir)
    if (folder / DIVERGED).is_file():
        diverged = json.loads((folder / DIVERGED).read_text(encoding="utf-8"))
        return _run_summary(spec, None, folder, sweep_dir, diverged)
    return None


def _one_run(
    config: SweepConfig,
    spec: RunSpec,
    split_dir: Path,
    masks: dict[str, Path],
    retain: str | None,
    folder: Path,
    show_progress: bool,
    registry: Registry,
) -> bool:
    """Finish one run (skip, resume or start it); returns whether it trained now.

    Raises:
        FolderBusy: another process holds the run's folder.
    """
    if _over(folder):
        return False
    try:
        if (folder / CHECKPOINT / "state.json").is_file():
            resume_run(folder, show_progress=show_progress, registry=registry)
        else:
            request = _request(config, spec, split_dir, masks, retain, folder, show_progress)
            start_run(request, overwrite=True, registry=registry)  # a folder without a checkpoint: no work
    except TrainingDiverged as error:
        write_json(folder / DIVERGED, {"diverged": str(error)})
    return True


def _request(
    config: SweepConfig,
    spec: RunSpec,
    split_dir: Path,
    masks: dict[str, Path],
    retain: str | None,
    folder: Path,
    show_progress: bool,
) -> RunRequest:
    mode = training_mode(spec.method)
    mask_file = _mask_for(spec, masks)
    mask, retain_set = (None, mask_file) if spec.method.startswith(RETAIN_PREFIX) else (mask_file, None)
    return RunRequest(
        inject=str(split_dir / INJECT),
        mastered=str(split_dir / MASTERED),
        heldout=str(split_dir / HELDOUT),
        out=str(folder),
        model=config.model,
        mask=str(mask) if mask is not None else None,
        retain=str(retain_set) if retain_set is not None else None,
        mode=mode,
        method_options=applicable_options(mode, config.method_options),
        scoring=config.scoring,
        loss_on=config.loss_on,
        task=sweep_task(config),
        allow_other_weights=spec.method.startswith(REUSE_PREFIX),
        dtype=config.dtype,
        device=config.device,
        threads=config.threads,
        retain_text=retain,
        track_drift=config.track_drift and spec.method == "mask",
        keep_weights=False,
        eval_every=config.eval_every,
        config=TrainConfig(
            epochs=config.epochs,
            lr=spec.lr,
            optimizer=config.optimizer,
            seed=spec.seed,
            eval_batch_size=config.eval_batch_size,
            show_progress=show_progress,
        ),
    )


def _mask_for(spec: RunSpec, masks: dict[str, Path]) -> Path | None:
    base, fraction = split_share(spec.method)
    return masks.get(share_key(control_key(base, spec.seed) if base in CONTROLS else base, fraction))


def _run_summary(
    spec: RunSpec, run: RunRecord | None, folder: Path, sweep_dir: Path, diverged: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The figures of one run that the comparison needs: its last evaluated epoch's, and under ``epochs``
    every evaluated epoch's after 0 (None figures where the run diverged). The run is found where it was
    read (``folder``), not where it was trained, so a sweep folder copied elsewhere reads the same."""
    summary: dict[str, Any] = {"method": method_label(spec.method), "lr": spec.lr, "seed": spec.seed}
    if run is None:
        return {**summary, **(diverged or {}), "learned_share": None, "heldout_forgotten_share": None}
    rows = run.metrics
    return {
        **summary,
        "run_dir": _relative(folder, sweep_dir),
        **epoch_figures(rows[-1]),
        "epochs": [epoch_figures(row) for row in rows if row["epoch"] > 0],
        "collaborative_share": run.collaborative_share,
        "time_s": run.time_s,
    }


def _relative(folder: Path, sweep_dir: Path) -> str:
    """``folder`` relative to the sweep folder, so ``sweep.json`` reads the same on any machine."""
    try:
        return str(folder.resolve().relative_to(sweep_dir.resolve()))
    except ValueError:
        return str(folder)


def summarize_sweep(
    config: SweepConfig,
    runs: Sequence[dict[str, Any]],
    masks: dict[str, Path],
    split_dir: Path,
    *,
    complete: bool = True,
) -> dict[str, Any]:
    """The ``sweep.json`` payload: every run, per (method, lr, epoch) means over seeds, each method's best
    within the budget, the front, the area under each method's curve, and the paired comparisons.

    ``complete`` is False while runs of the sweep are still to come.
    """
    points = aggregate(runs)
    best = best_per_method(points, config.forgetting_budget)
    alive = [point["heldout_forgotten_share"] for point in points if not point["diverged"]]
    split = json.loads((split_dir / SUMMARY).read_text(encoding="utf-8"))
    return {
        "complete": complete,
        "config": asdict(config),
        "split": split,
        "heldout_questions": split["counts"]["heldout"] + split["counts"].get("pool", 0),
        "masks": {name: _mask_summary(path, split_dir.parent) for name, path in masks.items()},
        "runs": list(runs),
        "points": points,
        "best": best,
        "pareto": pareto_front(points),
        "auc": learned_forgotten_auc(points, max(alive, default=0.0)),
        "paired": paired_comparisons(runs, best, split_dir.parent),
        "paired_final": paired_comparisons(runs, final_points(points, best), split_dir.parent),
    }


def _mask_summary(path: Path, sweep_dir: Path) -> dict[str, Any]:
    mask = Mask.load(path, scores=False)
    return {"path": _relative(path, sweep_dir), "id": mask.id, "collaborative_share": mask.collaborative_share()}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
