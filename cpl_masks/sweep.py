"""The paper's comparison in one call: every method at every learning rate, judged under a forgetting budget.

A sweep splits the data once (holding out a share of the mastered questions), profiles the CPL
mask, makes the two control masks (random and gradient-magnitude, at the CPL mask's share in every
tensor), then trains every method at every learning rate of the grid for every seed. Each run is
an ordinary training-run folder under ``runs/``, so ``cpl-masks compare`` reads it; epoch 0 of
every run comes from the split's own scores, so no question is scored twice for the same weights.

A method is reported at its best learning rate: the one with the most questions learned (mean
over seeds) whose held-out forgetting stays within the budget, so no method is judged at a bad
learning rate. ``sweep.json`` holds every run and that choice; ``sweep.png`` draws learned against
held-out forgotten with the Pareto front.

Re-running with the same arguments resumes: finished runs are skipped, an interrupted run goes on
from its last checkpoint, and a run that diverged stays recorded as diverged. Re-running with only
another ``--forgetting-budget`` judges the finished runs again without training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cpl_masks.controls import CONTROLS, control_mask
from cpl_masks.data import BUILTIN_DEMO, load_questions
from cpl_masks.demo_data import retain_text
from cpl_masks.errors import CplError
from cpl_masks.files import atomic_write, write_json
from cpl_masks.masks import Mask
from cpl_masks.methods import METHODS, method_options
from cpl_masks.models import LoadedModel, load_model
from cpl_masks.profile import profile
from cpl_masks.registry import Registry
from cpl_masks.registry.names import task_name
from cpl_masks.split import HELDOUT, INJECT, MASTERED, SUMMARY, split_questions, write_split
from cpl_masks.train import OPTIMIZERS, TrainConfig, TrainingDiverged
from cpl_masks.training_run import CHECKPOINT, RUN, RunRequest, read_run, resume_run, start_run

MASK_METHODS = ("mask", "random", "gradient-magnitude")  # static-mask runs: CPL's mask and its two controls
DEFAULT_METHODS = ("full", "mask", "random", "gradient-magnitude", "dynamic", "lora", "replay", "agem", "ewc")
DEFAULT_LR_GRID = (1e-5, 1e-4, 1e-3)
REUSE_PREFIX = "reuse:"  # a method name "reuse:<file>" trains with a mask profiled elsewhere (cross-task reuse)
CONFIG_FILE, RESULT_FILE, PLOT_FILE, DIVERGED = "sweep_config.json", "sweep.json", "sweep.png", "diverged.json"
Report = Callable[[str], None]


@dataclass
class SweepConfig:
    """Everything a sweep depends on; a re-run with the same values resumes it."""

    model: str
    data: str
    out: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    lr_grid: list[float] = field(default_factory=lambda: list(DEFAULT_LR_GRID))
    method_lr_grid: dict[str, list[float]] = field(default_factory=dict)  # per-method grids replacing lr_grid
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 2
    optimizer: str = "sgd"
    forgetting_budget: float = 0.02
    scoring: str = "loglik"
    holdout_fraction: float = 0.25
    min_margin: float = 0.0
    limit: int | None = None
    retain_text: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)  # e.g. replay_share, ewc_lambda, lora_rank
    track_drift: bool = True  # record the CPL mask's agreement with the sign rule after every epoch
    eval_batch_size: int = 16
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None

    def check(self) -> None:
        """Refuse bad options before anything is loaded, naming the option."""
        for name in self.methods:
            if name.startswith(REUSE_PREFIX):
                if not Path(name.removeprefix(REUSE_PREFIX)).is_file():
                    raise CplError(f"--methods {name}: no such mask file")
            elif name not in METHODS and name not in MASK_METHODS:
                known = ", ".join(dict.fromkeys([*METHODS, *MASK_METHODS]))
                raise CplError(f"--methods {name}: choose among {known}, or {REUSE_PREFIX}MASK_FILE")
        if len(set(self.methods)) != len(self.methods) or not self.methods:
            raise CplError("--methods: give each method once, at least one")
        for option, grid in [
            ("--lr-grid", self.lr_grid),
            *((f"--method-lr-grid {name}", values) for name, values in self.method_lr_grid.items()),
        ]:
            if not grid or any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
                raise CplError(f"{option} {grid}: give positive learning rates")
        stray = sorted(set(self.method_lr_grid) - set(self.methods))
        if stray:
            raise CplError(f"--method-lr-grid {stray[0]}: not one of the swept --methods")
        if not self.seeds:
            raise CplError("--seeds: give at least one seed")
        if not 0.0 <= self.forgetting_budget <= 1.0:
            raise CplError(f"--forgetting-budget {self.forgetting_budget}: must be a share in [0, 1]")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise CplError(f"--holdout-fraction {self.holdout_fraction}: a sweep needs a held-out share in (0, 1)")
        if self.optimizer not in OPTIMIZERS:
            raise CplError(f"--optimizer {self.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
        if self.retain_text is not None and not Path(self.retain_text).is_file():
            raise CplError(f"--retain-text {self.retain_text}: no such file")
        modes = {_mode(method) for method in self.methods}
        for name in modes:
            method_options(name, _applicable_options(name, self.method_options))
        unused = set(self.method_options) - {key for name in modes for key in _option_names(name)}
        if unused:
            raise CplError(f"--{sorted(unused)[0].replace('_', '-')}: none of the swept methods takes it")
        TrainConfig(epochs=self.epochs, optimizer=self.optimizer, eval_batch_size=self.eval_batch_size).check()


@dataclass
class RunSpec:
    """One run of the sweep: a method at a learning rate and a seed."""

    method: str
    lr: float
    seed: int

    @property
    def label(self) -> str:
        """The run's folder name under ``runs/``."""
        name = _method_label(self.method)
        return f"{name}-lr{self.lr:g}-s{self.seed}"


