"""Every command's ``--help`` reads at 80 columns: options in one column beside their names, nothing wider."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cpl_masks.cli.app import app

WIDTH = 80


def command_paths(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of the app as the words that call it (``("registry", "gc")``); a group is told by its
    ``commands`` (Typer carries its own copy of click, so not by click's class)."""
    paths = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        paths.extend(command_paths(command, path) if hasattr(command, "commands") else [path])
    return paths


COMMANDS = command_paths(typer.main.get_command(app))


def test_every_command_is_found():
    assert {("train",), ("sweep",), ("registry", "gc")} <= set(COMMANDS)


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda path: " ".join(path) or "cpl-masks")
def test_help_fits_80_columns(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(WIDTH)}, terminal_width=WIDTH)
    assert result.exit_code == 0, result.output
    wide = [line for line in result.output.splitlines() if len(line) > WIDTH]
    assert not wide, wide
    assert "Options:" in result.output and "╭" not in result.output  # click's plain layout, not rich's panels
