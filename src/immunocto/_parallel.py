"""Ordered maps over tiles on a pool of worker processes.

numpy/scipy hold the GIL too often for threads to scale, so per-tile work runs in processes:
forked where the platform allows (workers share the parent's memory), spawned otherwise (the
initializer arguments are then pickled). Each worker limits BLAS to one thread, so workers do
not fight over cores. Results come back in input order, so the output never depends on the
number of workers.

Scale-out: inside ``with use_dask(client):`` every ordered map runs as Dask tasks on that
``distributed.Client`` instead (a ``LocalCluster`` or a real cluster by scheduler address).
Each Dask worker builds the per-tile context (open files, models) once per map and keeps it;
at most ``2 x workers`` tasks are in flight, so results never pile up in memory.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from immunocto._memory import reuse_freed_memory

T = TypeVar("T")
R = TypeVar("R")

_STATE: dict[str, Any] = {}
_DASK: dict[str, Any] = {"client": None}
_BLAS: dict[str, Any] = {}


def one_blas_thread() -> Any:
    """Context manager: BLAS (and OpenMP) run on one thread inside the ``with`` block.

    A multi-threaded matmul sums in another order than a single-threaded one, so results would
    depend on the core count or ``OMP_NUM_THREADS`` (e.g. registration's sub-pixel shifts moved
    its affine by 0.07 px between 1 and 2 BLAS threads). The libraries are found once per
    process.
    """
    from threadpoolctl import ThreadpoolController

    if "controller" not in _BLAS:
        _BLAS["controller"] = ThreadpoolController()
    return _BLAS["controller"].limit(limits=1)


class use_dask:
    """Route :func:`ordered_map` through a ``distributed.Client`` inside the ``with`` block."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._previous: Any = None

    def __enter__(self) -> Any:
        self._previous = _DASK["client"]
        _DASK["client"] = self.client
        return self.client

    def __exit__(self, *exc: object) -> None:
        _DASK["client"] = self._previous


#: Dask's nanny gives its workers ``MALLOC_TRIM_THRESHOLD_=65536`` (to return freed memory to
#: the OS sooner). Setting it turns off glibc's adaptive mmap threshold, so every large numpy
#: temporary is a fresh ``mmap`` whose pages fault in zeroed: our tile tasks ran 1.3-1.6x
#: slower on such workers than in a plain process. Our LocalClusters leave it unset.
WORKER_ENV_UNSET = ("MALLOC_TRIM_THRESHOLD_",)


@contextlib.contextmanager
def local_cluster(workers: int, **kwargs: Any) -> Iterator[Any]:
    """A ``distributed.LocalCluster`` of ``workers`` processes, one thread each, whose workers
    keep glibc's default allocator settings (see :data:`WORKER_ENV_UNSET`).

    A nanny writes its settings (``OMP_NUM_THREADS=1``, ...) into this process's environment
    before spawning, so an earlier plain ``LocalCluster`` leaves ``MALLOC_TRIM_THRESHOLD_``
    behind for our workers to inherit, and ours would leave ``OMP_NUM_THREADS=1`` behind for
    any process started after the run: those variables are removed while the cluster runs and
    put back as they were when it closes.
    """
    import dask
    from distributed import LocalCluster

    touched = set(dask.config.get("distributed.nanny.pre-spawn-environ", {})) | set(
        WORKER_ENV_UNSET
    )
    saved = {k: os.environ.get(k) for k in touched}
    for k in WORKER_ENV_UNSET:
        os.environ.pop(k, None)
    unset = {f"distributed.nanny.pre-spawn-environ.{k}": None for k in WORKER_ENV_UNSET}
    try:
        with dask.config.set(unset):  # read when the nannies are created
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, **kwargs
            )
        with cluster:
            yield cluster
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def dask_client() -> Any:
    """The client :func:`ordered_map` uses now (``None``: local processes)."""
    return _DASK["client"]


def _dask_task(fn: Callable[[Any, Any], Any], key: str, setup_pair: tuple, item: Any) -> Any:
    """Run on a Dask worker: the context is built once per (map, worker) and cached there."""
    from distributed import get_worker

    reuse_freed_memory()
    _STATE["worker"] = True
    worker = get_worker()
    cache = worker.__dict__.setdefault("_immunocto_contexts", {})
    if key not in cache:
        cache.clear()  # one map at a time: drop the previous map's open files
        setup, setup_args = setup_pair
        cache[key] = setup(*setup_args) if setup is not None else None
    with one_blas_thread():  # the BLAS libraries are found once per worker, not per task
        return fn(cache[key], item)


