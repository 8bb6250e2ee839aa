"""The docs cannot drift from the CLI: every command has one reference section whose options are exactly
the command's, the generated tables are current, and every relative link in the docs points to a file.

The tables in ``docs/commands/`` are written by ``docs/generate_commands.py``; when a test here fails
after an option changed, run ``.venv/bin/python docs/generate_commands.py`` and review the diff.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections import Counter
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GENERATOR = DOCS / "generate_commands.py"
RESYNC = "run: .venv/bin/python docs/generate_commands.py"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
NAME_IN_CELL = re.compile(r"`([^`]+)`")

# Flags of other programs that the pages quote (launchers, the generator itself); every other ``--flag`` in the
# docs' prose and examples must be an option of some ``cpl-masks`` command, so a renamed option cannot linger.
FOREIGN_FLAGS = {
    "--help",  # every command's, and the examples'
    "--check",  # docs/generate_commands.py
    "--standalone",  # torchrun
    "--nproc_per_node",
    "--no-python",
    "--multi_gpu",  # accelerate launch
    "--num_processes",
    "--no_python",
}
FLAG = re.compile(r"(?<![\w/-])--[a-z][\w-]*")


@cache
def generator() -> ModuleType:
    """``docs/generate_commands.py`` imported as a module (``docs/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("generate_commands", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@cache
def app_commands() -> dict[str, Any]:
    """The CLI's documented commands by full name, e.g. ``"cpl-masks registry rm"``."""
    return generator().commands()


def command_pages() -> list[Path]:
    """The command reference pages, ``docs/commands/*.md``."""
    return generator().pages()


def regions() -> list[tuple[str, str, str]]:
    """Every generated region of every command page as ``(page name, command name, region body)``."""
    found = []
    for page in command_pages():
        for match in generator().REGION.finditer(page.read_text()):
            found.append((page.name, match.group("command").strip(), match.group("body")))
    return found


def names_in_region(body: str) -> set[str]:
    """The option and argument names a region's table lists: the backticked names of each row's first cell."""
    names: set[str] = set()
    for line in body.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if not cells or cells[0] in ("option", "---"):
            continue
        names.update(NAME_IN_CELL.findall(cells[0]))
    return names


def names_of_command(command: Any) -> set[str]:
    """The option strings (``--out``, ``-o``, ``--no-overwrite``) and argument names the command accepts."""
    gen = generator()
    return {name for param in gen.documented_params(command) for name in gen.param_names(param)}


def accepted_names(command: Any) -> set[str]:
    """Every option string the command accepts, hidden ones too (such as a renamed option's old spelling)."""
    gen = generator()
    return {name for param in command.params if not gen.is_help(param) for name in gen.param_names(param)}


def relative_links(text: str) -> list[str]:
    """Relative link targets in Markdown ``text``, outside code, without their ``#anchor``; URLs are skipped."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def markdown_files() -> list[Path]:
    """The Markdown files whose links are checked: everything under ``docs/`` and the root README."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_every_command_has_exactly_one_section() -> None:
    """A command without a region fails, as does a repeated region or one naming no command."""
    counts = Counter(command for _, command, _ in regions())
    missing = sorted(set(app_commands()) - set(counts))
    repeated = sorted(name for name, n in counts.items() if n > 1)
    unknown = sorted(set(counts) - set(app_commands()))
    assert not missing, f"commands with no section in docs/commands/: {missing}; add a region, then {RESYNC}"
    assert not repeated, f"commands with more than one section: {repeated}"
    assert not unknown, f"sections for commands the CLI does not have: {unknown}"


def test_every_region_is_closed() -> None:
    """Each ``<!-- options: ... -->`` marker has its ``<!-- /options -->``."""
    gen = generator()
    for page in command_pages():
        text = page.read_text()
        assert len(gen.markers(text)) == len(gen.REGION.findall(text)), f"{page.name}: a region is not closed"


@pytest.mark.parametrize("page,command,body", regions(), ids=lambda value: str(value)[:40])
def test_page_lists_exactly_the_commands_options(page: str, command: str, body: str) -> None:
    """Both directions: an option the command has but the page lacks fails, and one the page lists that the
    command lacks fails."""
    if command not in app_commands():
        pytest.skip(f"{command} is not a command (reported by test_every_command_has_exactly_one_section)")
    expected = names_of_command(app_commands()[command])
    listed = names_in_region(body)
    assert not expected - listed, f"{page}: {command} options missing from the page: {sorted(expected - listed)}"
    assert not listed - expected, f"{page}: {command} has no options {sorted(listed - expected)}; {RESYNC}"


def test_generated_tables_are_current() -> None:
    """Regenerating every page in memory changes nothing: types, defaults and help match the CLI."""
    stale = []
    for page in command_pages():
        text = page.read_text()
        if generator().render(text, app_commands()) != text:
            stale.append(page.name)
    assert not stale, f"out-of-date option tables in {stale}; {RESYNC}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_point_to_files(path: Path) -> None:
    """Every relative link's file part exists (anchors are not checked)."""
    broken = [target for target in relative_links(path.read_text()) if not (path.parent / target).exists()]
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


def test_the_table_parser_reads_what_the_generator_writes() -> None:
    """The test's reading of a table agrees with the generator's writing of it (a flag's --no- form,
    a short option, an argument), so the checks above compare like with like."""
    gen = generator()
    for command in app_commands().values():
        assert names_in_region(gen.table(command)) == names_of_command(command)


def test_prose_names_only_existing_options() -> None:
    """Outside the generated tables, every ``--flag`` a page under ``docs/`` mentions is an option some command
    accepts (a hidden old spelling counts: a page may say what an option used to be called)."""
    known = {name for command in app_commands().values() for name in accepted_names(command)} | FOREIGN_FLAGS
    stale = {}
    for page in sorted(DOCS.rglob("*.md")):
        unknown = sorted(set(FLAG.findall(generator().REGION.sub("", page.read_text()))) - known)
        if unknown:
            stale[str(page.relative_to(ROOT))] = unknown
    assert not stale, f"options no command has (renamed or removed?): {stale}"
