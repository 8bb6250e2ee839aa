"""Regenerate the option tables of the command reference in ``docs/commands/`` from the CLI itself.

Each page in ``docs/commands/`` holds hand-written prose and, for every command it documents, one
generated region::

    <!-- options: cpl-masks train -->
    ...table written by this script...
    <!-- /options -->

Only the text between the two markers is rewritten; everything around it is kept. The table lists
each argument and option of the command as the Typer app defines it (names, type or choices,
default, help), so after an option is added, renamed or removed one command resyncs every page::

    .venv/bin/python docs/generate_commands.py           # rewrite the tables in place
    .venv/bin/python docs/generate_commands.py --check   # exit 1 if a table is out of date

A command that has no marker on any page is reported (exit status 1): add an empty region for it,
``<!-- options: cpl-masks NAME -->`` then ``<!-- /options -->``, to the page of its group and run the
script again. ``tests/test_docs.py`` fails on the same conditions.
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

DOCS = Path(__file__).resolve().parent
COMMANDS_DIR = DOCS / "commands"
PROGRAM = "cpl-masks"
END_MARKER = "<!-- /options -->"
REGION = re.compile(r"(<!-- options: (?P<command>[^>]*?) -->\n)(?P<body>.*?)(" + re.escape(END_MARKER) + ")", re.S)
NO_OPTIONS = "This command takes no options."
START = re.compile(r"<!-- options: (?P<command>[^>]*?) -->")


@dataclass(frozen=True)
class Row:
    """One argument or option of a command, as the reference table shows it."""

    names: tuple[str, ...]  # "--out", "-o", "--no-overwrite"; an argument's metavar, e.g. "MASK"
    type: str
    default: str
    help: str


def app_command() -> Any:
    """The click command of the installed ``cpl-masks`` Typer app (imports the CLI, loads no model)."""
    from cpl_masks.cli.app import app

    return typer.main.get_command(app)


def walk(command: Any, path: tuple[str, ...] = (PROGRAM,)) -> Iterator[tuple[str, Any]]:
    """Every documented (sub)command as ``("cpl-masks registry list", command)``, in the app's order.

    Leaf commands are yielded; a group only when it takes options of its own. Hidden commands are skipped.
    """
    subcommands = getattr(command, "commands", None)
    if subcommands is None or any(not is_help(p) for p in command.params):
        yield " ".join(path), command
    for name, sub in (subcommands or {}).items():
        if not getattr(sub, "hidden", False):
            yield from walk(sub, (*path, name))


def commands() -> dict[str, Any]:
    """The app's documented commands by full name (``"cpl-masks train"``)."""
    return dict(walk(app_command()))


def is_help(param: Any) -> bool:
    """Whether ``param`` is the ``--help`` option click adds to every command."""
    return getattr(param, "name", None) == "help"


def _is_argument(param: Any) -> bool:
    """Whether ``param`` is a positional argument (its name comes without dashes)."""
    return not any(opt.startswith("-") for opt in param.opts)


def documented_params(command: Any) -> list[Any]:
    """The command's arguments and options, without ``--help`` and hidden ones, in definition order."""
    return [p for p in command.params if not getattr(p, "hidden", False) and not is_help(p)]


def param_names(param: Any) -> tuple[str, ...]:
    """The names a page shows for ``param``: every option string, or an argument's upper-case metavar."""
    if _is_argument(param):
        return (param.name.upper(),)
    return (*param.opts, *param.secondary_opts)


def _type_label(param: Any, ctx: Any) -> str:
    """The value type, e.g. ``int``, ``path``, ``list[str]``, or the choices ``a|b``; flags are ``flag``."""
    if getattr(param, "is_flag", False) and not getattr(param, "count", False):
        return "flag"
    if hasattr(param, "display_type"):  # Typer's own click: a TypeDescriptor
        label = param.display_type(ctx)
    else:  # plain click: a ParamType
        choices = getattr(param.type, "choices", None)
        label = "|".join(str(c) for c in choices) if choices else param.type.name
    label = label.strip("<>")
    if getattr(param, "multiple", False) and not label.startswith("list["):
        label += ", repeatable"
    if _is_argument(param) and param.nargs == -1:
        label += ", one or more"
    return label


