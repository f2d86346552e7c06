"""The ``immunocto`` command line (typer + rich). One module per command.

Heavy libraries are imported inside the commands, so ``immunocto --help`` stays fast.
"""

from immunocto.cli.app import app, main

__all__ = ["app", "main"]
