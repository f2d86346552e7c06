"""The Dask LocalCluster that `immunocto run` starts: workers keep glibc's allocator defaults,
keep busy behind a slow task, and are warmed up before the first tile."""

import os
import sys
import time

import dask
import pytest

from immunocto._parallel import local_cluster, ordered_map, use_dask, warm_workers

pytest.importorskip("distributed")


def _worker_env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}


def test_local_cluster_workers_keep_the_adaptive_mmap_threshold(monkeypatch):
    from distributed import Client, LocalCluster

    from immunocto._parallel import local_cluster

    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    before = dask.config.get(key)
    # the nanny's other settings are absent here (and monkeypatch puts them back after)
    for name in dask.config.get("distributed.nanny.pre-spawn-environ"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    # what an earlier plain LocalCluster leaves in this process (its nanny writes it here)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with (
        local_cluster(1, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        [env] = client.run(_worker_env).values()
        assert len(cluster.workers) == 1
    assert env["MALLOC_TRIM_THRESHOLD_"] is None  # Dask's default would set 65536
    assert env["OMP_NUM_THREADS"] == "1"  # Dask's other worker settings stay
    assert dask.config.get(key) == before  # the caller's Dask config is untouched
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # and its environment restored:
    assert "OMP_NUM_THREADS" not in os.environ  # no worker setting left behind for later
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    # the plain LocalCluster does set it: the test above would notice a regression
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        ) as plain,
        Client(plain) as client,
    ):
        [env] = client.run(_worker_env).values()
    assert env["MALLOC_TRIM_THRESHOLD_"] is not None


def _timed(_context, item):
    start = time.time()
    time.sleep(3.0 if item == 0 else 0.1)
    return item, start, time.time()


def test_dask_map_keeps_the_other_workers_busy_behind_a_slow_task():
    """A slow first task (a worker building its context) must not stall the other worker: the
    map submits a new task whenever any finishes, and still yields in order."""
    from distributed import Client

    with (
        local_cluster(2, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as client,
        use_dask(client),
    ):
        out = list(ordered_map(_timed, range(10), workers=2))
    assert [item for item, _, _ in out] == list(range(10))
    first_done = out[0][2]
    started_meanwhile = [item for item, start, _ in out[1:] if start < first_done]
    # 4 x workers may run ahead of the oldest unfinished one: items 1-7 (waiting on the oldest,
    # as before, would let only items 1-3 start)
    assert len(started_meanwhile) >= 6, started_meanwhile


def _has_torch() -> bool:
    return "torch" in sys.modules


def test_warm_workers_imports_torch_on_every_worker_before_any_tile():
    pytest.importorskip("torch")
    from distributed import Client

    with (
        local_cluster(2, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        assert not any(client.run(_has_torch).values())
        warm_workers(client)
        deadline = time.time() + 120
        while not all(client.run(_has_torch).values()):
            assert time.time() < deadline, "workers never imported torch"
            time.sleep(0.5)
