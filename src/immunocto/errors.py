"""Errors a user can fix. The CLI prints them as one line (traceback only with ``-v``)."""

from __future__ import annotations


class ImmunoctoError(Exception):
    """Base class for errors caused by input the user can correct.

    The message should name the file, the field and the fix. A message about a function's
    argument names it in backticks (`` `slides` must be at least 1``) and lists it in
    ``arguments``; the CLI shows it as the command's flag (``--slides``), see :meth:`for_cli`.
    """

    def __init__(self, message: str, *, arguments: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.arguments = arguments

    def for_cli(self, flags: dict[str, str] | None = None) -> str:
        """The message with each `` `argument` `` written as its command-line flag:
        ``flags[argument]`` when given, else ``--argument-with-dashes``."""
        message = str(self)
        for name in self.arguments:
            flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
            message = message.replace(f"`{name}`", flag)
        return message


class ConfigError(ImmunoctoError):
    """The run config (``immunocto.yaml``) is malformed or inconsistent."""


class InputFileError(ImmunoctoError):
    """An input file is missing, unreadable or has the wrong content."""
