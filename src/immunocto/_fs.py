"""Atomic file writes: a reader never sees half a file, a crash never corrupts an old one."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from immunocto.errors import InputFileError, is_out_of_space, out_of_space

#: ``scheme:/`` at the start of a path (two or more letters: ``C:/`` stays a Windows drive);
#: pathlib turns ``s3://b/k`` into ``s3:/b/k``, so one slash is enough to recognise a URL.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/")


def local_path(value: str | os.PathLike[str], what: str = "path") -> Path:
    """The local path ``value`` names: a plain path, or a ``file://`` URL (``file:///data/x``,
    ``file://localhost/data/x``, or ``file:/data/x`` as pathlib leaves it).

    Any other URL (``s3://``, ``gs://``, ``az://``, ``http://``...) is an
    :class:`~immunocto.errors.InputFileError` naming ``what`` and the way to use such
    storage: immunocto's outputs are committed by atomic renames (nothing half-written is ever
    seen, a killed run resumes), which object stores do not have, so the run folder lives on a
    POSIX file system (local, or shared by the cluster) or on a mount of the store.
    """
    text = os.fspath(value)
    m = _URL.match(text)
    if not m:
        return Path(text)
    scheme = m.group(1).lower()
    if scheme == "file":
        if not text[5:].startswith("//"):  # file:/data/x: pathlib's rendering of file:///data/x
            return Path(urllib.parse.unquote(text[5:]))
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise InputFileError(
                f"{text}: {what}: a file:// URL on another host ({parsed.netloc}); give a path "
                "on this machine (or a shared file system's path)"
            )
        return Path(urllib.parse.unquote(parsed.path))
    if not text.startswith(f"{m.group(1)}://"):  # as pathlib left it: give the URL back
        text = f"{m.group(1)}://{text[len(m.group(0)) :]}"
    raise InputFileError(
        f"{text}: {what}: {scheme}:// URLs are not read or written directly (outputs are "
        "committed by atomic renames, which object stores lack); use a local or shared file "
        "system path, or mount the store with renames supported (s3fs, gcsfuse, blobfuse2, "
        "rclone mount) and give the mount's path (docs: Scaling out, 'Where the run folder "
        "lives')"
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Works for files and for directories (e.g. a zarr store): whatever the caller creates at
    the yielded path replaces ``path`` in one rename. On an exception the temporary is
    removed and ``path`` is left as it was; a write that runs out of space becomes an
    :class:`~immunocto.errors.OutOfSpaceError` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        try:
            yield target
        except OSError as exc:
            if is_out_of_space(exc):
                raise out_of_space(exc, path) from exc
            raise
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            target.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
