"""Sharing masks on the Hugging Face Hub: push a registered mask with a model card, pull one back.

Both go through ``huggingface_hub`` and honour ``HF_TOKEN`` and ``HF_ENDPOINT`` (read at call time). Hub
failures become one-line :class:`CplError` messages; a pull registers the mask once its content id checks out.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.models import DEFAULT_MODEL
from cpl_masks.profiling.retain import retain_measure
from cpl_masks.registry import Registry, Transfer, source_of
from cpl_masks.registry.names import MAX_TASK_CHARS, check_task, mask_name

MASK_FILENAME = "mask.safetensors"
PROVENANCE_FILENAME = "provenance.json"
FIGURE_FILENAME = "per_layer.png"
TAGS = ["cpl-masks", "freeze-mask", "collaborative-parameter-learning", "knowledge-injection"]
_HUB_MODELS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
_REVISION = re.compile(r"[A-Za-z0-9._/+=@-]{1,200}", re.ASCII)  # a branch, tag or commit, in plain ASCII
_BAD_REVISION = re.compile(r"\.\.|//|^[-/.]|/\.|[./]$|\./|\.lock(/|$)|^@$")  # '..', '-' first, empty/.-led/.lock parts
_COMMIT = re.compile(r"[0-9a-f]{40}")
_MARKDOWN_SYNTAX = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character
_CODE_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/:@+=-]{0,199}", re.ASCII)  # safe in a code block and a shell
CELL_CHARS = 300  # a model card field is shown in at most this many characters
_MASK_INTRO = """A cpl-masks freeze mask (Collaborative Parameter Learning, arXiv 2601.21577):
one bit per weight of the base model, 1 where the gradient of the new facts agrees with the gradient
of what the model already knows (trained), 0 where they conflict (frozen)."""
_RETAIN_INTRO = """A cpl-masks retain set (Collaborative Parameter Learning, arXiv 2601.21577): the signs of the mean
gradient over questions the model must keep (two bits per weight of the base model; the loss and
which signs count under "signs" below), and the questions themselves. Training with it keeps only
the entries of each step's gradient that agree in sign with it, refreshing the signs from its
questions as the weights move."""


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
    check_repo_id(repo_id, "--repo-id")
    if revision is not None:
        check_revision(revision, "--revision")
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
    _checked_commit(commit.oid, f"push {repo_id}")
    registry.add_transfer(mask.id, Transfer("push", repo_id, landed, commit.oid, commit.commit_url))
    return PushResult(ref=name, repo_id=repo_id, revision=landed, commit_sha=commit.oid, url=commit.commit_url)


def pull(target: str, *, registry: Registry, task: str | None = None) -> PullResult:
    """Download ``OWNER/NAME[@REVISION]`` into the Hub cache, verify its content id, and register it.

    The registered mask keeps the source its metadata gives (profiled, combined, ...); where it came
    from is its ``repo_id``, ``revision`` and pull transfer. Its name is ``<model>/hub.<owner>.<name>``
    (:func:`pulled_task`), never one of the user's own names, unless ``task`` asks for one: the
    repo's metadata is untrusted, so a pull must not become the latest version of ``tiny/base``.
    """
    repo_id, revision = parse_target(target)
    if task is not None:
        check_task(task)
    registry.check()
    api = hub_api(require_token=False)
    with hub_errors("pull", target):
        info = api.model_info(repo_id, revision=revision)
        sha = _checked_commit(info.sha, f"pull {target}")
        files = {sibling.rfilename for sibling in info.siblings or []}
        if MASK_FILENAME not in files:
            raise CplError(f"pull {target}: the repo has no {MASK_FILENAME} (not a cpl-masks mask repo)")
        path = Path(download(api, repo_id, MASK_FILENAME, sha))
        claimed = None
        if PROVENANCE_FILENAME in files:
            claimed = _claimed_id(Path(download(api, repo_id, PROVENANCE_FILENAME, sha)), target)
    mask = Mask.load(path, scores=False)  # raises when the bits do not give the id in the header
    if claimed is not None and claimed != mask.id:
        raise CplError(
            f"pull {target}: {MASK_FILENAME} has id {mask.id[:12]} but {PROVENANCE_FILENAME} says {claimed[:12]}"
        )
    if task is None:
        task = pulled_task(repo_id)
        source = source_of(mask.metadata, kind=mask.kind)
        _refuse_a_foreign_name(registry, mask_name(mask.metadata, task, source=source), repo_id)
    transfer = Transfer("pull", repo_id, revision or "main", sha, f"{api.endpoint}/{repo_id}")
    name = registry.register(path, task=task, repo_id=repo_id, revision=sha, transfer=transfer, expected_id=mask.id)
    return PullResult(ref=name, mask_id=mask.id, repo_id=repo_id, commit_sha=sha, path=path)


def pulled_task(repo_id: str) -> str:
    """The task part of a pulled mask's registry name, one per repo id, at most 64 characters.

    ``hub.<owner>.<name>``, or ``hub.<owner>--<name>`` when the owner has a dot: a valid repo id has
    no ``--`` or ``..`` and its parts start and end with a letter, digit or ``_``, so the first dot
    (or the one ``--``) is the slash and no two repos share a task (``a/b.c`` and ``a.b/c`` differ).
    Longer ones keep 46 characters, ``..`` (which no full one holds) and 16 hex digits of the id's
    sha256. It names where the mask came from, so a pull without ``--name`` never files itself under
    a task the user profiled (the repo's metadata may claim any model and task).
    """
    owner, name = check_repo_id(repo_id).split("/")
    task = f"hub.{owner}{'--' if '.' in owner else '.'}{name}"
    if len(task) <= MAX_TASK_CHARS:
        return task
    return f"{task[: MAX_TASK_CHARS - 18]}..{hashlib.sha256(repo_id.encode()).hexdigest()[:16]}"


def _refuse_a_foreign_name(registry: Registry, name: str, repo_id: str) -> None:
    """Refuse to file a pull under a name that holds a mask from elsewhere: another repo, or this machine.

    Names from :func:`pulled_task` differ per repo, but a retain set adds ``.retain`` to its name, and a
    name may have been made by hand (``--name``) or by an older cpl-masks; no pull becomes their next version.
    """
    others = {item["repo_id"] or "this machine" for item in registry.list_masks() if item["name"] == name}
    others.discard(repo_id)
    if others:
        raise CplError(
            f"pull {repo_id}: registry name {name} already holds a mask from {', '.join(sorted(others))}; "
            "choose another with --name"
        )


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


def check_repo_id(repo_id: str, where: str = "repo id") -> str:
    """Accept ``OWNER/NAME`` exactly when ``huggingface_hub``'s own validator does, and it has an owner.

    The one check of every repo id the tool takes or writes (``push --repo-id``, ``pull``, ``hf://`` and
    the Hub references of :func:`~cpl_masks.integrations.trainer.load_mask`, the ids a mask's metadata
    names in a model card), run before any network call. A mask repo always has an owner: a bare name
    would land in the token's namespace under an id the registry would not know.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("it has no owner")
    except HFValidationError as error:
        reason = " ".join(str(error).replace(f"'{repo_id}'", "").split()).rstrip(":. ")
        raise CplError(f"{where} {_shown(repo_id)}: not a valid Hub repo id; expected OWNER/NAME ({reason})") from None
    return repo_id


def check_revision(revision: str, where: str = "revision") -> str:
    """Accept a branch, tag or commit name by git's ref rules, in plain ASCII (no space, ``~^:?*[\\``).

    No ``..``, no empty, dot-led or ``.lock`` part, no leading ``-``: a revision becomes a ref file in
    the Hub cache and a URL path segment, so it can leave neither.
    """
    if not _REVISION.fullmatch(revision) or _BAD_REVISION.search(revision):
        raise CplError(
            f"{where} {_shown(revision)}: not a valid Hub revision (a branch, tag or commit: letters, digits,"
            " '._-/+=@'; no '..', and no empty, dot-led or '.lock' part)"
        )
    return revision


def parse_target(target: str, where: str = "pull") -> tuple[str, str | None]:
    """``OWNER/NAME[@REVISION]`` as its checked repo id and revision (None: the default branch)."""
    repo_id, at, revision = target.partition("@")
    check_repo_id(repo_id, where)
    return repo_id, check_revision(revision, f"{where} revision") if at else None


def is_repo_id(text: str) -> bool:
    """Whether ``text`` is a repo id :func:`check_repo_id` accepts (registry names read as one too)."""
    return _passes(check_repo_id, text)


def is_hub_target(text: str) -> bool:
    """Whether ``text`` is an ``OWNER/NAME[@REVISION]`` that :func:`parse_target` accepts."""
    return _passes(parse_target, text)


def _passes(check: Any, text: str) -> bool:
    try:
        check(text)
    except CplError:
        return False
    return True


def _checked_commit(sha: Any, where: str) -> str:
    """A commit id the Hub answered: 40 lower-case hex digits, or refused (it names a cache folder)."""
    if not isinstance(sha, str) or not _COMMIT.fullmatch(sha):
        raise CplError(f"{where}: the Hub answered a commit id that is not 40 hex digits ({_shown(str(sha))})")
    return sha


def _shown(text: str) -> str:
    """Untrusted text for a one-line message: quoted, escaped, at most 80 characters of it."""
    return repr(text[:80]) + ("…" if len(text) > 80 else "")


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
    return ref if is_repo_id(ref) and not Path(ref).exists() else None


def datasets(mask: Mask) -> list[str]:
    """Hub dataset ids among the mask's data sources (local files are left out)."""
    data = mask.metadata.get("data") or {}
    sources = [entry.get("path") for entry in data.values() if isinstance(entry, dict)]
    return sorted(
        {
            source
            for source in sources
            if isinstance(source, str) and is_repo_id(source) and not Path(source).suffix and not Path(source).exists()
        }
    )


def card_text(value: Any) -> str:
    """An untrusted value as one line of visible text: control and format characters (newlines, bidi
    overrides, zero-width) as spaces, runs of spaces as one, at most :data:`CELL_CHARS` characters."""
    spaced = "".join(" " if unicodedata.category(char)[0] == "C" else char for char in str(value))
    text = " ".join(spaced.split())
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"


def markdown_text(value: Any) -> str:
    """:func:`card_text` with every ASCII punctuation character backslash-escaped: in any Markdown renderer
    it stays text (no table cell break, link, autolink, HTML, emphasis or heading)."""
    return _MARKDOWN_SYNTAX.sub(r"\\\1", card_text(value))


def _code_word(text: Any, placeholder: str) -> str:
    """``text`` where it is one plain word, safe in a code block and a shell command; else ``placeholder``."""
    return text if isinstance(text, str) and _CODE_WORD.fullmatch(text) else placeholder


def card_rows(mask: Mask, name: str) -> list[tuple[str, str]]:
    """The model card's provenance table as (field, value) text, before escaping; fields without a value left out."""
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
        ("loss", metadata.get("loss") if "loss_on" in metadata else None),  # said where free-form items took part
        ("rule", json.dumps(metadata.get("rule"), ensure_ascii=False)),
        ("signs", retain_measure(mask).describe() if mask.kind == "retain" else None),
        ("parents", ", ".join(map(str, metadata.get("parents") or [])) or None),
        ("created", metadata.get("created")),
    ]
    for key, entry in sorted((metadata.get("data") or {}).items()):
        if isinstance(entry, dict):
            shape = f" ({entry['format']})" if entry.get("format") else ""
            rows.append((f"data: {key}", f"{entry.get('rows')} rows{shape}, sha256 {str(entry.get('sha256'))[:16]}…"))
    return [(key, str(value)) for key, value in rows if value not in (None, "null")]


