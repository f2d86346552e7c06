"""Helpers shared by the tests (simulated runs and measurements on them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from immunocto.simulate.dataset import simulate_dataset
from immunocto.simulate.transform import TruthTransform


def simulate_small(out: Path, **kwargs) -> Path:
    """A 512 px slide, tile 256, in-process; ``kwargs`` override simulate_dataset's."""
    opts = {"size": 512, "slides": 1, "seed": 11, "tile": 256, "workers": 1}
    opts.update(kwargs)
    simulate_dataset(out, **opts)
    return out


def read_if(run: Path, slide: str = "sim000") -> tuple[np.ndarray, list[str]]:
    """Level-0 IF ``(c, y, x)`` and its channel names from the OME metadata."""
    with tifffile.TiffFile(run / "slides" / slide / "if.ome.tif") as tif:
        data = tif.series[0].levels[0].asarray()
        meta = tifffile.xml2dict(tif.ome_metadata)
    channels = meta["OME"]["Image"]["Pixels"]["Channel"]
    return data, [c["Name"] for c in channels]


def measure_in_if(run: Path, channel: str, slide: str = "sim000") -> dict[int, float]:
    """Mean of ``channel`` over each true nucleus+cell, read through the *true* transform
    (so registration does not blur the measurement). Returns ``cell_id -> mean counts``."""
    truth = run / "truth" / slide
    cells = tifffile.imread(truth / "cells.tif")
    transform = TruthTransform.from_dict(json.loads((truth / "registration.json").read_text()))
    data, names = read_if(run, slide)
    ys, xs = np.nonzero(cells)
    u, v = transform.he_to_if(xs.astype(float), ys.astype(float))
    values = ndimage.map_coordinates(
        data[names.index(channel)].astype(np.float32), np.stack([v, u]), order=1, mode="nearest"
    )
    labels = cells[ys, xs]
    sums = np.bincount(labels, weights=values)
    counts = np.bincount(labels)
    ids = np.flatnonzero(counts)
    return {int(i): float(sums[i] / counts[i]) for i in ids}


def count_calls(monkeypatch, owner: type, name: str) -> dict[str, int]:
    """Count the calls of ``owner.name`` made in this process (``counts["n"]``): a forked
    worker counts in its own copy, so a zero here means the work ran elsewhere."""
    counts = {"n": 0}
    original = getattr(owner, name)

    def counted(self, *args, **kwargs):
        counts["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return counts


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server for ``app`` on a free loopback port, in a thread (a context manager)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )

    def __enter__(self) -> LiveServer:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class WorkerKiller:
    """SIGKILL the Dask worker process ``pid`` as soon as ``ready()`` is true (polled every
    5 ms for up to ``timeout`` s, in a thread): ``with WorkerKiller(pid, ready) as k: ...``
    then ``k.killed`` says whether it happened."""

    def __init__(self, pid: int, ready, timeout: float = 120.0) -> None:
        import threading

        self.pid, self.ready, self.timeout = pid, ready, timeout
        self.killed = False
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import os
        import signal
        import time

        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.ready():
                os.kill(self.pid, signal.SIGKILL)
                self.killed = True
                return
            time.sleep(0.005)

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()
