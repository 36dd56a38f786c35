"""STATUS: usable

The one module where trio meets asyncio/aiortc. Everything else in scope-trio is plain trio.

Rules this module enforces so callers do not have to know them (see STACK-NOTES):

* Every aiortc object must be created, and every aiortc coroutine awaited, inside an open
  ``trio_asyncio.open_loop()``. Coroutines are awaited only through :func:`aio` (a bare
  ``await`` of an aiortc coroutine from trio breaks in ``setLocalDescription``).
* aiortc callbacks run inside the trio-asyncio loop task, where synchronous trio calls are legal:
  :class:`PeerEvents` and :func:`open_message_channel` turn them into ``send_nowait`` on trio
  memory channels, so callers consume events with ordinary ``async for``.
* A peer connection is closed exactly once, shielded and under a deadline
  (:func:`close_peer_connection`): a half-cancelled ``RTCPeerConnection.close()`` makes every
  later close hang forever.
* trio-asyncio loses an asyncio cancel that arrives while a ``run_in_executor`` job runs;
  aiortc encodes video that way, so a stopped sender could keep running and ``close()`` hang.
  Every loop we create peer connections in gets an executor that abandons cancelled jobs.
* Peer connections always get an explicit ``iceServers`` list (empty: loopback/host only);
  aiortc's default would contact a public STUN server.

Synchronous aiortc calls that only schedule work (``RTCDataChannel.send``) are legal from any
trio task inside the open loop.

Process-global state: :func:`tune_ice_consent` changes module constants of aioice, which every
peer connection in the process reads at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import functools
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import aioice.ice
import aioice.stun
import trio
import trio_asyncio  # type: ignore[import-untyped]  # no py.typed; contained here
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceCandidate,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.exceptions import InvalidStateError
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import candidate_from_sdp
from av import VideoFrame

__all__ = [
    "AIOICE_DEFAULT_CONSENT",
    "FAST_CONSENT",
    "VIDEO_TIME_BASE",
    "ConsentTiming",
    "InvalidCandidateError",
    "InvalidStateError",
    "MediaStreamError",
    "MediaStreamTrack",
    "PeerEvents",
    "RTCDataChannel",
    "RTCIceCandidate",
    "RTCPeerConnection",
    "RTCSessionDescription",
    "RemoteDataChannel",
    "TrioVideoSource",
    "add_ice_candidate",
    "aio",
    "answer_offer",
    "apply_answer",
    "black_frame",
    "close_peer_connection",
    "create_offer",
    "get_ice_consent",
    "install_datagram_filter",
    "new_peer_connection",
    "open_loop",
    "open_message_channel",
    "parse_ice_candidate",
    "receive_video",
    "request_keyframe",
    "tune_ice_consent",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
"""Time base of every frame :class:`TrioVideoSource` emits (the RTP video clock)."""


# --------------------------------------------------------------------------------------------
# Awaiting asyncio from trio


async def aio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await the asyncio coroutine function ``fn(*args)`` from trio, inside the open loop.

    The coroutine is created and run inside the asyncio context (``aio_as_trio(fn)(*args)``),
    which is what aiortc needs. Cancelling the trio caller cancels the asyncio task.
    """
    result: T = await trio_asyncio.aio_as_trio(fn)(*args)
    return result


@contextlib.asynccontextmanager
async def open_loop() -> AsyncIterator[object]:
    """``trio_asyncio.open_loop()``: the asyncio loop that aiortc objects live in.

    Nesting is allowed (measured: a loop opened inside another in the same trio run works,
    and peers in the two loops connect to each other): a component that owns aiortc objects
    may open its own loop without knowing whether its caller already has one. The loop gets
    the cancellation-safe executor (see :func:`_ensure_cancellable_executor`).
    """
    async with trio_asyncio.open_loop() as loop:
        _ensure_cancellable_executor()
        yield loop


