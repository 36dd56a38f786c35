"""The aiortc bridge with real peers on loopback, inside the trio-asyncio loop."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioice.ice
import aioice.stun
import pytest
import trio
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from aiortc.exceptions import InvalidStateError
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame
from devcloud_client import connect, eventually, luma_halves, mean_luma, rgb_frame

from scope_trio import rtc
from scope_trio.rtc import _aiortc_internals as internals
from scope_trio.rtc import datagrams, raw, tracks
from scope_trio.rtc.bridge import aio

# Generous deadlines: these run real media on a loaded 2-core machine.
CONNECT_DEADLINE = 15.0
FRAME_DEADLINE = 10.0


@dataclass
class Pair:
    """An offerer sending a TrioVideoSource to an answerer, connected."""

    offerer: RTCPeerConnection
    answerer: RTCPeerConnection
    offerer_events: raw.PeerEvents
    answerer_events: raw.PeerEvents
    source: rtc.TrioVideoSource
    remote_track: MediaStreamTrack


@asynccontextmanager
async def open_pair() -> AsyncIterator[Pair]:
    """Two connected peers on loopback; both closed on exit."""
    offerer = raw.new_peer_connection([])
    answerer = raw.new_peer_connection([])
    offerer_events = raw.PeerEvents(offerer)
    answerer_events = raw.PeerEvents(answerer)
    source = rtc.TrioVideoSource(fps=30, width=64, height=64)
    offerer.addTrack(source)
    try:
        with trio.fail_after(CONNECT_DEADLINE):
            await connect(offerer, answerer)
            await offerer_events.wait_state("connected")
            await answerer_events.wait_state("connected")
            remote_track = await answerer_events.tracks.receive()
        yield Pair(offerer, answerer, offerer_events, answerer_events, source, remote_track)
    finally:
        await raw.close_peer_connection(offerer)
        await raw.close_peer_connection(answerer)


@pytest.fixture
async def pair(aio_loop: object) -> AsyncIterator[Pair]:
    async with open_pair() as connected:
        yield connected


async def next_frame_where(
    receive: trio.MemoryReceiveChannel[VideoFrame], predicate: object
) -> VideoFrame:
    assert callable(predicate)
    async for frame in receive:
        if predicate(frame):
            return frame
    raise AssertionError("track ended")


async def test_a_check_from_the_remote_makes_ours_go_again_at_once(aio_loop: object) -> None:
    """Every first check of the offerer is lost and aioice would retry it only on its
    retransmission timer, 5 s here: the answerer's check (sent 0.3 s late, as into a path
    that was down), answered, makes the offerer send its own again at once (RFC 8445's
    triggered check), so it connects long before."""
    saved = rtc.tune_ice_consent(rto=5.0)
    offerer = raw.new_peer_connection([])
    answerer = raw.new_peer_connection([])
    events = raw.PeerEvents(offerer)
    offerer.addTransceiver("video")
    lost: set[tuple[int, tuple[Any, ...]]] = set()
    try:
        offer = await raw.create_offer(offerer)
        for protocol in internals.ice_protocols(offerer):

            def send_stun(message: Any, addr: Any, _send: Any = protocol.send_stun) -> None:
                first = (id(_send), tuple(addr))
                if message.message_class == aioice.stun.Class.REQUEST and first not in lost:
                    lost.add(first)  # the first check to each address never arrives
                    return
                _send(message, addr)

            protocol.send_stun = send_stun
        answer = await raw.answer_offer(answerer, offer.sdp)
        for protocol in internals.ice_protocols(answerer):

            def send_late(message: Any, addr: Any, _send: Any = protocol.send_stun) -> None:
                asyncio.get_running_loop().call_later(0.3, _send, message, addr)

            protocol.send_stun = send_late
        await raw.apply_answer(offerer, answer.sdp)
        with trio.fail_after(3.0):  # the retransmission would come at 5 s
            await events.wait_state("connected")
        assert lost, "no first check was lost: the case was not made"
    finally:
        rtc.tune_ice_consent(**dataclasses.asdict(saved))
        await raw.close_peer_connection(offerer)
        await raw.close_peer_connection(answerer)


async def test_new_peer_connection_converts_ice_servers(aio_loop: object) -> None:
    pc = raw.new_peer_connection(
        [
            {"urls": "stun:stun.example.org:3478"},
            {"urls": ["turn:turn.example.org"], "username": "u", "credential": "c"},
        ]
    )
    try:
        servers = pc._RTCPeerConnection__configuration.iceServers  # type: ignore[attr-defined]
        assert servers is not None
        assert [s.urls for s in servers] == [
            ["stun:stun.example.org:3478"],
            ["turn:turn.example.org"],
        ]
        assert (servers[1].username, servers[1].credential) == ("u", "c")
    finally:
        await raw.close_peer_connection(pc)
    empty = raw.new_peer_connection([])
    try:
        config = empty._RTCPeerConnection__configuration  # type: ignore[attr-defined]
        assert config.iceServers == []
    finally:
        await raw.close_peer_connection(empty)


@pytest.mark.parametrize(
    "entry",
    [
        {},
        {"urls": 3},
        {"urls": []},
        {"urls": "stun:x", "username": 1},
        {"urls": "x", "credential": 2},
    ],
)
async def test_new_peer_connection_rejects_garbage(
    aio_loop: object, entry: dict[str, object]
) -> None:
    with pytest.raises(ValueError, match="ICE server"):
        raw.new_peer_connection([entry])


async def test_frames_flow_and_black_after_idle(pair: Pair) -> None:
    send, receive = trio.open_memory_channel[VideoFrame](1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tracks.receive_video, pair.remote_track, send.send_nowait)

        # White frames pushed from trio arrive white (lossy: compare with a tolerance).
        async def feed_white() -> None:
            while True:
                pair.source.push(rgb_frame(64, 64, 255))
                await trio.sleep(1 / 30)

        feeder = trio.CancelScope()

        async def run_feeder() -> None:
            with feeder:
                await feed_white()

        nursery.start_soon(run_feeder)
        with trio.fail_after(FRAME_DEADLINE):
            await next_frame_where(receive, lambda f: mean_luma(f) > 200)

        # Input stops: within about idle_timeout the track turns black, same size.
        feeder.cancel()
        stopped = time.monotonic()
        with trio.fail_after(FRAME_DEADLINE):
            black = await next_frame_where(receive, lambda f: mean_luma(f) < 40)
        assert time.monotonic() - stopped >= 0.5
        assert (black.width, black.height) == (64, 64)
        assert pair.source.black_frames_sent > 0
        nursery.cancel_scope.cancel()


async def test_receive_video_returns_when_remote_closes(pair: Pair) -> None:
    first = trio.Event()
    counts: list[int] = []

    def deliver(frame: VideoFrame) -> None:
        first.set()

    async def receive() -> None:
        counts.append(await tracks.receive_video(pair.remote_track, deliver))

    with trio.fail_after(FRAME_DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await first.wait()  # black frames flow without input
            await raw.close_peer_connection(pair.offerer)
        # receive_video returned by itself: the nursery was not cancelled.
        assert counts[0] >= 1
        assert await pair.answerer_events.wait_state("closed") == "closed"


async def test_request_keyframe(pair: Pair) -> None:
    send, receive = trio.open_memory_channel[VideoFrame](1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tracks.receive_video, pair.remote_track, send.send_nowait)
        with trio.fail_after(FRAME_DEADLINE):
            await receive.receive()
        assert await tracks.request_keyframe(pair.answerer, pair.remote_track)
        nursery.cancel_scope.cancel()
    # A track this peer connection does not receive has nothing to ask for.
    assert not await tracks.request_keyframe(pair.answerer, pair.source)


async def test_source_forwards_at_most_twice_fps_with_increasing_pts(aio_loop: object) -> None:
    source = rtc.TrioVideoSource(fps=50, idle_timeout=10.0, width=32, height=32)
    try:
        started = time.monotonic()
        pts: list[int] = []
        with trio.fail_after(FRAME_DEADLINE):
            for _ in range(11):
                source.push(rgb_frame(32, 32, 0, 255))
                frame = await aio(source.recv)
                assert frame.time_base == rtc.VIDEO_TIME_BASE
                assert frame.pts is not None
                pts.append(frame.pts)
        elapsed = time.monotonic() - started
        # Forwarded at once, but never two frames closer than half a frame interval.
        assert elapsed >= 10 / (2 * 50) * 0.9
        assert pts == sorted(set(pts))
        # pts follow wall time in the 90 kHz clock (loose: the machine may be loaded).
        assert pts[-1] - pts[0] >= int(0.9 * elapsed * 90_000) - 9_000
        # A burst leaves in order: two pushes before a recv deliver both.
        source.push(rgb_frame(32, 32, 0))
        source.push(rgb_frame(32, 32, 255))
        with trio.fail_after(FRAME_DEADLINE):
            assert mean_luma(await aio(source.recv)) < 20
            assert mean_luma(await aio(source.recv)) > 200
        assert (source.frames_pushed, source.frames_skipped) == (13, 0)
    finally:
        source.stop()
    with pytest.raises(MediaStreamError):
        await aio(source.recv)


def _timed(luma: int, seconds: float) -> VideoFrame:
    """A 32x32 frame of ``luma`` whose media time is ``seconds`` (90 kHz pts)."""
    frame = rgb_frame(32, 32, luma)
    frame.pts = round(seconds * 90_000)
    frame.time_base = rtc.VIDEO_TIME_BASE
    return frame


async def test_source_skips_what_is_too_late_and_what_a_slow_encoder_cannot_catch_up(
    aio_loop: object,
) -> None:
    source = rtc.TrioVideoSource(fps=30, idle_timeout=None, max_lateness=0.3)
    try:
        with trio.fail_after(FRAME_DEADLINE):
            # A backlog within the bound is forwarded, oldest first; older is skipped.
            for i, luma in enumerate((10, 60, 110, 160)):
                source.push(_timed(luma, i * 0.14))  # 0, 0.14, 0.28, 0.42 s
            assert source.frames_skipped == 1, "0 s is more than 0.3 s behind 0.42 s"
            got = [round(mean_luma(await aio(source.recv)), -1) for _ in range(3)]
            assert got == [60, 110, 160]
            # A pts that goes backwards is a new stream: what waited is dropped.
            source.push(_timed(200, 9.0))
            source.push(_timed(30, 1.0))
            assert source.frames_skipped == 2
            assert round(mean_luma(await aio(source.recv)), -1) == 30
            # An encoder slower than the frames' spacing (33 ms) gets only the newest.
            media_time = 1.0
            for _ in range(8):
                media_time += 1 / 30
                source.push(_timed(80, media_time))
                await aio(source.recv)
                await trio.sleep(0.06)  # "encoding" for 60 ms
            skipped = source.frames_skipped
            for luma in (50, 100, 150):
                media_time += 1 / 30
                source.push(_timed(luma, media_time))
            assert round(mean_luma(await aio(source.recv)), -1) == 150
            assert source.frames_skipped == skipped + 2
    finally:
        source.stop()


def test_the_lateness_bound_is_one_retransmission_within_limits() -> None:
    assert rtc.lateness_bound(None) == tracks.MIN_LATENESS  # no hole seen: a short bound
    assert rtc.lateness_bound(0.01) == tracks.MIN_LATENESS
    assert rtc.lateness_bound(0.3) == pytest.approx(tracks.LATENESS_PER_FILL * 0.3)
    assert rtc.lateness_bound(5.0) == tracks.MAX_LATENESS
    bound = [0.05]
    source = rtc.TrioVideoSource(max_lateness=lambda: bound[0])  # read at every push
    source.push(_timed(10, 0.0))
    source.push(_timed(20, 0.1))
    assert source.frames_skipped == 1
    bound[0] = 0.5
    source.push(_timed(30, 0.2))
    assert source.frames_skipped == 1
    source.stop()


async def test_source_black_frame_without_input(aio_loop: object) -> None:
    source = rtc.TrioVideoSource(fps=30, idle_timeout=0.2)
    try:
        with trio.fail_after(FRAME_DEADLINE):
            frame = await aio(source.recv)
            assert (frame.width, frame.height) == (512, 512)
            assert mean_luma(frame) < 20
            # Idle: black frames at the frame rate until a frame is pushed.
            started = time.monotonic()
            for _ in range(3):
                assert mean_luma(await aio(source.recv)) < 20
            assert time.monotonic() - started >= 2 / 30 * 0.9
            source.push(rgb_frame(64, 32, 0, 255))
            left, right = luma_halves(await aio(source.recv))
            assert left < 20
            assert right > 235
            # The next black frame has the size of the last pushed one.
            frame = await aio(source.recv)
            assert (frame.width, frame.height, mean_luma(frame) < 20) == (64, 32, True)
    finally:
        source.stop()


async def test_source_delivers_a_frame_pushed_while_waiting(aio_loop: object) -> None:
    source = rtc.TrioVideoSource(fps=30, idle_timeout=10.0)
    result: list[VideoFrame] = []
    try:
        with trio.fail_after(FRAME_DEADLINE):
            async with trio.open_nursery() as nursery:

                async def receive() -> None:
                    result.append(await aio(source.recv))

                nursery.start_soon(receive)
                await trio.sleep(0.1)
                assert not result  # waiting for input, not sending black yet
                source.push(rgb_frame(64, 32, 0, 255))
        left, right = luma_halves(result[0])
        assert left < 20
        assert right > 235
    finally:
        source.stop()


async def test_close_is_idempotent_and_shielded(pair: Pair) -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        # Already cancelled: the close still runs to completion.
        assert await raw.close_peer_connection(pair.offerer)
    assert pair.offerer.connectionState == "closed"
    with trio.fail_after(2):
        assert await raw.close_peer_connection(pair.offerer)
    # Concurrent closes of the other peer: one close, every caller sees it complete.
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):

            async def close() -> None:
                results.append(await raw.close_peer_connection(pair.answerer))

            nursery.start_soon(close)
    assert results == [True, True, True]
    assert pair.answerer.connectionState == "closed"


async def test_close_while_encoding_completes(aio_loop: object) -> None:
    """Regression: a close issued while aiortc encodes a frame in its executor used to hang.

    trio-asyncio lost the sender task's cancel when it arrived during ``run_in_executor``;
    the first (key)frames take longest to encode, so closing right after connecting while
    frames flow hit it most of the time.
    """
    for _ in range(3):
        async with open_pair() as pair, trio.open_nursery() as nursery:

            async def feed(source: rtc.TrioVideoSource = pair.source) -> None:
                while True:
                    source.push(rgb_frame(64, 64, 0, 255))
                    await trio.sleep(1 / 30)

            nursery.start_soon(feed)
            await trio.lowlevel.checkpoint()
            with trio.fail_after(4):
                assert await raw.close_peer_connection(pair.offerer, timeout=3)
            nursery.cancel_scope.cancel()


async def test_close_before_connect(aio_loop: object) -> None:
    pc = raw.new_peer_connection([])
    pc.createDataChannel("parameters")
    await raw.create_offer(pc)
    with trio.fail_after(10):
        assert await raw.close_peer_connection(pc)


async def test_data_channel_messages_in_order(aio_loop: object) -> None:
    offerer = raw.new_peer_connection([])
    answerer = raw.new_peer_connection([])
    answerer_events = raw.PeerEvents(answerer)
    channel = offerer.createDataChannel("parameters", ordered=True)
    opened = trio.Event()
    channel.on("open", opened.set)
    try:
        with trio.fail_after(CONNECT_DEADLINE):
            await connect(offerer, answerer)
            remote, messages = await answerer_events.channels.receive()
            await opened.wait()
            for i in range(20):
                channel.send(f'{{"n": {i}}}')  # a sync aiortc call from trio
            received = [await messages.receive() for _ in range(20)]
        assert received == [f'{{"n": {i}}}' for i in range(20)]
        assert remote.label == "parameters"
        await raw.close_peer_connection(offerer)
        with trio.fail_after(CONNECT_DEADLINE):
            async for _ in messages:  # ends when the channel closes
                pass
    finally:
        await raw.close_peer_connection(offerer)
        await raw.close_peer_connection(answerer)


async def test_parse_ice_candidate(aio_loop: object) -> None:
    pc = raw.new_peer_connection([])
    pc.createDataChannel("x")
    try:
        offer = await raw.create_offer(pc)
        line = next(line for line in offer.sdp.splitlines() if line.startswith("a=candidate:"))
        for text in (line, line[2:], line[len("a=candidate:") :]):
            candidate = rtc.parse_ice_candidate(
                {"candidate": text, "sdpMid": "0", "sdpMLineIndex": 0}
            )
            assert candidate is not None
            assert (candidate.sdpMid, candidate.sdpMLineIndex) == ("0", 0)
            assert candidate.protocol == "udp"
            assert candidate.port > 0
    finally:
        await raw.close_peer_connection(pc)
    assert rtc.parse_ice_candidate(None) is None
    assert rtc.parse_ice_candidate({"candidate": "", "sdpMid": "0"}) is None


@pytest.mark.parametrize(
    "data",
    [
        "candidate:1 1 udp 1 1.2.3.4 5 typ host",
        {"candidate": 5, "sdpMid": "0"},
        {"candidate": "candidate:garbage", "sdpMid": "0"},
        {"candidate": "candidate:1 1 udp x 1.2.3.4 5 typ host", "sdpMid": "0"},
        {"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host"},
        {"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host", "sdpMLineIndex": "0"},
        {"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host", "sdpMid": 0},
    ],
)
def test_parse_ice_candidate_rejects_garbage(data: object) -> None:
    with pytest.raises(ValueError, match="ICE candidate"):
        rtc.parse_ice_candidate(data)  # type: ignore[arg-type]


async def test_answer_offer_rejects_malformed_sdp(aio_loop: object) -> None:
    pc = raw.new_peer_connection([])
    try:
        for sdp in ("", "garbage", "v=0\r\nm=video\r\n"):
            with pytest.raises(ValueError, match="SDP"):
                await raw.answer_offer(pc, sdp)
        with pytest.raises(ValueError, match="offer"):
            await raw.answer_offer(pc, "v=0", "answer")
    finally:
        await raw.close_peer_connection(pc)


def test_tune_ice_consent_sets_and_restores() -> None:
    original = rtc.get_ice_consent()
    try:
        previous = rtc.tune_ice_consent(0.3, 6, 1.0)
        assert previous == original
        assert (aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES) == (0.3, 6)
        assert aioice.stun.RETRY_RTO == 1.0
        assert rtc.get_ice_consent() == rtc.FAST_CONSENT
        assert rtc.tune_ice_consent(**dataclasses.asdict(previous)) == rtc.FAST_CONSENT
        assert rtc.get_ice_consent() == original
        with pytest.raises(ValueError, match="positive"):
            rtc.tune_ice_consent(0, 3, 0.2)
        assert rtc.get_ice_consent() == original
    finally:
        rtc.tune_ice_consent(**dataclasses.asdict(original))
    assert original == rtc.AIOICE_DEFAULT_CONSENT  # nothing else in the process changed it


CONSENT_HEALTHY_WINDOW = 1.5
"""Absence window: on a healthy path no consent check fails, so nothing closes meanwhile."""


async def test_silent_path_detected_with_fast_consent(aio_loop: object) -> None:
    """A datagram filter makes the path silent; fast consent closes it (~8 s), long before
    aioice's default would (~31 s). The media session's faster signal is path silence.

    The consent interval is read when each check is scheduled, so tune before connecting.
    """
    original = rtc.tune_ice_consent(**dataclasses.asdict(rtc.FAST_CONSENT))
    try:
        async with open_pair() as pair:
            dropping = False
            assert datagrams.install_datagram_filter(pair.answerer, lambda: dropping) >= 1
            with trio.move_on_after(CONSENT_HEALTHY_WINDOW):
                await pair.offerer_events.wait_state("closed")
            assert pair.offerer.connectionState == "connected"
            dropping = True
            started = time.monotonic()
            with trio.fail_after(15):  # well inside aioice's default of ~31 s
                await pair.offerer_events.wait_state("closed")
            print(f"silent path closed by consent after {time.monotonic() - started:.2f} s")
    finally:
        rtc.tune_ice_consent(**dataclasses.asdict(original))


async def test_watch_inbound_stamps_every_datagram_until_the_path_is_silent(
    aio_loop: object,
) -> None:
    """Without any media towards the offerer, consent answers and RTCP still reach it; a
    dropping filter on the other side stops every one of them."""
    async with open_pair() as pair:
        inbound = datagrams.watch_inbound(pair.offerer)
        dropping = False
        assert datagrams.install_datagram_filter(pair.answerer, lambda: dropping) >= 1
        seen = inbound.count

        async def arriving() -> bool:  # another peer's traffic: no event to wait on
            return inbound.count >= seen + 2

        await eventually(arriving)  # aiortc sends RTCP every 0.5-1.5 s, consent every 5 s
        assert trio.current_time() - inbound.last_at < 1.0
        dropping = True
        await trio.sleep(0.1)  # what was already in flight or queued
        silent_from, count = inbound.last_at, inbound.count
        await trio.sleep(SILENCE_WINDOW)  # named absence window: nothing may arrive
        assert (inbound.count, inbound.last_at) == (count, silent_from)


SILENCE_WINDOW = 2.0
"""Absence window: longer than aiortc's RTCP interval (at most 1.5 s)."""


