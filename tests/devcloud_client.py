"""Test helpers: synthetic frames and pixel checks (no numpy), leak and polling helpers,
and a devcloud client.

Decoded video is lossy, so checks compare mean luma of regions with a tolerance.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import trio
import trio_websocket
from aiortc import RTCDataChannel, RTCPeerConnection
from av import VideoFrame

from scope_trio import rtc
from scope_trio.dev.devcloud import DevCloudConfig, serve_devcloud
from scope_trio.rtc import raw, tracks


def rgb_frame(width: int, height: int, left: int, right: int | None = None) -> VideoFrame:
    """An rgb24 frame: grey level ``left`` in the left half, ``right`` (default same) right."""
    right = left if right is None else right
    frame = VideoFrame(width=width, height=height, format="rgb24")
    plane = frame.planes[0]
    half = width // 2
    row = bytes([left]) * (3 * half) + bytes([right]) * (3 * (width - half))
    row += bytes(plane.line_size - len(row))
    plane.update(row * height)
    return frame


def luma_halves(frame: VideoFrame) -> tuple[float, float]:
    """Mean luma (0-255) of the left and right halves, ignoring a margin around the split."""
    gray = frame.reformat(format="gray")
    plane = gray.planes[0]
    data = bytes(plane)
    width, height = gray.width, gray.height
    margin = max(2, width // 16)
    left_end, right_start = width // 2 - margin, width // 2 + margin
    left_sum = right_sum = 0
    for y in range(margin, height - margin):
        row = data[y * plane.line_size : y * plane.line_size + width]
        left_sum += sum(row[margin:left_end])
        right_sum += sum(row[right_start : width - margin])
    rows = height - 2 * margin
    return left_sum / (rows * (left_end - margin)), right_sum / (
        rows * (width - margin - right_start)
    )


def mean_luma(frame: VideoFrame) -> float:
    """Mean luma (0-255) of the whole frame."""
    left, right = luma_halves(frame)
    return (left + right) / 2


def live_peer_connections() -> int:
    """Peer connections in this process (both sides, the dev cloud's too) not yet closed."""
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, RTCPeerConnection) and o.connectionState != "closed"
    )


async def eventually(
    check: Callable[[], Awaitable[bool]],
    timeout: float = 10,  # noqa: ASYNC109 - the deadline is the point of this helper
    poll: float = 0.05,
) -> None:
    """Poll state that lives elsewhere (the dev cloud, gc) until ``check`` holds.

    For state with no event to wait on; raises ``trio.TooSlowError`` after ``timeout``.
    """
    with trio.fail_after(timeout):
        while True:
            if await check():
                return
            await trio.sleep(poll)


async def connect(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    """Negotiate ``offerer`` → ``answerer`` in-process (no trickle: aiortc gathers up front)."""
    offer = await raw.create_offer(offerer)
    answer = await raw.answer_offer(answerer, offer.sdp)
    await raw.apply_answer(offerer, answer.sdp)


# --------------------------------------------------------------------------------------------
# A devcloud client: signaling over trio-websocket, media over a real aiortc peer.


@asynccontextmanager
async def running_devcloud(**config: Any) -> AsyncIterator[str]:
    """A devcloud on an ephemeral port for the block; yields its base URL."""
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_devcloud, DevCloudConfig(**config)))
        try:
            yield url
        finally:
            nursery.cancel_scope.cancel()