class _AbandoningExecutor(trio_asyncio.TrioExecutor):  # type: ignore[misc]  # untyped base
    """trio-asyncio's thread executor, but a cancelled job is abandoned, not awaited.

    With trio-asyncio's own executor a cancel that arrives while the thread runs is LOST:
    the asyncio future's cancel is forwarded to a trio task that cannot be cancelled
    (``to_thread.run_sync``), which then completes normally, so the awaiting asyncio task
    gets the result instead of ``CancelledError``. aiortc encodes every video frame in
    ``run_in_executor``: a sender stopped mid-encode kept running, and
    ``RTCPeerConnection.close()`` waited for it forever (measured: most closes issued
    right after connecting while frames flowed). Abandoning the thread delivers the
    cancel at once; the thread finishes on its own and its result is dropped.
    """

    async def submit(self, func: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(
            func, *args, limiter=self._limiter, abandon_on_cancel=True
        )


_patched_loops: weakref.WeakSet[Any] = weakref.WeakSet()


def _ensure_cancellable_executor() -> None:
    """Give the current trio-asyncio loop the :class:`_AbandoningExecutor` and an exception
    handler that logs instead of crashing (once per loop).

    Called for every peer connection, so loops opened without :func:`open_loop` (e.g. a
    test fixture's) are fixed too.
    """
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError("aiortc needs an open trio-asyncio loop (rtc.open_loop())")
    if loop not in _patched_loops:
        loop.set_default_executor(_AbandoningExecutor())
        loop.set_exception_handler(_log_background_error)
        _patched_loops.add(loop)


def _log_background_error(loop: object, context: dict[str, Any]) -> None:
    """Log an error from an aiortc task nobody awaits, instead of ending the whole run.

    aiortc leaves some tasks unawaited (e.g. ``InvalidStateError('RTCIceTransport is
    closed')`` when a peer connection is closed while it still connects); trio-asyncio's
    default handler would raise it into the loop's nursery and take the server down.
    """
    exception = context.get("exception")
    logger.warning(
        "aiortc background error (ignored): %s",
        context.get("message", "unhandled error"),
        exc_info=exception if isinstance(exception, BaseException) else None,
    )


# --------------------------------------------------------------------------------------------
# Peer connections


def _ice_server(entry: Mapping[str, Any]) -> RTCIceServer:
    urls = entry.get("urls")
    if isinstance(urls, str):
        url_list = [urls]
    elif isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls):
        url_list = list(urls)
    else:
        raise ValueError(f"ICE server needs 'urls' as a string or list of strings: {entry!r}")
    username = entry.get("username")
    credential = entry.get("credential")
    if username is not None and not isinstance(username, str):
        raise ValueError("ICE server 'username' must be a string")
    if credential is not None and not isinstance(credential, str):
        raise ValueError("ICE server 'credential' must be a string")
    return RTCIceServer(urls=url_list, username=username, credential=credential)


def new_peer_connection(ice_servers: Iterable[Mapping[str, Any]]) -> RTCPeerConnection:
    """Create a peer connection with exactly these ICE servers (empty: host candidates only).

    ``ice_servers`` are CONTRACT-style dicts ``{urls: str | [str], username?, credential?}``.
    Raises :class:`ValueError` on a malformed entry. Must be called inside the open loop.
    """
    servers = [_ice_server(entry) for entry in ice_servers]
    _ensure_cancellable_executor()
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


async def create_offer(pc: RTCPeerConnection) -> RTCSessionDescription:
    """Create and apply a local offer; returns it with all host candidates gathered."""
    offer = await aio(pc.createOffer)
    await aio(pc.setLocalDescription, offer)
    return _local_description(pc)


async def answer_offer(
    pc: RTCPeerConnection,
    sdp: str,
    sdp_type: str = "offer",
    *,
    send_tracks: Iterable[MediaStreamTrack] = (),
) -> RTCSessionDescription:
    """Apply a remote offer, then create and apply the answer, which is returned.

    Each of ``send_tracks`` is attached to the offer's first free transceiver of its kind
    (so an offered ``sendrecv`` video gets our video back); a track whose kind the offer
    lacks is not sent.
    Raises :class:`ValueError` when the offer cannot be parsed or applied, so callers can
    report a client error (400) rather than crash.
    """
    if sdp_type != "offer":
        raise ValueError(f"expected an SDP offer, got type {sdp_type!r}")
    await _set_remote(pc, sdp, sdp_type)
    for track in send_tracks:
        if any(t.kind == track.kind and t.sender.track is None for t in pc.getTransceivers()):
            pc.addTrack(track)
    answer = await aio(pc.createAnswer)
    await aio(pc.setLocalDescription, answer)
    return _local_description(pc)


