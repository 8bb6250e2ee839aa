"""What a training run is asked to do (:class:`RunRequest`, saved as ``config.json``) and the data it reads.

A request is checked whole before any model loads; local files are kept by absolute path and content
hash, so a resume finds and verifies them from anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cpl_masks.data.questions import Question, load_questions, questions_sha256
from cpl_masks.errors import CplError
from cpl_masks.evaluation import harness
from cpl_masks.methods import METHODS, method_options
from cpl_masks.scoring.completion import DEFAULT_LOSS_ON, check_loss_on
from cpl_masks.training.loop import TrainConfig
from cpl_masks.utils.files import sha256_file


@dataclass
class RunRequest:
    """Everything a training run needs; saved as ``config.json`` so ``--resume`` can replay it."""

    inject: str
    mastered: str
    out: str
    model: str
    heldout: str | None = None
    mask: str | None = None  # as given: a path, an id, name@vN or name
    mode: str | None = None  # a name of cpl_masks.methods.METHODS (mask when --mask is given, dynamic with --retain)
    retain: str | None = None  # a retain set, referred to as a mask is: its signs start the per-step rule
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own options, by field name
    scoring: str | None = None  # default: the mask's, else split.json's, else letter
    loss_on: str = DEFAULT_LOSS_ON  # free-form items' loss: their completion tokens, or all tokens
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
    lm_eval_tasks: list[str] | None = None  # lm-eval tasks scored at epoch 0 and after the last epoch
    lm_eval_include: str | None = None  # a folder of local lm-eval task YAML (lm-eval's include_path)
    lm_eval_limit: int | None = None  # the first N docs of each lm-eval task (None: all)
    config: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> None:
        """Refuse bad options before any model loads, naming the option."""
        mode = self.resolved_mode()
        METHODS[mode].cls.check_options(method_options(mode, self.method_options), retain=self.retain is not None)
        self.config.check()
        check_loss_on(self.loss_on)
        check_evaluation(self.eval_every, self.retain_text)
        if self.track_drift and mode != "mask":
            raise CplError("--track-drift needs --mask (it measures how a static mask drifts from the sign rule)")
        check_options_with(self.method_options, self.config)
        if self.track_drift and self.config.distributed == "fsdp2":
            raise CplError("--track-drift needs whole gradients: use --distributed ddp with it, not fsdp2")
        harness.check_options(self.lm_eval_tasks, self.lm_eval_include, self.lm_eval_limit)  # last: it may take seconds

    @property
    def mask_file(self) -> str | None:
        """The mask file the run reads, as given: its freeze mask or its retain set (at most one is given)."""
        return self.mask if self.mask is not None else self.retain

    @property
    def mask_file_option(self) -> str:
        """The option that gave :attr:`mask_file`, for messages: ``--mask`` or ``--retain``."""
        return "--retain" if self.retain is not None else "--mask"

    def resolved_mode(self) -> str:
        """The training mode, refusing contradictory or missing choices."""
        if self.mode is not None and self.mode not in METHODS:
            raise CplError(f"--method {self.mode}: choose one of {', '.join(METHODS)}")
        if self.retain is not None:
            if self.mask is not None or self.mode not in (None, "dynamic"):
                given = "--mask" if self.mask is not None else f"--method {self.mode}"
                raise CplError(f"--retain trains with the per-step rule (--method dynamic); it excludes {given}")
            return "dynamic"
        if self.mask is not None:
            if self.mode not in (None, "mask"):
                raise CplError(f"--mask and --method {self.mode} exclude each other; give one of them")
            return "mask"
        if self.mode is None:
            raise CplError(
                f"choose how to train: --mask MASK or --method {'|'.join(m for m in METHODS if m != 'mask')}"
            )
        if self.mode == "mask":
            raise CplError("--method mask needs --mask MASK")
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


def check_evaluation(eval_every: int, track_text: str | None) -> None:
    """Refuse evaluation options a run and a sweep share: ``--eval-every`` and ``--track-text``."""
    if not (isinstance(eval_every, int) and eval_every >= 1):
        raise CplError(f"--eval-every {eval_every}: must be a whole number of epochs, at least 1")
    if track_text is not None:
        read_track_text(track_text)


def read_track_text(path: str) -> str:
    """The tracked text (``--track-text``) as a run scores it: a readable UTF-8 file with some text in it.

    Read whole before any model loads (and again by the run, from the same one place), so a file that is
    missing, unreadable, not UTF-8 or blank is refused up front instead of failing or giving NaN later.
    A UTF-8 byte-order mark is not part of the text.

    Raises:
        CplError: naming ``--track-text`` and the file, and what is wrong with it.
    """
    where = f"--track-text {path}"
    if not Path(path).is_file():
        raise CplError(f"{where}: no such file")
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CplError(f"{where}: cannot be read ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CplError(f"{where}: the file is not valid UTF-8 (byte {error.start + 1})") from None
    if not text.strip():
        raise CplError(f"{where}: the file is empty (its loss tracks forgetting, so it needs some text)")
    return text


def check_options_with(options: dict[str, Any], config: TrainConfig) -> None:
    """Refuse method options that the training configuration cannot honour."""
    if options.get("reprofile_every") is not None and (config.optimizer != "sgd" or config.distributed == "fsdp2"):
        # momentum and Adam moments would move entries a new mask freezes; re-profiling needs whole gradients
        raise CplError("--reprofile-every runs with --optimizer sgd, and not under --distributed fsdp2")


def load_run_data(request: RunRequest) -> RunData:
    """Read the injection, mastered and optional held-out question files."""
    return RunData(
        inject=load_questions(request.inject),
        mastered=load_questions(request.mastered),
        heldout=load_questions(request.heldout) if request.heldout else [],
    )


def with_absolute_paths(request: RunRequest) -> RunRequest:
    """``request`` with its local files and folders as absolute paths, so a resume finds them from anywhere."""

    def absolute(source: str | None) -> str | None:
        return str(Path(source).resolve()) if source is not None and Path(source).exists() else source

    return replace(
        request,
        inject=absolute(request.inject),
        mastered=absolute(request.mastered),
        heldout=absolute(request.heldout),
        retain_text=absolute(request.retain_text),
        lm_eval_include=absolute(request.lm_eval_include),
        model=absolute(request.model),
        out=str(Path(request.out).resolve()),
    )


def change_config(config: TrainConfig, done: int, *, lr: float | None, epochs: int | None) -> dict[str, Any] | None:
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


def reload_data(out: Path, request: RunRequest, hashes: dict[str, str] | None) -> RunData:
    """The question sets read again from their saved paths and checked against their saved hashes.

    A ``config.json`` written before hashes were saved (``hashes`` None) is trusted as it is.
    """
    try:
        data = load_run_data(request)
    except CplError as error:
        raise CplError(f"--resume {out}: cannot read the run's data again: {error}") from None
    if hashes is not None:
        found = input_hashes(request, data)
        for name, expected in hashes.items():
            if found.get(name) != expected:
                raise CplError(
                    f"--resume {out}: {getattr(request, name)} ({name}) has changed since the run started "
                    f"(sha256 {expected[:12]}, now {(found.get(name) or 'nothing')[:12]})"
                )
    return data


def input_hashes(request: RunRequest, data: RunData) -> dict[str, str]:
    """sha256 of each question set's questions and of the retain text's bytes, by request field."""
    hashes = {name: questions_sha256(questions) for name, questions in data.sets().items()}
    if request.retain_text is not None:
        hashes["retain_text"] = sha256_file(request.retain_text)
    return hashes
