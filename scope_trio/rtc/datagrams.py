"""A peer connection's ICE sockets seen from trio: inbound activity, and fault injection."""

from __future__ import annotations

from collections.abc import Callable

import trio
from aiortc import RTCPeerConnection

from scope_trio.rtc import _aiortc_internals as internals
from scope_trio.rtc.bridge import current_loop

__all__ = ["InboundDatagrams", "install_datagram_filter", "watch_inbound"]


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
    loop = current_loop()
    inbound = InboundDatagrams()
    for protocol in internals.ice_protocols(pc):
        internals.tap(protocol, loop).observers.append(inbound._received)
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
    loop = current_loop()
    count = 0
    for protocol in internals.ice_protocols(pc):
        tap = internals.tap(protocol, loop)
        tap.drop = drop
        tap.delay = delay or _no_delay
        count += 1
    return count


def _no_delay() -> float:
    return 0.0