async def apply_answer(pc: RTCPeerConnection, sdp: str, sdp_type: str = "answer") -> None:
    """Apply the remote answer to our offer. Raises :class:`ValueError` if it is malformed."""
    if sdp_type != "answer":
        raise ValueError(f"expected an SDP answer, got type {sdp_type!r}")
    await _set_remote(pc, sdp, sdp_type)


async def _set_remote(pc: RTCPeerConnection, sdp: str, sdp_type: str) -> None:
    if not isinstance(sdp, str) or not sdp.strip():
        raise ValueError("empty SDP")
    # aiortc accepts text without any media section (and answers it with nothing useful).
    if not sdp.lstrip().startswith("v=") or "\nm=" not in sdp:
        raise ValueError("malformed SDP: no session or media section")
    try:
        description = RTCSessionDescription(sdp=sdp, type=sdp_type)
        await aio(pc.setRemoteDescription, description)
    except (ValueError, IndexError, KeyError, TypeError, AssertionError) as exc:
        raise ValueError(f"malformed SDP: {exc}") from exc


def _local_description(pc: RTCPeerConnection) -> RTCSessionDescription:
    description = pc.localDescription
    if description is None:  # pragma: no cover - aiortc sets it in setLocalDescription
        raise RuntimeError("peer connection has no local description")
    return description


_close_done: weakref.WeakKeyDictionary[RTCPeerConnection, trio.Event] = weakref.WeakKeyDictionary()


async def close_peer_connection(
    pc: RTCPeerConnection,
    timeout: float = 5.0,  # noqa: ASYNC109 - shielded: a caller's deadline cannot bound it
) -> bool:
    """Close ``pc`` exactly once, even when the caller is being cancelled.

    The first call runs ``pc.close()`` shielded under ``timeout``; later or concurrent calls
    only wait (shielded, same bound) for that first close. Returns True when the close has
    completed, False if it did not finish within ``timeout`` (logged; the peer connection is
    then abandoned, never closed a second time because that would hang forever).
    """
    done = _close_done.get(pc)
    if done is not None:
        with trio.move_on_after(timeout, shield=True):
            await done.wait()
        return done.is_set()
    done = _close_done[pc] = trio.Event()
    connections = _ice_connections(pc)  # found before close() takes the transports apart
    try:
        with trio.move_on_after(timeout, shield=True) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_recancel_stuck_senders, pc)
                await aio(pc.close)
                nursery.cancel_scope.cancel()
        _reap_consent_checks(connections)
    finally:
        done.set()
    if scope.cancelled_caught:
        released = _release_sockets(pc)
        logger.warning(
            "RTCPeerConnection.close() did not finish within %.1f s; abandoned it and closed "
            "its %d UDP socket(s)",
            timeout,
            released,
        )
        return False
    return True


SENDER_NUDGE_INTERVAL = 0.5
"""How often a close re-delivers the cancel to senders that are still running."""


async def _recancel_stuck_senders(pc: RTCPeerConnection) -> None:
    """Re-deliver the cancel to sender tasks that outlive ``close()``'s first cancel.

    ``close()`` stops each sender by cancelling its RTP task and waiting for it to exit. Now and
    then (about 1 close in 40 under load, with frames flowing) that cancel is swallowed on the
    way through the asyncio/trio bridge and the task keeps encoding, so ``close()`` would wait
    until its deadline. Cancelling again is harmless for a task that is already exiting.
    Reaches into aiortc's private task attributes: there is no public way.
    """
    while True:
        await trio.sleep(SENDER_NUDGE_INTERVAL)
        for sender in pc.getSenders():
            for name in ("_RTCRtpSender__rtp_task", "_RTCRtpSender__rtcp_task"):
                task = getattr(sender, name, None)
                if task is not None and not task.done():
                    task.cancel()


