"""Review app roles: admin tokens mint, revoke and export; a reviewer's token is refused on
those routes; revoked tokens stop working; stores from before roles keep working."""

from __future__ import annotations

import sqlite3

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from immunocto.cli import app as cli
from immunocto.errors import ImmunoctoError
from immunocto.review.server import MAX_BODY, create_app
from immunocto.review.store import ReviewStore, review_path


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_roles_admin_routes_refuse_a_reviewer_token(review_run):
    store = ReviewStore(review_path(review_run))
    boss = store.add_reviewer("boss", role="admin")
    ann = store.add_reviewer("ann")
    c = TestClient(create_app(review_run))
    routes = [("get", "/api/admin/reviewers", None),
              ("post", "/api/admin/reviewers", {"name": "bob"}),
              ("post", "/api/admin/revoke", {"name": "ann"}),
              ("post", "/api/admin/export", None)]  # fmt: skip
    for method, url, body in routes:
        assert (
            getattr(c, method)(
                url, headers=_auth(ann), **({"json": body} if body else {})
            ).status_code
            == 403
        )
        assert getattr(c, method)(url, **({"json": body} if body else {})).status_code == 401
    # the admin mints a reviewer whose token works at once, shown in that answer only
    res = c.post("/api/admin/reviewers", headers=_auth(boss), json={"name": "bob"})
    assert res.status_code == 200 and res.json()["role"] == "reviewer"
    bob = res.json()["token"]
    assert c.get("/api/me", headers=_auth(bob)).json()["reviewer"] == "bob"
    names = {
        r["name"]: r for r in c.get("/api/admin/reviewers", headers=_auth(boss)).json()["reviewers"]
    }
    assert set(names) == {"ann", "bob", "boss"} and names["boss"]["role"] == "admin"
    assert all("token" not in r for r in names.values())
    assert (
        c.post("/api/admin/reviewers", headers=_auth(boss), json={"name": "bob"}).status_code == 409
    )
    assert (
        c.post("/api/admin/reviewers", headers=_auth(boss), json={"name": "../x"}).status_code
        == 422
    )
    # revoking: ann's token stops working, her decisions stay
    row = int(c.get("/api/batch", headers=_auth(ann)).json()["items"][0]["row"])
    assert (
        c.post(
            "/api/decisions", headers=_auth(ann), json={"row": row, "label": "cd8_t"}
        ).status_code
        == 200
    )
    assert c.post("/api/admin/revoke", headers=_auth(boss), json={"name": "ann"}).status_code == 200
    assert c.get("/api/me", headers=_auth(ann)).status_code == 401
    assert store.all_decisions()["reviewer"].tolist() == ["ann"]
    assert (
        c.post("/api/admin/revoke", headers=_auth(boss), json={"name": "nobody"}).status_code == 404
    )
    # the admin exports V0: review_label lands in the cell tables
    res = c.post("/api/admin/export", headers=_auth(boss))
    assert res.status_code == 200
    tables = [
        pq.read_table(p, columns=["review_label"]).to_pandas()
        for p in (review_run / "cells").glob("*.parquet")
    ]
    assert sum(int((t["review_label"] == "cd8_t").sum()) for t in tables) == 1


def test_roles_oversized_bodies_are_refused_before_reading(review_run):
    store = ReviewStore(review_path(review_run))
    tok = store.add_reviewer("ann")
    c = TestClient(create_app(review_run))
    big = b"x" * (MAX_BODY + 1)
    res = c.post(
        "/api/decisions", headers={**_auth(tok), "content-type": "application/json"}, content=big
    )
    assert res.status_code == 413
    assert store.all_decisions().empty


def test_roles_store_from_before_roles_gains_them(tmp_path):
    path = tmp_path / "review.sqlite"
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE reviewers (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL)"
    )
    con.commit()
    con.close()
    store = ReviewStore(path)
    tok = store.add_reviewer("old")
    assert store.identify(tok) == ("old", "reviewer")
    with pytest.raises(ImmunoctoError, match="role 'boss'"):
        store.add_reviewer("x", role="boss")


def test_roles_cli_admin_and_revoke(review_run):
    runner = CliRunner()
    out = runner.invoke(cli, ["review", "add-reviewer", str(review_run), "root", "--admin"])
    assert out.exit_code == 0 and "admin root added" in out.output
    token = out.output.strip().splitlines()[-1]
    store = ReviewStore(review_path(review_run))
    assert store.identify(token) == ("root", "admin")
    assert runner.invoke(cli, ["review", "revoke", str(review_run), "root"]).exit_code == 0
    assert store.identify(token) is None
    bad = runner.invoke(cli, ["review", "revoke", str(review_run), "ghost"])
    assert bad.exit_code == 2 and "no reviewer 'ghost'" in bad.output


def test_roles_rate_limits_answer_429_and_wrong_tokens_lock_the_address(review_run):
    from immunocto.review.limits import Limits, TokenBucket

    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    limits = Limits(
        requests=TokenBucket(rate=2.0, burst=5.0, clock=clock),
        failures=TokenBucket(rate=0.1, burst=3.0, clock=clock),
    )
    ann = ReviewStore(review_path(review_run)).add_reviewer("ann")
    c = TestClient(create_app(review_run, limits=limits))
    codes = [c.get("/api/me", headers=_auth(ann)).status_code for _ in range(7)]
    assert codes == [200] * 5 + [429] * 2  # the burst, then the rate
    res = c.get("/api/me", headers=_auth(ann))
    assert res.status_code == 429 and res.headers["Retry-After"] == "1"
    # refusals carry the security headers too (one middleware in front of everything)
    assert res.headers["content-security-policy"].startswith("default-src 'self'")
    assert res.headers["cache-control"] == "no-store" and res.json()["detail"].startswith("too")
    now[0] += 1.0  # two more tokens
    assert [c.get("/api/me", headers=_auth(ann)).status_code for _ in range(3)] == [200, 200, 429]
    # wrong tokens from one address: 401 three times, then 429 even for the right token
    now[0] += 10.0
    wrong = [c.get("/api/me", headers=_auth(f"guess{i}")).status_code for i in range(4)]
    assert wrong == [401, 401, 401, 429]
    locked = c.get("/api/me", headers=_auth(ann))
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) == 10
    assert c.get("/api/me").status_code == 429  # no token at all is not let through either
    assert c.post("/api/login", json={"token": ann}).status_code == 429  # nor a sign-in
    now[0] += 10.0  # one failure forgiven
    assert c.get("/api/me", headers=_auth(ann)).status_code == 200
    # wrong tokens at the sign-in count too
    now[0] += 100.0
    signin = [c.post("/api/login", json={"token": f"guess{i}"}).status_code for i in range(4)]
    assert signin == [401, 401, 401, 429]
    # a page that has not signed in yet (no token) does not count as a failure
    fresh = TestClient(create_app(review_run))
    assert [fresh.get("/api/me").status_code for _ in range(15)] == [401] * 15


def test_roles_token_buckets_forget_idle_clients():
    from immunocto.review.limits import TokenBucket

    now = [0.0]
    b = TokenBucket(rate=1.0, burst=2.0, max_keys=100, clock=lambda: now[0])
    for i in range(150):
        assert b.take(f"k{i}")
        now[0] += 0.01
    now[0] += 10
    assert b.take("late") and len(b._state) <= 100
