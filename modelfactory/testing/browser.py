"""Headless Debian Chromium driven by Playwright (no browser download: ``/usr/bin/chromium``).

``.ci/run`` installs the ``chromium`` package when it is missing. Use :func:`open_browser`::

    with open_browser() as browser:
        page = browser.new_page()
        page.goto(url)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Where browser tests leave their screenshots (kept as test artifacts).
SCREENSHOT_DIR = Path(os.environ.get("MODELFACTORY_TEST_ARTIFACTS", "test-artifacts"))


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise FileNotFoundError(
            "no chromium found: `apt-get install -y chromium` (.ci/run does it), or set CHROMIUM=/path"
        )
    return path


@contextmanager
def open_browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            browser.close()


def screenshot_path(name: str) -> Path:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOT_DIR / name
