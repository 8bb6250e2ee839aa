"""Local data for the lm-eval tasks of this folder (``--lm-eval-include experiments/lm_eval_tasks``).

lm-eval imports this module by the YAML's ``custom_dataset: !function utils.local_jsonl``; the data file is
read where the YAML says, relative to this folder, so the task works from any working directory and
offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def local_jsonl(data_files: str, **_: Any) -> Any:
    """The JSONL file ``data_files`` (relative to this folder, or absolute) as a ``test`` split.

    lm-eval passes the YAML's ``dataset_kwargs`` and ``metadata`` as keyword arguments; only
    ``data_files`` is used.
    """
    import datasets

    path = (HERE / data_files).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the shared data lives in ../shared/data beside the repository)")
    return datasets.load_dataset("json", data_files={"test": str(path)})
