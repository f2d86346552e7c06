"""Read-ahead of the next tile's inputs in one process (`immunocto._readahead`)."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from immunocto._parallel import ordered_map
from immunocto._readahead import MAX_PENDING, ReadAhead


def test_reads_run_on_one_background_thread_in_the_order_asked():
    ahead = ReadAhead()
    seen: list[tuple[str, int]] = []

    def read(key):
        def run():
            time.sleep(0.01)
            seen.append((threading.current_thread().name, key))
            return key * 10

        return run

    ahead.submit(1, read(1))
    ahead.submit(2, read(2))
    ahead.submit(2, read(99))  # a second submit of a key is ignored
    assert ahead.get(1, read(-1)) == 10
    assert ahead.get(2, read(-1)) == 20
    assert ahead.get(3, read(3)) == 30  # never submitted: read there and waited for
    ahead.close()
    assert [k for _, k in seen] == [1, 2, 3]
    names = {name for name, _ in seen}
    assert len(names) == 1 and names != {threading.current_thread().name}


def test_a_failed_read_raises_when_taken_and_stale_reads_are_dropped():
    ahead = ReadAhead()

    def boom():
        raise OSError("tile 7: truncated")

    ahead.submit(7, boom)  # no error yet
    with pytest.raises(OSError, match="tile 7"):
        ahead.get(7, boom)
    calls = []
    for k in range(MAX_PENDING + 3):  # never taken: only the newest MAX_PENDING wait
        ahead.submit(k, lambda k=k: calls.append(k) or k)
    assert len(ahead._pending) == MAX_PENDING
    assert ahead.get(MAX_PENDING + 2, lambda: -1) == MAX_PENDING + 2
    ahead.close()
    assert ahead._pending == {}
    # a copy in another process starts idle
    fresh = pickle.loads(pickle.dumps(ahead))
    assert fresh._pending == {} and fresh.get("k", lambda: 5) == 5
    fresh.close()


def test_ordered_map_prefetches_each_next_item_once_before_its_turn():
    events: list[tuple[str, int]] = []

    def fn(context, item):
        events.append(("run", item))
        return item * item

    def prefetch(context, item):
        assert context == "ctx"
        events.append(("prefetch", item))

    out = list(ordered_map(fn, range(4), workers=1, local_context="ctx", prefetch=prefetch))
    assert out == [0, 1, 4, 9]
    assert [e for e in events if e[0] == "prefetch"] == [("prefetch", i) for i in range(4)]
    for i in range(4):  # item i is asked for before item i - 1 runs... and before its own run
        assert events.index(("prefetch", i)) < events.index(("run", i))
        if i:
            assert events.index(("prefetch", i)) < events.index(("run", i - 1))
