"""Sharing masks on the Hugging Face Hub: push a registered mask with a model card, pull one back.

Both go through ``huggingface_hub`` and honour ``HF_TOKEN`` and ``HF_ENDPOINT`` (read at call
time, so a changed environment takes effect without re-importing). Hub failures become one-line
:class:`CplError` messages, and a pull registers the mask only after its content id checks out.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.models import DEFAULT_MODEL
from cpl_masks.profiling.retain import retain_measure
from cpl_masks.registry import Registry, Transfer
from cpl_masks.registry.names import MAX_TASK_CHARS

MASK_FILENAME = "mask.safetensors"
PROVENANCE_FILENAME = "provenance.json"
FIGURE_FILENAME = "per_layer.png"
TAGS = ["cpl-masks", "freeze-mask", "collaborative-parameter-learning", "knowledge-injection"]
_HUB_MODELS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", re.ASCII)


@dataclass
class PushResult:
    """Where a push landed."""

    ref: str  # the mask's registry name@vN
    repo_id: str
    revision: str
    commit_sha: str
    url: str


@dataclass
class PullResult:
    """What a pull registered."""

    ref: str  # registry name@vN
    mask_id: str
    repo_id: str
    commit_sha: str
    path: Path  # the file in the Hub cache


def push(
    ref: str, repo_id: str, *, registry: Registry, private: bool = False, revision: str | None = None
) -> PushResult:
    """Upload a mask, its model card and its provenance to ``repo_id`` (created if needed).

    A mask file that is not registered yet is registered in ``registry`` first, so the push is on record.
    """
    check_repo_id(repo_id)
    path = registry.resolve(ref)
    mask = Mask.load(path, scores=False)
    known = registry.names(mask.id)
    name = known[0] if known else registry.register(path)  # a push never adds a name to a registered mask
    api = hub_api(require_token=True)
    from huggingface_hub import CommitOperationAdd

    files = {
        MASK_FILENAME: path,
        "README.md": model_card(mask, name, repo_id).encode(),
        PROVENANCE_FILENAME: json.dumps(provenance(mask, name), indent=2, sort_keys=True).encode(),
    }
    if mask.kind == "mask":  # a retain set has no collaborative shares to draw
        files[FIGURE_FILENAME] = per_layer_figure(mask)
    operations = [CommitOperationAdd(path_in_repo=key, path_or_fileobj=value) for key, value in files.items()]
    with hub_errors("push", repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            repo_id, operations=operations, commit_message=f"Upload cpl-masks mask {name}", revision=revision
        )
    landed = revision or "main"
    registry.add_transfer(mask.id, Transfer("push", repo_id, landed, commit.oid, commit.commit_url))
    return PushResult(ref=name, repo_id=repo_id, revision=landed, commit_sha=commit.oid, url=commit.commit_url)


def pull(target: str, *, registry: Registry, task: str | None = None) -> PullResult:
    """Download ``OWNER/NAME[@REVISION]`` into the Hub cache, verify its content id, and register it.

    The registered mask keeps the source its metadata gives (profiled, combined, ...); where it came
    from is its ``repo_id``, ``revision`` and pull transfer. Its name is ``<model>/hub.<owner>.<name>``
    (:func:`pulled_task`), never one of the user's own names, unless ``task`` asks for one: the
    repo's metadata is untrusted, so a pull must not become the latest version of ``tiny/base``.
    """
    repo_id, _, revision = target.partition("@")
    check_repo_id(repo_id)
    registry.check()
    api = hub_api(require_token=False)
    with hub_errors("pull", target):
        info = api.model_info(repo_id, revision=revision or None)
        files = {sibling.rfilename for sibling in info.siblings or []}
        if MASK_FILENAME not in files:
            raise CplError(f"pull {target}: the repo has no {MASK_FILENAME} (not a cpl-masks mask repo)")
        path = Path(download(api, repo_id, MASK_FILENAME, info.sha))
        claimed = None
        if PROVENANCE_FILENAME in files:
            claimed = _claimed_id(Path(download(api, repo_id, PROVENANCE_FILENAME, info.sha)), target)
    mask = Mask.load(path, scores=False)  # raises when the bits do not give the id in the header
    if claimed is not None and claimed != mask.id:
        raise CplError(
            f"pull {target}: {MASK_FILENAME} has id {mask.id[:12]} but {PROVENANCE_FILENAME} says {claimed[:12]}"
        )
    transfer = Transfer("pull", repo_id, revision or "main", info.sha, f"{api.endpoint}/{repo_id}")
    task = task if task is not None else pulled_task(repo_id)
    name = registry.register(path, task=task, repo_id=repo_id, revision=info.sha, transfer=transfer)
    return PullResult(ref=name, mask_id=mask.id, repo_id=repo_id, commit_sha=info.sha, path=path)


def pulled_task(repo_id: str) -> str:
    """The task part of a pulled mask's registry name: ``hub.<owner>.<name>``, at most 64 characters.

    It names where the mask came from, so a pull without ``--name`` never files itself under a
    task the user profiled (the repo's metadata may claim any model and task).
    """
    task = "hub." + re.sub(r"[^A-Za-z0-9._-]+", "-", repo_id.replace("/", "."))
    if len(task) <= MAX_TASK_CHARS:
        return task
    digest = hashlib.sha256(repo_id.encode()).hexdigest()[:8]
    return f"{task[: MAX_TASK_CHARS - 9]}-{digest}"


def _claimed_id(path: Path, target: str) -> str | None:
    """The id a downloaded ``provenance.json`` claims, refusing a file that is not such an object."""
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise CplError(f"pull {target}: {PROVENANCE_FILENAME} is not valid JSON") from error
    if not isinstance(provenance, dict):
        raise CplError(f"pull {target}: {PROVENANCE_FILENAME} is not a JSON object")
    claimed = provenance.get("id")
    if claimed is not None and (not isinstance(claimed, str) or not re.fullmatch(r"[0-9a-f]{64}", claimed)):
        raise CplError(f"pull {target}: {PROVENANCE_FILENAME} 'id' is not a mask id (64 hex digits)")
    return claimed


def is_repo_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub repo id ``OWNER/NAME`` (registry names do too, so ask the registry first)."""
    return bool(_REPO_ID.match(text))


def check_repo_id(repo_id: str) -> None:
    """Accept ``OWNER/NAME`` only."""
    if not is_repo_id(repo_id):
        raise CplError(f"repo id {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.')")


def hub_api(*, require_token: bool) -> Any:
    """An ``HfApi`` on ``$HF_ENDPOINT`` with ``$HF_TOKEN`` (or the saved login); a push needs a token."""
    from huggingface_hub import HfApi, get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if require_token and not token:
        raise CplError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a push needs write access)")
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token or None)


