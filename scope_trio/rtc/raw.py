"""Operations on aiortc's own ``RTCPeerConnection``, from trio.

The layer :class:`scope_trio.rtc.PeerConnection` is built on. Production code outside
``rtc/`` uses that class instead; tests and benchmarks that play an outside peer (a browser,
a cloud client) use these functions on plain aiortc objects.

Rules kept here so callers do not have to know them:

* Every peer connection gets an explicit ``iceServers`` list (empty: loopback/host only);
  aiortc's default would contact a public STUN server.
* A peer connection is closed exactly once, shielded and under a deadline
  (:func:`close_peer_connection`): a half-cancelled ``RTCPeerConnection.close()`` makes every
  later close hang forever. The close also frees what aiortc's own close misses.
* aiortc callbacks run inside the trio-asyncio loop task, where synchronous trio calls are
  legal: :class:`PeerEvents` and :func:`open_message_channel` turn them into ``send_nowait``
  on trio memory channels, so callers consume events with ordinary ``async for``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

import trio
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceCandidate,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)

from scope_trio.rtc import _aiortc_internals as internals
from scope_trio.rtc.bridge import aio, current_loop, ensure_loop
from scope_trio.rtc.sdp import (
    MALFORMED_SDP_ERRORS,
    InvalidCandidateError,
    check_candidate_target,
    check_remote_sdp,
    malformed,
)

__all__ = [
    "PeerEvents",
    "RemoteDataChannel",
    "add_ice_candidate",
    "answer_offer",
    "apply_answer",
    "close_peer_connection",
    "create_offer",
    "new_peer_connection",
    "offer_nowait",
    "open_message_channel",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


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

    ``ice_servers`` are dicts ``{urls: str | [str], username?, credential?}`` as the cloud
    sends them. Raises :class:`ValueError` on a malformed entry. Must be called inside the
    open loop.
    """
    servers = [_ice_server(entry) for entry in ice_servers]
    ensure_loop()
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


async def create_offer(pc: RTCPeerConnection) -> RTCSessionDescription:
    """Create and apply a local offer; returns it with all host candidates gathered."""
    offer = await aio(pc.createOffer)
    await aio(pc.setLocalDescription, offer)
    _check_back_at_once(pc)
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
    try:  # a malformed offer that aiortc took can still break its answer
        answer = await aio(pc.createAnswer)
        await aio(pc.setLocalDescription, answer)
    except (*MALFORMED_SDP_ERRORS, RuntimeError) as exc:
        raise malformed(exc, "malformed SDP: cannot answer it") from exc
    _check_back_at_once(pc)
    return _local_description(pc)


async def apply_answer(pc: RTCPeerConnection, sdp: str, sdp_type: str = "answer") -> None:
    """Apply the remote answer to our offer. Raises :class:`ValueError` if it is malformed."""
    if sdp_type != "answer":
        raise ValueError(f"expected an SDP answer, got type {sdp_type!r}")
    await _set_remote(pc, sdp, sdp_type)


async def _set_remote(pc: RTCPeerConnection, sdp: str, sdp_type: str) -> None:
    check_remote_sdp(sdp)
    try:
        description = RTCSessionDescription(sdp=sdp, type=sdp_type)
        # BUNDLE may discard some connections here: the close must still find them.
        internals.remember_ice_connections(pc)
        await aio(pc.setRemoteDescription, description)
    except (*MALFORMED_SDP_ERRORS, RuntimeError) as exc:
        raise malformed(exc, "malformed SDP") from exc
    # Every video receiver now exists and starts only after ICE and DTLS: give it the
    # receive buffer that releases frames when whole (scope_trio.rtc.receiver).
    internals.install_frame_buffers(pc, current_loop())


def _check_back_at_once(pc: RTCPeerConnection) -> None:
    """Our ICE sockets exist once the local description is set: each answers a remote
    check with its own at once (see ``check_back_at_once`` in the internals)."""
    for protocol in internals.ice_protocols(pc):
        internals.check_back_at_once(protocol)


