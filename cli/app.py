"""The ``cpl-masks`` Typer application: registers each command module's functions."""

from __future__ import annotations

import typer

from cpl_masks.cli import hub, masks, split, sweep
from cpl_masks.cli import registry as registry_commands
from cpl_masks.cli import train as train_commands

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
app.command()(masks.profile)
app.command()(masks.inspect)
app.command()(masks.diff)
app.command("combine")(masks.combine_command)
app.command()(masks.threshold)
app.add_typer(registry_commands.app, name="registry")
app.command()(hub.push)
app.command()(hub.pull)
app.command()(train_commands.train)
app.command()(train_commands.compare)
app.command()(sweep.sweep)


def main() -> None:
    """Console-script entry point."""
    app()
