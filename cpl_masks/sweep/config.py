"""What a sweep is asked to do (:class:`SweepConfig`, checked whole before anything loads) and how its
method names map to training methods: a method of the table, a control mask, ``reuse:MASK_FILE`` (a mask
made elsewhere) or ``retain:RETAIN_FILE`` (the per-step rule from a retain set made elsewhere).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpl_masks.data.questions import check_limit
from cpl_masks.errors import CplError
from cpl_masks.methods import METHODS, method_options
from cpl_masks.profiling.controls import CONTROLS
from cpl_masks.scoring.completion import DEFAULT_LOSS_ON, check_loss_on
from cpl_masks.training.loop import TrainConfig
from cpl_masks.training.request import check_evaluation, check_options_with

DEFAULT_METHODS = (
    "full",
    "mask",
    "random",
    "gradient-magnitude",
    "dynamic",
    "random-signs",
    "lora",
    "replay",
    "agem",
    "ewc",
)
DEFAULT_LR_GRID = (1e-5, 1e-4, 1e-3)
REUSE_PREFIX = "reuse:"  # a method name "reuse:<file>" trains with a mask profiled elsewhere (cross-task reuse)
RETAIN_PREFIX = "retain:"  # "retain:<file>" trains by the per-step rule from a retain set (profile --kind retain)
FILE_PREFIXES = {REUSE_PREFIX: "mask", RETAIN_PREFIX: "retain"}  # prefix -> the kind of file it names
SHARE_MARK = "@"  # "mask@0.5": a mask method at another share (--keep-fraction-grid)


@dataclass
class SweepConfig:
    """Everything a sweep depends on; a re-run with the same values resumes it."""

    model: str
    data: str
    out: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    lr_grid: list[float] = field(default_factory=lambda: list(DEFAULT_LR_GRID))
    method_lr_grid: dict[str, list[float]] = field(default_factory=dict)  # per-method grids replacing lr_grid
    keep_fraction_grid: list[float] = field(default_factory=list)  # mask methods also at these kept shares
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 2
    optimizer: str = "sgd"
    forgetting_budget: float = 0.02
    scoring: str = "loglik"
    loss_on: str = DEFAULT_LOSS_ON  # free-form items' loss: their completion tokens, or all tokens
    holdout_fraction: float = 0.25
    min_margin: float = 0.0
    limit: int | None = None
    heldout_data: str | None = None  # a forgetting pool's candidates (builtin:demo: its unused general questions)
    heldout_limit: int | None = None
    eval_every: int = 1
    retain_text: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)  # e.g. replay_share, ewc_lambda, lora_rank
    track_drift: bool = True  # record the CPL mask's agreement with the sign rule after every epoch
    eval_batch_size: int = 16
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None

    def check(self) -> None:
        """Refuse bad options before anything is loaded, naming the option."""
        check_loss_on(self.loss_on)
        for name in self.methods:
            prefix = file_prefix(name)
            if prefix is not None:
                check_file_method(name, prefix, self.scoring, self.method_options)
            elif name not in METHODS and name not in mask_methods():
                known = ", ".join(dict.fromkeys([*METHODS, *mask_methods()]))
                raise CplError(
                    f"--methods {name}: choose among {known}, {REUSE_PREFIX}MASK_FILE or {RETAIN_PREFIX}FILE"
                )
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
        if any(not 0.0 < fraction < 1.0 for fraction in self.keep_fraction_grid):
            raise CplError(f"--keep-fraction-grid {self.keep_fraction_grid}: give shares in (0, 1)")
        if len(set(self.keep_fraction_grid)) != len(self.keep_fraction_grid):
            raise CplError(f"--keep-fraction-grid {self.keep_fraction_grid}: give each share once")
        if self.keep_fraction_grid and not any(name in mask_methods() for name in self.methods):
            raise CplError(f"--keep-fraction-grid: needs a mask method among --methods ({', '.join(mask_methods())})")
        if not 0.0 <= self.forgetting_budget <= 1.0:
            raise CplError(f"--forgetting-budget {self.forgetting_budget}: must be a share in [0, 1]")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise CplError(f"--holdout-fraction {self.holdout_fraction}: a sweep needs a held-out share in (0, 1)")
        check_limit(self.heldout_limit, "--heldout-limit")
        check_evaluation(self.eval_every, self.retain_text)
        modes = {training_mode(method) for method in self.methods}
        for method in self.methods:
            name = training_mode(method)
            options = method_options(name, applicable_options(name, self.method_options))
            METHODS[name].cls.check_options(options, retain=method.startswith(RETAIN_PREFIX))
        unused = set(self.method_options) - {key for name in modes for key in option_names(name)}
        if unused:
            raise CplError(f"--{sorted(unused)[0].replace('_', '-')}: none of the swept methods takes it")
        config = TrainConfig(epochs=self.epochs, optimizer=self.optimizer, eval_batch_size=self.eval_batch_size)
        config.check()
        check_options_with(self.method_options, config)
        if self.method_options.get("reprofile_every") is not None and set(self.methods) & set(CONTROLS):
            raise CplError("--reprofile-every profiles the CPL mask again; a control mask has no rule to re-profile")

    def swept_methods(self) -> list[str]:
        """The methods the runs use: ``methods``, each mask method followed by its variants at the grid's shares."""
        swept = []
        for name in self.methods:
            swept.append(name)
            if name in mask_methods():
                swept += [at_share(name, fraction) for fraction in self.keep_fraction_grid]
        return swept

    def lr_grid_of(self, method: str) -> list[float]:
        """The learning rates ``method`` is run at (a share variant takes its base method's grid)."""
        return self.method_lr_grid.get(split_share(method)[0], self.lr_grid)