def run_sweep(
    config: SweepConfig, *, report: Report = print, show_progress: bool = True, registry: Registry | None = None
) -> dict[str, Any]:
    """Run (or resume) the sweep ``config`` describes; returns the ``sweep.json`` payload.

    Every mask run is recorded in ``registry`` (None: the one in ``$CPL_MASKS_HOME``), which is
    checked before any model loads.

    Raises:
        CplError: bad options, a broken registry, or an output folder holding a sweep with other arguments.
    """
    config.check()
    registry = registry or Registry()
    registry.check()
    out = Path(config.out)
    _claim_folder(out, config)
    split_dir = _split(config, out / "split", report, show_progress)
    masks = _masks(config, split_dir, out / "masks", report, show_progress)
    retain = _retain_text(config, out)
    specs = [
        RunSpec(method, lr, seed)
        for method in config.methods
        for lr in config.method_lr_grid.get(method, config.lr_grid)
        for seed in config.seeds
    ]
    runs, durations = [], []
    for index, spec in enumerate(specs, start=1):
        remaining = len(specs) - index + 1
        eta = f", about {_minutes(statistics.mean(durations) * remaining)} left" if durations else ""
        report(f"[run {index}/{len(specs)}] {spec.method} lr={spec.lr:g} seed={spec.seed}{eta}")
        started = time.perf_counter()
        result, trained = _one_run(config, spec, split_dir, masks, retain, out / "runs", show_progress, registry)
        if trained:
            durations.append(time.perf_counter() - started)
        runs.append(result)
        payload = summarize_sweep(config, runs, masks, split_dir, complete=index == len(specs))
        write_json(out / RESULT_FILE, payload)  # after every run, so a long sweep can be read as it goes
    draw_sweep(payload, out / PLOT_FILE)
    return payload


_SUMMARY_ONLY = ("out", "forgetting_budget")  # arguments that change the report, not the runs


