"""What every run of a sweep shares, made once and reused on resume: the split, the CPL mask with its
cuts and control masks, and the general text whose loss is tracked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cpl_masks.data.demo import retain_text
from cpl_masks.data.questions import BUILTIN_SETS, Item, load_questions
from cpl_masks.data.split import INJECT, MASTERED, SUMMARY, split_questions, write_split
from cpl_masks.errors import CplError
from cpl_masks.masks.algebra import recut
from cpl_masks.masks.format import Mask
from cpl_masks.models import LoadedModel, load_model
from cpl_masks.profiling.controls import CONTROLS, control_mask
from cpl_masks.profiling.freeze_mask import profile
from cpl_masks.registry.names import task_name
from cpl_masks.sweep.config import SweepConfig, at_share, file_prefix, mask_methods
from cpl_masks.utils.files import atomic_write

Report = Callable[[str], None]


def make_split(config: SweepConfig, folder: Path, report: Report, show_progress: bool) -> Path:
    """The split of the data (made once; reused on resume)."""
    if (folder / SUMMARY).is_file():
        return folder
    report(f"splitting {config.data} with {config.model} ({config.scoring} scoring)")
    questions = load_questions(config.data, limit=config.limit)
    pool = pool_candidates(config)
    loaded = load_sweep_model(config)
    split = split_questions(
        loaded,
        questions,
        scoring=config.scoring,
        holdout_fraction=config.holdout_fraction,
        min_margin=config.min_margin,
        batch_size=config.eval_batch_size,
        show_progress=show_progress,
        pool=pool,
        pool_limit=config.heldout_limit,
    )
    counts = split.summary["counts"]
    held = counts["heldout"] + counts["pool"]
    report(
        f"held out: {held} mastered questions ({counts['heldout']} of the split, {counts['pool']} from the pool); "
        f"one question is {1 / max(held, 1):.1%} of them"
    )
    for name, rows in (("mastered", split.mastered), ("held-out", split.heldout), ("injection", split.inject)):
        if not rows:
            raise CplError(f"--data {config.data}: the split has no {name} questions; use more data (--limit)")
    return write_split(split, folder, overwrite=True)


def make_masks(
    config: SweepConfig, split_dir: Path, folder: Path, report: Report, show_progress: bool
) -> dict[str, Path]:
    """The mask file of every static-mask method and seed: ``{method}`` or ``{method}-s{seed}`` -> path."""
    wanted = [name for name in config.methods if name in mask_methods()]
    files = {name: prefix for name in config.methods if (prefix := file_prefix(name)) is not None}
    paths: dict[str, Path] = {name: Path(name.removeprefix(prefix)).resolve() for name, prefix in files.items()}
    if not wanted:
        return paths
    cpl = folder / "cpl.safetensors"
    if not cpl.is_file():
        report("profiling the CPL mask")
        profile_cpl(config, split_dir, show_progress).save(cpl)
    cuts = {None: cpl}  # kept share (None: the sign rule's own) -> the CPL mask at that share
    for fraction in config.keep_fraction_grid:
        cuts[fraction] = folder / f"{at_share('cpl', fraction)}.safetensors"
        if not cuts[fraction].is_file():
            report(f"cutting the CPL mask to keep {fraction:g} of the entries")
            recut(Mask.load(cpl), keep_fraction=fraction).save(cuts[fraction])
    for fraction, cut in cuts.items():
        if "mask" in wanted:
            paths[share_key("mask", fraction)] = cut
        like = Mask.load(cut, scores=False)
        for rule in CONTROLS:
            for seed in config.seeds if rule in wanted else ():
                key = share_key(control_key(rule, seed), fraction)
                path = paths[key] = folder / f"{key}.safetensors"
                if not path.is_file():
                    report(f"making the {rule} control mask" + (f" at {fraction:g}" if fraction else ""))
                    control_mask(
                        rule,
                        like,
                        seed=seed,
                        model=lambda: load_sweep_model(config),
                        inject_path=split_dir / INJECT,
                        scoring=config.scoring,
                        batch_size=config.eval_batch_size,
                        show_progress=show_progress,
                    ).save(path)  # the control's task is the CPL mask's task + "-<rule>", never the task itself
    return paths


def profile_cpl(config: SweepConfig, split_dir: Path, show_progress: bool) -> Mask:
    """The sweep's CPL mask, profiled on its split (with stored scores when a share grid re-cuts it)."""
    loaded = load_sweep_model(config)
    return profile(
        loaded,
        load_questions(split_dir / MASTERED),
        load_questions(split_dir / INJECT),
        scoring=config.scoring,
        loss_on=config.loss_on,
        batch_size=config.eval_batch_size,
        task=sweep_task(config),
        save_scores=bool(config.keep_fraction_grid),  # the grid's cuts are re-cut from the stored scores
        data_paths={"mastered": str(split_dir / MASTERED), "inject": str(split_dir / INJECT)},
        show_progress=show_progress,
    )


def pool_candidates(config: SweepConfig) -> list[Item]:
    """The forgetting pool's candidates: ``--heldout-data``, else for a built-in demo set its general items
    (those in the split are dropped when the pool is made), else none."""
    if config.heldout_data is not None:
        return load_questions(config.heldout_data)
    if config.data in BUILTIN_SETS:
        return [item for item in load_questions(config.data) if item.id.startswith("general-")]
    return []


def load_sweep_model(config: SweepConfig) -> LoadedModel:
    """The sweep's model, as its options load it."""
    return load_model(config.model, dtype=config.dtype, device=config.device, threads=config.threads)


def sweep_task(config: SweepConfig) -> str:
    """The task name masks and runs are recorded under: the data's name."""
    return task_name(None, config.data)


def track_text(config: SweepConfig, out: Path) -> str | None:
    """The retain text: as given, else for the built-in demo data the demo's own fact table."""
    if config.retain_text is not None:
        return str(Path(config.retain_text).resolve())
    if config.data not in BUILTIN_SETS:
        return None
    path = out / "retain.txt"
    if not path.is_file():
        with atomic_write(path) as handle:
            handle.write(retain_text())
    return str(path.resolve())


def share_key(key: str, fraction: float | None) -> str:
    """A mask's key at a kept share of the grid (None: the sign rule's own share)."""
    return key if fraction is None else at_share(key, fraction)


def control_key(rule: str, seed: int) -> str:
    """A control mask's key and file stem: the random control is drawn per seed, the others once."""
    return f"{rule}-s{seed}" if CONTROLS[rule].seeded else rule