def _local_description(pc: RTCPeerConnection) -> RTCSessionDescription:
    description = pc.localDescription
    if description is None:  # pragma: no cover - aiortc sets it in setLocalDescription
        raise RuntimeError("peer connection has no local description")
    return description


async def add_ice_candidate(pc: RTCPeerConnection, candidate: RTCIceCandidate | None) -> None:
    """Add a remote candidate (None: end of candidates). Rejected → InvalidCandidateError."""
    if candidate is None:
        # aiortc gathers all candidates up front and has no end-of-candidates call that
        # changes anything for us: nothing to do.
        return
    check_candidate_target(pc, candidate)
    try:
        await aio(pc.addIceCandidate, candidate)
    except (ValueError, IndexError, KeyError) as exc:
        raise InvalidCandidateError(f"ICE candidate rejected: {exc}") from exc


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

    Besides aiortc's close, it cancels aiortc's unawaited connect task first, re-delivers
    cancels that sender tasks swallowed, reaps consent checks and closes sockets an
    interrupted ICE operation left (the internals module says why for each).
    """
    done = _close_done.get(pc)
    if done is not None:
        with trio.move_on_after(timeout, shield=True):
            await done.wait()
        return done.is_set()
    done = _close_done[pc] = trio.Event()
    loop = current_loop()
    connections = internals.remember_ice_connections(pc)  # before close() takes them apart
    internals.cancel_connect_tasks(pc, loop)
    internals.close_frame_buffers(pc)
    failure: Exception | None = None
    left_over = 0
    try:
        with trio.move_on_after(timeout, shield=True) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(internals.recancel_stuck_senders, pc)
                try:
                    await aio(pc.close)
                except Exception as exc:  # reported below, once its sockets are released
                    failure = exc
                nursery.cancel_scope.cancel()
        internals.reap_consent_checks(connections, loop)
        left_over = internals.close_left_over_sockets(connections)
        if left_over:
            logger.debug("closed %d UDP socket(s) an interrupted ICE operation left", left_over)
    finally:
        done.set()
    if failure is not None:
        # aiortc's close() stops at the first transceiver a malformed offer left without
        # its transport, leaving the rest open: free what it did not.
        logger.warning(
            "RTCPeerConnection.close() failed (%s: %s); closed its %d UDP socket(s)",
            type(failure).__name__,
            failure,
            left_over + internals.release_sockets(pc),
        )
        return False
    if scope.cancelled_caught:
        released = left_over + internals.release_sockets(pc)
        logger.warning(
            "RTCPeerConnection.close() did not finish within %.1f s; abandoned it and closed "
            "its %d UDP socket(s)",
            timeout,
            released,
        )
        return False
    return True


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
            offer_nowait(state_send, pc.connectionState)

        def on_track(track: MediaStreamTrack) -> None:
            offer_nowait(track_send, track)

        def on_datachannel(channel: RTCDataChannel) -> None:
            offer_nowait(channel_send, RemoteDataChannel(channel, open_message_channel(channel)))

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


def offer_nowait(channel: trio.MemorySendChannel[T], value: T) -> None:
    """``send_nowait`` from an aiortc callback; dropped if the receiving side is closed."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        channel.send_nowait(value)


def open_message_channel(channel: RTCDataChannel) -> trio.MemoryReceiveChannel[str | bytes]:
    """Receive a data channel's messages in trio, in order; ends when the channel closes.

    Register before the first message can arrive (in the ``datachannel`` event handler's
    consumer, or right after ``createDataChannel``). Unbounded: the sender is not paced.
    """
    send, receive = trio.open_memory_channel[str | bytes](math.inf)

    def on_message(message: str | bytes) -> None:
        offer_nowait(send, message)

    def on_close() -> None:
        send.close()

    channel.on("message", on_message)
    channel.on("close", on_close)
    if channel.readyState == "closed":
        send.close()
    return receive