async def test_datagram_filter_delay_adds_to_the_round_trip(aio_loop: object) -> None:
    """A delay on one side holds datagrams in both directions: the RTT grows by twice it."""
    offerer = raw.new_peer_connection([])
    answerer = raw.new_peer_connection([])
    answerer_events = raw.PeerEvents(answerer)
    channel = offerer.createDataChannel("echo", ordered=True)
    opened = trio.Event()
    channel.on("open", opened.set)
    replies = raw.open_message_channel(channel)
    delay = 0.0
    try:
        with trio.fail_after(CONNECT_DEADLINE):
            offer = await raw.create_offer(offerer)
            answer = await raw.answer_offer(answerer, offer.sdp)
            assert (
                datagrams.install_datagram_filter(answerer, lambda: False, delay=lambda: delay) >= 1
            )
            await raw.apply_answer(offerer, answer.sdp)
            remote, messages = await answerer_events.channels.receive()
            await opened.wait()

        async def echo() -> None:
            async for message in messages:
                remote.send(message)

        async def round_trip() -> float:
            sent = time.monotonic()
            channel.send("ping")
            with trio.fail_after(10):
                assert await replies.receive() == "ping"
            return time.monotonic() - sent

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            direct = await round_trip()
            delay = 0.15
            delayed = await round_trip()
            nursery.cancel_scope.cancel()
        print(f"round trip {direct * 1000:.1f} ms, with 150 ms each way {delayed * 1000:.1f} ms")
        assert delayed >= 0.3
    finally:
        await raw.close_peer_connection(offerer)
        await raw.close_peer_connection(answerer)


