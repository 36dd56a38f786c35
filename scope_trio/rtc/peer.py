"""The trio-facing peer connection: the only WebRTC object code outside ``rtc/`` touches.

:class:`PeerConnection` wraps one aiortc ``RTCPeerConnection`` and exposes it in trio terms:
negotiation as plain async methods that raise ``ValueError`` on bad client input, events
(connection states, remote tracks, remote data channels) as trio memory channels, data
channels as :class:`DataChannel` (messages on a trio channel, ``send`` that raises
:class:`ChannelClosedError` instead of aiortc's ``InvalidStateError``), inbound tracks as
:class:`RemoteTrack`, and a close that runs exactly once, shielded, under its own deadline.
No aiortc object is reachable from its public API.

Must be created and used inside an open trio-asyncio loop (:func:`scope_trio.rtc.open_loop`),
by trio tasks of that run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from aiortc import MediaStreamTrack, RTCDataChannel, RTCIceCandidate, RTCSessionDescription
from aiortc.exceptions import InvalidStateError
from av import VideoFrame

from scope_trio.rtc import raw, tracks
from scope_trio.rtc.datagrams import InboundDatagrams, install_datagram_filter, watch_inbound
from scope_trio.rtc.tracks import TrioVideoSource
from scope_trio.rtc.uplink import UplinkReceipts, watch_uplink

__all__ = [
    "ChannelClosedError",
    "DataChannel",
    "PeerConnection",
    "RemoteTrack",
    "SessionDescription",
]

ENDED_STATES = ("closed", "failed")
"""Connection states after which nothing flows again (aiortc has no ``disconnected``: a
lost path, whether ICE consent found it or the peer closed, shows as ``closed``)."""


class ChannelClosedError(Exception):
    """A message was sent on a data channel that is not open (or closed under the send)."""


@dataclass(frozen=True)
class SessionDescription:
    """An SDP offer or answer as text: ``type`` is ``"offer"`` or ``"answer"``."""

    sdp: str
    type: str

    @classmethod
    def _of(cls, description: RTCSessionDescription) -> SessionDescription:
        return cls(sdp=description.sdp, type=description.type)


class DataChannel:
    """A data channel from trio: :attr:`messages` in order, :meth:`send`, :meth:`wait_open`.

    The message channel is attached when the channel is created (ours) or inside the
    ``datachannel`` event (the remote peer's), so no message is ever missed; it ends when the
    data channel closes. Unbounded: the sender is not paced.
    """

    def __init__(self, channel: RTCDataChannel) -> None:
        self._channel = channel
        self.messages: trio.MemoryReceiveChannel[str | bytes] = raw.open_message_channel(channel)
        self._opened = trio.Event()
        channel.on("open", self._opened.set)  # a sync trio call: legal inside the loop task
        if channel.readyState == "open":
            self._opened.set()

    @property
    def label(self) -> str:
        return str(self._channel.label)

    @property
    def is_open(self) -> bool:
        """Whether :meth:`send` can send now."""
        return self._channel.readyState == "open"

    async def wait_open(self) -> None:
        """Wait until the channel is open (bound it with the caller's deadline)."""
        await self._opened.wait()

    def send(self, message: str | bytes) -> None:
        """Queue one message (never blocks). :class:`ChannelClosedError` if not open."""
        if not self.is_open:
            raise ChannelClosedError(f"data channel {self.label!r} is not open")
        try:
            self._channel.send(message)
        except InvalidStateError as exc:  # closing under us, between check and send
            raise ChannelClosedError(f"data channel {self.label!r} closed") from exc


class RemoteTrack:
    """A track the remote peer sends us, from trio."""

    def __init__(self, track: MediaStreamTrack, pc: PeerConnection) -> None:
        self._track = track
        self._pc = pc

    @property
    def kind(self) -> str:
        """``"video"`` or ``"audio"``."""
        return str(self._track.kind)

    async def receive_video(self, deliver: Callable[[VideoFrame], object]) -> int:
        """Hand every decoded frame to ``deliver`` (synchronously, from this task) until the
        track ends; returns how many. ``ValueError`` if this is not a video track."""
        return await tracks.receive_video(self._track, deliver)

    def retransmission_delay(self) -> float | None:
        """How long a hole of this video track typically waits for its retransmission
        (about a round trip); None before the first. Feed :func:`~scope_trio.rtc.tracks.
        lateness_bound` with it for the track its frames are forwarded on."""
        return tracks.retransmission_delay(self._pc._pc, self._track)

    async def drain(self) -> None:
        """Consume the track until it ends (a track we do not use must still be read)."""
        await tracks.drain(self._track)

    async def request_keyframe(self) -> bool:
        """Ask the sender for a keyframe (RTCP PLI). False when nothing could be requested
        (no media has arrived yet, so the sender's source is not known)."""
        return await tracks.request_keyframe(self._pc._pc, self._track)


class PeerConnection:
    """One WebRTC peer connection, driven from trio (see the module docstring).

    Register nothing: the events are collected from construction on. Channels:

    * :attr:`states`: every connection state change (``connecting``, ``connected``,
      ``failed``, ``closed``), in order. A lost path shows as ``closed`` (or ``failed``):
      :attr:`closed_by_us` tells it from our own :meth:`close`.
    * :attr:`tracks`: every remote track, as a :class:`RemoteTrack`.
    * :attr:`channels`: every data channel the remote side opens, as a :class:`DataChannel`.

    ``ice_servers`` are dicts ``{urls: str | [str], username?, credential?}`` as the cloud
    sends them (empty: host candidates only, never a public STUN server); ``ValueError`` on
    a malformed one. Use as ``async with`` to close on the way out, or call :meth:`close`.
    """

    def __init__(
        self,
        ice_servers: Iterable[Mapping[str, Any]] = (),
        *,
        close_timeout: float = 5.0,
    ) -> None:
        self._pc = raw.new_peer_connection(ice_servers)
        self._close_timeout = close_timeout
        self._close_called = False
        state_send, self.states = trio.open_memory_channel[str](math.inf)
        track_send, self.tracks = trio.open_memory_channel[RemoteTrack](math.inf)
        channel_send, self.channels = trio.open_memory_channel[DataChannel](math.inf)
        pc = self._pc

        def on_state() -> None:
            raw.offer_nowait(state_send, str(pc.connectionState))

        def on_track(track: MediaStreamTrack) -> None:
            raw.offer_nowait(track_send, RemoteTrack(track, self))

        def on_datachannel(channel: RTCDataChannel) -> None:
            raw.offer_nowait(channel_send, DataChannel(channel))

        pc.on("connectionstatechange", on_state)
        pc.on("track", on_track)
        pc.on("datachannel", on_datachannel)

    async def __aenter__(self) -> PeerConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> str:
        """The current connection state."""
        return str(self._pc.connectionState)

    @property
    def closed_by_us(self) -> bool:
        """Whether :meth:`close` has been called (a ``closed`` state is then ours)."""
        return self._close_called

    async def wait_state(self, *wanted: str) -> str:
        """Wait until the state is one of ``wanted`` (now or later) and return it.

        Consumes :attr:`states` up to that change. Raises :class:`ConnectionError` if the
        connection ends (``closed``/``failed``) while another state was wanted.
        """
        current = self.state
        while current not in wanted:
            if current in ENDED_STATES:
                raise ConnectionError(f"peer connection {current}")
            current = await self.states.receive()
        return current

    @property
    def local_description(self) -> SessionDescription | None:
        description = self._pc.localDescription
        return None if description is None else SessionDescription._of(description)

    @property
    def remote_description(self) -> SessionDescription | None:
        description = self._pc.remoteDescription
        return None if description is None else SessionDescription._of(description)

    # ------------------------------------------------------------------ media and data

    def add_track(self, track: TrioVideoSource) -> None:
        """Send ``track`` (before negotiating: it goes into the offer)."""
        self._pc.addTrack(track)

    def replace_track(self, old: TrioVideoSource, new: TrioVideoSource) -> None:
        """Send ``new`` instead of ``old`` on the same sender, without renegotiating.
        ``KeyError`` if ``old`` is not sent."""
        for sender in self._pc.getSenders():
            if sender.track is old:
                sender.replaceTrack(new)
                return
        raise KeyError("that track is not sent on this peer connection")

    def sends(self, track: TrioVideoSource) -> bool:
        """Whether ``track`` got a transceiver (after :meth:`answer`: the offer had room)."""
        return any(t.sender.track is track for t in self._pc.getTransceivers())

    def open_data_channel(self, label: str, *, ordered: bool = True) -> DataChannel:
        """Create a data channel (before the offer, so it is negotiated with it)."""
        return DataChannel(self._pc.createDataChannel(label, ordered=ordered))

    # ------------------------------------------------------------------ negotiation

    async def create_offer(self) -> SessionDescription:
        """Create and apply our offer, with all host candidates gathered."""
        return SessionDescription._of(await raw.create_offer(self._pc))

    async def answer(
        self, sdp: str, sdp_type: str = "offer", *, send_tracks: Iterable[TrioVideoSource] = ()
    ) -> SessionDescription:
        """Apply a remote offer and return our applied answer. Each of ``send_tracks`` is
        sent if the offer has a free section of its kind (see :meth:`sends`). ``ValueError``
        when the offer is malformed or cannot be answered (a client error)."""
        return SessionDescription._of(
            await raw.answer_offer(self._pc, sdp, sdp_type, send_tracks=send_tracks)
        )

    async def apply_answer(self, sdp: str, sdp_type: str = "answer") -> None:
        """Apply the remote answer to our offer. ``ValueError`` if it is malformed."""
        await raw.apply_answer(self._pc, sdp, sdp_type)

    async def add_candidate(self, candidate: RTCIceCandidate | None) -> None:
        """Add a remote candidate from :func:`scope_trio.rtc.parse_ice_candidate` (None: end
        of candidates). :class:`scope_trio.rtc.InvalidCandidateError` when it is refused."""
        await raw.add_ice_candidate(self._pc, candidate)

    # ------------------------------------------------------------------ the ICE sockets

    def watch_inbound(self) -> InboundDatagrams:
        """Stamp every datagram our ICE sockets receive from now on (call after the local
        description is set: the sockets exist once candidates are gathered)."""
        return watch_inbound(self._pc)

    def watch_uplink(self, track: TrioVideoSource) -> UplinkReceipts:
        """Follow what the remote receives of ``track`` (its receiver reports), from now on
        (call after the local description is set). ``LookupError`` if we do not send it."""
        for sender in self._pc.getSenders():
            if sender.track is track:
                return watch_uplink(self._pc, sender)
        raise LookupError("this peer connection does not send that track")

    def install_datagram_filter(
        self, drop: Callable[[], bool], *, delay: Callable[[], float] | None = None
    ) -> int:
        """Fault injection: drop datagrams both ways while ``drop()``, hold the others
        ``delay()`` seconds. Returns the number of sockets filtered."""
        return install_datagram_filter(self._pc, drop, delay=delay)

    # ------------------------------------------------------------------ close

    async def close(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - shielded: the caller's cannot bound it
    ) -> bool:
        """Close exactly once, shielded, under ``timeout`` (default: ``close_timeout``).

        Safe to call from any number of tasks, also while cancelled: later calls wait for
        the first close (same bound). True once closed; False if the close failed or did
        not finish in time (its sockets are then freed and it is abandoned, logged).
        """
        self._close_called = True
        return await raw.close_peer_connection(
            self._pc, self._close_timeout if timeout is None else timeout
        )
