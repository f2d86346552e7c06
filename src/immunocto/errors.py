"""Errors a user can fix. The CLI prints them as one line (traceback only with ``-v``)."""

from __future__ import annotations

import errno


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


class OutOfSpaceError(ImmunoctoError):
    """A write failed for want of space: the disk or quota is full, or a file-size limit."""


#: errno values of a full disk, a full quota and a file-size limit (``ulimit -f``).
_OUT_OF_SPACE_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_OUT_OF_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "file too large")


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` (an ``OSError``, or a library's wrapper of one, e.g. pyarrow's) says a
    write ran out of space."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in _OUT_OF_SPACE_ERRNO or any(
        t in str(exc).lower() for t in _OUT_OF_SPACE_TEXT
    )


def out_of_space(exc: BaseException, path: object | None = None) -> OutOfSpaceError:
    """The user-facing error for an out-of-space ``exc`` while writing ``path``."""
    where = path or getattr(exc, "filename", None) or "an output file"
    reason = getattr(exc, "strerror", None) or str(exc)
    return OutOfSpaceError(
        f"no space left writing {where} ({reason}): free disk space (or raise the quota or "
        "file-size limit) and rerun the same command; finished outputs are kept and the run "
        "resumes where it stopped"
    )
