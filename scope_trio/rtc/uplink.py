"""What the remote peer receives of our video, from its RTCP receiver reports (trio side).

A peer that receives our RTP reports, every 0.5-1.5 s (aiortc's RTCP interval), the highest
sequence number it has received. We stamp the send time of every RTP packet of our stream,
so each report says how long the remote has received nothing we sent: its *starvation*, as
of the report's arrival. On a healthy path that is about a round trip (the report and our
packets are in flight) plus a packet interval; when the server→remote direction is dead it
grows with every report although the remote keeps talking to us. That is the one signal of
a dead sending direction that neither path silence (we still receive) nor the stall
watchdog (frames stop only as a consequence, 2 s later) gives early.

A silence of both directions (a blip) also starves the remote: the longest silence of our
inbound direction within the starved window is reported beside it, and the arrival of the
remote's RTP can be awaited (:meth:`UplinkReceipts.wait_rtp`), so a judge can tell a blip
that just ended from a dead direction (see :mod:`scope_trio.cloud.media`).

The round trip is aiortc's smoothed estimate, which follows a path that became slower only
over several reports (each new sample weighs 15 %). Right after the round trip grows, a
healthy report therefore looks starved by the growth. Two more facts are reported so a judge
can tell that from a dead direction: how long the remote's RTP has been quiet (its video,
made from ours, stops about a round trip after our packets stop reaching it) and whether
the remote received nothing at all since its previous report.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import trio
from aiortc import RTCPeerConnection, RTCRtpSender

from scope_trio.rtc import _aiortc_internals as internals
from scope_trio.rtc.bridge import current_loop

__all__ = ["UplinkReceipts", "UplinkReport", "watch_uplink"]

SENT_HISTORY = 10.0
"""Seconds of send times kept (longer starvation is reported as at least this)."""
GAP_MIN = 0.05
"""Inbound silences shorter than this are not recorded (video packets come every ~33 ms)."""
REPORT_SPACING = 0.25
"""Reports closer than this (two blocks of one RTCP compound) are not compared."""


@dataclass(frozen=True)
class UplinkReport:
    """One receiver report about our stream, judged on arrival."""

    at: float
    """``trio.current_time()`` of its arrival."""
    starved_for: float
    """Seconds before ``at`` since the remote last received anything we sent: the send time
    of the first packet it has not reported. 0 when it has everything we sent."""
    rtt: float | None
    """Our sender's round-trip estimate (None before the first)."""
    inbound_gap: float
    """The longest silence of our inbound direction within the starved window."""
    rtp_quiet: float
    """Seconds before ``at`` since the remote's last RTP reached us (its media still flows
    when this is small)."""
    nothing_since_previous: bool
    """The previous report, at least :data:`REPORT_SPACING` earlier, already left the same
    packet unreceived: the remote received nothing we sent between the two reports."""

    @property
    def beyond_rtt(self) -> float:
        """Starvation beyond what a round trip explains."""
        return self.starved_for - (self.rtt or 0.0)


class UplinkReceipts:
    """The remote's receipt of one sender's stream (:func:`watch_uplink`)."""

    def __init__(self, sender: RTCRtpSender) -> None:
        self._sender = sender
        self._ssrc = internals.sender_ssrc(sender)
        self._sent: deque[tuple[int, float]] = deque()
        self._gaps: deque[tuple[float, float]] = deque()
        self._last_in = self._last_rtp = trio.current_time()
        self._previous: tuple[float, float] | None = None
        """The arrival of the first report that left the latest report's first unreceived
        packet unreceived, and that packet's send time."""
        self._changed = trio.Event()
        self._rtp_waiter: trio.Event | None = None
        self.reports = 0
        """Receiver reports about our stream so far."""
        self.rtp_received = 0
        """RTP datagrams received from the remote (its media flows towards us)."""
        self.latest: UplinkReport | None = None

    async def next_report(self) -> UplinkReport:
        """Wait for the next receiver report about our stream."""
        await self._changed.wait()
        assert self.latest is not None
        return self.latest

    def force_keyframe(self) -> None:
        """Make our encoder send a keyframe next (a path that returns: the remote's decoder
        may be waiting on packets lost in the outage)."""
        internals.force_keyframe(self._sender)

    # ---------------------------------------------------------------- from the asyncio side

    def _on_sent(self, ssrc: int, seq: int) -> None:
        if ssrc != self._ssrc:
            return  # retransmissions (RTX) and other streams
        now = trio.current_time()
        self._sent.append((seq, now))
        while self._sent and now - self._sent[0][1] > SENT_HISTORY:
            self._sent.popleft()

    async def wait_rtp(self) -> None:
        """Wait for the next RTP datagram from the remote."""
        if self._rtp_waiter is None:
            self._rtp_waiter = trio.Event()
        await self._rtp_waiter.wait()

    def _on_rtp_received(self) -> None:
        self.rtp_received += 1
        self._last_rtp = trio.current_time()
        waiter, self._rtp_waiter = self._rtp_waiter, None
        if waiter is not None:
            waiter.set()

    def _on_inbound(self) -> None:
        now = trio.current_time()
        if now - self._last_in >= GAP_MIN:
            self._gaps.append((self._last_in, now))
            while self._gaps and now - self._gaps[0][1] > SENT_HISTORY:
                self._gaps.popleft()
        self._last_in = now

    def _on_report(self, highest: int) -> None:
        now = trio.current_time()
        sent = self._sent
        # Drop what the remote has: at or before ``highest`` (16-bit serial arithmetic).
        while sent:
            ahead = (sent[0][0] - highest) & 0xFFFF
            if 0 < ahead < 0x8000:
                break  # the first packet the remote has not reported
            sent.popleft()
        since = sent[0][1] if sent else now
        gap = max((min(end, now) - max(start, since) for start, end in self._gaps), default=0.0)
        self.latest = UplinkReport(
            at=now,
            starved_for=now - since,
            rtt=internals.sender_rtt(self._sender),
            inbound_gap=max(0.0, gap),
            rtp_quiet=now - self._last_rtp,
            nothing_since_previous=(
                self._previous is not None
                and since == self._previous[1]
                and now - self._previous[0] >= REPORT_SPACING
            ),
        )
        if not sent:
            self._previous = None
        elif self._previous is None or since != self._previous[1]:
            self._previous = (now, since)
        self.reports += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()


def watch_uplink(pc: RTCPeerConnection, sender: RTCRtpSender) -> UplinkReceipts:
    """Follow what the remote receives of ``sender``'s stream, from now on.

    Call after the local description is set (the ICE sockets exist) and inside the open loop.
    """
    receipts = UplinkReceipts(sender)
    loop = current_loop()
    for protocol in internals.ice_protocols(pc):
        internals.observe_sent_rtp(protocol, receipts._on_sent)
        internals.observe_received_rtp(protocol, receipts._on_rtp_received)
        internals.tap(protocol, loop).observers.append(receipts._on_inbound)
    internals.observe_receiver_reports(sender, receipts._on_report)
    return receipts
