"""The ``cpl-masks`` Typer application: registers each command module's functions."""

from __future__ import annotations

import typer

from cpl_masks.cli import split

app = typer.Typer(
    name="cpl-masks",
    help="Reusable freeze masks for teaching a language model new facts without forgetting old ones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def root() -> None:
    """Reusable freeze masks for teaching a language model new facts without forgetting old ones."""


app.command()(split.split)


def main() -> None:
    """Console-script entry point."""
    app()
