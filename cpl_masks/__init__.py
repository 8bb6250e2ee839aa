"""cpl-masks: reusable freeze masks for knowledge injection without forgetting.

The pipeline, one module per stage: :mod:`~cpl_masks.data` (question sets),
:mod:`~cpl_masks.models` (loading and fingerprints), :mod:`~cpl_masks.scoring` (answers and the
answer loss), :mod:`~cpl_masks.split` (mastered vs. to-inject).
"""

from cpl_masks.data import FieldNames, Question, load_questions, questions_sha256, write_questions
from cpl_masks.errors import CplError
from cpl_masks.models import DEFAULT_MODEL, LoadedModel, load_model, model_fingerprint
from cpl_masks.scoring import SCORINGS, Scores, make_scorer, score_questions
from cpl_masks.split import Split, split_questions, write_split

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "SCORINGS",
    "CplError",
    "FieldNames",
    "LoadedModel",
    "Question",
    "Scores",
    "Split",
    "__version__",
    "load_model",
    "load_questions",
    "make_scorer",
    "model_fingerprint",
    "questions_sha256",
    "score_questions",
    "split_questions",
    "write_questions",
    "write_split",
]