def _dask_map(client, fn, items: list, setup, setup_args: tuple) -> Iterator[Any]:
    """Submit ``items`` as tasks, results in order.

    At most ``2 x workers`` tasks are in flight, and a new one is submitted whenever any task
    finishes (not only the oldest), so one slow task (a worker's first, which builds its
    context) does not leave the other workers idle; finished results wait for their turn in a
    buffer of at most ``4 x workers`` (they are small: workers write their own outputs).
    """
    import uuid

    from distributed import as_completed

    key = uuid.uuid4().hex
    workers = max(len(client.scheduler_info().get("workers", {})), 1)
    window, ahead = 2 * workers, 4 * workers
    # the setup (paths, parameters, models) travels to each worker once, not with every task
    [pair] = client.scatter([(setup, setup_args)], broadcast=True, hash=False)
    index: dict[Any, int] = {}  # future in flight -> its item's position
    ready: dict[int, Any] = {}  # finished results waiting for their turn
    finished = as_completed()
    submitted = yielded = 0
    try:
        while yielded < len(items):
            while len(index) < window and submitted < len(items) and submitted - yielded < ahead:
                future = client.submit(_dask_task, fn, key, pair, items[submitted], pure=False)
                index[future] = submitted
                finished.add(future)
                submitted += 1
            future = next(finished)
            ready[index.pop(future)] = future.result()
            future.release()
            while yielded in ready:
                yield ready.pop(yielded)
                yielded += 1
    finally:
        for f in index:
            f.cancel()
        pair.release()


def warm_workers(client: Any = None) -> None:
    """Start each Dask worker's PyTorch import now, as a task of its own, so the first tile a
    worker gets does not pay for it while the client still prepares the stage. Fire and
    forget; nothing when there is no client (``client`` defaults to :func:`dask_client`) or
    no PyTorch."""
    client = client if client is not None else _DASK["client"]
    if client is None:
        return
    from distributed import fire_and_forget

    for address in client.scheduler_info().get("workers", {}):
        fire_and_forget(client.submit(_warm_imports, workers=[address], pure=False))


def _warm_imports() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def in_worker() -> bool:
    """Whether this process is one of several running tiles side by side (a pool worker of
    :func:`ordered_map` or a Dask worker running its tasks): intra-op threads (PyTorch) then
    stay at one, since the other workers hold the other cores."""
    return bool(_STATE.get("worker"))


def _init(setup: Callable[..., Any] | None, args: tuple) -> None:
    from threadpoolctl import threadpool_limits

    _STATE["worker"] = True
    reuse_freed_memory()
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
    prefetch: Callable[[Any, T], None] | None = None,
) -> Iterator[R]:
    """``fn(context, item)`` for every item, results in order.

    With ``workers <= 1`` (or a single item) everything runs here with ``local_context``
    (BLAS limited to one thread while ``fn`` runs, as in the workers), and ``prefetch(context,
    item)``, when given, is called for the next item before ``fn`` runs on this one, so that
    item's reads can start on a background thread (:mod:`immunocto._readahead`; it must not
    change any result); otherwise each worker builds its context once with
    ``setup(*setup_args)`` (e.g. reopening files: handles must not cross a fork).
    """
    items = list(items)
    reuse_freed_memory()  # per-tile buffers are reused, not faulted in afresh (see _memory)
    client = _DASK["client"]
    if client is not None and len(items) > 1:
        yield from _dask_map(client, fn, items, setup, setup_args)
        return
    if workers <= 1 or len(items) <= 1:
        context = (
            local_context if local_context is not None or setup is None else setup(*setup_args)
        )
        if prefetch is not None and items:
            prefetch(context, items[0])
        for k, item in enumerate(items):
            if prefetch is not None and k + 1 < len(items):
                prefetch(context, items[k + 1])
            # one BLAS thread, as in the workers: results must not depend on the worker count
            with one_blas_thread():
                result = fn(context, item)
            yield result
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(
        min(workers, len(items)), mp_context=ctx, initializer=_init, initargs=(setup, setup_args)
    ) as pool:
        yield from pool.map(_call, [(fn, item) for item in items], chunksize=1)