@dataclass
class RunSpec:
    """One run of the sweep: a method at a learning rate and a seed."""

    method: str
    lr: float
    seed: int

    @property
    def label(self) -> str:
        """The run's folder name under ``runs/``."""
        name = method_label(self.method)
        return f"{name}-lr{self.lr:g}-s{self.seed}"


def mask_methods() -> tuple[str, ...]:
    """Sweep methods that train through a static mask: the methods table's mask methods and the controls."""
    return (*(name for name, spec in METHODS.items() if spec.needs_mask), *CONTROLS)


def at_share(method: str, fraction: float) -> str:
    """The name of mask method ``method`` cut to keep ``fraction`` of the entries, e.g. ``mask@0.5``."""
    return f"{method}{SHARE_MARK}{fraction:g}"


def split_share(method: str) -> tuple[str, float | None]:
    """``(base method, kept share)`` of a sweep method name; the share is None for an uncut name."""
    base, mark, share = method.partition(SHARE_MARK)
    return (base, float(share)) if mark and file_prefix(method) is None else (method, None)


def training_mode(method: str) -> str:
    """The training method behind a sweep method name: every mask variant trains as ``mask``."""
    base = split_share(method)[0]
    if base.startswith(RETAIN_PREFIX):
        return "dynamic"
    return "mask" if base in mask_methods() or base.startswith(REUSE_PREFIX) else base


def method_label(method: str) -> str:
    """A sweep method's name in folders and reports: ``reuse-<stem>`` / ``retain-<stem>`` for a file's."""
    prefix = file_prefix(method)
    if prefix is None:
        return method
    return f"{prefix.removesuffix(':')}-{Path(method.removeprefix(prefix)).stem}"


def file_prefix(method: str) -> str | None:
    """The prefix of a method naming a file (``reuse:`` or ``retain:``), or None."""
    return next((prefix for prefix in FILE_PREFIXES if method.startswith(prefix)), None)


def check_file_method(method: str, prefix: str, scoring: str, options: dict[str, Any] | None = None) -> None:
    """Refuse a ``reuse:`` / ``retain:`` method whose file a run of the sweep would refuse, before anything loads.

    The file must be there, a valid mask file of the kind the prefix names, profiled with the sweep's
    ``scoring``; a retain set's questions and recorded sign measure must be intact and agree with the sweep's
    method ``options``. Each refusal names the method and the file.
    """
    from cpl_masks.data.split import resolve_scoring
    from cpl_masks.masks.format import Mask
    from cpl_masks.profiling.retain import retain_measure, retain_questions

    path, names = Path(method.removeprefix(prefix)), {"mask": "freeze mask", "retain": "retain set"}
    if not path.is_file():
        raise CplError(f"--methods {method}: no such {'retain set' if prefix == RETAIN_PREFIX else 'mask'} file")
    try:
        mask = Mask.load(path, scores=False)
        if mask.kind != FILE_PREFIXES[prefix]:
            other = next(name for name, wanted in FILE_PREFIXES.items() if wanted == mask.kind)
            raise CplError(f"{path} is a {names[mask.kind]}; name it as {other}{path}")
        resolve_scoring(scoring, mask_scoring=mask.metadata.get("scoring"), force=None)
        if mask.kind == "retain":
            retain_questions(mask)
            retain_measure(mask, applicable_options("dynamic", options or {}))
    except CplError as error:
        raise CplError(f"--methods {method}: {error}") from None


def option_names(mode: str) -> set[str]:
    return {item.name for item in dataclasses.fields(METHODS[mode].options)}


def applicable_options(mode: str, options: dict[str, Any]) -> dict[str, Any]:
    """The sweep's method options that belong to ``mode`` (each option names its method's fields)."""
    names = option_names(mode)
    return {key: value for key, value in options.items() if key in names}