def _default_label(param: Any) -> str:
    """The default as a page shows it: ``required``, ``-`` when there is none (see the help), or the value."""
    if param.required:
        return "required"
    default = param.default
    if callable(default):
        return "(dynamic)"
    if isinstance(default, enum.Enum):
        default = default.value
    if getattr(param, "is_flag", False) and not getattr(param, "count", False):
        if param.secondary_opts:
            return (param.opts if default else param.secondary_opts)[0]
        return "off" if not default else "on"
    if default is None or default == () or default == []:
        return "-"
    if isinstance(default, (list, tuple)):
        return ", ".join(str(d) for d in default)
    return str(default)


def rows(command: Any) -> list[Row]:
    """The reference rows of ``command``: one per argument or option."""
    ctx = command.make_context(command.name or PROGRAM, [], resilient_parsing=True)
    return [
        Row(param_names(p), _type_label(p, ctx), _default_label(p), " ".join((getattr(p, "help", None) or "").split()))
        for p in documented_params(command)
    ]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("*", "\\*")


def table(command: Any) -> str:
    """The generated region's body for ``command``: a Markdown table, ending with a newline."""
    found = rows(command)
    if not found:
        return NO_OPTIONS + "\n"
    lines = ["| option | type | default | help |", "| --- | --- | --- | --- |"]
    for row in found:
        names = ", ".join(f"`{name}`" for name in row.names)
        default = row.default if row.default in ("-", "required") else f"`{row.default}`"
        lines.append(f"| {names} | {_cell(row.type)} | {_cell(default)} | {_cell(row.help)} |")
    return "\n".join(lines) + "\n"


def render(text: str, known: dict[str, Any]) -> str:
    """``text`` with every generated region replaced by the current table of its command.

    A region naming a command the app does not have is left as it is (the test and ``--check`` report it).
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group("command").strip()
        if name not in known:
            return match.group(0)
        return match.group(1) + table(known[name]) + match.group(4)

    return REGION.sub(replace, text)


def pages() -> list[Path]:
    """The command reference pages, sorted."""
    return sorted(COMMANDS_DIR.glob("*.md"))


def markers(text: str) -> list[str]:
    """The command names of the generated regions that ``text`` opens, in order."""
    return [m.group("command").strip() for m in START.finditer(text)]


def problems(known: dict[str, Any]) -> list[str]:
    """What is wrong with the regions across all pages: missing, repeated, unknown or unclosed."""
    found: dict[str, list[str]] = {}
    out = []
    for page in pages():
        text = page.read_text()
        opened = markers(text)
        if len(opened) != len(REGION.findall(text)):
            out.append(f"{page.name}: a region is not closed by {END_MARKER}")
        for name in opened:
            found.setdefault(name, []).append(page.name)
    for name in known:
        if name not in found:
            out.append(f"{name}: no region on any page; add '<!-- options: {name} -->' and '{END_MARKER}'")
        elif len(found[name]) > 1:
            out.append(f"{name}: {len(found[name])} regions ({', '.join(found[name])}); keep one")
    out += [
        f"{name}: region in {', '.join(where)}, but the app has no such command"
        for name, where in found.items()
        if name not in known
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with ``--check`` only compare) every page's tables; 1 if anything is stale or wrong."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = parser.parse_args(argv)
    known = commands()
    status = 0
    for page in pages():
        text = page.read_text()
        new = render(text, known)
        if new != text:
            if args.check:
                print(f"{page.relative_to(DOCS.parent)}: out of date", file=sys.stderr)
                status = 1
            else:
                page.write_text(new)
                print(f"{page.relative_to(DOCS.parent)}: updated")
    for problem in problems(known):
        print(problem, file=sys.stderr)
        status = 1
    if args.check and status:
        print("run: .venv/bin/python docs/generate_commands.py", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
