"""Rate limits of the review server: token buckets keyed by client.

Two limits: requests per client (its bearer token, its login cookie, else its address), and
failed sign-ins per address (a wrong token), so nobody can guess tokens or flood the server
that the lab's reviewers share. Both answer ``429`` with ``Retry-After``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """``rate`` tokens per second into a bucket of ``burst``, one bucket per key.

    :meth:`take` spends a token (``False`` when the key's bucket is empty); :meth:`wait` is
    how long until the key has a token again. Keys idle long enough to refill are forgotten
    (at most ``max_keys`` are kept), so memory stays bounded whatever the clients send.
    """

    rate: float
    burst: float
    max_keys: int = 10_000
    clock: object = time.monotonic
    _state: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (tokens, t)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _level(self, key: str, now: float) -> float:
        tokens, then = self._state.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.rate)

    def take(self, key: str, cost: float = 1.0) -> bool:
        with self._lock:
            now = self.clock()  # type: ignore[operator]
            level = self._level(key, now)
            if level < cost:
                self._state[key] = (level, now)
                return False
            self._state[key] = (level - cost, now)
            if len(self._state) > self.max_keys:
                self._forget(now)
            return True

    def empty(self, key: str) -> bool:
        """Whether ``key`` has no whole token left (nothing spent)."""
        with self._lock:
            return self._level(key, self.clock()) < 1.0  # type: ignore[operator]

    def wait(self, key: str) -> int:
        """Whole seconds until ``key`` has a token again (for ``Retry-After``)."""
        with self._lock:
            level = self._level(key, self.clock())  # type: ignore[operator]
        return max(1, math.ceil((1.0 - level) / self.rate)) if level < 1.0 else 0

    def _forget(self, now: float) -> None:
        full = [k for k in self._state if self._level(k, now) >= self.burst]
        for k in full:
            del self._state[k]
        if len(self._state) > self.max_keys:  # still too many: drop the oldest
            for k in sorted(self._state, key=lambda k: self._state[k][1])[: len(self._state) // 2]:
                del self._state[k]


@dataclass
class Limits:
    """The server's two limits (see the module docstring). Defaults: 40 requests/s per
    client with bursts of 200 (a reviewer deciding as fast as keys allow needs ~5/s, the page
    loads ~30 images at once); 10 failed sign-ins per address, one more every 6 s."""

    requests: TokenBucket = field(default_factory=lambda: TokenBucket(rate=40.0, burst=200.0))
    failures: TokenBucket = field(default_factory=lambda: TokenBucket(rate=1 / 6, burst=10.0))
