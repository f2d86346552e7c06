"""Regenerate docs/review.jpg: the review page on a run with a cell database.

.venv/bin/python docs/review_screenshot.py immunocto-demo
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import expect, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import LiveServer
from immunocto.review.server import create_app
from immunocto.review.store import ReviewStore, review_path


def main(run: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("review.sqlite*"))
        token = ReviewStore(review_path(copy)).add_reviewer("demo")
        with (
            LiveServer(create_app(copy, strategy="stratified", batch_size=24)) as server,
            sync_playwright() as p,
        ):
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1300, "height": 840})
            page.goto(server.url + "/")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_selector(".cell img")
            for key in ("1", "2", "3", "4", "c"):
                page.keyboard.press(key)
                page.wait_for_timeout(30)
            expect(page.locator("#progress-text")).to_have_text(re.compile(r"^4 /"))
            page.wait_for_timeout(800)
            out = Path(tmp) / "review.png"
            page.screenshot(path=str(out))
            browser.close()
        Image.open(out).convert("RGB").save(Path(__file__).parent / "review.jpg", quality=85)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
