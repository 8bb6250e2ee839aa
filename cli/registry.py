"""``cpl-masks registry ...``: list, show, trace, check and prune the registered masks and their runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.tree import Tree

from cpl_masks.cli.common import new_app, print_json, print_table, reports_errors, say, stdout, untrusted
from cpl_masks.registry import Health, Registry, Removal, StrayFile

app = new_app(help="The mask registry: provenance, reuse across tasks, lineage.")
RefArgument = Annotated[str, typer.Argument(help="Mask: file path, id or id prefix, name@vN, or name (latest).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@app.command("list")
@reports_errors
def list_command(
    model: Annotated[str | None, typer.Option(help="Only masks of this model (ref or slug).")] = None,
    task: Annotated[str | None, typer.Option(help="Only masks of this task.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List registered masks, their shares and reuse.

    List registered masks with their share of collaborative entries and how often they were reused.

    \b
    Example:
      cpl-masks registry list --model smollm2-135m-instruct
    """
    masks = Registry().list_masks(model=model, task=task)
    if as_json:
        print_json(masks)
        return
    print_table(
        f"{len(masks)} registered masks",
        ["mask", "id", "source", "entries", "collaborative", "runs", "created"],
        [
            (
                item["ref"],
                item["id"][:12],
                source_cell(item),
                item["n_params"],
                f"{item['collaborative_share']:.1%}",
                item["runs"],
                item["created_at"],
            )
            for item in masks
        ],
        whole=("mask", "id", "source"),
    )


def source_cell(item: dict[str, Any]) -> str:
    """What made a listed mask, where it came from when pulled (its repo), and what it is an alias of."""
    source = item["source"] if item["alias_of"] is None else f"alias of {item['alias_of']}"
    return f"{source}, pulled from {item['repo_id']}" if item["repo_id"] else source


