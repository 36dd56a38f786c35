"""Scope's frontend as an aiortc peer: a camera track, the ``parameters`` channel, and
everything the server sends back, judged by the brightness of the two frame halves.

The camera sends a half-white/half-black frame at 30 fps: a frame that comes back inverted
went through the dev cloud's ``invert`` pipeline, a black one came from nobody. How the offer
reaches the server is the caller's: straight to a :class:`~scope_trio.relay.relay.Relay`
(``tests/test_relay.py``), or through ``POST /api/v1/webrtc/offer`` with
:func:`http_browser` (the fault rig, the metrics and log tests, the server processes of
``tests/serve_process.py``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpx
import trio
from aiortc import RTCDataChannel, RTCPeerConnection
from av import VideoFrame
from devcloud_client import luma_halves, rgb_frame

from scope_trio import rtc
from scope_trio.rtc import raw, tracks

WIDTH, HEIGHT = 128, 96
FPS = 30.0

SendOffer = Callable[[str, str], Awaitable[Mapping[str, Any]]]
"""Gives the server our offer (sdp, type); returns its ``{sdp, type, sessionId}`` answer."""


class Seen(NamedTuple):
    """One frame the browser received: when, and the mean luma of its two halves."""

    at: float
    left: float
    right: float

    @property
    def inverted(self) -> bool:
        return self.left < 60 and self.right > 195

    @property
    def black(self) -> bool:
        return self.left < 40 and self.right < 40


@dataclass
class Browser:
    """The browser's side: its peer connection and everything it received."""

    pc: RTCPeerConnection
    events: raw.PeerEvents
    channel: RTCDataChannel
    session_id: str
    deadline: float = 10.0
    """Default bound on :meth:`inverted_frame`."""
    seen: list[Seen] = field(default_factory=list)
    states_after_connect: list[str] = field(default_factory=list)
    closed: trio.Event = field(default_factory=trio.Event)
    _arrived: trio.Event = field(default_factory=trio.Event)

    def on_frame(self, frame: VideoFrame) -> None:
        self.seen.append(Seen(trio.current_time(), *luma_halves(frame)))
        self._arrived.set()
        self._arrived = trio.Event()

    async def record_states(self) -> None:
        async for state in self.events.states:
            self.states_after_connect.append(state)
            if state in ("closed", "failed"):
                self.closed.set()
                return

    async def inverted_frame(self, timeout: float | None = None) -> Seen:  # noqa: ASYNC109
        """Wait for a processed frame arriving from now on."""
        start = len(self.seen)
        with trio.fail_after(self.deadline if timeout is None else timeout):
            while True:
                for seen in self.seen[start:]:
                    if seen.inverted:
                        return seen
                start = len(self.seen)
                await self._arrived.wait()

    async def next_frame(self, timeout: float | None = None) -> Seen:  # noqa: ASYNC109
        """Wait for any frame arriving from now on."""
        start = len(self.seen)
        with trio.fail_after(self.deadline if timeout is None else timeout):
            while len(self.seen) == start:
                await self._arrived.wait()
        return self.seen[start]

    def send(self, update: Mapping[str, Any]) -> None:
        """A parameter update on the ``parameters`` data channel, as Scope's frontend sends."""
        self.channel.send(json.dumps(dict(update)))


@asynccontextmanager
async def open_browser(send_offer: SendOffer, *, deadline: float = 10.0) -> AsyncIterator[Browser]:
    """A connected :class:`Browser` for the block (peer connection, data channel open, the
    server's track arriving); closed, shielded and bounded, on the way out."""
    pc = raw.new_peer_connection([])
    events = raw.PeerEvents(pc)
    camera = rtc.TrioVideoSource(fps=FPS, idle_timeout=None)
    pc.addTrack(camera)
    channel = pc.createDataChannel("parameters", ordered=True)
    opened = trio.Event()
    channel.on("open", opened.set)
    try:
        async with trio.open_nursery() as nursery:

            async def produce() -> None:
                while True:  # a fresh frame each time: push takes ownership (pts)
                    camera.push(rgb_frame(WIDTH, HEIGHT, 255, 0))
                    await trio.sleep(1 / FPS)

            nursery.start_soon(produce)
            offer = await raw.create_offer(pc)
            with trio.fail_after(deadline):
                answer = await send_offer(offer.sdp, offer.type)
            assert answer["type"] == "answer"
            await raw.apply_answer(pc, answer["sdp"], answer["type"])
            with trio.fail_after(deadline):
                assert await events.wait_state("connected") == "connected"
                await opened.wait()
                track = await events.tracks.receive()
            b = Browser(pc, events, channel, answer["sessionId"], deadline=deadline)
            nursery.start_soon(b.record_states)
            nursery.start_soon(tracks.receive_video, track, b.on_frame)
            yield b
            nursery.cancel_scope.cancel()
    finally:
        camera.stop()
        await raw.close_peer_connection(pc)


def http_browser(
    api: httpx.AsyncClient,
    params: Mapping[str, Any] | None = None,
    *,
    deadline: float = 10.0,
) -> AbstractAsyncContextManager[Browser]:
    """A connected :class:`Browser` whose offer went through ``POST /api/v1/webrtc/offer``
    of the server ``api`` talks to, with ``params`` as its ``initialParameters``."""

    async def send_offer(sdp: str, sdp_type: str) -> dict[str, Any]:
        body: dict[str, Any] = {"sdp": sdp, "type": sdp_type}
        if params is not None:
            body["initialParameters"] = dict(params)
        response = await api.post("/api/v1/webrtc/offer", json=body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    return open_browser(send_offer, deadline=deadline)