def download(api: Any, repo_id: str, filename: str, commit: str) -> str:
    """One file of a repo at a fixed commit, through the Hub cache (``$HF_HUB_CACHE`` when set)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(
        repo_id,
        filename,
        revision=commit,
        endpoint=api.endpoint,
        token=api.token,
        cache_dir=os.environ.get("HF_HUB_CACHE") or None,
    )


@contextlib.contextmanager
def hub_errors(action: str, target: str) -> Iterator[None]:
    """Turn ``huggingface_hub`` and network failures into one-line errors naming the repo."""
    import httpx2
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{action} {target}"
    try:
        yield
    except RevisionNotFoundError as error:
        raise CplError(f"{where}: no such revision on the Hub") from error
    except RepositoryNotFoundError as error:
        raise CplError(f"{where}: repository not found (or private and your token cannot read it)") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise CplError(f"{where}: the Hub rejected your token (401); check HF_TOKEN") from error
        if status == 403:
            raise CplError(f"{where}: your token may not write to this repository (403)") from error
        raise CplError(f"{where}: the Hub answered {status} ({str(error).splitlines()[0][:160]})") from error
    except (httpx2.TransportError, LocalEntryNotFoundError, ConnectionError) as error:
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        raise CplError(f"{where}: cannot reach the Hub at {endpoint} ({type(error).__name__})") from error


def provenance(mask: Mask, name: str) -> dict[str, Any]:
    """What ``provenance.json`` holds: the id, the registry name it was pushed as, and the header metadata."""
    return {
        "id": mask.id,
        "kind": mask.kind,
        "name": name,
        "entries": mask.entries,
        "collaborative_share": mask.collaborative_share() if mask.kind == "mask" else None,
        "metadata": mask.metadata,
    }


def base_model(mask: Mask) -> str | None:
    """The Hub id of the model a mask was profiled on, when it is one (not a local path)."""
    ref = (mask.metadata.get("model") or {}).get("ref") or ""
    ref = _HUB_MODELS.get(ref, ref)
    return ref if _REPO_ID.match(ref) and not Path(ref).exists() else None


def datasets(mask: Mask) -> list[str]:
    """Hub dataset ids among the mask's data sources (local files are left out)."""
    data = mask.metadata.get("data") or {}
    sources = [entry.get("path") for entry in data.values() if isinstance(entry, dict)]
    return sorted(
        {
            source
            for source in sources
            if isinstance(source, str)
            and _REPO_ID.match(source)
            and not Path(source).suffix
            and not Path(source).exists()
        }
    )


