"""Ordered maps over tiles on a pool of worker processes.

numpy/scipy hold the GIL too often for threads to scale, so per-tile work runs in processes:
forked where the platform allows (workers share the parent's memory), spawned otherwise (the
initializer arguments are then pickled). Each worker limits BLAS to one thread, so workers do
not fight over cores. Results come back in input order, so the output never depends on the
number of workers.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STATE: dict[str, Any] = {}


def _init(setup: Callable[..., Any] | None, args: tuple) -> None:
    from threadpoolctl import threadpool_limits

    _STATE["blas"] = threadpool_limits(limits=1)
    _STATE["context"] = setup(*args) if setup is not None else None


def _call(payload: tuple[Callable[[Any, Any], Any], Any]) -> Any:
    fn, item = payload
    return fn(_STATE["context"], item)


def ordered_map(
    fn: Callable[[Any, T], R],
    items: Iterable[T],
    *,
    workers: int,
    setup: Callable[..., Any] | None = None,
    setup_args: tuple = (),
    local_context: Any = None,
) -> Iterator[R]:
    """``fn(context, item)`` for every item, results in order.

    With ``workers <= 1`` (or a single item) everything runs here with ``local_context``;
    otherwise each worker builds its context once with ``setup(*setup_args)`` (e.g. reopening
    files: handles must not cross a fork).
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        context = (
            local_context if local_context is not None or setup is None else setup(*setup_args)
        )
        for item in items:
            yield fn(context, item)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(
        min(workers, len(items)), mp_context=ctx, initializer=_init, initargs=(setup, setup_args)
    ) as pool:
        yield from pool.map(_call, [(fn, item) for item in items], chunksize=1)
