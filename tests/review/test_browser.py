"""End to end in real headless Chromium (Debian's package, driven by Playwright): a reviewer
labels cells with the keyboard and the decisions are in SQLite."""

from __future__ import annotations

import re
import shutil
import sqlite3

import pytest
from playwright.sync_api import expect

from helpers import LiveServer
from immunocto.review.server import create_app
from immunocto.review.store import ReviewStore, review_path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    if not shutil.which("chromium"):
        pytest.fail(
            "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        yield b
        b.close()


def _login(page, url, token):
    page.goto(url + "/")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_selector(".cell img")


def _decisions(run):
    con = sqlite3.connect(review_path(run))
    return con.execute(
        "SELECT reviewer, row, label, unsure, kind FROM decisions ORDER BY id"
    ).fetchall()


def test_keyboard_labelling_lands_in_sqlite(review_run, browser, tmp_path):
    token = ReviewStore(review_path(review_run)).add_reviewer("alice")
    with LiveServer(create_app(review_run, batch_size=12)) as server:
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        _login(page, server.url, token)
        assert page.inner_text("#who") == "alice"
        rows = [
            int(r) for r in page.eval_on_selector_all(".cell", "els => els.map(e => e.dataset.row)")
        ]
        assert len(rows) == 12 and page.locator(".cell .proposed").count() == 12
        for key in ("1", "2", "ArrowRight", "x", "u"):  # as fast as a reviewer can type
            page.keyboard.press(key)
        expect(page.locator("#progress-text")).to_have_text(re.compile(r"^4 /"))
        page.keyboard.press("z")
        expect(page.locator("#status")).to_have_text(re.compile(r"^undone"))
        page.keyboard.press("i")  # IF view
        expect(page.locator(".cell img").first).to_have_attribute("src", re.compile(r"if\.png"))
        page.keyboard.press("c")  # context view
        expect(page.locator("#context")).to_have_attribute("src", re.compile(r"context\.png"))
        for _ in range(100):  # wait until the context image has loaded
            if page.locator("#context").evaluate("e => e.complete && e.naturalWidth") == 256:
                break
            page.wait_for_timeout(50)
        assert page.locator("#context").evaluate("e => e.naturalWidth") == 256
        page.screenshot(path=str(tmp_path / "review.png"))
        assert errors == []
    got = _decisions(review_run)
    assert got == [
        ("alice", rows[0], "cd4_t", 0, "decision"),
        ("alice", rows[1], "cd8_t", 0, "decision"),
        ("alice", rows[3], "not_cell", 0, "decision"),
        ("alice", rows[4], "ambiguous", 1, "decision"),
        ("alice", rows[4], None, 0, "undo"),
    ]
    latest = ReviewStore(review_path(review_run)).latest()
    assert sorted(latest["row"]) == sorted([rows[0], rows[1], rows[3]])


def test_blind_mode_and_a_wrong_token_in_the_browser(review_run, browser):
    store = ReviewStore(review_path(review_run))
    token = store.add_reviewer("bob")
    with LiveServer(create_app(review_run, blind=True)) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#token", "not-a-token")
        page.click("button[type=submit]")
        expect(page.locator("#login-error")).to_have_text("unknown token")
        assert page.is_visible("#login") and not page.is_visible("#app")
        _login(page, server.url, token)
        assert page.is_visible("#blind-flag")
        assert page.locator(".cell .proposed").count() == 0
        assert "proposed" not in page.content()
        # the agreement page renders the tables from the API
        page.keyboard.press("5")
        expect(page.locator("#progress-text")).to_have_text(re.compile(r"^1 /"))
        expect(page.locator("#status")).to_have_text(re.compile(r"^saved other"))
        page.goto(server.url + "/agreement")
        expect(page.locator("#concordance tr")).to_have_count(2)
        assert "bob" in page.inner_text("#concordance")
    assert [(r[0], r[2]) for r in _decisions(review_run)] == [("bob", "other")]
