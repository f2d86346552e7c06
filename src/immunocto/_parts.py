"""Folders of per-tile results written by workers, kept across a crash for resuming.

A stage that fans tiles out to workers (local processes or Dask) lets each worker write its
tile's result here instead of sending it back; the client then merges the parts in a stream.
The folder is keyed by what the results were computed from (``key.json``): a run with the same
key keeps the finished parts and computes only the missing ones, any other key starts afresh.
Every file is written atomically (:mod:`immunocto._fs`), so a worker killed mid-write leaves
nothing that looks finished.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from immunocto._fs import atomic_write_text

KEY_FILE = "key.json"


def parts_key(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A stage fingerprint as a part-folder key: the worker count changes how tiles are spread,
    not their results, so resuming with other ``workers`` keeps the finished parts."""
    params = {k: v for k, v in fingerprint.get("params", {}).items() if k != "workers"}
    return {**fingerprint, "params": params}


def encode_arrays(*arrays: np.ndarray) -> bytes:
    """Arrays as consecutive ``.npy`` records, zstd-compressed (level 1: fast)."""
    from numcodecs import Zstd

    buf = io.BytesIO()
    for a in arrays:
        np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return Zstd(level=1).encode(buf.getvalue())


def decode_arrays(data: bytes, n: int) -> list[np.ndarray]:
    """The ``n`` arrays of :func:`encode_arrays`."""
    from numcodecs import Zstd

    buf = io.BytesIO(Zstd().decode(data))
    return [np.load(buf, allow_pickle=False) for _ in range(n)]


class PartFolder:
    """A folder of per-tile parts for one slide and one stage."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).absolute()  # workers may run elsewhere (cwd)

    def open_for(self, key: dict[str, Any]) -> PartFolder:
        """Use the folder for ``key``: parts from other inputs or settings are discarded."""
        text = json.dumps(key, sort_keys=True, default=str)
        try:
            same = (self.folder / KEY_FILE).read_text() == text
        except OSError:
            same = False
        if not same:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / KEY_FILE, text)
        return self

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
