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
import ipaddress
import logging
import math
import re
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
from aiortc.sdp import SessionDescription, candidate_from_sdp
from av import VideoFrame

__all__ = [
    "AIOICE_DEFAULT_CONSENT",
    "FAST_CONSENT",
    "VIDEO_TIME_BASE",
    "ConsentTiming",
    "InboundDatagrams",
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
    "watch_inbound",
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
    """Give the current trio-asyncio loop the :class:`_AbandoningExecutor`, an exception
    handler that logs instead of crashing, and a record of the sockets aioice binds
    (:func:`_record_bound_sockets`), once per loop.

    Called for every peer connection, so loops opened without :func:`open_loop` (e.g. a
    test fixture's) are fixed too.
    """
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError("aiortc needs an open trio-asyncio loop (rtc.open_loop())")
    if loop not in _patched_loops:
        loop.set_default_executor(_AbandoningExecutor())
        loop.set_exception_handler(_log_background_error)
        _record_bound_sockets(loop)
        _patched_loops.add(loop)


_bound_sockets: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()
"""aioice connection → every socket (``StunProtocol``) bound for it, as soon as it is bound."""


def _record_bound_sockets(loop: Any) -> None:
    """Note every UDP socket aioice binds in ``loop`` under its connection, at once.

    aioice binds one socket per local address and tells its connection about them only once
    all are bound (``get_component_candidates``): a cancel in between (a stop while the offer
    is made) loses the sockets bound so far, and ``close()`` can never close them. With this
    record :func:`close_peer_connection` can. Wraps the loop's own
    ``create_datagram_endpoint`` (an instance attribute of a loop we own); it adds a weak
    reference per socket and nothing else.
    """
    create = loop.create_datagram_endpoint

    async def create_datagram_endpoint(*args: Any, **kwargs: Any) -> Any:
        transport, protocol = await create(*args, **kwargs)
        receiver = getattr(protocol, "receiver", None)
        if receiver is not None and isinstance(protocol, aioice.ice.StunProtocol):
            _bound_sockets.setdefault(receiver, weakref.WeakSet()).add(protocol)
        return transport, protocol

    loop.create_datagram_endpoint = create_datagram_endpoint


def _log_background_error(loop: object, context: dict[str, Any]) -> None:
    """Log an error from an aiortc task nobody awaits, instead of ending the whole run.

    aiortc leaves some tasks unawaited; trio-asyncio's default handler would raise their
    errors into the loop's nursery and take the server down. The one seen in practice,
    ``InvalidStateError('RTCIceTransport is closed')`` from a close while connecting, no
    longer happens (:func:`_cancel_connect_tasks`); this stays as the safety net, loudly.
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


_MALFORMED_SDP_ERRORS = (
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    AssertionError,
    AttributeError,
    StopIteration,
)
"""What aiortc raises on an SDP it cannot use (AttributeError: a section missing parts it
dereferences, e.g. a truncated offer; StopIteration: a ``next()`` for a codec the offer
lacks); all of them are the client's error. Inside an aiortc coroutine that StopIteration
becomes ``RuntimeError("coroutine raised StopIteration")``: see :func:`_malformed`."""
_SDP_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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
    try:  # a malformed offer that aiortc took can still break its answer
        answer = await aio(pc.createAnswer)
        await aio(pc.setLocalDescription, answer)
    except (*_MALFORMED_SDP_ERRORS, RuntimeError) as exc:
        raise _malformed(exc, "malformed SDP: cannot answer it") from exc
    return _local_description(pc)


def _malformed(exc: Exception, what: str) -> ValueError:
    """``exc`` from aiortc, on a bad SDP, as the ValueError to raise; re-raises anything
    else (a RuntimeError that is not a StopIteration in a coroutine is not the SDP's)."""
    if isinstance(exc, RuntimeError) and not isinstance(exc.__cause__, StopIteration):
        raise exc
    return ValueError(f"{what}: {str(exc) or type(exc).__name__}")


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
    # SDP is text lines (RFC 8866): a NUL or another control character is never valid, and
    # aiortc takes some of them into identifiers it later fails on in a background task.
    if _SDP_CONTROL_CHARACTERS.search(sdp):
        raise ValueError("malformed SDP: control characters")
    try:
        # Without these DTLS can never start: aiortc would fail later, in a background task.
        for media in SessionDescription.parse(sdp).media:
            if media.dtls is None or not media.dtls.fingerprints:
                raise ValueError(f"the {media.kind} section has no DTLS fingerprint or setup")
        description = RTCSessionDescription(sdp=sdp, type=sdp_type)
        _remember_ice_connections(pc)  # BUNDLE may discard some: the close must still find them
        await aio(pc.setRemoteDescription, description)
    except (*_MALFORMED_SDP_ERRORS, RuntimeError) as exc:
        raise _malformed(exc, "malformed SDP") from exc


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
    completed, False if it did not finish within ``timeout`` or aiortc's close failed
    (logged; the peer connection's UDP sockets are then closed and it is abandoned, never
    closed a second time because that would hang forever).
    """
    done = _close_done.get(pc)
    if done is not None:
        with trio.move_on_after(timeout, shield=True):
            await done.wait()
        return done.is_set()
    done = _close_done[pc] = trio.Event()
    connections = _remember_ice_connections(pc)  # before close() takes the transports apart
    _cancel_connect_tasks(pc)
    failure: Exception | None = None
    left_over = 0
    try:
        with trio.move_on_after(timeout, shield=True) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_recancel_stuck_senders, pc)
                try:
                    await aio(pc.close)
                except Exception as exc:  # reported below, once its sockets are released
                    failure = exc
                nursery.cancel_scope.cancel()
        _reap_consent_checks(connections)
        left_over = _close_left_over_sockets(connections)
    finally:
        done.set()
    if failure is not None:
        # aiortc's close() stops at the first transceiver a malformed offer left without
        # its transport, leaving the rest open: free what it did not.
        logger.warning(
            "RTCPeerConnection.close() failed (%s: %s); closed its %d UDP socket(s)",
            type(failure).__name__,
            failure,
            left_over + _release_sockets(pc),
        )
        return False
    if scope.cancelled_caught:
        released = left_over + _release_sockets(pc)
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
    run forever (a task leak per such close, seen by benchmarks/stop_latency.py). Since
    :func:`_cancel_connect_tasks` cancels the only task that starts them, this is a
    backstop (for an aiortc that renamed that task). The later passes are plain asyncio
    timers, owned by the loop (cancelled with it).
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


_AIORTC_CONNECT = getattr(RTCPeerConnection, "_RTCPeerConnection__connect", None)


def _cancel_connect_tasks(pc: RTCPeerConnection) -> None:
    """Cancel ``pc``'s connect task before ``close()``, so it cannot fail unawaited.

    ``setLocalDescription``/``setRemoteDescription`` start aiortc's private
    ``RTCPeerConnection.__connect`` with ``ensure_future`` and nobody awaits it. It starts the
    transports one after the other (ICE, DTLS, then the next transport's ICE) and does not
    look at the closed flag between them: a close that lands after ICE completed, during the
    DTLS handshake, makes it start the SCTP transport's ICE, which close() has just stopped,
    and it fails with ``InvalidStateError('RTCIceTransport is closed')`` that no one
    retrieves (10 per 500 start/stop cycles in benchmarks/stop_latency.py, all from stops
    while connecting). Cancelled first, it ends at the await it is in; ``close()`` then stops
    whatever it had started, as before. It is also the only task that runs aioice's
    ``connect()``, which starts the consent checks: cancelled, it can no longer start them
    after the close (see :func:`_reap_consent_checks`). Found among the loop's tasks by its
    code object; a no-op if aiortc renames it.
    """
    connect_code = getattr(_AIORTC_CONNECT, "__code__", None)
    loop = trio_asyncio.current_loop.get()
    if connect_code is None or loop is None:
        return
    for task in asyncio.all_tasks(loop):
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)
        if (
            not task.done()
            and getattr(coro, "cr_code", None) is connect_code
            and frame is not None
            and frame.f_locals.get("self") is pc
        ):
            task.cancel()


def _close_left_over_sockets(connections: list[Any]) -> int:
    """After ``close()``: close every UDP socket of these connections still open; how many.

    Two interrupted aioice operations leave sockets that ``close()`` never reaches (each kept
    its file descriptor and trio-asyncio's reader task forever: +1 or +2 of each per such
    stop in benchmarks/stop_latency.py):

    * BUNDLE: applying the answer replaces the data channel's transport by the video's and
      closes the replaced ICE connection inside ``setRemoteDescription``. A stop that cancels
      it there interrupts that close between two sockets, and the pc no longer references
      that connection. :func:`_set_remote` remembers the connections beforehand, so they are
      among ``connections``.
    * Gathering: a cancel while aioice binds the sockets loses those bound so far; the
      connection does not know them, :func:`_record_bound_sockets` does.
    """
    closed = 0
    for connection in connections:
        protocols = [*getattr(connection, "_protocols", []), *_bound_sockets.get(connection, ())]
        for protocol in protocols:
            transport = getattr(protocol, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()
                closed += 1
    if closed:
        logger.debug("closed %d UDP socket(s) an interrupted ICE operation left open", closed)
    return closed


def _release_sockets(pc: RTCPeerConnection) -> int:
    """Close the UDP sockets of an abandoned peer connection, so it leaks no file descriptor.

    Reaches into aioice (its connections' protocols) because aiortc offers no way to tear a
    half-closed peer connection down; only used after ``close()`` itself gave up.
    """
    released = 0
    for protocol in _ice_protocols(pc):
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
    problem = _candidate_problem(text, candidate)
    if problem is not None:
        raise InvalidCandidateError(f"malformed ICE candidate {text!r}: {problem}")
    candidate.sdpMid = sdp_mid
    candidate.sdpMLineIndex = index
    return candidate


_ICE_FOUNDATION = re.compile(r"[A-Za-z0-9+/]{1,32}")
_MDNS_HOST = re.compile(r"[A-Za-z0-9-]+\.local")


def _candidate_problem(text: str, candidate: RTCIceCandidate) -> str | None:
    """What makes a parsed candidate invalid (RFC 8839 section 5.1), or None.

    aiortc's parser reads any eight words; aioice then drops what it cannot use without a
    word, so a candidate that will never be tried would still be "accepted". The address must
    be an IP address or an mDNS ``.local`` name (aioice resolves nothing else).
    """
    words = text.split()
    ports = (candidate.port, candidate.relatedPort)
    checks = (
        (words[6] == "typ", "expected 'typ' before the candidate type"),
        (len(words) % 2 == 0, "an extension attribute has no value"),
        (
            _ICE_FOUNDATION.fullmatch(candidate.foundation) is not None,
            "the foundation must be 1-32 letters, digits, '+' or '/'",
        ),
        (1 <= candidate.component <= 256, "the component id must be 1-256"),
        (candidate.protocol.lower() in ("udp", "tcp"), "the transport must be udp or tcp"),
        (1 <= candidate.priority <= 2**31 - 1, "the priority must be 1 to 2^31-1"),
        (
            _MDNS_HOST.fullmatch(candidate.ip) is not None or _is_ip_address(candidate.ip),
            "the address must be an IP address or an mDNS .local name",
        ),
        (all(p is None or 0 <= p <= 65535 for p in ports), "a port must be 0-65535"),
        (
            candidate.type in ("host", "srflx", "prflx", "relay"),
            "the type must be host, srflx, prflx or relay",
        ),
    )
    return next((problem for ok, problem in checks if not ok), None)


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


async def add_ice_candidate(pc: RTCPeerConnection, candidate: RTCIceCandidate | None) -> None:
    """Add a remote candidate (None: end of candidates). Rejected → InvalidCandidateError."""
    if candidate is None:
        # aiortc gathers all candidates up front and has no end-of-candidates call that
        # changes anything for us: nothing to do.
        return
    # aiortc ignores a candidate for a media section the session does not have: say so.
    sections = pc.remoteDescription.sdp.count("\nm=") if pc.remoteDescription else 0
    mids = {t.mid for t in pc.getTransceivers()} | {pc.sctp.mid if pc.sctp else None}
    if candidate.sdpMid is not None and candidate.sdpMid not in mids:
        raise InvalidCandidateError(f"ICE candidate for unknown sdpMid {candidate.sdpMid!r}")
    if candidate.sdpMid is None and not 0 <= (candidate.sdpMLineIndex or 0) < sections:
        raise InvalidCandidateError(
            f"ICE candidate for media section {candidate.sdpMLineIndex} of {sections}"
        )
    try:
        await aio(pc.addIceCandidate, candidate)
    except (ValueError, IndexError, KeyError) as exc:
        raise InvalidCandidateError(f"ICE candidate rejected: {exc}") from exc


# --------------------------------------------------------------------------------------------
# ICE consent timing (process-global)


@dataclass(frozen=True)
class ConsentTiming:
    """aioice's ICE consent-freshness timing.

    aioice sends one check every ``interval`` (± 20 %), waits for the answer, and gives up
    on it after ``rto`` seconds with no retransmission (``query_consent`` uses
    ``retransmissions=0``): every check on a path whose round trip exceeds ``rto`` fails.
    ``failures`` failed checks in a row close the connection (``connectionState`` →
    ``closed``), about ``failures * (interval + rto)`` seconds after a path went silent.
    ``rto`` is also the first STUN retransmission timeout of the connectivity checks, so it
    sets how long a first connect to an unreachable peer takes to fail (``127 * rto``).
    """

    interval: float
    failures: int
    rto: float


AIOICE_DEFAULT_CONSENT = ConsentTiming(interval=5.0, failures=6, rto=0.5)
"""aioice's own defaults: a silent path is detected after about 31 s."""

FAST_CONSENT = ConsentTiming(interval=0.3, failures=3, rto=1.0)
"""Frequent checks with a timeout safe for real round trips: what the server uses.

The checks go out every ~0.3 s, so even without video the peer's answers arrive every
0.3 s + RTT: that keeps :class:`scope_trio.cloud.media.CloudMediaSession`'s path-silence signal
(no datagram for 1 s: the path is dead, detected in ~1.05 s whatever the RTT) from firing
during a pause. The 1 s timeout lets every check pass on paths with up to 1 s of round trip;
consent then closes a silent path after ~3.5-4 s, a backstop behind path silence. (The
previous tuning, 0.2 s, failed every check once the RTT passed 200 ms: a healthy stream to
a distant cloud was declared lost ~1.5 s after it connected, again and again.)
"""


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
    Keep ``rto`` above the longest round trip a path may have (see :class:`ConsentTiming`).
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
# The ICE sockets: inbound activity, and fault injection


class InboundDatagrams:
    """When a peer connection's ICE sockets last received anything (:func:`watch_inbound`).

    Every datagram counts: RTP, RTCP, DTLS, STUN requests and responses, even the late answer
    to a consent check that already timed out. A long round trip only delays packets, so
    "nothing at all for T seconds" means a dead path whatever the RTT, provided the peer
    sends something more often than every T seconds: video does, and without video the
    answers to our consent checks do (every consent interval + RTT) as do the peer's RTCP
    reports (every 0.5-1.5 s in aiortc).
    """

    def __init__(self) -> None:
        self.count = 0
        """Datagrams received since the watch began."""
        self.last_at = trio.current_time()
        """``trio.current_time()`` of the last one (of the watch's start before the first)."""

    def _received(self) -> None:
        self.count += 1
        self.last_at = trio.current_time()


def watch_inbound(pc: RTCPeerConnection) -> InboundDatagrams:
    """Stamp every datagram ``pc``'s ICE sockets receive, from now on.

    Call after the local description is set (the sockets exist once candidates are gathered);
    must be called inside the open loop. A datagram that a fault filter drops
    (:func:`install_datagram_filter`) was never received; a delayed one counts on delivery.
    """
    loop = _current_loop()
    inbound = InboundDatagrams()
    for protocol in _ice_protocols(pc):
        _tap(protocol, loop).observers.append(inbound._received)
    return inbound


def install_datagram_filter(
    pc: RTCPeerConnection,
    drop: Callable[[], bool],
    *,
    delay: Callable[[], float] | None = None,
) -> int:
    """Make ``pc``'s ICE sockets drop every datagram while ``drop()`` is true, and hold every
    other one ``delay()`` seconds (0: none) in each direction.

    Both directions are filtered (STUN, DTLS, RTP, RTCP): while dropping, the peer sees a
    silent path, no close and no BYE; a delay adds twice its value to every round trip (a
    delayed datagram is discarded if its socket closed meanwhile). For fault injection only.
    Call after the local description is set; calling again replaces the filter. Returns the
    number of sockets filtered.
    """
    loop = _current_loop()
    count = 0
    for protocol in _ice_protocols(pc):
        tap = _tap(protocol, loop)
        tap.drop = drop
        tap.delay = delay or _no_delay
        count += 1
    return count


_known_connections: weakref.WeakKeyDictionary[RTCPeerConnection, list[Any]] = (
    weakref.WeakKeyDictionary()
)


def _remember_ice_connections(pc: RTCPeerConnection) -> list[Any]:
    """Every aioice connection ``pc`` has had so far (those BUNDLE discarded included)."""
    known = _known_connections.setdefault(pc, [])
    for connection in _ice_connections(pc):
        if all(c is not connection for c in known):
            known.append(connection)
    return list(known)


def _ice_connections(pc: RTCPeerConnection) -> list[Any]:
    transports: list[Any] = []
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        if dtls is not None:
            transports.append(dtls.transport)
    # A malformed offer can leave an SCTP transport without its DTLS transport.
    if pc.sctp is not None and pc.sctp.transport is not None:
        transports.append(pc.sctp.transport.transport)
    connections: list[Any] = []
    for ice_transport in transports:
        connection = getattr(ice_transport.iceGatherer, "_connection", None)
        if connection is not None and all(c is not connection for c in connections):
            connections.append(connection)
    return connections


def _ice_protocols(pc: RTCPeerConnection) -> list[Any]:
    """The aioice protocols (one per local socket) of every ICE connection of ``pc``."""
    return [
        protocol
        for connection in _ice_connections(pc)
        for protocol in list(getattr(connection, "_protocols", []))
    ]


def _current_loop() -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop | None = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError("aiortc needs an open trio-asyncio loop (rtc.open_loop())")
    return loop


def _never() -> bool:
    return False


def _no_delay() -> float:
    return 0.0


class _DatagramTap:
    """The one wrapper around an aioice protocol's datagram paths, shared by all its users.

    aioice has no hook for this: the protocol instance's ``send_stun``, ``send_data`` and
    ``datagram_received`` are replaced once (``StunProtocol`` internals, the same in aioice
    0.10 and 0.13), and what users want is state of the tap: ``drop`` and ``delay`` (fault
    injection, :func:`install_datagram_filter`) and ``observers`` (:func:`watch_inbound`),
    called for every datagram received after drop and delay. Delays are asyncio timers,
    owned by the loop.
    """

    def __init__(self, protocol: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.protocol = protocol
        self.loop = loop
        self.drop: Callable[[], bool] = _never
        self.delay: Callable[[], float] = _no_delay
        self.observers: list[Callable[[], None]] = []
        self._send_stun = protocol.send_stun
        self._send_data = protocol.send_data
        self._datagram_received = protocol.datagram_received
        protocol.send_stun = self.send_stun
        protocol.send_data = self.send_data
        protocol.datagram_received = self.datagram_received

    def _open(self) -> bool:
        transport = getattr(self.protocol, "transport", None)
        return transport is not None and not transport.is_closing()

    def send_stun(self, message: Any, addr: tuple[str, int]) -> None:
        if self.drop():
            return
        delay = self.delay()
        if delay > 0:
            self.loop.call_later(delay, self._send_stun_later, message, addr)
        else:
            self._send_stun(message, addr)

    def _send_stun_later(self, message: Any, addr: tuple[str, int]) -> None:
        if self._open():
            self._send_stun(message, addr)

    async def send_data(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.drop():
            return
        delay = self.delay()
        if delay > 0:  # not awaited: the sender goes on, as it would on a long path
            self.loop.call_later(delay, self._send_data_later, data, addr)
        else:
            await self._send_data(data, addr)

    def _send_data_later(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._open():  # what StunProtocol.send_data does, without the coroutine
            self.protocol.transport.sendto(data, addr)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.drop():
            return
        delay = self.delay()
        if delay > 0:
            self.loop.call_later(delay, self._deliver_later, data, addr)
        else:
            self._deliver(data, addr)

    def _deliver_later(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self._open():
            self._deliver(data, addr)

    def _deliver(self, data: bytes, addr: tuple[Any, ...]) -> None:
        for observer in self.observers:
            observer()
        self._datagram_received(data, addr)


def _tap(protocol: Any, loop: asyncio.AbstractEventLoop) -> _DatagramTap:
    """The protocol's :class:`_DatagramTap`, installed on first use."""
    tap = getattr(protocol, "_scope_trio_tap", None)
    if not isinstance(tap, _DatagramTap):
        tap = _DatagramTap(protocol, loop)
        protocol._scope_trio_tap = tap
    return tap
