"""The typer application: global options and command registration."""

from __future__ import annotations

import typer

from immunocto import __version__
from immunocto.cli import db as db_cmd
from immunocto.cli import export as export_cmd
from immunocto.cli import imports as import_cmd
from immunocto.cli import quantify as quantify_cmd
from immunocto.cli import register as register_cmd
from immunocto.cli import review as review_cmd
from immunocto.cli import run as run_cmd
from immunocto.cli import segment as segment_cmd
from immunocto.cli import simulate as simulate_cmd
from immunocto.cli import train as train_cmd
from immunocto.cli import validate as validate_cmd
from immunocto.cli._common import setup_logging

app = typer.Typer(
    name="immunocto",
    help=(
        "Co-registered H&E + multiplexed IF slides -> an auditable single-cell immune-cell "
        "database for H&E. Commands: simulate, register, segment, quantify, gate, build-db, db, review, train, expand, predict, validate, export, import, run (chains every stage built so far)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"immunocto {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="More output: -v info and tracebacks, -vv debug."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    setup_logging(verbose)


app.command("simulate")(simulate_cmd.simulate)
app.command("register")(register_cmd.register)
app.command("segment")(segment_cmd.segment)
app.command("quantify")(quantify_cmd.quantify)
app.command("gate")(quantify_cmd.gate)
app.command("build-db")(db_cmd.build_db)
app.command("train")(train_cmd.train)
app.command("expand")(train_cmd.expand)
app.command("predict")(train_cmd.predict)
app.command("run")(run_cmd.run)
app.add_typer(db_cmd.app, name="db")
app.add_typer(review_cmd.app, name="review")
app.add_typer(validate_cmd.app, name="validate")
app.add_typer(export_cmd.app, name="export")
app.add_typer(import_cmd.app, name="import")


def main() -> None:
    """Console-script entry point."""
    app()
