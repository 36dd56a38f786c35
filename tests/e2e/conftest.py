"""Browser tests: a real headless Chromium (Debian's) driven by Playwright, against a real
``scope-trio serve`` process on the embedded dev cloud.

Playwright's Python API is asyncio-based, so these tests use its sync API from plain
(non-trio) tests, and the server runs as a subprocess exactly as a user starts it.

Without Chromium they skip locally, saying how to install it; under ``CI=true`` they fail.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]
SERVER_START_TIMEOUT = 60.0
URL_LINE = re.compile(r"open (http://\S+) in your browser")


def _missing(what: str) -> None:
    message = (
        f"{what} is not available: install Debian's Chromium (`apt-get install chromium`) "
        "and the e2e group (`nox -s e2e` does that) to run the browser tests"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: browser tests must run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = os.environ.get("SCOPE_TRIO_CHROMIUM") or shutil.which("chromium") or ""
    if not path or not Path(path).exists():
        _missing("Chromium")
    return path


@pytest.fixture
def server() -> Iterator[str]:
    """``scope-trio serve`` with debug endpoints on the embedded dev cloud; yields its URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "scope_trio", "serve", "--port", "0", "--debug-endpoints"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    url = None
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    lines: list[str] = []
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = URL_LINE.search(line)
        if match:
            url = match.group(1).rstrip("/")
    try:
        assert url is not None, "server did not print its URL:\n" + "".join(lines)
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "healthy"
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - reported as a failure
            process.kill()
            process.wait()
            pytest.fail("scope-trio serve did not stop within 30 s of SIGTERM")
        finally:
            # The server's whole log: pytest shows it when the test failed.
            print("".join(lines) + process.stdout.read())
            process.stdout.close()


@pytest.fixture
def page(chromium_path: str) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright (the e2e dependency group)")
    # tests/conftest.py imports trio_asyncio, which installs its own asyncio loop policy for
    # the process; Playwright's sync API needs a plain asyncio loop of its own.
    saved_policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        with sync_playwright() as playwright:
            yield from _browser_page(playwright, chromium_path)
    finally:
        asyncio.set_event_loop_policy(saved_policy)


def _browser_page(playwright: Any, chromium_path: str) -> Iterator[Any]:
    browser = playwright.chromium.launch(
        executable_path=chromium_path, args=CHROMIUM_FLAGS, headless=True
    )
    try:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        yield context.new_page()
        context.close()
    finally:
        browser.close()
