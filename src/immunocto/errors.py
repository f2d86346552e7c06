"""Errors a user can fix. The CLI prints them as one line (traceback only with ``-v``)."""

from __future__ import annotations


class ImmunoctoError(Exception):
    """Base class for errors caused by input the user can correct.

    The message should name the file, the field and the fix.
    """


class ConfigError(ImmunoctoError):
    """The run config (``immunocto.yaml``) is malformed or inconsistent."""


class InputFileError(ImmunoctoError):
    """An input file is missing, unreadable or has the wrong content."""
