"""Windows of H&E around cells read straight from the slides, through an LRU tile cache.

Safe in DataLoader workers and web servers: files are opened lazily in each process (a
pickled or forked copy reopens them) and closed by :meth:`SlideWindows.close`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np


class SlideWindows:
    """``size`` x ``size`` RGB windows centred on level-0 points of the run's H&E slides.

    ``slides`` maps slide id -> (H&E path, mpp). Tiles of ``tile`` px are cached, at most
    ``cache_tiles`` of them, so neighbouring cells share reads.
    """

    def __init__(
        self,
        slides: dict[str, tuple[Path, float]],
        *,
        size: int = 256,
        tile: int = 512,
        cache_tiles: int = 64,
    ) -> None:
        self.slides = slides
        self.size = size
        self.tile = tile
        self.cache_tiles = cache_tiles
        self._open: dict[str, Any] = {}
        self._cache: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
        self._pid: int | None = None

    @classmethod
    def from_config(cls, config: str | os.PathLike[str], **kwargs: Any) -> SlideWindows:
        from immunocto.config import load_config

        cfg = load_config(config)
        return cls({s.id: (cfg.resolve(s.he), s.mpp) for s in cfg.slides}, **kwargs)

    def _slide(self, sid: str):
        if self._pid != os.getpid():
            self._open, self._cache, self._pid = {}, OrderedDict(), os.getpid()
        if sid not in self._open:
            from immunocto.io import open_slide

            path, mpp = self.slides[sid]
            self._open[sid] = open_slide(path, mpp=mpp)
        return self._open[sid]

    def _tile(self, sid: str, tx: int, ty: int) -> np.ndarray:
        key = (sid, tx, ty)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        t = self.tile
        block = self._slide(sid).read_region(tx * t, ty * t, t, t)
        self._cache[key] = block
        if len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        return block

    def window(self, sid: str, x: float, y: float) -> np.ndarray:
        """``(size, size, 3)`` uint8 window whose pixel ``[size // 2, size // 2]`` is the
        rounded ``(x, y)``; outside the slide is zeros."""
        s, t = self.size, self.tile
        x0, y0 = round(x) - s // 2, round(y) - s // 2
        out = np.zeros((s, s, 3), np.uint8)
        for ty in range(int(np.floor(y0 / t)), int(np.floor((y0 + s - 1) / t)) + 1):
            for tx in range(int(np.floor(x0 / t)), int(np.floor((x0 + s - 1) / t)) + 1):
                if tx < 0 or ty < 0:
                    continue
                block = self._tile(sid, tx, ty)
                ys = slice(max(y0, ty * t), min(y0 + s, ty * t + block.shape[0]))
                xs = slice(max(x0, tx * t), min(x0 + s, tx * t + block.shape[1]))
                if ys.stop <= ys.start or xs.stop <= xs.start:
                    continue
                out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = block[
                    ys.start - ty * t : ys.stop - ty * t, xs.start - tx * t : xs.stop - tx * t
                ]
        return out

    def close(self) -> None:
        """Close the slides this process opened."""
        if self._pid == os.getpid():
            for slide in self._open.values():
                slide.close()
        self._open, self._cache = {}, OrderedDict()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_open={}, _cache=OrderedDict(), _pid=None)
        return state