def _reap_consent_checks(connections: list[Any], *, again: tuple[float, ...] = (0.25, 1.0)) -> None:
    """Cancel consent checks that outlive ``close()``, now and a little later.

    aioice starts consent freshness checks when ICE completes. When a close lands between
    "completed" and the start of those checks, they begin after the connection closed and
    run forever (a task leak per such close, seen by benchmarks/stop_latency.py). The later
    passes are plain asyncio timers, owned by the loop (cancelled with it).
    """
    for connection in connections:
        task = getattr(connection, "_query_consent_task", None)
        if task is not None and not task.done():
            task.cancel()
    if again:
        loop = trio_asyncio.current_loop.get()
        if loop is not None:
            loop.call_later(
                again[0], functools.partial(_reap_consent_checks, connections, again=again[1:])
            )


def _release_sockets(pc: RTCPeerConnection) -> int:
    """Close the UDP sockets of an abandoned peer connection, so it leaks no file descriptor.

    Reaches into aioice (its connections' protocols) because aiortc offers no way to tear a
    half-closed peer connection down; only used after ``close()`` itself gave up.
    """
    released = 0
    for connection in _ice_connections(pc):
        for protocol in list(getattr(connection, "_protocols", [])):
            transport = getattr(protocol, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()
                released += 1
    return released


# --------------------------------------------------------------------------------------------
# Events into trio


class RemoteDataChannel(NamedTuple):
    """A data channel opened by the remote peer, with its messages already being collected."""

    channel: RTCDataChannel
    messages: trio.MemoryReceiveChannel[str | bytes]
    """In order; ends when the channel closes (see :func:`open_message_channel`)."""


class PeerEvents:
    """A peer connection's events as trio memory channels.

    Register right after creating the peer connection (before negotiating), so no event is
    missed. The aiortc handlers only call ``send_nowait`` on unbounded channels; an event for
    which the receiving side is already closed is dropped.

    * :attr:`states`: every ``connectionState`` change (``connecting``, ``connected``,
      ``failed``, ``closed``). aiortc reports a lost path as ``closed``, never ``disconnected``.
    * :attr:`tracks`: every remote track (``track`` event).
    * :attr:`channels`: every data channel the remote side opens, as a
      :class:`RemoteDataChannel` whose message channel was attached inside the ``datachannel``
      event itself, so a message sent right after opening is never lost.
    """

    def __init__(self, pc: RTCPeerConnection) -> None:
        self.pc = pc
        state_send, self.states = trio.open_memory_channel[str](math.inf)
        track_send, self.tracks = trio.open_memory_channel[MediaStreamTrack](math.inf)
        channel_send, self.channels = trio.open_memory_channel[RemoteDataChannel](math.inf)

        def on_state() -> None:
            _offer(state_send, pc.connectionState)

        def on_track(track: MediaStreamTrack) -> None:
            _offer(track_send, track)

        def on_datachannel(channel: RTCDataChannel) -> None:
            _offer(channel_send, RemoteDataChannel(channel, open_message_channel(channel)))

        pc.on("connectionstatechange", on_state)
        pc.on("track", on_track)
        pc.on("datachannel", on_datachannel)

    @property
    def connection_state(self) -> str:
        """The peer connection's current ``connectionState``."""
        return str(self.pc.connectionState)

    async def wait_state(self, *wanted: str) -> str:
        """Wait until ``connectionState`` is one of ``wanted`` (now or later); return it.

        Consumes :attr:`states` up to that change. Raises :class:`ConnectionError` if the
        connection reaches ``closed``/``failed`` while another state was wanted.
        """
        current = self.connection_state
        while current not in wanted:
            if current in ("closed", "failed"):
                raise ConnectionError(f"peer connection {current}")
            current = await self.states.receive()
        return current


def _offer(channel: trio.MemorySendChannel[T], value: T) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        channel.send_nowait(value)


def open_message_channel(channel: RTCDataChannel) -> trio.MemoryReceiveChannel[str | bytes]:
    """Receive a data channel's messages in trio, in order; ends when the channel closes.

    Register before the first message can arrive (in the ``datachannel`` event handler's
    consumer, or right after ``createDataChannel``). Unbounded: the sender is not paced.
    """
    send, receive = trio.open_memory_channel[str | bytes](math.inf)

    def on_message(message: str | bytes) -> None:
        _offer(send, message)

    def on_close() -> None:
        send.close()

    channel.on("message", on_message)
    channel.on("close", on_close)
    if channel.readyState == "closed":
        send.close()
    return receive


# --------------------------------------------------------------------------------------------
# Media


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
    * Frames leave at most ``fps`` times per second, stamped with strictly increasing pts
      in :data:`VIDEO_TIME_BASE` derived from wall time, so a variable input rate keeps
      correct timing.
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
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
            self._next_slot = now
        if self._next_slot > now:
            await asyncio.sleep(self._next_slot - now)
        frame = await self._next_frame()
        now = time.monotonic()
        self._next_slot = max(self._next_slot + self._interval, now)
        pts = max(int((now - self._t0) * VIDEO_CLOCK_RATE), self._last_pts + 1)
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        self.frames_sent += 1
        return frame

    async def _next_frame(self) -> VideoFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            frame = self._pending
            if frame is not None:
                self._pending = None
                return frame
            if self._idle_timeout is None:
                await self._sleep_until_woken(None)
                continue
            idle_for = time.monotonic() - self._last_input
            if idle_for >= self._idle_timeout:
                self.black_frames_sent += 1
                return black_frame(*self._size)
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


def _receiver_of(pc: RTCPeerConnection, track: MediaStreamTrack) -> RTCRtpReceiver | None:
    for receiver in pc.getReceivers():
        if receiver.track is track:
            return receiver
    return None


async def request_keyframe(pc: RTCPeerConnection, track: MediaStreamTrack) -> bool:
    """Ask the sender of an inbound video ``track`` for a keyframe (RTCP PLI).

    aiortc has no public API for this; it uses ``RTCRtpReceiver._send_rtcp_pli`` for the
    sources seen in the last 10 s. Returns False when nothing could be requested (no receiver,
    no media received yet, or the private API is missing in this aiortc version).
    """
    receiver = _receiver_of(pc, track)
    send_pli = getattr(receiver, "_send_rtcp_pli", None)
    if receiver is None or send_pli is None:
        return False
    sources = receiver.getSynchronizationSources()
    for source in sources:
        await aio(send_pli, source.source)
    return bool(sources)


# --------------------------------------------------------------------------------------------
# ICE candidates


class InvalidCandidateError(ValueError):
    """A trickled ICE candidate that is not valid; the message says why."""


def parse_ice_candidate(data: Mapping[str, Any] | None) -> RTCIceCandidate | None:
    """Parse a trickled ``{candidate, sdpMid, sdpMLineIndex}`` dict.

    Returns None for end-of-candidates (``None`` or an empty ``candidate`` string). Raises
    :class:`InvalidCandidateError` (a ``ValueError``) with the reason on anything else that is not a valid candidate.
    """
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise InvalidCandidateError(f"ICE candidate must be an object, got {type(data).__name__}")
    text = data.get("candidate")
    if not isinstance(text, str):
        raise InvalidCandidateError("ICE candidate needs a 'candidate' string")
    text = text.strip()
    if text.startswith("a="):
        text = text[2:]
    if text.startswith("candidate:"):
        text = text[len("candidate:") :]
    if not text:
        return None
    sdp_mid = data.get("sdpMid")
    index = data.get("sdpMLineIndex")
    if sdp_mid is not None and not isinstance(sdp_mid, str):
        raise InvalidCandidateError("ICE candidate 'sdpMid' must be a string")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
        raise InvalidCandidateError("ICE candidate 'sdpMLineIndex' must be an integer")
    if sdp_mid is None and index is None:
        raise InvalidCandidateError("ICE candidate needs 'sdpMid' or 'sdpMLineIndex'")
    try:
        candidate = candidate_from_sdp(text)
    except (ValueError, IndexError, AssertionError) as exc:  # aiortc asserts the field count
        raise InvalidCandidateError(f"malformed ICE candidate {text!r}: {exc}") from exc
    candidate.sdpMid = sdp_mid
    candidate.sdpMLineIndex = index
    return candidate


async def add_ice_candidate(pc: RTCPeerConnection, candidate: RTCIceCandidate | None) -> None:
    """Add a remote candidate (None: end of candidates). Rejected → InvalidCandidateError."""
    if candidate is None:
        # aiortc gathers all candidates up front and has no end-of-candidates call that
        # changes anything for us: nothing to do.
        return
    try:
        await aio(pc.addIceCandidate, candidate)
    except (ValueError, IndexError, KeyError) as exc:
        raise InvalidCandidateError(f"ICE candidate rejected: {exc}") from exc


# --------------------------------------------------------------------------------------------
# ICE consent timing (process-global)


@dataclass(frozen=True)
class ConsentTiming:
    """aioice's ICE consent-freshness timing.

    A path whose consent checks all fail is declared lost (``connectionState`` → ``closed``)
    after roughly ``failures * (interval + rto)`` seconds. ``rto`` is also the first STUN
    retransmission timeout, so it shortens the first-connect timeout too.
    """

    interval: float
    failures: int
    rto: float


AIOICE_DEFAULT_CONSENT = ConsentTiming(interval=5.0, failures=6, rto=0.5)
"""aioice's own defaults: a silent path is detected after about 31 s."""

FAST_CONSENT = ConsentTiming(interval=0.3, failures=3, rto=0.2)
"""A silent path detected in about 1.25-1.5 s; a healthy 30 s stream saw no false loss."""


def get_ice_consent() -> ConsentTiming:
    """The consent timing currently in effect for this process."""
    return ConsentTiming(
        interval=float(aioice.ice.CONSENT_INTERVAL),
        failures=int(aioice.ice.CONSENT_FAILURES),
        rto=float(aioice.stun.RETRY_RTO),
    )


def tune_ice_consent(
    interval: float = FAST_CONSENT.interval,
    failures: int = FAST_CONSENT.failures,
    rto: float = FAST_CONSENT.rto,
) -> ConsentTiming:
    """Set aioice's consent timing for the WHOLE PROCESS; returns the previous timing.

    These are module constants of aioice read at run time: the interval applies to running
    connections from their next check on, ``rto`` to STUN transactions started afterwards.
    Restore with ``tune_ice_consent(**dataclasses.asdict(previous))``.
    """
    if interval <= 0 or rto <= 0 or failures < 1:
        raise ValueError("consent interval and rto must be positive, failures at least 1")
    previous = get_ice_consent()
    aioice.ice.CONSENT_INTERVAL = interval  # type: ignore[assignment]  # declared int
    aioice.ice.CONSENT_FAILURES = failures
    aioice.stun.RETRY_RTO = rto
    return previous


# --------------------------------------------------------------------------------------------
# Fault injection


def install_datagram_filter(pc: RTCPeerConnection, drop: Callable[[], bool]) -> int:
    """Make ``pc``'s ICE sockets silently drop every datagram while ``drop()`` is true.

    Both directions are filtered (STUN, DTLS, RTP): the peer sees a silent path, no close and
    no BYE. For fault injection only. Call after the local description is set (the sockets
    exist once candidates are gathered). Returns the number of sockets filtered. Relies on
    aioice internals (``Connection._protocols``, ``StunProtocol.send_stun``/``send_data``/
    ``datagram_received``).
    """
    count = 0
    for connection in _ice_connections(pc):
        for protocol in list(getattr(connection, "_protocols", [])):
            if getattr(protocol, "_scope_trio_filtered", False):
                continue
            _filter_protocol(protocol, drop)
            count += 1
    return count


def _ice_connections(pc: RTCPeerConnection) -> list[Any]:
    transports: list[Any] = []
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        if dtls is not None:
            transports.append(dtls.transport)
    if pc.sctp is not None:
        transports.append(pc.sctp.transport.transport)
    connections: list[Any] = []
    for ice_transport in transports:
        connection = getattr(ice_transport.iceGatherer, "_connection", None)
        if connection is not None and all(c is not connection for c in connections):
            connections.append(connection)
    return connections


def _filter_protocol(protocol: Any, drop: Callable[[], bool]) -> None:
    send_stun = protocol.send_stun
    send_data = protocol.send_data
    datagram_received = protocol.datagram_received

    def filtered_send_stun(message: Any, addr: tuple[str, int]) -> None:
        if not drop():
            send_stun(message, addr)

    async def filtered_send_data(data: bytes, addr: tuple[str, int]) -> None:
        if not drop():
            await send_data(data, addr)

    def filtered_datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
        if not drop():
            datagram_received(data, addr)

    protocol.send_stun = filtered_send_stun
    protocol.send_data = filtered_send_data
    protocol.datagram_received = filtered_datagram_received
    protocol._scope_trio_filtered = True