async def control(url: str, method: str, path: str, body: Any = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return await client.request(method, path, json=body)


async def fault(url: str, action: str, **fields: Any) -> dict[str, Any]:
    response = await control(url, "POST", "/control/faults", {"action": action, **fields})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def state(url: str) -> dict[str, Any]:
    response = await control(url, "GET", "/control/state")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


class Signaling:
    """One signaling WebSocket to the devcloud, speaking the JSON protocol."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(message))

    async def receive(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await self.ws.get_message())
        return message

    async def request(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Send a request with a fresh request_id; return the reply carrying that id."""
        request_id = f"req-{next(self._ids)}"
        await self.send({"type": kind, "request_id": request_id, **fields})
        while True:
            reply = await self.receive()
            if reply.get("request_id") == request_id:
                return reply


@asynccontextmanager
async def open_signaling(
    url: str, api_key: str | None = None, *, expect_ready: bool = True
) -> AsyncIterator[Signaling]:
    """A signaling WebSocket to the devcloud at ``url``; closed (socket included) on exit.

    The TCP stream is opened here and closed here: trio-websocket leaks it when the server
    closes first (docs/stack-notes.md), which ``filterwarnings = error`` would turn into a failure.
    """
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname is not None
    assert parsed.port is not None
    headers = [(b"Authorization", f"Key {api_key}".encode())] if api_key else None
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream(parsed.hostname, parsed.port)
        try:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, parsed.netloc, "/ws", extra_headers=headers
            )
            try:
                signaling = Signaling(ws)
                if expect_ready:
                    ready = await signaling.receive()
                    assert ready["type"] == "ready", ready
                    assert ready["connection_id"]
                yield signaling
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()
        finally:
            await stream.aclose()
            nursery.cancel_scope.cancel()


@dataclass
class MediaClient:
    """A browser-like client peer: sends a half-black/half-white pattern, counts frames back."""

    pc: RTCPeerConnection
    events: raw.PeerEvents
    source: rtc.TrioVideoSource
    parameters: RTCDataChannel
    session_id: str = ""
    frames_received: int = 0
    feeding: bool = True
    halves: tuple[int, int] = (0, 255)
    """Grey levels of the left and right halves of the frames :meth:`feed` sends."""

    def __post_init__(self) -> None:
        self._frames_send, self.frames = trio.open_memory_channel[VideoFrame](math.inf)

    def deliver(self, frame: VideoFrame) -> None:
        self.frames_received += 1
        self._frames_send.send_nowait(frame)

    async def next_frame(self) -> VideoFrame:
        return await self.frames.receive()

    def drain(self) -> None:
        """Forget frames received so far."""
        with contextlib.suppress(trio.WouldBlock):
            while True:
                self.frames.receive_nowait()

    async def feed(self, size: int = 128) -> None:
        while True:
            if self.feeding:
                self.source.push(rgb_frame(size, size, *self.halves))
            await trio.sleep(1 / 30)


async def start_media(
    signaling: Signaling,
    nursery: trio.Nursery,
    initial_parameters: dict[str, Any] | None = None,
    *,
    send_video: bool = True,
    direction: str = "recvonly",
) -> MediaClient:
    """Offer through ``signaling``, connect, and start feeding and receiving in ``nursery``.

    ``send_video=False`` offers like a browser in text mode: one video transceiver with no
    track, in ``direction`` (``recvonly``, or ``sendrecv`` as a browser's default), and
    nothing is fed.
    """
    pc = raw.new_peer_connection([])
    client = MediaClient(
        pc=pc,
        events=raw.PeerEvents(pc),
        source=rtc.TrioVideoSource(fps=30, idle_timeout=None),
        parameters=pc.createDataChannel("parameters", ordered=True),
    )
    if send_video:
        pc.addTrack(client.source)
    else:
        pc.addTransceiver("video", direction=direction)
    try:
        offer = await raw.create_offer(pc)
        fields: dict[str, Any] = {"sdp": offer.sdp, "sdp_type": offer.type}
        if initial_parameters is not None:
            fields["initialParameters"] = initial_parameters
        reply = await signaling.request("offer", **fields)
        assert reply["type"] == "answer", reply
        client.session_id = reply["sessionId"]
        await raw.apply_answer(pc, reply["sdp"], reply["sdp_type"])
        await client.events.wait_state("connected")
        track = await client.events.tracks.receive()
    except BaseException:
        await raw.close_peer_connection(pc)
        raise
    nursery.start_soon(tracks.receive_video, track, client.deliver)
    if send_video:
        nursery.start_soon(client.feed)
    return client
