"""Load on the review app: N concurrent reviewers for a fixed time against a real server
(`immunocto review serve`, loopback only), then a kill of the server in the middle of the
load.

Each client is a reviewer with its own token, in a loop: fetch a batch (`GET /api/batch`),
decide each cell of it in one request (`POST /api/decisions`, one decision per request, the
way the page sends them). Printed: decisions/s, p50 / p99 latency of the decision requests,
the decisions the server acknowledged vs the rows in `review.sqlite` (none may be lost or
duplicated), and after a SIGKILL of the server under load: `PRAGMA integrity_check` and
every acknowledged decision still there.

    python benchmarks/review_load.py --clients 16 --seconds 60

`--size` sets the simulated slides (two, for a crop store to review). Printed and appended to
benchmarks/results/review_load.jsonl.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from _results import record

#: HTTP status of every decision request of the run.
STATUS: Counter = Counter()
LABELS = ("cd4_t", "cd8_t", "b_cell", "macrophage", "other")


def make_run(workdir: Path, size: int) -> Path:
    """Two simulated slides through `build-db`: a crop store to review."""
    run = workdir / "run"
    subprocess.run([sys.executable, "-m", "immunocto", "simulate", str(run), "--size", str(size),
                    "--slides", "2", "--seed", "7"], check=True, capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "immunocto", "run", str(run), "--until", "build-db",
                    "--no-dask", "--workers", "1"], check=True, capture_output=True)  # fmt: skip
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(run: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "immunocto", "review", "serve", str(run), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/favicon.ico", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the review server did not start")


def client(url: str, token: str, stop: threading.Event, acked: list, lat: list, seed: int) -> None:
    """One reviewer: batches and decisions until ``stop``; records acknowledged decisions."""
    rng = np.random.default_rng(seed)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        while not stop.is_set():
            try:
                items = c.get("/api/batch", params={"size": 8}).json()["items"]
            except (httpx.HTTPError, ValueError, KeyError):
                return  # the server is gone (kill phase)
            if not items:
                return
            for it in items:
                if stop.is_set():
                    return
                body = {"row": it["row"], "label": LABELS[int(rng.integers(len(LABELS)))]}
                t0 = time.perf_counter()
                try:
                    res = c.post("/api/decisions", json=body)
                except httpx.HTTPError:
                    return
                lat.append(time.perf_counter() - t0)
                STATUS[res.status_code] += 1  # (429: over the rate limit, refused, not lost)
                if res.status_code == 200:
                    acked.append((token, it["row"], body["label"]))


def load(port: int, tokens: dict[str, str]):
    """Start one client thread per token; returns (stop event, threads, acked, latencies, t0)."""
    url = f"http://127.0.0.1:{port}"
    stop, acked, lat = threading.Event(), [], []
    threads = [
        threading.Thread(target=client, args=(url, tok, stop, acked, lat, i), daemon=True)
        for i, tok in enumerate(tokens.values())
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    return stop, threads, acked, lat, t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", type=int, default=2048, help="simulated slide size (px)")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    from immunocto.review.store import ReviewStore, review_path

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="review-load-"))
    run = make_run(workdir, args.size)
    store = ReviewStore(review_path(run))
    tokens = {f"r{i:02d}": store.add_reviewer(f"r{i:02d}") for i in range(args.clients)}
    name_of = {tok: name for name, tok in tokens.items()}
    port = free_port()
    proc = serve(run, port)
    rows = []
    try:
        stop, threads, acked, lat, t0 = load(port, tokens)
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        wall = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    stored = store.all_decisions()
    lat_ms = np.array(lat) * 1000
    want = Counter((name_of[t], r, lab) for t, r, lab in acked)
    got = Counter(zip(stored["reviewer"], stored["row"], stored["label"], strict=True))
    rows.append({
        "phase": "load", "clients": args.clients, "seconds": round(wall, 1),
        "decisions_acked": len(acked), "decisions_stored": len(stored),
        "lost": sum((want - got).values()), "duplicated": sum((got - want).values()),
        "decisions_per_s": round(len(acked) / wall, 1),
        "refused_429": STATUS[429], "other_errors": sum(STATUS.values()) - STATUS[200] - STATUS[429],
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 1) if len(lat_ms) else None,
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 1) if len(lat_ms) else None,
    })  # fmt: skip
    # kill phase: SIGKILL the server under load, restart, check the file and every acked decision
    before = len(stored)
    fresh = {f"k{i:02d}": store.add_reviewer(f"k{i:02d}") for i in range(args.clients)}
    name_of.update({tok: name for name, tok in fresh.items()})  # reviewers with cells left
    proc = serve(run, port)
    stop, threads, acked2, _, _ = load(port, fresh)
    time.sleep(min(5.0, args.seconds / 2))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    con = sqlite3.connect(review_path(run))
    integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    con.close()
    after = store.all_decisions()
    have = set(zip(after["reviewer"], after["row"], after["label"], strict=True))
    missing = [a for a in acked2 if (name_of[a[0]], a[1], a[2]) not in have]
    rows.append({
        "phase": "SIGKILL under load", "integrity_check": integrity,
        "decisions_acked": len(acked2), "stored_since": len(after) - before,
        "acked_but_missing": len(missing),
    })  # fmt: skip
    record("review_load", rows)
    if rows[0]["lost"] or rows[0]["duplicated"] or integrity != "ok" or missing:
        sys.exit(1)


if __name__ == "__main__":
    main()
