"""Video between trio and aiortc: an outbound track fed from trio, inbound frames into trio.

aiortc's tracks are asyncio objects; these are the only places frames cross the boundary.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections import deque
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
    "lateness_bound",
    "receive_video",
    "request_keyframe",
    "retransmission_delay",
]

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
"""Time base of every frame :class:`TrioVideoSource` emits (the RTP video clock)."""
SMOOTHING = 0.2
"""Weight of a new sample in the source's smoothed spacing and encode time."""


def black_frame(width: int = 512, height: int = 512) -> VideoFrame:
    """A black ``yuv420p`` frame (limited range: Y=16, U=V=128) without pts."""
    frame = VideoFrame(width=width, height=height, format="yuv420p")
    for plane, value in zip(frame.planes, (16, 128, 128), strict=True):
        plane.update(bytes([value]) * plane.buffer_size)
    return frame


MIN_LATENESS, MAX_LATENESS = 0.1, 0.5
"""Range of :func:`lateness_bound`; the minimum is also the default of a new source."""
LATENESS_PER_FILL = 1.0
"""A queued frame may be this many typical retransmission delays behind the newest."""
MAX_QUEUED = 32
"""Frames held at most, whatever their timing (memory bound: ~0.4 MB each at 512x512)."""


class TrioVideoSource(VideoStreamTrack):
    """An outbound video track fed from trio with :meth:`push`.

    Guarantees:

    * :meth:`push` never blocks. Frames wait in a short queue bounded in **media time**: a
      frame more than ``max_lateness`` seconds older than the newest pushed one is skipped
      (a number, or a callable read at every push: the feeder passes
      :func:`lateness_bound` of the hop its frames come over),
      and so is every frame but the newest while the encoder is slower than the input
      (its measured encode time exceeds the frames' spacing). A burst pushed together (a
      receive buffer releasing what waited behind a filled hole) is therefore forwarded,
      not collapsed to its newest frame, as long as the encoder can catch up, while a slow
      encoder drops frames and never builds latency. Media time is the frame's pts when it
      has one, else the moment of the push. A pts that goes backwards (a new stream)
      empties the queue.
    * **Forward, don't tick**: a pushed frame goes to the encoder as soon as it asks, not on
      the next tick of a fixed ``fps`` clock (which cost up to a frame interval per hop,
      ~17 ms on average at 30 fps). Two frames never leave closer than half a frame interval
      (at most ``2 * fps`` per second), so a backlog drains at up to twice the frame rate.
      Frames are stamped with strictly increasing pts in :data:`VIDEO_TIME_BASE` derived
      from wall time, so a variable input rate keeps correct timing.
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
        max_lateness: float | Callable[[], float] = MIN_LATENESS,
    ) -> None:
        super().__init__()
        if fps <= 0:
            raise ValueError("fps must be positive")
        if not callable(max_lateness) and not max_lateness >= 0:
            raise ValueError("max_lateness must be >= 0")
        self._interval = 1.0 / fps
        self._idle_timeout = idle_timeout
        self._max_lateness = max_lateness
        self._size = (width, height)
        self._queue: deque[tuple[float, VideoFrame]] = deque()
        """(media time in seconds, frame), oldest first."""
        self._by_pts: bool | None = None
        """Whether media times come from pts (None: nothing pushed yet)."""
        self._newest = -math.inf
        """Media time of the newest pushed frame."""
        self._spacing = self._interval
        """Smoothed media time between consecutive frames."""
        self._encode_time = 0.0
        """Smoothed time the sender spends between taking a frame and asking for the next."""
        self._handed_at: float | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_input = time.monotonic()
        self._t0: float | None = None
        self._next_slot = 0.0
        """Earliest time of the next black frame (black frames keep to ``fps``)."""
        self._last_sent = -math.inf
        self._last_pts = -1
        self.frames_pushed = 0
        """Frames given to :meth:`push`."""
        self.frames_skipped = 0
        """Pushed frames never sent: too late, or left behind by a slow encoder."""
        self.frames_sent = 0
        """Frames returned to the encoder, black ones included."""
        self.black_frames_sent = 0

    def push(self, frame: VideoFrame) -> None:
        """Offer a frame; it is sent after those queued before it, or skipped (see above)."""
        now = time.monotonic()
        by_pts = frame.pts is not None and frame.time_base is not None
        at = float(frame.pts * frame.time_base) if by_pts else now  # type: ignore[operator]
        queue = self._queue
        if by_pts != self._by_pts:
            self._skip(len(queue))  # the kind of timing changed: nothing to compare with
        elif at < self._newest:
            self._skip(len(queue))  # a new stream: its timeline starts over
        elif self._newest > -math.inf:  # a pause is no spacing: steps count up to 4 frames
            step = min(max(at - self._newest, self._interval / 2), 4 * self._interval)
            self._spacing += SMOOTHING * (step - self._spacing)
        self._by_pts, self._newest = by_pts, at
        queue.append((at, frame))
        bound = self._max_lateness() if callable(self._max_lateness) else self._max_lateness
        while queue[0][0] < at - bound or len(queue) > MAX_QUEUED:
            self._skip(1)
        self._size = (frame.width, frame.height)
        self._last_input = now
        self.frames_pushed += 1
        self._wake()

    def stop(self) -> None:
        """End the track; a waiting :meth:`recv` raises ``MediaStreamError``."""
        super().stop()
        self._queue.clear()
        self._wake()

    async def recv(self) -> VideoFrame:
        """Called by aiortc's sender (asyncio side): the next frame to encode."""
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._handed_at is not None:  # the sender encoded and sent the previous frame
            spent = now - self._handed_at
            self._encode_time += SMOOTHING * (spent - self._encode_time)
        if self._t0 is None:
            self._t0 = self._next_slot = now
        black = await self._wait_for_input()
        now = time.monotonic()
        earliest = self._next_slot if black else self._last_sent + self._interval / 2
        if earliest > now:
            await asyncio.sleep(earliest - now)
            now = time.monotonic()
        if self._queue:  # also when a frame came while a black one waited: it wins
            frame = self._take()
        else:
            frame = black_frame(*self._size)
            self.black_frames_sent += 1
        self._last_sent = now
        self._next_slot = now + self._interval
        pts = max(int((now - self._t0) * VIDEO_CLOCK_RATE), self._last_pts + 1)
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        self.frames_sent += 1
        self._handed_at = time.monotonic()
        return frame

    def _take(self) -> VideoFrame:
        """The oldest queued frame, or the newest when the encoder cannot catch up."""
        if len(self._queue) > 1 and self._encode_time >= self._spacing:
            self._skip(len(self._queue) - 1)
        return self._queue.popleft()[1]

    def _skip(self, count: int) -> None:
        for _ in range(count):
            self._queue.popleft()
        self.frames_skipped += count

    async def _wait_for_input(self) -> bool:
        """Until a frame is queued (False) or, once idle, a black frame is due (True)."""
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            if self._queue:
                return False
            if self._idle_timeout is None:
                await self._sleep_until_woken(None)
                continue
            idle_for = time.monotonic() - self._last_input
            if idle_for >= self._idle_timeout:
                return True
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


def retransmission_delay(pc: RTCPeerConnection, track: MediaStreamTrack) -> float | None:
    """The typical time a hole of the inbound video ``track`` waits for its retransmission
    (about the hop's round trip; see ``FrameBuffer.typical_fill``), None before the first
    or without our receive buffer."""
    receiver = _receiver_of(pc, track)
    installed = None if receiver is None else internals.installed_frame_buffer(receiver)
    buffer = None if installed is None else installed.buffer
    return None if buffer is None else buffer.typical_fill


def lateness_bound(retransmission_delay: float | None) -> float:
    """How far behind the newest frame a queued frame may still be sent, for frames that
    come over a hop with this :func:`retransmission_delay`.

    The frames a hole held are released together when its retransmission arrives, late by
    up to that delay: those are forwarded (a few more frames a second on a lossy path),
    while frames late by more (a lost retransmission, a stall) are skipped, so one
    retransmission is all the latency a backlog adds. :data:`LATENESS_PER_FILL` times the
    delay, within [:data:`MIN_LATENESS`, :data:`MAX_LATENESS`].
    """
    if retransmission_delay is None:
        return MIN_LATENESS
    return min(MAX_LATENESS, max(MIN_LATENESS, LATENESS_PER_FILL * retransmission_delay))


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