def model_card(mask: Mask, name: str, repo_id: str) -> str:
    """README.md: YAML front matter for the Hub, then provenance, the per-layer figure and usage.

    Every field from the mask's metadata (untrusted) or the registry goes through :func:`markdown_text`
    in the table, :func:`_code_word` in the commands and :func:`is_repo_id` into the front matter.
    """
    from huggingface_hub import ModelCardData

    front = ModelCardData(
        base_model=base_model(mask), library_name="cpl-masks", tags=TAGS, datasets=datasets(mask) or None
    ).to_yaml()
    table = "\n".join(f"| {markdown_text(key)} | {markdown_text(value)} |" for key, value in card_rows(mask, name))
    title = f"`{name}`" if _code_word(name, "") else markdown_text(name)
    unversioned = name.split("@")[0]
    commands = {
        "repo": _code_word(repo_id, "OWNER/NAME"),
        "name": _code_word(unversioned, "MASK"),
        "short": _code_word(unversioned.split("/")[-1].removesuffix(".retain"), "NAME"),
        "model": _code_word((mask.metadata.get("model") or {}).get("ref"), "MODEL"),
    }
    retain = mask.kind == "retain"
    figure = f"## Share of trainable entries per layer\n\n![collaborative share per layer]({FIGURE_FILENAME})\n\n"
    train = f"--{'retain' if retain else 'mask'} {commands['name']} --model {commands['model']}"
    train += " \\\n    --inject new_facts.jsonl --mastered kept.jsonl" if retain else " --inject new_facts.jsonl"
    return f"""---
{front}
---

# cpl-masks {"retain set" if retain else "freeze mask"} {title}

{_RETAIN_INTRO if retain else _MASK_INTRO}

## Provenance

| field | value |
|---|---|
{table}

Full provenance: [`{PROVENANCE_FILENAME}`]({PROVENANCE_FILENAME}).

{"" if retain else figure}## How to use it

```bash
cpl-masks pull {commands["repo"]} --name {commands["short"]}
cpl-masks train {train} --out runs/new
```
"""


def per_layer_figure(mask: Mask) -> bytes:
    """PNG bytes of the ``inspect`` heatmap (collaborative share, layers x module types) for the model card."""
    from cpl_masks.masks.stats import draw_share_heatmap

    buffer = io.BytesIO()
    draw_share_heatmap(mask, buffer)
    return buffer.getvalue()
