"""The review store and the JSON API (FastAPI TestClient and a real uvicorn server)."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from helpers import LiveServer
from immunocto.cli import app as cli
from immunocto.cli.review import is_loopback
from immunocto.db import read_index
from immunocto.errors import ImmunoctoError
from immunocto.review.batches import candidates, next_batch
from immunocto.review.server import create_app
from immunocto.review.store import ReviewStore, hash_token, review_path


def _client(run, **kwargs):
    return TestClient(create_app(run, **kwargs))


def test_tokens_are_stored_hashed_and_names_checked(review_run):
    store = ReviewStore(review_path(review_run))
    token = store.add_reviewer("alice")
    assert store.reviewer_for(token) == "alice" and store.reviewer_for("nope") is None
    path = review_path(review_run)  # the file and its write-ahead log (open connections)
    raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    assert token.encode() not in raw and hash_token(token).encode() in raw
    with pytest.raises(ImmunoctoError, match="already exists"):
        store.add_reviewer("alice")
    with pytest.raises(ImmunoctoError, match="letters, digits"):
        store.add_reviewer("<script>")
    con = sqlite3.connect(review_path(review_run))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_decisions_are_appended_and_the_latest_counts_with_undo(review_run):
    store = ReviewStore(review_path(review_run))
    store.add_reviewer("a")
    cell = {"slide_id": "sim000", "cell_id": 1, "row": 0}
    store.add_decisions("a", [{**cell, "label": "cd4_t"}])
    store.add_decisions("a", [{**cell, "label": "cd8_t"}])
    assert store.latest()["label"].tolist() == ["cd8_t"]
    assert store.undo("a", 0) == "cd4_t"
    assert store.latest()["label"].tolist() == ["cd4_t"]
    assert store.undo("a", 0) is None
    assert store.latest().empty
    trail = store.all_decisions()
    assert trail["label"].tolist() == ["cd4_t", "cd8_t", "cd4_t", None] and trail["kind"].tolist()[
        -2:
    ] == ["undo", "undo"]
    with pytest.raises(ImmunoctoError, match="unknown label"):
        store.add_decisions("a", [{**cell, "label": "neutrophil"}])


def test_api_refuses_without_token_and_validates_labels(review_run):
    token = ReviewStore(review_path(review_run)).add_reviewer("alice")
    client = _client(review_run)
    assert client.post("/api/decisions", json={"row": 0, "label": "cd4_t"}).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert (
        client.post("/api/decisions", json={"row": 0, "label": "cd4_t"}, headers=bad).status_code
        == 401
    )
    auth = {"Authorization": f"Bearer {token}"}
    assert (
        client.post(
            "/api/decisions", json={"row": 0, "label": "neutrophil"}, headers=auth
        ).status_code
        == 422
    )
    assert (
        client.post(
            "/api/decisions", json={"row": 10**9, "label": "cd4_t"}, headers=auth
        ).status_code
        == 422
    )
    r = client.post("/api/decisions", json={"row": 3, "label": "cd8_t"}, headers=auth)
    assert r.status_code == 200 and r.json() == {"stored": 1}
    r = client.post(
        "/api/decisions",
        json={"decisions": [{"row": 4, "label": "other"}, {"row": 5, "label": "ambiguous"}]},
        headers=auth,
    )
    assert r.json() == {"stored": 2}
    rows = (
        sqlite3.connect(review_path(review_run))
        .execute(
            "SELECT reviewer, row, label, unsure, slide_id, cell_id FROM decisions ORDER BY id"
        )
        .fetchall()
    )
    index = read_index(review_run)[0].to_pandas().set_index("row")
    assert [r[:4] for r in rows] == [
        ("alice", 3, "cd8_t", 0),
        ("alice", 4, "other", 0),
        ("alice", 5, "ambiguous", 1),
    ]
    assert rows[0][4:] == (index.loc[3, "slide_id"], int(index.loc[3, "cell_id"]))
    # the cookie from /api/login opens images but not POSTs
    assert client.post("/api/login", json={"token": "wrong"}).status_code == 401
    assert client.post("/api/login", json={"token": token}).json() == {"reviewer": "alice"}
    assert client.get("/api/crops/0/he.png").headers["content-type"] == "image/png"
    assert client.post("/api/decisions", json={"row": 6, "label": "other"}).status_code == 401


def test_image_routes_take_numeric_rows_and_known_channels(review_run):
    token = ReviewStore(review_path(review_run)).add_reviewer("alice")
    client = _client(review_run)
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/crops/0/he.png").status_code == 401
    for path in (
        "/api/crops/0/he.png",
        "/api/crops/0/if.png?channels=CD3e,CD8a",
        "/api/crops/0/context.png",
    ):
        r = client.get(path, headers=auth)
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG", path
    assert client.get("/api/crops/..%2Fimmunocto.yaml/he.png", headers=auth).status_code in (
        404,
        422,
    )
    assert client.get("/api/crops/abc/he.png", headers=auth).status_code == 422
    assert client.get("/api/crops/999999/he.png", headers=auth).status_code == 404
    assert client.get("/api/crops/0/if.png?channels=<b>", headers=auth).status_code == 422
    page = client.get("/")
    assert (
        "script-src 'self'" in page.headers["content-security-policy"]
        and page.headers["x-content-type-options"] == "nosniff"
    )


def test_blind_mode_hides_proposed_labels(review_run):
    token = ReviewStore(review_path(review_run)).add_reviewer("alice")
    auth = {"Authorization": f"Bearer {token}"}
    seen = _client(review_run).get("/api/batch?size=5", headers=auth).json()
    assert all("proposed" in i for i in seen["items"])
    blind = _client(review_run, blind=True).get("/api/batch?size=5", headers=auth).json()
    assert blind["items"] and all("proposed" not in i and "margin" not in i for i in blind["items"])
    assert [i["row"] for i in blind["items"]] == [i["row"] for i in seen["items"]]


def test_batch_strategies(review_run):
    cands = candidates(review_run)
    store = ReviewStore(review_path(review_run))
    for name in ("a", "b", "c"):
        store.add_reviewer(name)
    latest = store.latest()
    strat = next_batch(cands, latest, "a", strategy="stratified", size=10)
    assert strat["label"].iloc[:5].nunique() == 5  # one of each class first
    margin = next_batch(cands, latest, "a", strategy="margin", size=20)
    assert np.all(np.diff(margin["gate_margin"].to_numpy()) >= 0)
    assert margin["gate_margin"].iloc[0] == cands["gate_margin"].min()
    # decided cells leave the reviewer's batches; a disagreement between b and c comes first for a
    r0, r1 = int(cands["row"].iloc[0]), int(cands["row"].iloc[1])

    def cell(r):
        return {
            "slide_id": cands.set_index("row").loc[r, "slide_id"],
            "cell_id": int(cands.set_index("row").loc[r, "cell_id"]),
            "row": r,
        }

    store.add_decisions("b", [{**cell(r0), "label": "cd4_t"}, {**cell(r1), "label": "other"}])
    store.add_decisions("c", [{**cell(r0), "label": "cd8_t"}])
    latest = store.latest()
    assert (
        int(next_batch(cands, latest, "a", strategy="disagreements", size=3)["row"].iloc[0]) == r0
    )
    assert r0 not in set(next_batch(cands, latest, "b", strategy="random", size=len(cands))["row"])
    a1 = next_batch(cands, latest, "a", size=8)
    assert a1.equals(next_batch(cands, latest, "a", size=8))  # stable across reloads
    with pytest.raises(ImmunoctoError, match="unknown strategy"):
        next_batch(cands, latest, "a", strategy="alphabetical")


def test_two_reviewers_at_once_lose_nothing(review_run):
    store = ReviewStore(review_path(review_run))
    tokens = {name: store.add_reviewer(name) for name in ("alice", "bob")}
    rows = read_index(review_run)[0].column("row").to_numpy()[:120]
    jobs = [(name, int(r)) for r in rows for name in tokens]

    with LiveServer(create_app(review_run)) as server:

        def post(job):
            name, row = job
            with httpx.Client(base_url=server.url, timeout=30) as c:
                label = "cd4_t" if name == "alice" else "other"
                return c.post(
                    "/api/decisions",
                    json={"row": row, "label": label},
                    headers={"Authorization": f"Bearer {tokens[name]}"},
                ).status_code

        with ThreadPoolExecutor(max_workers=12) as pool:
            codes = list(pool.map(post, jobs))
    assert codes == [200] * len(jobs)
    latest = store.latest()
    assert len(store.all_decisions()) == len(jobs) == len(latest)
    assert set(latest.loc[latest["reviewer"] == "bob", "row"]) == set(rows.tolist())


def test_cli_stats_and_export_make_v0(review_run):
    runner = CliRunner()
    out = runner.invoke(cli, ["review", "add-reviewer", str(review_run), "ann"])
    assert out.exit_code == 0, out.output
    token = out.output.strip().splitlines()[-1]
    assert ReviewStore(review_path(review_run)).reviewer_for(token) == "ann"
    store = ReviewStore(review_path(review_run))
    store.add_reviewer("ben")
    index = read_index(review_run)[0].to_pandas().head(60)
    items = [
        {"slide_id": r.slide_id, "cell_id": r.cell_id, "row": r.row, "label": r.label}
        for r in index.itertuples()
    ]
    store.add_decisions("ann", items)
    store.add_decisions("ben", items)
    out = runner.invoke(cli, ["review", "stats", str(review_run), "--bootstrap", "200"])
    assert out.exit_code == 0, out.output
    assert "1.000" in out.output  # kappa of two reviewers who agree on every cell
    assert (review_run / "review" / "agreement.png").exists() and (
        review_run / "review" / "agreement.json"
    ).exists()
    out = runner.invoke(cli, ["review", "export", str(review_run)])
    assert out.exit_code == 0, out.output
    cells = pq.read_table(review_run / "cells" / "sim000.parquet").to_pandas().set_index("cell_id")
    mine = index[index["slide_id"] == "sim000"]
    assert (cells.loc[mine["cell_id"], "review_label"].to_numpy() == mine["label"].to_numpy()).all()
    assert (cells["review_label"] == "unlabeled").sum() == len(cells) - len(mine)
    out = runner.invoke(cli, ["build-db", str(review_run), "--labels", "review", "--no-if"])
    assert out.exit_code == 0, out.output
    v0 = read_index(review_run)[0].to_pandas()
    assert set(v0["version"]) == {"V0"} and len(v0) == 60


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_pipeline_review_stage_takes_stock(review_run):
    from immunocto.config import load_config
    from immunocto.review.stage import review_stage

    cfg = load_config(review_run)
    first = review_stage(cfg, None)
    assert first["decisions"] == 0 and "review add-reviewer" in first["next"]
    store = ReviewStore(review_path(review_run))
    for name in ("ann", "ben"):
        store.add_reviewer(name)
    index = read_index(review_run)[0].to_pandas().head(10)
    items = [
        {"slide_id": r.slide_id, "cell_id": r.cell_id, "row": r.row, "label": r.label}
        for r in index.itertuples()
    ]
    store.add_decisions("ann", items)
    store.add_decisions("ben", items[:5])
    done = review_stage(cfg, None)
    assert done["reviewers"] == 2 and done["cells_reviewed"] == 10 and done["mean_kappa"] == 1.0
    assert done["v0_cells"] == 10 and (review_run / "review" / "agreement.json").exists()
