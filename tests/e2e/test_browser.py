"""The status page in a real Chromium: connect, stream the fake camera through the relay and
the dev cloud, simulate a cloud disconnect, see it recover on the page and in the video."""

from __future__ import annotations

import os
from typing import Any

import httpx

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


TEXT_MODE_OFFER = """async () => {
  // Scope's frontend in text mode: it receives video and sends none (a recvonly transceiver).
  const pc = new RTCPeerConnection();
  window.textPc = pc;
  pc.addTransceiver('video', {direction: 'recvonly'});
  window.textChannel = pc.createDataChannel('parameters', {ordered: true});
  const video = document.createElement('video');
  video.id = 'text-mode';
  video.muted = true;
  video.autoplay = true;
  video.playsInline = true;
  document.body.appendChild(video);
  pc.ontrack = (e) => { video.srcObject = e.streams[0] || new MediaStream([e.track]); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === 'complete') return done();
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') done();
    });
  });
  const response = await fetch('/api/v1/webrtc/offer', {
    method: 'POST',
    headers: {'content-type': 'application/json'},
    body: JSON.stringify({
      sdp: pc.localDescription.sdp,
      type: 'offer',
      initialParameters: {prompts: [{text: 'scope-trio', weight: 1.0}]},
    }),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(JSON.stringify(answer));
  await pc.setRemoteDescription(answer);
  return answer.sessionId;
}"""

TEXT_VIDEO_ADVANCED = """([since, by]) => {
  const v = document.getElementById('text-mode');
  return v && v.videoWidth > 0 && v.currentTime > since + by;
}"""

FRAME_LUMA = """() => {
  const v = document.getElementById('text-mode');
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext('2d');
  g.drawImage(v, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let sum = 0, spread = 0;
  const values = [];
  for (let i = 0; i < d.length; i += 4 * 97) values.push((d[i] + d[i + 1] + d[i + 2]) / 3);
  for (const x of values) sum += x;
  const mean = sum / values.length;
  for (const x of values) spread += Math.abs(x - mean);
  return [mean, spread / values.length];
}"""


def test_text_mode_pipeline_streams_with_no_browser_video(server: str, page: Any) -> None:
    """``pattern`` needs no input video: a real Chromium offers with a recvonly transceiver
    only, and the relay still answers and plays the cloud's pictures into it."""
    page.goto(server + "/status")
    assert page.evaluate(POST, ["/api/v1/cloud/connect", {}]) == 200
    page.wait_for_function(STATUS_IS, arg=["/api/v1/cloud/status", "connected", True], polling=100)
    with httpx.Client(base_url=server, timeout=10) as http:
        assert "pattern" in http.get("/api/v1/pipelines/schemas").json()["pipelines"]
    assert page.evaluate(POST, ["/api/v1/pipeline/load", {"pipeline_ids": ["pattern"]}]) == 200
    page.wait_for_function(
        STATUS_IS, arg=["/api/v1/pipeline/status", "status", "loaded"], polling=100
    )
    session_id = page.evaluate(TEXT_MODE_OFFER)
    assert session_id
    page.wait_for_function(TEXT_VIDEO_ADVANCED, arg=[0, 1.0], timeout=30_000)
    mean, spread = page.evaluate(FRAME_LUMA)
    assert spread > 5, f"a drawn pattern, not a flat frame (mean {mean}, spread {spread})"
    with httpx.Client(base_url=server, timeout=10) as http:
        assert http.get("/api/v1/cloud/status").json()["webrtc_connected"] is True
        assert http.delete(f"/api/v1/webrtc/offer/{session_id}").status_code == 204


POST = """async ([path, body]) => (await fetch(path, {
  method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify(body),
})).status"""

STATUS_IS = """async ([path, key, value]) => (await (await fetch(path)).json())[key] === value"""
