"""``cpl-masks registry ...``: list, show, trace, check and prune the registered masks."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.tree import Tree

from cpl_masks import registry
from cpl_masks.cli.common import print_table, reports_errors, stdout

app = typer.Typer(help="The mask registry: provenance, reuse across tasks, lineage.", no_args_is_help=True)
RefArgument = Annotated[str, typer.Argument(help="Mask: file path, id or id prefix, name@vN, or name (latest).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@app.command("list")
@reports_errors
def list_command(
    model: Annotated[str | None, typer.Option(help="Only masks of this model (ref or slug).")] = None,
    task: Annotated[str | None, typer.Option(help="Only masks of this task.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List registered masks with their share of collaborative entries and how often they were reused.

    Example: cpl-masks registry list --model smollm2-135m-instruct
    """
    masks = registry.list_masks(model=model, task=task)
    if as_json:
        stdout.print_json(data=masks)
        return
    print_table(
        f"{len(masks)} registered masks",
        ["mask", "id", "source", "entries", "collaborative", "runs", "created"],
        [
            (
                item["ref"],
                item["id"][:12],
                item["source"],
                item["n_params"],
                f"{item['collaborative_share']:.1%}",
                item["runs"],
                item["created_at"],
            )
            for item in masks
        ],
    )


@app.command()
@reports_errors
def show(ref: RefArgument, as_json: JsonOption = False) -> None:
    """Show a mask's provenance and every task it was used on, with the results.

    Example: cpl-masks registry show smollm2-135m-instruct/arc@v1
    """
    details = registry.show(ref)
    if as_json:
        stdout.print_json(data=details)
        return
    summary = {key: details[key] for key in ("id", "source", "repo_id", "revision", "n_params", "path")}
    summary["collaborative share"] = f"{details['collaborative_share']:.2%}"
    summary["parents"] = ", ".join(parent["ref"] or parent["id"][:12] for parent in details["parents"]) or "-"
    summary["children"] = ", ".join(child["ref"] for child in details["children"]) or "-"
    provenance = dict(details["provenance"])
    if isinstance(provenance.get("tensors"), dict):  # per-tensor statistics: hundreds of rows, see --json
        provenance["tensors"] = f"statistics of {len(provenance['tensors'])} tensors (see --json)"
    rows = [(key, "-" if value is None else value) for key, value in summary.items()]
    rows += sorted(flatten(provenance).items())
    print_table(f"mask {details['ref']}", ["field", "value"], rows)
    print_table(
        f"used in {len(details['runs'])} training runs",
        ["task", "mode", "learned", "forgotten", "held-out forgotten", "output", "recorded"],
        [
            (
                run["task"] or "-",
                run["mode"] or "-",
                out_of(run["learned"], run["totals"].get("inject_wrong")),
                out_of(run["forgotten"], run["totals"].get("mastered_right")),
                out_of(run["heldout_forgotten"], run["totals"].get("heldout_right")),
                run["out_dir"] or "-",
                run["recorded_at"],
            )
            for run in details["runs"]
        ],
    )
    if details["transfers"]:
        print_table(
            "hub transfers",
            ["direction", "repo", "revision", "commit", "at"],
            [
                (
                    item["direction"],
                    item["repo_id"],
                    item["revision"] or "-",
                    (item["commit_sha"] or "-")[:12],
                    item["at"],
                )
                for item in details["transfers"]
            ],
        )


def flatten(payload: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested provenance as ``a.b.c -> value`` rows (lists shown as compact JSON)."""
    rows: dict[str, str] = {}
    for key, value in payload.items():
        if isinstance(value, dict) and value:
            rows.update(flatten(value, f"{prefix}{key}."))
        else:
            rows[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return rows


def out_of(count: float | None, total: int | None) -> str:
    """A question count as ``count/total`` (or alone when the total is unknown), ``-`` when unknown."""
    if count is None:
        return "-"
    return f"{count:g}/{total}" if total is not None else f"{count:g}"


@app.command()
@reports_errors
def lineage(ref: RefArgument, as_json: JsonOption = False) -> None:
    """Show the masks a mask was combined from (parents) and the masks combined from it (children).

    Example: cpl-masks registry lineage 3fa9c2
    """
    tree = registry.lineage(ref)
    if as_json:
        stdout.print_json(data=tree)
        return
    root = Tree(f"[bold]{tree['ref']}[/] ({tree['id'][:12]})")
    for key in ("parents", "children"):
        add_branch(root.add(key), tree[key], key)
    stdout.print(root)


def add_branch(branch: Tree, nodes: list[dict[str, Any]], key: str) -> None:
    """Add lineage nodes (and their own parents or children) under a tree branch."""
    for node in nodes:
        add_branch(branch.add(f"{node['ref'] or 'not registered'} ({node['id'][:12]})"), node[key], key)


@app.command()
@reports_errors
def verify() -> None:
    """Re-hash every registered mask file; report missing or corrupt ones (exit status 1 if any).

    Example: cpl-masks registry verify
    """
    health = registry.verify()
    report(health, f"checked {health.checked} masks")
    if not health.ok:
        raise typer.Exit(1)


def report(health: registry.Health, title: str) -> None:
    """Print the problems a health check found, one row each."""
    rows = [("missing file", item) for item in health.missing]
    rows += [("corrupt file", item) for item in health.corrupt]
    rows += [("orphan file (no row; `registry gc` removes it)", item) for item in health.orphans]
    rows += [("abandoned temporary copy", item) for item in health.leftovers]
    print_table(f"{title}: {'all intact' if not rows else f'{len(rows)} problems'}", ["problem", "mask"], rows)


@app.command()
@reports_errors
def rm(ref: RefArgument) -> None:
    """Remove a mask, its recorded runs and transfers, and its stored file.

    Example: cpl-masks registry rm smollm2-135m-instruct/arc@v1
    """
    stdout.print(f"removed {registry.remove(ref)}")


@app.command()
@reports_errors
def gc() -> None:
    """Delete stored files that no registered mask points to (left by interrupted registrations).

    Example: cpl-masks registry gc
    """
    health = registry.collect_garbage()
    stdout.print(f"removed {len(health.orphans)} orphan files and {len(health.leftovers)} temporary copies")
    if health.missing:
        report(health, "registered masks without a file")