def model_card(mask: Mask, name: str, repo_id: str) -> str:
    """README.md: YAML front matter for the Hub, then provenance, the per-layer figure and usage."""
    from huggingface_hub import ModelCardData

    front = ModelCardData(
        base_model=base_model(mask), library_name="cpl-masks", tags=TAGS, datasets=datasets(mask) or None
    ).to_yaml()
    metadata = mask.metadata
    model = metadata.get("model") or {}
    rows = [
        ("id", mask.id),
        ("registry name", name),
        ("model", model.get("ref")),
        ("model fingerprint", model.get("fingerprint")),
        ("entries", mask.entries),
        ("collaborative share", f"{mask.collaborative_share():.2%}" if mask.kind == "mask" else None),
        ("task", metadata.get("task")),
        ("scoring", metadata.get("scoring")),
        ("rule", json.dumps(metadata.get("rule"))),
        ("signs", retain_measure(mask).describe() if mask.kind == "retain" else None),
        ("parents", ", ".join(metadata.get("parents") or []) or None),
        ("created", metadata.get("created")),
    ]
    for key, entry in sorted((metadata.get("data") or {}).items()):
        if isinstance(entry, dict):
            rows.append((f"data: {key}", f"{entry.get('rows')} rows, sha256 {str(entry.get('sha256'))[:16]}…"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows if value not in (None, "null"))
    if mask.kind == "retain":
        return _retain_card(front, name, repo_id, table, model.get("ref"))
    return f"""---
{front}
---

# cpl-masks freeze mask `{name}`

A cpl-masks freeze mask (Collaborative Parameter Learning, arXiv 2601.21577):
one bit per weight of the base model, 1 where the gradient of the new facts agrees with the gradient
of what the model already knows (trained), 0 where they conflict (frozen).

## Provenance

| field | value |
|---|---|
{table}

Full provenance: [`{PROVENANCE_FILENAME}`]({PROVENANCE_FILENAME}).

## Share of trainable entries per layer

![collaborative share per layer]({FIGURE_FILENAME})

## How to use it

```bash
cpl-masks pull {repo_id} --name {name.split("@")[0].split("/")[-1]}
cpl-masks train --mask {name.split("@")[0]} --model {model.get("ref")} --inject new_facts.jsonl --out runs/new
```
"""


def _retain_card(front: str, name: str, repo_id: str, table: str, model: str | None) -> str:
    """README.md of a retain set: what it holds and how to train with it."""
    return f"""---
{front}
---

# cpl-masks retain set `{name}`

A cpl-masks retain set (Collaborative Parameter Learning, arXiv 2601.21577): the signs of the mean
gradient over questions the model must keep (two bits per weight of the base model; the loss and
which signs count under "signs" below), and the questions themselves. Training with it keeps only
the entries of each step's gradient that agree in sign with it, refreshing the signs from its
questions as the weights move.

## Provenance

| field | value |
|---|---|
{table}

Full provenance: [`{PROVENANCE_FILENAME}`]({PROVENANCE_FILENAME}).

## How to use it

```bash
cpl-masks pull {repo_id} --name {name.split("@")[0].split("/")[-1].removesuffix(".retain")}
cpl-masks train --retain {name.split("@")[0]} --model {model} \\
    --inject new_facts.jsonl --mastered kept.jsonl --out runs/new
```
"""


def per_layer_figure(mask: Mask) -> bytes:
    """PNG bytes of the ``inspect`` heatmap (collaborative share, layers x module types) for the model card."""
    from cpl_masks.masks.stats import draw_share_heatmap

    buffer = io.BytesIO()
    draw_share_heatmap(mask, buffer)
    return buffer.getvalue()
