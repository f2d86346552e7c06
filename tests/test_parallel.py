"""The Dask LocalCluster that `immunocto run` starts: workers keep glibc's allocator defaults."""

import os

import dask
import pytest

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
