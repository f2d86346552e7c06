"""Read-ahead: the next tile's input read on a background thread while this tile is computed.

In one process a tile stage alternates between reading (decoding compressed IF / H&E tiles:
the decoder releases the GIL and runs in its own threads) and computing (numpy, PyTorch), so
one of the two idles while the other works. :func:`immunocto._parallel.ordered_map` calls a
stage's ``prefetch(context, next_item)`` before it runs ``fn(context, item)``; the stage
submits the next item's reads to a :class:`ReadAhead` and later takes them with :meth:`get`.

Once anything was read ahead, every read of one reader goes through the same single background
thread, in the order asked, so file handles are never used by two threads at once; where nothing
is read ahead (a worker process) reads run in the caller, no thread started. Results do not
depend on whether, or how far, anything was read ahead. One thread (the stage's) calls
:meth:`ReadAhead.submit` and :meth:`ReadAhead.get`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

#: Most reads kept waiting to be taken (older ones are dropped: a skipped prefetch).
MAX_PENDING = 2


class ReadAhead:
    """Reads keyed by a hashable ``key`` (e.g. the tile's window), run on one thread.

    ``submit(key, read)`` starts ``read()`` in the background (once per key); ``get(key,
    read)`` returns its result, running ``read`` if it was never submitted (on the background
    thread once there is one, else right here). A read's exception is raised by :meth:`get`,
    not by :meth:`submit`.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[Hashable, Future] = {}

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="immunocto-read")
        return self._pool

    def submit(self, key: Hashable, read: Callable[[], Any]) -> None:
        if key in self._pending:
            return
        while len(self._pending) >= MAX_PENDING:  # never taken: drop the oldest
            self._pending.pop(next(iter(self._pending))).cancel()
        self._pending[key] = self._executor().submit(read)

    def get(self, key: Hashable, read: Callable[[], Any]) -> Any:
        future = self._pending.pop(key, None)
        if future is None:
            if self._pool is None:  # nothing read ahead yet: no thread needed
                return read()
            future = self._pool.submit(read)
        return future.result()

    def close(self) -> None:
        """Wait for reads in flight and stop the thread (call before closing the files)."""
        pending, self._pending = list(self._pending.values()), {}
        pool, self._pool = self._pool, None
        for future in pending:
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=True)

    def __getstate__(self) -> dict[str, Any]:  # a fresh, idle one in another process
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
