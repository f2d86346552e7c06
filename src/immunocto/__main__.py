"""``python -m immunocto`` = the ``immunocto`` command."""

from immunocto.cli import main

main()