def _claim_folder(out: Path, config: SweepConfig) -> None:
    """Record the arguments in a new folder, or check that an existing sweep folder has the same ones.

    The forgetting budget only changes which runs are reported, so a finished sweep can be judged
    again under another budget without training anything.
    """
    saved = out / CONFIG_FILE
    wanted = asdict(config)
    if saved.is_file():
        previous = json.loads(saved.read_text(encoding="utf-8"))
        changed = sorted(key for key in wanted if key not in _SUMMARY_ONLY and previous.get(key) != wanted[key])
        if changed:
            raise CplError(
                f"--out {out}: holds a sweep with other arguments ({', '.join(changed)}); "
                "use another folder or the same arguments to resume it"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise CplError(f"--out {out}: not empty and not a sweep folder; choose an empty or new folder")
    write_json(saved, wanted)


def _split(config: SweepConfig, folder: Path, report: Report, show_progress: bool) -> Path:
    """The split of the data (made once; reused on resume)."""
    if (folder / SUMMARY).is_file():
        return folder
    report(f"splitting {config.data} with {config.model} ({config.scoring} scoring)")
    questions = load_questions(config.data, limit=config.limit)
    loaded = _load(config)
    split = split_questions(
        loaded,
        questions,
        scoring=config.scoring,
        holdout_fraction=config.holdout_fraction,
        min_margin=config.min_margin,
        batch_size=config.eval_batch_size,
        show_progress=show_progress,
    )
    for name, rows in (("mastered", split.mastered), ("held-out", split.heldout), ("injection", split.inject)):
        if not rows:
            raise CplError(f"--data {config.data}: the split has no {name} questions; use more data (--limit)")
    return write_split(split, folder, overwrite=True)


def _masks(config: SweepConfig, split_dir: Path, folder: Path, report: Report, show_progress: bool) -> dict[str, Path]:
    """The mask file of every static-mask method and seed: ``{method}`` or ``{method}-s{seed}`` -> path."""
    wanted = [name for name in config.methods if name in MASK_METHODS]
    reused = [name for name in config.methods if name.startswith(REUSE_PREFIX)]
    paths: dict[str, Path] = {name: Path(name.removeprefix(REUSE_PREFIX)).resolve() for name in reused}
    if not wanted:
        return paths
    cpl = folder / "cpl.safetensors"
    if not cpl.is_file():
        report("profiling the CPL mask")
        _profile(config, split_dir, show_progress).save(cpl)
    if "mask" in wanted:
        paths["mask"] = cpl
    like = Mask.load(cpl, scores=False)
    for rule in CONTROLS:
        for seed in config.seeds if rule in wanted else ():
            path = paths[_control_key(rule, seed)] = folder / f"{_control_key(rule, seed)}.safetensors"
            if not path.is_file():
                report(f"making the {rule} control mask")
                control_mask(
                    rule,
                    like,
                    seed=seed,
                    model=lambda: _load(config),
                    inject_path=split_dir / INJECT,
                    scoring=config.scoring,
                    batch_size=config.eval_batch_size,
                    show_progress=show_progress,
                ).save(path)  # the control's task is the CPL mask's task + "-<rule>", never the task itself
    return paths


def _profile(config: SweepConfig, split_dir: Path, show_progress: bool) -> Mask:
    loaded = _load(config)
    return profile(
        loaded,
        load_questions(split_dir / MASTERED),
        load_questions(split_dir / INJECT),
        scoring=config.scoring,
        batch_size=config.eval_batch_size,
        task=_task(config),
        data_paths={"mastered": str(split_dir / MASTERED), "inject": str(split_dir / INJECT)},
        show_progress=show_progress,
    )


def _load(config: SweepConfig) -> LoadedModel:
    return load_model(config.model, dtype=config.dtype, device=config.device, threads=config.threads)


def _task(config: SweepConfig) -> str:
    """The task name masks and runs are recorded under: the data's name."""
    return task_name(None, config.data)


def _retain_text(config: SweepConfig, out: Path) -> str | None:
    """The retain text: as given, else for the built-in demo data the demo's own fact table."""
    if config.retain_text is not None:
        return str(Path(config.retain_text).resolve())
    if config.data != BUILTIN_DEMO:
        return None
    path = out / "retain.txt"
    if not path.is_file():
        with atomic_write(path) as handle:
            handle.write(retain_text())
    return str(path.resolve())


def _one_run(
    config: SweepConfig,
    spec: RunSpec,
    split_dir: Path,
    masks: dict[str, Path],
    retain: str | None,
    runs_dir: Path,
    show_progress: bool,
    registry: Registry,
) -> tuple[dict[str, Any], bool]:
    """Finish one run (skip, resume or start it); returns its summary and whether it trained now."""
    folder = runs_dir / spec.label
    if (folder / RUN).is_file():
        return _run_summary(spec, read_run(folder)), False
    if (folder / DIVERGED).is_file():
        return _run_summary(spec, None, json.loads((folder / DIVERGED).read_text(encoding="utf-8"))), False
    try:
        if (folder / CHECKPOINT / "state.json").is_file():
            payload = resume_run(folder, show_progress=show_progress, registry=registry)
        else:
            request = _request(config, spec, split_dir, masks, retain, folder, show_progress)
            payload = start_run(request, overwrite=True, registry=registry)  # a folder without a checkpoint: no work
    except TrainingDiverged as error:
        diverged = {"diverged": str(error)}
        write_json(folder / DIVERGED, diverged)
        return _run_summary(spec, None, diverged), True
    return _run_summary(spec, payload), True


def _request(
    config: SweepConfig,
    spec: RunSpec,
    split_dir: Path,
    masks: dict[str, Path],
    retain: str | None,
    folder: Path,
    show_progress: bool,
) -> RunRequest:
    mode = _mode(spec.method)
    mask = _mask_for(spec, masks)
    return RunRequest(
        inject=str(split_dir / INJECT),
        mastered=str(split_dir / MASTERED),
        heldout=str(split_dir / HELDOUT),
        out=str(folder),
        model=config.model,
        mask=str(mask) if mask is not None else None,
        mode=mode,
        method_options=_applicable_options(mode, config.method_options),
        scoring=config.scoring,
        task=_task(config),
        allow_other_weights=spec.method.startswith(REUSE_PREFIX),
        dtype=config.dtype,
        device=config.device,
        threads=config.threads,
        retain_text=retain,
        track_drift=config.track_drift and spec.method == "mask",
        keep_weights=False,
        config=TrainConfig(
            epochs=config.epochs,
            lr=spec.lr,
            optimizer=config.optimizer,
            seed=spec.seed,
            eval_batch_size=config.eval_batch_size,
            show_progress=show_progress,
        ),
    )


def _mode(method: str) -> str:
    """The training method behind a sweep method name: every mask variant trains as ``mask``."""
    return "mask" if method in MASK_METHODS or method.startswith(REUSE_PREFIX) else method


def _method_label(method: str) -> str:
    return f"reuse-{Path(method.removeprefix(REUSE_PREFIX)).stem}" if method.startswith(REUSE_PREFIX) else method


def _mask_for(spec: RunSpec, masks: dict[str, Path]) -> Path | None:
    return masks.get(_control_key(spec.method, spec.seed) if spec.method in CONTROLS else spec.method)


def _control_key(rule: str, seed: int) -> str:
    """A control mask's key and file stem: the random control is drawn per seed, the others once."""
    return f"{rule}-s{seed}" if rule == "random" else rule


def _option_names(mode: str) -> set[str]:
    return {item.name for item in dataclasses.fields(METHODS[mode].options)}


def _applicable_options(mode: str, options: dict[str, Any]) -> dict[str, Any]:
    """The sweep's method options that belong to ``mode`` (each option names its method's fields)."""
    names = _option_names(mode)
    return {key: value for key, value in options.items() if key in names}


def _run_summary(spec: RunSpec, run: dict[str, Any] | None, diverged: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures of one run that the comparison needs (None where the run diverged)."""
    summary: dict[str, Any] = {"method": _method_label(spec.method), "lr": spec.lr, "seed": spec.seed}
    if run is None:
        return {**summary, **(diverged or {}), "learned_share": None, "heldout_forgotten_share": None}
    final, totals = run["final"], run["final"]["totals"]
    return {
        **summary,
        "run_dir": run["out_dir"],
        "learned": final["learned"],
        "inject_wrong": totals["inject_wrong"],
        "forgotten": final["forgotten"],
        "mastered_right": totals["mastered_right"],
        "heldout_forgotten": final["heldout_forgotten"],
        "heldout_right": totals["heldout_right"],
        "learned_share": _share(final["learned"], totals["inject_wrong"]),
        "forgotten_share": _share(final["forgotten"], totals["mastered_right"]),
        "heldout_forgotten_share": _share(final["heldout_forgotten"], totals["heldout_right"]),
        "delta_logprob": final.get("delta_logprob"),
        "delta_margin": final.get("delta_margin"),
        "retain_loss_delta": final.get("retain_loss_delta"),
        "mask_agreement": final.get("mask_agreement"),
        "collaborative_share": run.get("collaborative_share"),
        "time_s": run["time_s"],
    }


def _share(count: int | None, total: int | None) -> float | None:
    return None if count is None or not total else count / total


def summarize_sweep(
    config: SweepConfig,
    runs: Sequence[dict[str, Any]],
    masks: dict[str, Path],
    split_dir: Path,
    *,
    complete: bool = True,
) -> dict[str, Any]:
    """The ``sweep.json`` payload: every run, per (method, lr) means over seeds, each method's best, the front.

    ``complete`` is False while runs of the sweep are still to come.
    """
    points = aggregate(runs)
    return {
        "complete": complete,
        "config": asdict(config),
        "split": json.loads((split_dir / SUMMARY).read_text(encoding="utf-8")),
        "masks": {name: _mask_summary(path) for name, path in masks.items()},
        "runs": list(runs),
        "points": points,
        "best": best_per_method(points, config.forgetting_budget),
        "pareto": pareto_front(points),
    }


def _mask_summary(path: Path) -> dict[str, Any]:
    mask = Mask.load(path, scores=False)
    return {"path": str(path), "id": mask.id, "collaborative_share": mask.collaborative_share()}


_MEAN_KEYS = ("learned_share", "heldout_forgotten_share", "forgotten_share", "retain_loss_delta", "time_s")


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (method, learning rate): means and spreads over seeds; diverged seeds make it diverged."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["lr"]), []).append(run)
    points = []
    for (method, lr), members in groups.items():
        point: dict[str, Any] = {"method": method, "lr": lr, "seeds": len(members)}
        if any(member.get("learned_share") is None for member in members):
            points.append({**point, "diverged": True})
            continue
        for key in _MEAN_KEYS:
            values = [member[key] for member in members if member.get(key) is not None]
            point[key] = statistics.mean(values) if values else None
            point[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for key in ("delta_logprob", "delta_margin"):
            point[key] = {
                name: statistics.mean(member[key][name] for member in members) for name in members[0][key] or {}
            }
        agreement = [member["mask_agreement"]["touched"] for member in members if member.get("mask_agreement")]
        point["mask_agreement_touched"] = statistics.mean(agreement) if agreement else None
        points.append({**point, "diverged": False})
    return points


def best_per_method(points: Sequence[dict[str, Any]], budget: float) -> dict[str, dict[str, Any] | None]:
    """Each method at its most-learning learning rate whose held-out forgetting stays within ``budget``.

    Ties in learning go to less forgetting, then the smaller learning rate. ``None``: no learning
    rate of the grid stayed within the budget.
    """
    best: dict[str, dict[str, Any] | None] = {}
    for point in points:
        best.setdefault(point["method"], None)
        if point["diverged"] or point["heldout_forgotten_share"] > budget + 1e-12:
            continue
        current = best[point["method"]]
        key = (point["learned_share"], -point["heldout_forgotten_share"], -point["lr"])
        if current is None or key > (current["learned_share"], -current["heldout_forgotten_share"], -current["lr"]):
            best[point["method"]] = point
    return best


def pareto_front(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both axes (learns at least as much, forgets at most as much, one strictly)."""
    alive = [point for point in points if not point["diverged"]]

    def dominated(point: dict[str, Any]) -> bool:
        return any(
            other["learned_share"] >= point["learned_share"]
            and other["heldout_forgotten_share"] <= point["heldout_forgotten_share"]
            and (
                other["learned_share"] > point["learned_share"]
                or other["heldout_forgotten_share"] < point["heldout_forgotten_share"]
            )
            for other in alive
        )

    front = [point for point in alive if not dominated(point)]
    return sorted(front, key=lambda point: point["heldout_forgotten_share"])


SWEEP_COLUMNS = (
    "method",
    "best lr",
    "learned",
    "held-out forgotten",
    "forgotten",
    "Δ margin held-out",
    "Δ retain loss",
    "seeds",
)


def sweep_table_rows(payload: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One row per method at its best learning rate within the budget (``-`` where none qualified)."""
    rows = []
    for method, point in payload["best"].items():
        if point is None:
            rows.append((method, "none within budget", "-", "-", "-", "-", "-", "-"))
            continue
        retain = point.get("retain_loss_delta")
        rows.append(
            (
                method,
                f"{point['lr']:g}",
                _percent(point, "learned_share"),
                _percent(point, "heldout_forgotten_share"),
                _percent(point, "forgotten_share"),
                f"{point['delta_margin'].get('heldout', 0.0):+.3f}",
                "-" if retain is None else f"{retain:+.4f}",
                point["seeds"],
            )
        )
    return rows


def _percent(point: dict[str, Any], key: str) -> str:
    spread = point.get(f"{key}_sd") or 0.0
    return f"{point[key]:.1%}" + (f" ± {spread:.1%}" if point["seeds"] > 1 else "")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def draw_sweep(payload: dict[str, Any], path: str | Path) -> None:
    """Learned against held-out forgotten (one point per method and learning rate, the Pareto front drawn),
    and learned against the held-out change in the correct choice's margin, as a PNG (written atomically).

    The margin, not the raw score, is the continuous measure of forgetting: training on answers in
    one format raises every choice's score, so the correct one's score alone can rise while the
    model forgets which choice is right.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [point for point in payload["points"] if not point["diverged"]]
    methods = list(dict.fromkeys(point["method"] for point in points))
    colors = {method: plt.get_cmap("tab10")(index % 10) for index, method in enumerate(methods)}
    figure, (counts, continuous) = plt.subplots(1, 2, figsize=(12, 5))
    for point in points:
        x_share = 100 * point["heldout_forgotten_share"]
        x_margin = point["delta_margin"].get("heldout", 0.0)
        y = 100 * point["learned_share"]
        for axis, x in ((counts, x_share), (continuous, x_margin)):
            axis.scatter(x, y, color=colors[point["method"]], s=40)
            axis.annotate(f"{point['lr']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = payload["pareto"]
    counts.plot(
        [100 * p["heldout_forgotten_share"] for p in front],
        [100 * p["learned_share"] for p in front],
        color="black",
        linestyle="--",
        linewidth=1,
        label="Pareto front",
    )
    budget = 100 * payload["config"]["forgetting_budget"]
    counts.axvline(budget, color="grey", linewidth=0.8, linestyle=":", label=f"budget {budget:g}%")
    for method in methods:
        counts.scatter([], [], color=colors[method], label=method)
    counts.set_xlabel("held-out forgotten (% of held-out mastered)")
    counts.set_ylabel("learned (% of injection questions)")
    counts.set_title("learned vs forgotten (labels: learning rate)")
    counts.legend(fontsize=7)
    continuous.axvline(0, color="grey", linewidth=0.8)
    continuous.set_xlabel("mean change in the correct choice's margin, held-out mastered")
    continuous.set_ylabel("learned (% of injection questions)")
    continuous.set_title("learned vs continuous forgetting")
    for axis in (counts, continuous):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