async def test_close_during_the_dtls_handshake_leaves_no_unawaited_error(
    aio_loop: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: aiortc's connect task (started with ``ensure_future``, never awaited) went
    on after a close. When its DTLS handshake ended while close() was still taking ICE down
    (a datagram from the peer arriving just then: ~2 % of the stops while connecting in
    benchmarks/stop_latency.py), it started the SCTP transport's ICE, which the close had
    just marked closed: ``InvalidStateError('RTCIceTransport is closed')``, never retrieved.

    The race is made certain: the answerer's datagrams are held 100 ms, the offerer is closed
    the moment its ICE completes (its DTLS then still waits for the answerer's first flight),
    and aioice's close of the offerer's connection first lets that handshake end (or waits
    for the connect task to be gone).
    """
    assert isinstance(aio_loop, asyncio.AbstractEventLoop)
    offerer = raw.new_peer_connection([])
    answerer = raw.new_peer_connection([])
    unhandled: list[dict[str, object]] = []
    aio_loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    offerer.addTransceiver("video", direction="recvonly")
    offerer.createDataChannel("parameters")
    ice_completed = trio.Event()

    @offerer.on("iceconnectionstatechange")
    def _() -> None:
        if offerer.iceConnectionState == "completed":
            ice_completed.set()

    connection_close = aioice.ice.Connection.close

    async def close_once_the_handshake_ended(connection: aioice.ice.Connection) -> None:
        dtls = offerer.sctp.transport  # bundled: the video transceiver's, once negotiated
        if connection is dtls.transport.iceGatherer._connection:
            for _ in range(400):  # at most 2 s
                if dtls.state != "connecting" or not _connect_tasks(aio_loop, offerer):
                    break
                await asyncio.sleep(0.005)
        await connection_close(connection)

    monkeypatch.setattr(aioice.ice.Connection, "close", close_once_the_handshake_ended)
    try:
        with trio.fail_after(CONNECT_DEADLINE):
            offer = await raw.create_offer(offerer)
            answer = await raw.answer_offer(answerer, offer.sdp)
            datagrams.install_datagram_filter(answerer, lambda: False, delay=lambda: 0.1)
            await raw.apply_answer(offerer, answer.sdp)
            await ice_completed.wait()
        state = offerer.sctp.transport.state
        assert state == "connecting", "the close must land inside the DTLS handshake"
        assert await raw.close_peer_connection(offerer)

        async def connect_task_ended() -> bool:  # aiortc's task, not ours: no event
            return not _connect_tasks(aio_loop, offerer)

        await eventually(connect_task_ended, poll=0.01)
        gc.collect()  # an unretrieved task exception is reported when the task is collected
        await trio.lowlevel.checkpoint()
        assert unhandled == []
    finally:
        await raw.close_peer_connection(offerer)
        await raw.close_peer_connection(answerer)


def _connect_tasks(
    loop: asyncio.AbstractEventLoop, pc: RTCPeerConnection
) -> list[asyncio.Task[object]]:
    """aiortc's unawaited connect tasks of ``pc`` that have not ended."""
    tasks = []
    for task in asyncio.all_tasks(loop):
        coro: Any = task.get_coro()
        if (
            not task.done()
            and getattr(coro, "__qualname__", "") == "RTCPeerConnection.__connect"
            and coro.cr_frame is not None
            and coro.cr_frame.f_locals.get("self") is pc
        ):
            tasks.append(task)
    return tasks


async def test_close_after_an_interrupted_bundling_closes_every_socket(
    aio_loop: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: applying a BUNDLE answer closes the data channel's own ICE connection
    inside ``setRemoteDescription``; a stop at that moment interrupted that close between its
    two sockets, and the peer connection no longer knew the connection: one UDP socket and
    its reader task leaked (the last leak of benchmarks/stop_latency.py).

    Two host addresses are forced, and the cancel is delivered as that close begins.
    """
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda *_, **__: ["127.0.0.1"] * 2)
    offerer = raw.new_peer_connection([])
    answerer = raw.new_peer_connection([])
    offerer.addTransceiver("video", direction="recvonly")
    offerer.createDataChannel("parameters")
    try:
        with trio.fail_after(CONNECT_DEADLINE):
            offer = await raw.create_offer(offerer)
            answer = await raw.answer_offer(answerer, offer.sdp)
        assert offerer.sctp is not None
        discarded = offerer.sctp.transport.transport.iceGatherer._connection
        sockets = list(discarded._protocols)
        assert len(sockets) == 2
        connection_close = aioice.ice.Connection.close
        with trio.CancelScope() as scope:

            async def cancelled_as_it_closes(connection: aioice.ice.Connection) -> None:
                if connection is discarded:
                    scope.cancel()  # lands at its first await: after the first socket
                await connection_close(connection)

            monkeypatch.setattr(aioice.ice.Connection, "close", cancelled_as_it_closes)
            await raw.apply_answer(offerer, answer.sdp)
        monkeypatch.undo()
        assert scope.cancelled_caught
        assert offerer.sctp.transport.transport.iceGatherer._connection is not discarded
        assert await raw.close_peer_connection(offerer)
        assert [p for p in sockets if not p.transport.is_closing()] == []
    finally:
        await raw.close_peer_connection(offerer)
        await raw.close_peer_connection(answerer)


async def test_close_after_an_interrupted_gathering_closes_every_socket(
    aio_loop: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a cancel while aioice binds its sockets (a stop while the offer is being
    made) lost the sockets bound so far: the connection learns of them only once all are
    bound, so close() never closed them (a UDP socket and a reader task leaked each time).

    Two host addresses are forced, and the cancel is delivered the moment the second socket
    is bound, which is exactly the window a random stop hits now and then.
    """
    monkeypatch.setattr(
        aioice.ice, "get_host_addresses", lambda *_, **__: ["127.0.0.1", "127.0.0.1"]
    )
    bound: list[aioice.ice.StunProtocol] = []
    connection_made = aioice.ice.StunProtocol.connection_made
    pc = raw.new_peer_connection([])
    pc.createDataChannel("parameters")
    with trio.CancelScope() as scope:

        def cancel_on_the_second(protocol: aioice.ice.StunProtocol, transport: object) -> None:
            connection_made(protocol, transport)  # type: ignore[arg-type]
            bound.append(protocol)
            if len(bound) == 2:
                scope.cancel()

        monkeypatch.setattr(aioice.ice.StunProtocol, "connection_made", cancel_on_the_second)
        await raw.create_offer(pc)
    monkeypatch.undo()
    assert scope.cancelled_caught
    assert len(bound) == 2
    assert await raw.close_peer_connection(pc)
    assert [p for p in bound if not p.transport.is_closing()] == []


async def test_peer_events_wait_state_raises_on_close(pair: Pair) -> None:
    await raw.close_peer_connection(pair.answerer)
    with trio.fail_after(CONNECT_DEADLINE), pytest.raises(ConnectionError, match="closed"):
        await pair.offerer_events.wait_state("never")


def test_public_types_are_real() -> None:
    assert issubclass(rtc.TrioVideoSource, MediaStreamTrack)
    # The package's API is trio-facing: nothing in __all__ is an aiortc/aioice object.
    for name in rtc.__all__:
        module = str(getattr(getattr(rtc, name), "__module__", ""))
        assert not module.startswith(("aiortc", "aioice")), f"rtc.{name} comes from {module}"


BOUNDARY_EXEMPT: set[str] = set()
"""Production modules allowed past the boundary: none."""
ASYNCIO_SIDE = ("aiortc", "aioice", "trio_asyncio")


def _boundary_problems(path: Path) -> list[str]:
    """What in ``path`` reaches past ``scope_trio.rtc``'s public API."""
    public = set(rtc.__all__)
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
            if node.module == "scope_trio.rtc":
                names = {alias.name for alias in node.names}
                problems += [f"imports rtc.{name}" for name in sorted(names - public)]
        for module in modules:
            if module.split(".")[0] in ASYNCIO_SIDE or module.startswith("scope_trio.rtc."):
                problems.append(f"imports {module}")
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "rtc"
            and node.attr not in public
        ):
            problems.append(f"uses rtc.{node.attr} (line {node.lineno})")
    return problems


def test_the_asyncio_boundary_is_hard(tmp_path: Path) -> None:
    """Outside ``scope_trio/rtc/`` no production module imports aiortc, aioice or
    trio-asyncio, or uses anything of ``rtc`` but its trio-facing API."""
    package = Path(rtc.__file__).parent.parent
    found = {}
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative.startswith("rtc/") or relative in BOUNDARY_EXEMPT:
            continue
        problems = _boundary_problems(path)
        if problems:
            found[relative] = problems
    assert found == {}
    # The check itself can fail: the old media session drove aiortc objects directly.
    old_media = "from aiortc import RTCPeerConnection\nfrom scope_trio import rtc\nrtc.aio\n"
    probe = tmp_path / "old_media.py"
    probe.write_text(old_media, encoding="utf-8")
    assert _boundary_problems(probe) == ["imports aiortc", "uses rtc.aio (line 3)"]


async def test_an_unawaited_aiortc_error_is_logged_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiortc leaves some tasks unawaited; one that fails must not end the trio run."""
    import asyncio
    import gc

    async with rtc.open_loop():

        async def fail() -> None:
            raise InvalidStateError("RTCIceTransport is closed")

        async def fire_and_forget() -> None:
            asyncio.ensure_future(fail())  # noqa: RUF006 - exactly what aiortc does
            await asyncio.sleep(0.01)

        with caplog.at_level("WARNING", logger="scope_trio.rtc"):
            await aio(fire_and_forget)
            gc.collect()  # "Task exception was never retrieved" is reported on collection
            await trio.sleep(0.05)
        assert any(
            "RTCIceTransport is closed" in r.getMessage()
            or (r.exc_info and "RTCIceTransport" in str(r.exc_info[1]))
            for r in caplog.records
        )


# --------------------------------------------------------------------------------------------
# The private aiortc/aioice reach-ins: verify()


def test_verify_passes_on_the_installed_versions() -> None:
    """Every reliance holds for the pinned aiortc/aioice of this Python (1.15/0.10 on 3.10,
    1.16/0.13 on 3.11+): the server would refuse to start otherwise."""
    internals.verify()
    assert len(internals.RELIANCES) >= 8


def _verify_problems() -> str:
    with pytest.raises(internals.AiortcInternalsChanged) as caught:
        internals.verify()
    return str(caught.value)


def test_verify_names_a_missing_private_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(RTCPeerConnection, "_RTCPeerConnection__connect")
    message = _verify_problems()
    assert "RTCPeerConnection has no attribute '_RTCPeerConnection__connect'" in message
    assert "aiortc " in message  # the installed version is named
    assert message.count("\n- ") == 1, "only what changed is reported"


def test_verify_names_a_changed_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    async def send_rtcp_pli(self: object, ssrc: int, count: int) -> None: ...

    monkeypatch.setattr(RTCRtpReceiver, "_send_rtcp_pli", send_rtcp_pli)
    message = _verify_problems()
    assert "RTCRtpReceiver._send_rtcp_pli signature changed" in message
    assert "expected (self, media_ssrc), found (self, ssrc, count)" in message


def test_verify_names_an_instance_attribute_no_longer_assigned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attributes set in ``__init__`` are checked in its source: a renamed one is named."""

    def init(self: object, *args: object, **kwargs: object) -> None:
        self._connection_protocols = []  # type: ignore[attr-defined]  # renamed

    monkeypatch.setattr(aioice.ice.Connection, "__init__", init)
    monkeypatch.delattr(aioice.ice, "CONSENT_FAILURES")
    message = _verify_problems()
    assert "Connection.__init__ no longer contains 'self._protocols'" in message
    assert "Connection.__init__ no longer contains 'self._query_consent_task'" in message
    assert "aioice.ice has no attribute 'CONSENT_FAILURES'" in message


async def test_a_reach_in_fails_loudly_instead_of_doing_nothing(
    aio_loop: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No silent no-op: a reach-in whose private part is gone raises, naming it."""
    assert isinstance(aio_loop, asyncio.AbstractEventLoop)
    pc = raw.new_peer_connection([])
    try:
        with monkeypatch.context() as patch:
            patch.delattr(RTCPeerConnection, "_RTCPeerConnection__connect")
            with pytest.raises(internals.AiortcInternalsChanged, match="__connect"):
                internals.cancel_connect_tasks(pc, aio_loop)
    finally:
        assert await raw.close_peer_connection(pc)


async def test_no_loop_hosts_peer_connections_when_internals_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every loop runs the check once per process: an embedding that never calls
    configure_process still cannot create a peer connection without the fixes."""
    monkeypatch.delattr(RTCPeerConnection, "_RTCPeerConnection__connect")
    internals.verify_once.cache_clear()
    try:
        with pytest.raises(internals.AiortcInternalsChanged, match="__connect"):
            async with rtc.open_loop():
                pass  # pragma: no cover - the loop refuses before the body runs
    finally:
        internals.verify_once.cache_clear()


def test_configure_process_verifies_then_applies_consent(monkeypatch: pytest.MonkeyPatch) -> None:
    original = rtc.get_ice_consent()
    try:
        assert rtc.configure_process() == original
        assert rtc.get_ice_consent() == rtc.FAST_CONSENT
        assert rtc.configure_process(None) == rtc.FAST_CONSENT  # None: leave it
        assert rtc.get_ice_consent() == rtc.FAST_CONSENT
        rtc.configure_process(original)
        assert rtc.get_ice_consent() == original
        monkeypatch.setattr(RTCRtpSender, "__init__", lambda self: None)
        with pytest.raises(rtc.AiortcInternalsChanged, match="__rtp_task"):
            rtc.configure_process()
        assert rtc.get_ice_consent() == original, "nothing applied when verify fails"
    finally:
        rtc.tune_ice_consent(**dataclasses.asdict(original))


# --------------------------------------------------------------------------------------------
# The trio-facing PeerConnection


async def test_peer_connection_end_to_end(aio_loop: object) -> None:
    """Offer/answer, video both ways, a data channel both ways, states, keyframe request,
    track replacement and a shielded close-once, all without touching an aiortc object."""
    offerer = rtc.PeerConnection()
    answerer = rtc.PeerConnection()
    camera = rtc.TrioVideoSource(fps=30, width=64, height=64)
    reply = rtc.TrioVideoSource(fps=30, width=64, height=64)
    offerer.add_track(camera)
    channel = offerer.open_data_channel("parameters")
    try:
        with trio.fail_after(CONNECT_DEADLINE):
            offer = await offerer.create_offer()
            assert offer.type == "offer"
            assert offerer.local_description == offer
            answer = await answerer.answer(offer.sdp, send_tracks=[reply])
            assert answerer.sends(reply)
            assert answerer.remote_description == offer
            await offerer.apply_answer(answer.sdp, answer.type)
            assert await offerer.wait_state("connected") == "connected"
            assert await answerer.wait_state("connected") == "connected"
            remote_channel = await answerer.channels.receive()
            remote_camera = await answerer.tracks.receive()
            remote_reply = await offerer.tracks.receive()
            await channel.wait_open()
        assert (remote_channel.label, remote_camera.kind, remote_reply.kind) == (
            "parameters",
            "video",
            "video",
        )
        channel.send('{"n": 1}')
        with trio.fail_after(FRAME_DEADLINE):
            assert await remote_channel.messages.receive() == '{"n": 1}'
        remote_channel.send("back")
        with trio.fail_after(FRAME_DEADLINE):
            assert await channel.messages.receive() == "back"

        frames = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(remote_camera.receive_video, lambda _frame: frames.set())
            with trio.fail_after(FRAME_DEADLINE):
                await frames.wait()
            assert await remote_camera.request_keyframe()
            other = rtc.TrioVideoSource(fps=30, width=32, height=32)
            offerer.replace_track(camera, other)  # no renegotiation
            with pytest.raises(KeyError):
                offerer.replace_track(camera, other)
            nursery.cancel_scope.cancel()

        with trio.CancelScope() as scope:
            scope.cancel()
            assert await offerer.close()  # shielded: completes although cancelled
        assert offerer.closed_by_us
        assert offerer.state == "closed"
        with pytest.raises(rtc.ChannelClosedError):
            channel.send("late")
        with trio.fail_after(CONNECT_DEADLINE):  # the answerer sees the loss as a state
            assert await answerer.wait_state("closed") == "closed"
        assert not answerer.closed_by_us
        with pytest.raises(ConnectionError, match="closed"):
            await answerer.wait_state("connected")
    finally:
        assert await offerer.close()  # once: a second close only waits for the first
        assert await answerer.close()


async def test_peer_connection_refuses_bad_input(aio_loop: object) -> None:
    with pytest.raises(ValueError, match="ICE server"):
        rtc.PeerConnection([{"urls": 3}])
    async with rtc.PeerConnection() as pc:
        with pytest.raises(ValueError, match="SDP"):
            await pc.answer("garbage")
        with pytest.raises(rtc.InvalidCandidateError):
            rtc.parse_ice_candidate({"candidate": "candidate:garbage", "sdpMid": "0"})
    assert pc.state == "closed"
