"""The ``cpl-masks`` Typer application: registers each command module's functions."""

from __future__ import annotations

import typer

from cpl_masks.cli import fits, hub, masks, profile, split, sweep
from cpl_masks.cli import registry as registry_commands
from cpl_masks.cli import train as train_commands
from cpl_masks.cli.common import new_app
from cpl_masks.cli.method_options import with_method_options
from cpl_masks.utils import distributed

HELP = "Reusable freeze masks for teaching a language model new facts without forgetting old ones."


def build_app() -> typer.Typer:
    """The application with every command; ``train`` and ``sweep`` take the options of the methods
    table as it stands now, so a method added to it before this call is on the command line too."""
    app = new_app(name="cpl-masks", help=HELP)
    app.callback(help=HELP)(lambda: None)
    app.command()(split.split)
    app.command()(profile.profile)
    app.command()(masks.inspect)
    app.command()(masks.diff)
    app.command("combine")(masks.combine_command)
    app.command()(masks.threshold)
    app.add_typer(registry_commands.app, name="registry")
    app.command()(hub.push)
    app.command()(hub.pull)
    app.command()(with_method_options(train_commands.train))
    app.command()(train_commands.compare)
    app.command()(with_method_options(sweep.sweep))
    app.command()(fits.fits)
    return app


app = build_app()


def main() -> None:
    """Console-script entry point; a rank under torchrun ends through :func:`distributed.exit_launched`."""
    try:
        app()
    except SystemExit as stop:
        distributed.exit_launched(stop.code)
        raise
    distributed.exit_launched(0)
