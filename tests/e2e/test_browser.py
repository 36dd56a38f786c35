"""The status page in a real Chromium: connect, stream the fake camera through the relay and
the dev cloud, simulate a cloud disconnect, see it recover on the page and in the video."""

from __future__ import annotations

import os
from typing import Any

PILL_LOG = """() => {
  window.__pills = [];
  const pill = document.getElementById('pill');
  new MutationObserver(() => window.__pills.push(pill.textContent))
    .observe(pill, {childList: true, characterData: true, subtree: true});
  window.__headlines = [];
  const headline = document.getElementById('headline');
  new MutationObserver(() => window.__headlines.push(headline.textContent))
    .observe(headline, {childList: true, characterData: true, subtree: true});
}"""

VIDEO_ADVANCED = """([since, by]) => {
  const v = document.getElementById('remote');
  return v.videoWidth > 0 && v.currentTime > since + by;
}"""


def remote_time(page: Any) -> float:
    value: float = page.evaluate("() => document.getElementById('remote').currentTime")
    return value


def test_stream_survives_a_cloud_disconnect(server: str, page: Any) -> None:
    page.goto(server + "/")
    pill = page.locator("#pill")
    page.click("#connect")
    page.wait_for_function(
        "() => document.getElementById('pill').textContent === 'Connected'", timeout=30_000
    )

    page.click("#start")
    page.wait_for_function(
        "() => document.getElementById('pill').textContent === 'Streaming'", timeout=30_000
    )
    page.wait_for_function(VIDEO_ADVANCED, arg=[0, 1.0], timeout=30_000)
    assert page.evaluate("() => pc.connectionState") == "connected"
    if os.environ.get("SCOPE_TRIO_SCREENSHOT"):
        page.screenshot(path=os.environ["SCOPE_TRIO_SCREENSHOT"], full_page=True)

    page.evaluate(PILL_LOG)
    page.click("#simulate")
    page.wait_for_function("() => window.__pills.includes('Reconnecting')", timeout=15_000)
    page.wait_for_function(
        "() => document.getElementById('pill').textContent === 'Streaming'", timeout=30_000
    )
    assert "Reconnecting" in page.evaluate("() => window.__pills")
    # where the recovery stood: the outage's first attempt of the budget of 3
    headlines = page.evaluate("() => window.__headlines")
    assert any("reconnecting (1/3)" in h for h in headlines), headlines

    # The processed video plays again, on the same browser peer connection (no renegotiation).
    page.wait_for_function(VIDEO_ADVANCED, arg=[remote_time(page), 1.0], timeout=30_000)
    assert page.evaluate("() => pc.connectionState") == "connected"
    assert pill.text_content() == "Streaming"
    quality = page.evaluate(
        "() => document.getElementById('remote').getVideoPlaybackQuality().totalVideoFrames"
    )
    assert quality > 30

    page.click("#stop")
    page.wait_for_function(
        "() => document.getElementById('stream-pill').textContent === 'Idle'", timeout=10_000
    )