@app.command()
@reports_errors
def show(ref: RefArgument, as_json: JsonOption = False) -> None:
    """Show a mask's provenance and the tasks it was used on.

    Show a mask's provenance and every task it was used on, with the results.

    \b
    Example:
      cpl-masks registry show smollm2-135m-instruct/arc@v1
    """
    details = Registry().show(ref)
    if as_json:
        print_json(details)
        return
    summary = {key: details[key] for key in ("id", "source", "repo_id", "revision", "n_params", "path")}
    summary["collaborative share"] = f"{details['collaborative_share']:.2%}"
    summary["parents"] = ", ".join(parent["ref"] or parent["id"][:12] for parent in details["parents"]) or "-"
    summary["children"] = ", ".join(child["ref"] for child in details["children"]) or "-"
    summary["names"] = ", ".join(details["names"])
    provenance = dict(details["provenance"])
    if isinstance(provenance.get("tensors"), dict):  # per-tensor statistics: hundreds of rows, see --json
        provenance["tensors"] = f"statistics of {len(provenance['tensors'])} tensors (see --json)"
    rows = [(key, "-" if value is None else value) for key, value in summary.items()]
    rows += sorted(flatten(provenance).items())
    print_table(f"mask {details['ref']}", ["field", "value"], rows)
    print_table(
        f"used in {len(details['runs'])} training runs",
        ["task", "mode", "learned", "forgotten", "held-out forgotten", "output", "recorded"],
        [(run["task"] or "-", *run_cells(run)) for run in details["runs"]],
        whole=("task", "output", "recorded"),
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


def run_cells(run: dict[str, Any]) -> tuple[Any, ...]:
    """A recorded run's mode, results (counts out of totals), output folder and time, as table cells."""
    return (
        run["mode"] or "-",
        out_of(run["learned"], run["totals"].get("inject_wrong")),
        out_of(run["forgotten"], run["totals"].get("mastered_right")),
        out_of(run["heldout_forgotten"], run["totals"].get("heldout_right")),
        run["out_dir"] or "-",
        run["recorded_at"],
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
    """Show the masks a mask was combined from, and into.

    Show the masks a mask was combined from (parents) and the masks combined from it (children).

    \b
    Example:
      cpl-masks registry lineage 3fa9c2
    """
    tree = Registry().lineage(ref)
    if as_json:
        print_json(tree)
        return
    root = Tree(f"[bold]{untrusted(tree['ref'])}[/] ({untrusted(tree['id'][:12])})")
    for key in ("parents", "children"):
        add_branch(root.add(key), tree[key], key)
    stdout.print(root)


def add_branch(branch: Tree, nodes: list[dict[str, Any]], key: str) -> None:
    """Add lineage nodes (and their own parents or children) under a tree branch."""
    for node in nodes:
        add_branch(branch.add(untrusted(f"{node['ref'] or 'not registered'} ({node['id'][:12]})")), node[key], key)


@app.command()
@reports_errors
def runs(
    task: Annotated[str | None, typer.Option(help="Only runs on this task.")] = None,
    mask: Annotated[
        str | None, typer.Option(help="Only runs of this mask (also a removed mask's name@vN or id prefix).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List recorded training runs with their mask and results.

    List recorded training runs with their mask and results, also runs whose mask was removed.

    \b
    Example:
      cpl-masks registry runs --task arc
    """
    recorded = Registry().runs(task=task, mask=mask)
    if as_json:
        print_json(recorded)
        return
    print_table(
        f"{len(recorded)} recorded runs",
        ["task", "mask", "mode", "learned", "forgotten", "held-out forgotten", "output", "recorded"],
        [(run["task"] or "-", mask_cell(run), *run_cells(run)) for run in recorded],
        whole=("task", "mask", "output"),
    )


def mask_cell(run: dict[str, Any]) -> str:
    """The mask a run used: its ``name@vN``, marked when the mask has since been removed."""
    name = run["mask_ref"] or run["mask_id"][:12]
    return f"{name} (removed)" if run["removed"] else name


@app.command()
@reports_errors
def add(
    path: Annotated[Path, typer.Argument(help="Mask file to register (its content id is verified).")],
    name: Annotated[str | None, typer.Option("--name", help="Task name the registry files the mask under.")] = None,
) -> None:
    """Register a mask file.

    Register a mask file, for example one `registry gc` kept because it has no row.

    \b
    Example:
      cpl-masks registry add arc-mask.safetensors --name arc
    """
    say(f"registered {path} as {Registry().register(path, task=name)}")


@app.command()
@reports_errors
def verify() -> None:
    """Re-hash every registered mask file; report what is wrong.

    Re-hash every registered mask file; report missing or corrupt ones (exit status 1 if any).

    Also lists stray store files: not registered, misplaced, or named after another content id.

    \b
    Example:
      cpl-masks registry verify
    """
    health = Registry().verify()
    report(health, f"checked {health.checked} masks")
    if not health.ok:
        raise typer.Exit(1)


def report(health: Health, title: str) -> None:
    """Print the problems a health check found, one row each."""
    rows = [("missing file", item) for item in health.missing]
    rows += [("corrupt file", item) for item in health.corrupt]
    rows += [(f"stray file, {stray.problem} ({stray_hint(stray)})", str(stray.path)) for stray in health.strays]
    rows += [
        ("abandoned staged registration (no live process holds it; `registry gc` removes it)", item)
        for item in health.leftovers
    ]
    print_table(
        f"{title}: {'all intact' if not rows else f'{len(rows)} problems'}", ["problem", "path"], rows, whole=("path",)
    )


def stray_hint(stray: StrayFile) -> str:
    """What to do about a stray store file: a valid mask is worth registering again, anything else is garbage."""
    if stray.mask_id is None:
        return "not a valid mask; `registry gc` removes it"
    return f"a valid mask {stray.mask_id[:12]}; `registry add` it, or `registry gc --force` removes it"


@app.command()
@reports_errors
def rm(
    ref: Annotated[str, typer.Argument(help="Mask: name@vN, id or id prefix, or file path (not a bare name).")],
    force: Annotated[
        bool, typer.Option(help="Remove it even though recorded runs or registered children reference it.")
    ] = False,
) -> None:
    """Remove one version of a mask and its stored file.

    Remove one version of a mask and its stored file; its recorded runs stay, still naming it.

    Refuses a mask that runs or children reference unless --force. Version numbers are never reused.

    \b
    Example:
      cpl-masks registry rm smollm2-135m-instruct/arc@v1
    """
    print_removal(Registry().remove(ref, force=force))


def print_removal(removal: Removal) -> None:
    """Say what went (the mask, its file, its Hub transfers) and what stays (runs, children)."""
    if removal.alias_of is not None:
        say(f"removed the name {removal.ref}; the mask {removal.alias_of} it named stays")
        return
    say(f"removed {removal.ref} ({removal.mask_id[:12]}) and its file {removal.path}")
    if removal.aliases:
        say(f"removed its other names {', '.join(removal.aliases)}")
    if removal.transfers:
        say(f"removed the record of its {removal.transfers} Hub transfers")
    if removal.runs:
        say(f"kept {removal.runs} recorded runs; they show {removal.ref} as removed (`cpl-masks registry runs`)")
    if removal.children:
        say(f"kept its children {', '.join(removal.children)}")


@app.command()
@reports_errors
def gc(
    force: Annotated[bool, typer.Option(help="Also delete stray store files that are valid masks.")] = False,
) -> None:
    """Delete store files no registered mask points to.

    Delete store files no registered mask points to (left by interrupted registrations), printing each.

    A stray file that is a valid mask is kept unless --force: register it again with `registry add`.
    A staged registration is removed once no live process holds it, never while one is writing it.

    \b
    Example:
      cpl-masks registry gc
    """
    health = Registry().collect_garbage(force=force)
    for path in health.removed:
        say(f"removed {path}")
    for path in health.leftovers:
        say(f"removed {path} (an abandoned staged registration)")
    say(f"removed {len(health.removed)} stray files and {len(health.leftovers)} temporary copies")
    if health.kept:
        print_table(
            f"kept {len(health.kept)} stray files that are valid masks (`registry add FILE` registers one again, "
            "`registry gc --force` removes them)",
            ["mask id", "path"],
            [(stray.mask_id[:12], str(stray.path)) for stray in health.kept],
            whole=("path",),
        )
    if health.missing:
        report(health, "registered masks without a file")
