"""The uplink judge (scope_trio.rtc.uplink) fed by hand under a mock clock: which packet the
remote's report leaves unreceived, how long ago it was sent, across the 16-bit wrap, and the
inbound silence inside that window. The real-stack check is tests/test_network.py."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from scope_trio.rtc.uplink import UplinkReceipts


class _Sender:
    """What the judge reads of an aiortc sender: its SSRC and its round-trip estimate."""

    def __init__(self, rtt: float | None) -> None:
        self._ssrc = 1234
        self._RTCRtpSender__rtt = rtt


def _receipts(rtt: float | None = 0.1) -> UplinkReceipts:
    return UplinkReceipts(_Sender(rtt))  # type: ignore[arg-type]


async def _send(receipts: UplinkReceipts, first: int, count: int, spacing: float) -> None:
    for i in range(count):
        receipts._on_sent(1234, (first + i) & 0xFFFF)
        receipts._on_inbound()
        await trio.sleep(spacing)


async def test_a_report_of_everything_sent_is_no_starvation(autojump_clock: MockClock) -> None:
    receipts = _receipts()
    await _send(receipts, 100, 30, 0.03)
    receipts._on_report(129)
    assert receipts.latest is not None
    assert receipts.latest.starved_for == 0.0
    assert receipts.latest.beyond_rtt < 0


async def test_starvation_runs_from_the_first_packet_not_reported(
    autojump_clock: MockClock,
) -> None:
    receipts = _receipts(rtt=0.1)
    await _send(receipts, 65_530, 20, 0.04)  # wraps past 65535; ends at 0.8 s
    receipts._on_sent(99, 7)  # another stream (a retransmission): ignored
    # the remote has up to 65_534 (the 5th packet); the 6th was sent at 0.2 s
    receipts._on_report(65_534)
    report = receipts.latest
    assert report is not None
    assert report.starved_for == pytest.approx(0.8 - 0.2)
    assert report.beyond_rtt == pytest.approx(0.8 - 0.2 - 0.1)
    assert report.inbound_gap == 0.0, "inbound kept arriving every 40 ms"
    receipts._on_report(3)  # after the wrap: 65_530 + 9 = 3 (mod 2^16); the 11th at 0.4 s
    assert receipts.latest is not None
    assert receipts.latest.starved_for == pytest.approx(0.8 - 0.4)


async def test_a_silence_of_our_inbound_direction_is_reported(autojump_clock: MockClock) -> None:
    receipts = _receipts()
    await _send(receipts, 0, 10, 0.03)
    sent_more = trio.current_time()
    receipts._on_sent(1234, 10)
    await trio.sleep(0.7)  # nothing arrives: both directions silent
    receipts._on_inbound()  # the report's own datagram ends the silence
    receipts._on_report(9)
    report = receipts.latest
    assert report is not None
    assert report.starved_for == pytest.approx(trio.current_time() - sent_more)
    assert report.inbound_gap == pytest.approx(0.7)


async def test_next_report_and_wait_rtp_wake_their_waiters(autojump_clock: MockClock) -> None:
    receipts = _receipts(rtt=None)
    async with trio.open_nursery() as nursery:
        got: list[float] = []

        async def wait_report() -> None:
            got.append((await receipts.next_report()).starved_for)

        async def wait_rtp() -> None:
            await receipts.wait_rtp()
            got.append(-1.0)

        nursery.start_soon(wait_report)
        nursery.start_soon(wait_rtp)
        await trio.sleep(1)
        receipts._on_report(0)
        receipts._on_rtp_received()
    assert sorted(got) == [-1.0, 0.0]
    assert receipts.latest is not None
    assert receipts.latest.rtt is None
    assert receipts.rtp_received == 1


async def test_the_quiet_of_the_remotes_rtp_is_reported(autojump_clock: MockClock) -> None:
    receipts = _receipts()
    await _send(receipts, 0, 10, 0.03)
    receipts._on_rtp_received()
    await trio.sleep(0.25)
    receipts._on_report(3)
    assert receipts.latest is not None
    assert receipts.latest.rtp_quiet == pytest.approx(0.25)


async def test_a_remote_that_received_nothing_between_two_reports_is_told_apart(
    autojump_clock: MockClock,
) -> None:
    receipts = _receipts()
    await _send(receipts, 0, 20, 0.03)
    receipts._on_report(4)  # starved from packet 5 on
    first = receipts.latest
    assert first is not None
    assert not first.nothing_since_previous, "no previous report to compare with"
    receipts._on_report(4)  # a second block of the same compound: too close to compare
    assert receipts.latest is not None
    assert not receipts.latest.nothing_since_previous
    await _send(receipts, 20, 20, 0.03)
    receipts._on_report(4)  # 0.6 s later, still nothing past packet 4
    assert receipts.latest is not None
    assert receipts.latest.nothing_since_previous
    assert receipts.latest.starved_for == pytest.approx(first.starved_for + 0.6)
    receipts._on_report(30)  # the remote got more: a slower path, not a dead one
    assert receipts.latest is not None
    assert not receipts.latest.nothing_since_previous
    await trio.sleep(0.5)
    receipts._on_report(39)  # everything: nothing starved to compare with
    receipts._on_report(39)
    assert not receipts.latest.nothing_since_previous
