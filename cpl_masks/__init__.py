"""cpl-masks: reusable freeze masks for knowledge injection without forgetting.

The library, one subpackage per concern (the CLI, :mod:`cpl_masks.cli`, and the provenance
registry, :mod:`cpl_masks.registry`, stand beside it):

* :mod:`~cpl_masks.data`: question sets, the built-in demo set, the split into mastered (M) and injection (I);
* :mod:`~cpl_masks.models`: loading a model and the fingerprint of its exact weights;
* :mod:`~cpl_masks.scoring`: how a model answers a question, and the answer loss training descends;
* :mod:`~cpl_masks.profiling`: g_M and g_I into a freeze mask, its control masks, and retain sets;
* :mod:`~cpl_masks.masks`: the file format of both, read as untrusted bytes; algebra and statistics;
* :mod:`~cpl_masks.methods` and :mod:`~cpl_masks.training`: one loop for every method, and a run around it;
* :mod:`~cpl_masks.evaluation`: learned and forgotten, question by question, and paired statistics;
* :mod:`~cpl_masks.sweep`: every method at every learning rate, judged under a forgetting budget;
* :mod:`~cpl_masks.hub` (push and pull) and :mod:`~cpl_masks.integrations` (a mask or a retain set
  in transformers' ``Trainer``, TRL or any loop);
* :mod:`~cpl_masks.utils`: atomic files and locks, ranks and sharding, progress bars, versions.

Every public name below is importable from ``cpl_masks`` itself.
"""

import warnings
from typing import Any

from cpl_masks.data.questions import FieldNames, Question, load_questions, questions_sha256, write_questions
from cpl_masks.data.split import Split, forgetting_pool, split_questions, write_split
from cpl_masks.errors import CplError
from cpl_masks.evaluation.outcomes import compare_outcomes, question_outcomes, read_question_records
from cpl_masks.evaluation.stats import compare_paired, mcnemar_exact, paired_bootstrap
from cpl_masks.integrations.sign_rule import SignRuleHandle, apply_retain
from cpl_masks.integrations.trainer import MaskHandle, apply, apply_mask, load_mask
from cpl_masks.masks.algebra import combine, recut
from cpl_masks.masks.format import Mask, read_header
from cpl_masks.masks.stats import diff, summarize
from cpl_masks.methods import METHODS, Method, MethodContext, make_method
from cpl_masks.models import DEFAULT_MODEL, LoadedModel, load_model, model_fingerprint
from cpl_masks.profiling.controls import gradient_magnitude_mask, random_mask
from cpl_masks.profiling.freeze_mask import profile
from cpl_masks.profiling.retain import profile_retain, retain_questions
from cpl_masks.profiling.selection import Cut
from cpl_masks.scoring.scorers import SCORINGS, Scores, make_scorer, score_questions
from cpl_masks.sweep.config import SweepConfig
from cpl_masks.sweep.run import run_sweep
from cpl_masks.training.loop import TrainConfig
from cpl_masks.training.record import RunRecord
from cpl_masks.training.request import RunRequest
from cpl_masks.training.run import resume_run, start_run

__version__ = "0.1.0"

# The Trainer-facing API of a mask: ``Mask.from_ref("owner/name")`` and ``mask.apply(trainer)``.
# The file format (masks.py) is the lowest layer and imports nothing above it; the loaders that
# reach the registry and the Hub are attached here, where the whole package is in place.
Mask.from_ref = staticmethod(load_mask)  # type: ignore[attr-defined]
Mask.apply = apply  # type: ignore[attr-defined]

__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "SCORINGS",
    "CplError",
    "Cut",
    "FieldNames",
    "LoadedModel",
    "Mask",
    "MaskHandle",
    "Method",
    "MethodContext",
    "Question",
    "RunRecord",
    "RunRequest",
    "Scores",
    "SignRuleHandle",
    "Split",
    "SweepConfig",
    "TrainConfig",
    "__version__",
    "apply_mask",
    "apply_retain",
    "combine",
    "compare_outcomes",
    "compare_paired",
    "diff",
    "forgetting_pool",
    "gradient_magnitude_mask",
    "load_model",
    "load_questions",
    "make_method",
    "make_scorer",
    "mcnemar_exact",
    "model_fingerprint",
    "paired_bootstrap",
    "profile",
    "profile_retain",
    "question_outcomes",
    "questions_sha256",
    "random_mask",
    "read_header",
    "read_question_records",
    "recut",
    "resume_run",
    "retain_questions",
    "run_sweep",
    "score_questions",
    "split_questions",
    "start_run",
    "summarize",
    "write_questions",
    "write_split",
]

_RENAMED = {"Rule": "Cut"}  # an old public name -> its new one


def __getattr__(name: str) -> Any:
    """Old spellings of renamed public names stay importable, with a ``DeprecationWarning``."""
    if name in _RENAMED:
        warnings.warn(f"cpl_masks.{name} is renamed cpl_masks.{_RENAMED[name]}", DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module 'cpl_masks' has no attribute {name!r}")
