"""``cpl-masks push`` / ``cpl-masks pull``: share masks on the Hugging Face Hub."""

from __future__ import annotations

from typing import Annotated

import typer

from cpl_masks import hub
from cpl_masks.cli.common import print_table, reports_errors
from cpl_masks.registry import Registry


@reports_errors
def push(
    ref: Annotated[str, typer.Argument(help="Mask: file path, id or id prefix, name@vN, or name (latest).")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub model repo OWNER/NAME (created if missing).")],
    private: Annotated[bool, typer.Option(help="Create the repo as private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to (created if missing).")] = None,
) -> None:
    """Upload a registered mask to the Hugging Face Hub.

    Upload a mask with a model card and its provenance to the Hub (token from HF_TOKEN).

    \b
    Example:
      cpl-masks push smollm2-135m-instruct/arc --repo-id me/smollm2-arc-mask
    """
    result = hub.push(ref, repo_id, registry=Registry(), private=private, revision=revision)
    print_table(
        f"pushed {result.ref}",
        ["field", "value"],
        [
            ("repo", result.repo_id),
            ("revision", result.revision),
            ("commit", result.commit_sha),
            ("url", result.url),
        ],
    )


@reports_errors
def pull(
    target: Annotated[str, typer.Argument(help="Hub repo OWNER/NAME, optionally @REVISION (branch, tag or commit).")],
    name: Annotated[str | None, typer.Option("--name", help="Task part of the registry name.")] = None,
) -> None:
    """Download a mask from the Hub, verify it, register it.

    Download a mask from the Hub, verify its content id, and register it.

    \b
    Example:
      cpl-masks pull me/smollm2-arc-mask@main --name arc
    """
    result = hub.pull(target, registry=Registry(), task=name)
    print_table(
        f"pulled {result.repo_id} as {result.ref}",
        ["field", "value"],
        [("id", result.mask_id), ("commit", result.commit_sha), ("file", str(result.path))],
    )
