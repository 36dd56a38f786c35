"""Video between trio and aiortc: an outbound track fed from trio, inbound frames into trio.

aiortc's tracks are asyncio objects; these are the only places frames cross the boundary.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections.abc import Callable

from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpReceiver, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from scope_trio.rtc import _aiortc_internals as internals
from scope_trio.rtc.bridge import aio

__all__ = [
    "VIDEO_TIME_BASE",
    "TrioVideoSource",
    "black_frame",
    "drain",
    "receive_video",
    "request_keyframe",
]

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
"""Time base of every frame :class:`TrioVideoSource` emits (the RTP video clock)."""


def black_frame(width: int = 512, height: int = 512) -> VideoFrame:
    """A black ``yuv420p`` frame (limited range: Y=16, U=V=128) without pts."""
    frame = VideoFrame(width=width, height=height, format="yuv420p")
    for plane, value in zip(frame.planes, (16, 128, 128), strict=True):
        plane.update(bytes([value]) * plane.buffer_size)
    return frame


class TrioVideoSource(VideoStreamTrack):
    """An outbound video track fed from trio with :meth:`push`.

    Guarantees:

    * :meth:`push` never blocks and keeps only the newest frame (a slow encoder drops frames,
      it never builds latency).
    * **Forward, don't tick**: a pushed frame goes to the encoder as soon as it asks, not on
      the next tick of a fixed ``fps`` clock (which cost up to a frame interval per hop,
      ~17 ms on average at 30 fps). Two frames never leave closer than half a frame interval
      (at most ``2 * fps`` per second), so a burst of frames pushed together (a receive
      buffer releasing what waited behind a filled hole) costs the encoder one or two frames,
      the newest. Frames are stamped with strictly increasing pts in :data:`VIDEO_TIME_BASE`
      derived from wall time, so a variable input rate keeps correct timing.
    * After ``idle_timeout`` seconds without input (also at the start), black frames of the
      last pushed size (default 512x512) are sent at ``fps``, so the receiver keeps decoding
      and can tell "no input" from "connection lost". ``idle_timeout=None``: never send
      black, the track just goes quiet without input.

    ``push`` takes ownership of the frame (its pts and time_base are overwritten).
    """

    def __init__(
        self,
        *,
        fps: float = 30.0,
        idle_timeout: float | None = 1.0,
        width: int = 512,
        height: int = 512,
    ) -> None:
        super().__init__()
        if fps <= 0:
            raise ValueError("fps must be positive")
        self._interval = 1.0 / fps
        self._idle_timeout = idle_timeout
        self._size = (width, height)
        self._pending: VideoFrame | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_input = time.monotonic()
        self._t0: float | None = None
        self._next_slot = 0.0
        """Earliest time of the next black frame (black frames keep to ``fps``)."""
        self._last_sent = -math.inf
        self._last_pts = -1
        self.frames_pushed = 0
        """Frames given to :meth:`push` (including those replaced before being sent)."""
        self.frames_sent = 0
        """Frames returned to the encoder, black ones included."""
        self.black_frames_sent = 0

    def push(self, frame: VideoFrame) -> None:
        """Offer a frame; it replaces any frame not yet taken by the encoder."""
        self._pending = frame
        self._size = (frame.width, frame.height)
        self._last_input = time.monotonic()
        self.frames_pushed += 1
        self._wake()

    def stop(self) -> None:
        """End the track; a waiting :meth:`recv` raises ``MediaStreamError``."""
        super().stop()
        self._wake()

    async def recv(self) -> VideoFrame:
        """Called by aiortc's sender (asyncio side): the next frame to encode."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = self._next_slot = time.monotonic()
        frame, black = await self._next_frame()
        now = time.monotonic()
        earliest = self._next_slot if black else self._last_sent + self._interval / 2
        if earliest > now:
            await asyncio.sleep(earliest - now)
            if self._pending is not None:  # a newer frame came meanwhile: it wins
                self.black_frames_sent -= black
                frame, self._pending, black = self._pending, None, False
            now = time.monotonic()
        self._last_sent = now
        self._next_slot = now + self._interval
        pts = max(int((now - self._t0) * VIDEO_CLOCK_RATE), self._last_pts + 1)
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        self.frames_sent += 1
        return frame

    async def _next_frame(self) -> tuple[VideoFrame, bool]:
        """The pending frame (at once) or, once idle, a black one: (frame, is black)."""
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            frame = self._pending
            if frame is not None:
                self._pending = None
                return frame, False
            if self._idle_timeout is None:
                await self._sleep_until_woken(None)
                continue
            idle_for = time.monotonic() - self._last_input
            if idle_for >= self._idle_timeout:
                self.black_frames_sent += 1
                return black_frame(*self._size), True
            await self._sleep_until_woken(self._idle_timeout - idle_for)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _sleep_until_woken(self, at_most: float | None) -> None:
        """Wait for :meth:`push`/:meth:`stop`, or ``at_most`` seconds, on a bare future.

        Not ``asyncio.wait_for(event.wait())``: when the event is set in the same loop
        iteration as the sender's cancel arrives, ``wait_for`` returns instead of raising
        (CPython gh-86296) and the cancel is lost; the sender then never exits and
        ``RTCPeerConnection.close()`` hangs. A cancel of a bare future is never swallowed.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = None if at_most is None else loop.call_later(at_most, self._wake)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None


async def receive_video(track: MediaStreamTrack, deliver: Callable[[VideoFrame], object]) -> int:
    """Pull decoded frames from an inbound video track into ``deliver`` until the track ends.

    ``deliver`` is called synchronously from this trio task for every frame (e.g.
    ``TrioVideoSource.push`` or ``MemorySendChannel.send_nowait``). Returns the number of
    frames delivered once the track ends (``MediaStreamError``); cancellation stops it cleanly.
    """
    if track.kind != "video":
        raise ValueError(f"not a video track: {track.kind}")
    count = 0
    while True:
        try:
            frame = await aio(track.recv)
        except MediaStreamError:
            return count
        if isinstance(frame, VideoFrame):
            deliver(frame)
            count += 1


async def drain(track: MediaStreamTrack) -> None:
    """Consume an inbound track we do not use until it ends, so aiortc does not queue it."""
    while True:
        try:
            await aio(track.recv)
        except MediaStreamError:
            return


def _receiver_of(pc: RTCPeerConnection, track: MediaStreamTrack) -> RTCRtpReceiver | None:
    for receiver in pc.getReceivers():
        if receiver.track is track:
            return receiver
    return None


async def request_keyframe(pc: RTCPeerConnection, track: MediaStreamTrack) -> bool:
    """Ask the sender of an inbound video ``track`` for a keyframe (RTCP PLI).

    aiortc has no public API for this: the PLI goes out through the receiver's private
    sender (see the internals' ``send_pli``) for the sources seen in the last 10 s. Returns
    False when nothing could be requested (``pc`` does not receive ``track``, or no media
    has arrived yet).
    """
    receiver = _receiver_of(pc, track)
    if receiver is None:
        return False
    sources = receiver.getSynchronizationSources()
    for source in sources:
        await aio(internals.send_pli, receiver, source.source)
    return bool(sources)
