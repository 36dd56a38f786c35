"""The receive buffer, packet by packet: release on completion, loss, reordering, wrap-around."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

import trio
from av import VideoFrame

from scope_trio import rtc
from scope_trio.dev.netem import Impairment, open_netem
from scope_trio.rtc import _aiortc_internals as internals
from scope_trio.rtc import raw, tracks
from scope_trio.rtc.receiver import (
    FrameBuffer,
    h264_is_keyframe,
    h264_starts_nal,
    vp8_is_keyframe,
    vp8_starts_frame,
)

STEP = 3000  # 90 kHz at 30 fps
WAIT = 10.0


@dataclass
class Pkt:
    seq: int
    ts: int
    marker: bool
    data: bytes
    start: bool


def frames(
    count: int, *, packets: int = 3, seq0: int = 0, ts0: int = 0, keys: tuple[int, ...] = (0,)
) -> list[list[Pkt]]:
    """``count`` frames of ``packets`` packets; frame k is a keyframe if k in ``keys``. The
    data of each packet is (frame number, packet number), key frames start with 0x00."""
    out = []
    seq = seq0
    for k in range(count):
        frame = []
        for p in range(packets):
            tag = (0x00 if k in keys else 0x01) if p == 0 else 0xFF
            data = bytes([tag, k & 0xFF, p])
            ts = (ts0 + k * STEP) & 0xFFFFFFFF
            frame.append(Pkt(seq & 0xFFFF, ts, p == packets - 1, data, p == 0))
            seq += 1
        out.append(frame)
    return out


def feed(buf: FrameBuffer, pkt: Pkt, now: float = 0.0, *, marker: bool | None = None) -> list[int]:
    buf.add(
        pkt.seq, pkt.ts, pkt.marker if marker is None else marker, pkt.data, now, start=pkt.start
    )
    return [f.data[1] for f in buf.ready()]


def test_a_frame_is_released_by_its_marker_packet_not_by_the_next_frame() -> None:
    buf = FrameBuffer()
    stream = frames(3)
    assert feed(buf, stream[0][0]) == []
    assert feed(buf, stream[0][1]) == []
    assert feed(buf, stream[0][2]) == [0]  # complete: out at once
    out = [n for pkt in stream[1] + stream[2] for n in feed(buf, pkt)]
    assert out == [1, 2]
    assert buf.frames_released == 3
    assert buf.frames_dropped == 0


def test_released_data_is_the_packets_in_sequence_order_even_when_reordered() -> None:
    buf = FrameBuffer()
    stream = frames(2)
    buf.add(stream[0][2].seq, stream[0][2].ts, True, stream[0][2].data, 0.0)
    buf.add(stream[0][0].seq, stream[0][0].ts, False, stream[0][0].data, 0.0, start=True)
    assert buf.ready() == []
    buf.add(stream[0][1].seq, stream[0][1].ts, False, stream[0][1].data, 0.0)
    (frame,) = buf.ready()
    assert frame.data == b"".join(p.data for p in stream[0])
    assert frame.timestamp == stream[0][0].ts
    assert frame.keyframe


def test_duplicates_are_ignored() -> None:
    buf = FrameBuffer()
    stream = frames(2)
    out = []
    for pkt in stream[0] + stream[0] + stream[1] + [stream[1][1]]:
        out += feed(buf, pkt)
    assert out == [0, 1]


def test_a_hole_is_nacked_again_on_a_timer_and_its_fill_releases_the_backlog_at_once() -> None:
    buf = FrameBuffer(nack_interval=0.05, give_up=0.5)
    stream = frames(5)
    lost = stream[1][1]
    out: list[int] = []
    t = 0.0
    for frame in stream:
        for pkt in frame:
            t += 0.005
            if pkt is not lost:
                out += feed(buf, pkt, t)
    assert out == [0]  # frames 1-4 wait behind the hole
    assert buf.holes == [lost.seq]
    assert buf.actions(t).nack == []  # aiortc NACKed the new gap when it appeared
    assert buf.actions(t + 0.06).nack == [lost.seq]  # the first NACK went unanswered
    assert buf.actions(t + 0.08).nack == []
    assert buf.actions(t + 0.12).nack == [lost.seq]
    assert feed(buf, lost, t + 0.13) == [1, 2, 3, 4]  # all at once: no backlog
    assert buf.holes == []
    assert buf.next_deadline() is None


def test_a_lost_marker_packet_holds_its_frame_until_retransmitted() -> None:
    buf = FrameBuffer()
    stream = frames(3)
    marker = stream[0][2]
    out = feed(buf, stream[0][0]) + feed(buf, stream[0][1])
    out += [n for pkt in stream[1] for n in feed(buf, pkt, 0.01)]
    assert out == []  # frame 0's end is missing, frame 1 waits behind it
    assert buf.holes == [marker.seq]
    assert feed(buf, marker, 0.02) == [0, 1]


def test_an_unfillable_hole_drops_its_frames_requests_a_keyframe_and_skips_to_it() -> None:
    buf = FrameBuffer(nack_interval=0.05, give_up=0.3, pli_interval=0.2)
    stream = frames(8, keys=(0, 6))
    lost = stream[2][2]  # a marker packet that never comes
    out: list[int] = []
    t = 0.0
    for frame in stream[:5]:
        t += 0.033
        for pkt in frame:
            if pkt is not lost:
                out += feed(buf, pkt, t)
    assert out == [0, 1]
    assert buf.actions(0.132 + 0.29).pli is False  # the hole appeared at 0.132
    actions = buf.actions(0.132 + 0.31)  # now it is older than give_up
    assert actions.pli
    assert buf.waiting_for_keyframe
    assert buf.ready() == []  # frames 3 and 4 are not decodable without frame 2
    assert buf.frames_dropped == 3
    assert buf.actions(0.55).pli is False  # not again before pli_interval
    assert buf.actions(0.65).pli is True  # still no keyframe: ask again
    out = [n for pkt in stream[5] for n in feed(buf, pkt, 0.66)]
    assert out == []  # a delta frame while waiting: dropped
    out = [n for frame in stream[6:] for pkt in frame for n in feed(buf, pkt, 0.7)]
    assert out == [6, 7]
    assert not buf.waiting_for_keyframe
    assert buf.actions(1.0).pli is False
    assert buf.actions(1.0).nack == []


def test_a_complete_keyframe_behind_a_hole_is_skipped_to_at_once() -> None:
    buf = FrameBuffer(give_up=10.0)
    stream = frames(4, keys=(0, 2))
    out: list[int] = []
    for frame in stream:
        for pkt in frame:
            if pkt is not stream[1][0]:
                out += feed(buf, pkt)
    assert out == [0, 2, 3]  # frame 1 skipped without waiting for give_up
    assert buf.frames_dropped == 1
    assert buf.holes == []


def test_sequence_numbers_and_timestamps_wrap() -> None:
    buf = FrameBuffer()
    stream = frames(6, seq0=65530, ts0=0xFFFFFFFF - 2 * STEP)
    lost = stream[2][1]  # around the sequence wrap
    out: list[int] = []
    for frame in stream:
        for pkt in frame:
            if pkt is not lost:
                out += feed(buf, pkt)
    assert out == [0, 1]
    assert buf.holes == [lost.seq]
    assert feed(buf, lost) == [2, 3, 4, 5]
    assert [p.seq for p in stream[2]] == [65536 - 65536 + 0, 1, 2]


def test_a_late_packet_of_a_released_or_dropped_frame_is_ignored() -> None:
    buf = FrameBuffer(give_up=0.1)
    stream = frames(4, keys=(0, 3))
    lost = stream[1][1]
    for frame in stream[:3]:
        for pkt in frame:
            if pkt is not lost:
                feed(buf, pkt)
    buf.actions(0.2)  # give up frame 1 (and 2 behind it)
    assert feed(buf, lost, 0.25) == []
    assert [n for pkt in stream[3] for n in feed(buf, pkt, 0.3)] == [3]


def test_a_sender_that_does_not_mark_is_released_when_the_next_frame_begins() -> None:
    buf = FrameBuffer()
    stream = frames(3)
    out = [n for frame in stream for pkt in frame for n in feed(buf, pkt, marker=False)]
    assert out == [0, 1]


def test_the_first_frame_must_be_a_keyframe() -> None:
    buf = FrameBuffer()
    stream = frames(4, keys=(2,))
    out = [n for frame in stream[:2] for pkt in frame for n in feed(buf, pkt)]
    assert out == []
    assert buf.actions(0.0).pli
    out = [n for frame in stream[2:] for pkt in frame for n in feed(buf, pkt)]
    assert out == [2, 3]


def test_a_restarted_stream_starts_over_at_its_keyframe() -> None:
    buf = FrameBuffer()
    old = frames(2)
    new = frames(2, seq0=30000, ts0=5)
    out = [n for frame in old + new for pkt in frame for n in feed(buf, pkt)]
    assert out == [0, 1, 0, 1]


def test_codec_flags() -> None:
    assert vp8_starts_frame(bytes([0x10, 0]))
    assert not vp8_starts_frame(bytes([0x00, 0]))
    assert not vp8_starts_frame(bytes([0x11, 0]))  # S with partition 1
    assert vp8_is_keyframe(b"\x00")
    assert not vp8_is_keyframe(b"\x01")
    assert h264_is_keyframe(b"\x00\x00\x01\x67" + b"\x00\x00\x01\x65")
    assert not h264_is_keyframe(b"\x00\x00\x01\x41")
    assert h264_starts_nal(bytes([0x7C, 0x85]))
    assert not h264_starts_nal(bytes([0x7C, 0x05]))
    assert h264_starts_nal(bytes([0x41]))


# ------------------------------------------------------------------ the real stack


def _moving_frame(n: int, size: int = 64) -> VideoFrame:
    """A small frame (one RTP packet) that changes every time, so every frame is coded."""
    frame = VideoFrame(width=size, height=size, format="yuv420p")
    luma = bytes((x + 3 * n) & 0xFF for x in range(frame.planes[0].buffer_size))
    frame.planes[0].update(luma)
    for plane in frame.planes[1:]:
        plane.update(bytes([128]) * plane.buffer_size)
    return frame


async def test_video_keeps_flowing_with_bounded_latency_through_loss_and_jitter(
    aio_loop: object,
) -> None:
    """5 % loss and ±10 ms jitter (reordering) each way, one-packet frames: the case where
    aiortc's own buffer builds a backlog it never drains (one frame out per packet in).
    Frames keep coming, no gap exceeds the buffer's give-up bound plus a keyframe's round
    trip, and the delay of the last frames is not above that of the first ones."""
    seconds, fps = 4.0, 30.0
    link = Impairment(delay=0.02, jitter=0.01, loss=0.05)
    async with open_netem(seed=7, up=link, down=link) as netem:
        offerer, answerer = raw.new_peer_connection([]), raw.new_peer_connection([])
        source = rtc.TrioVideoSource(fps=fps, idle_timeout=None, width=64, height=64)
        try:
            offerer.addTrack(source)
            events = raw.PeerEvents(answerer)
            session = await netem.open_session()
            offer = await raw.create_offer(offerer)
            answer = await raw.answer_offer(answerer, await session.rewrite_offer(offer.sdp))
            await raw.apply_answer(offerer, await session.rewrite_answer(answer.sdp))
            arrivals: list[tuple[float, float]] = []  # (arrival, sender's time of the frame)

            def on_frame(frame: VideoFrame) -> None:
                arrivals.append((trio.current_time(), float(frame.pts or 0) / 90_000))

            async def feed() -> None:
                for n in range(int(seconds * fps)):
                    source.push(_moving_frame(n))
                    await trio.sleep(1 / fps)

            async with trio.open_nursery() as nursery:
                with trio.fail_after(WAIT):
                    track = await events.tracks.receive()
                nursery.start_soon(tracks.receive_video, track, on_frame)
                with trio.fail_after(WAIT + seconds):
                    await feed()
                await trio.sleep(0.5)
                nursery.cancel_scope.cancel()
            (receiver,) = answerer.getReceivers()
            installed = internals.installed_frame_buffer(receiver)
            assert installed is not None
            assert installed.buffer is not None
            buffer = installed.buffer
            lost_up = netem.snapshot()["up"]["dropped_loss"]
        finally:
            source.stop()
            await raw.close_peer_connection(offerer)
            await raw.close_peer_connection(answerer)
    assert lost_up > 0  # the path really lost media packets
    # and the buffer dealt with it: holes filled by retransmissions, or given up
    assert buffer.typical_fill is not None or buffer.frames_dropped > 0
    assert len(arrivals) >= 0.6 * seconds * fps
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) < 1.5  # give_up (0.5 s) + PLI + keyframe, with room for a slow CI
    # Delay against the fastest frame (the clocks' offset cancels out): the last third's
    # median stays near it (aiortc's own buffer: +0.5 s here, a backlog that never drains).
    delays = [arrival - sent for arrival, sent in arrivals]
    tail = delays[-len(delays) // 3 :]
    assert statistics.median(tail) - min(delays) < 0.15


def test_an_outage_is_skipped_at_once_with_a_keyframe_request() -> None:
    """A gap of more than OUTAGE of media time (a blip): its packets are stale, so nothing
    is NACKed and a keyframe is asked for at once, not after give_up."""
    buf = FrameBuffer(give_up=10.0)
    stream = frames(20, keys=(0, 19))
    out = [n for pkt in stream[0] + stream[1] for n in feed(buf, pkt)]
    assert out == [0, 1]
    # Frames 2..11 (0.33 s) lost in an outage; frame 12 arrives.
    out = [n for pkt in stream[12] for n in feed(buf, pkt, 0.4)]
    assert out == []
    assert buf.holes == []  # nothing stale is asked for
    assert buf.actions(0.4).pli
    out = [n for frame in stream[13:] for pkt in frame for n in feed(buf, pkt, 0.5)]
    assert out == [19]


def test_the_give_up_bound_follows_the_round_trip_of_retransmissions() -> None:
    buf = FrameBuffer()
    assert buf.current_give_up == 0.5  # no round trip known yet
    assert buf.typical_fill is None
    stream = frames(12, packets=2)
    t = 0.0
    for k in range(0, 12, 3):  # a packet of every third frame comes back 0.3 s later
        lost = stream[k][1]
        for frame in stream[k : k + 3]:
            for pkt in frame:
                if pkt is not lost:
                    feed(buf, pkt, t)
        buf.add(lost.seq, lost.ts, True, lost.data, t + 0.3, retransmission=True)
        buf.ready()
        t += 0.4
    assert abs(buf.current_give_up - (2.5 * 0.3 + 0.1)) < 1e-6
    assert abs(buf.current_nack_interval - 1.2 * 0.3) < 1e-6
    assert buf.typical_fill is not None
    assert abs(buf.typical_fill - 0.3) < 1e-6
    # A reordered packet (not a retransmission) says nothing about the round trip.
    quick = FrameBuffer()
    a, b = frames(2, packets=2)
    feed(quick, a[0])
    feed(quick, a[1])
    feed(quick, b[1], 0.01)
    feed(quick, b[0], 0.02)
    assert quick.current_give_up == 0.5


def test_a_stream_with_a_large_first_timestamp_is_no_outage() -> None:
    buf = FrameBuffer()
    stream = frames(3, ts0=0x7000_0000)
    lost = stream[0][1]
    out = [n for frame in stream for pkt in frame if pkt is not lost for n in feed(buf, pkt)]
    assert out == []
    assert buf.holes == [lost.seq]
    assert feed(buf, lost) == [0, 1, 2]


async def test_every_video_receiver_of_a_peer_connection_gets_the_buffer(
    aio_loop: object,
) -> None:
    """Both sides of an ``rtc.PeerConnection`` pair (the offerer's sendrecv receiver too),
    installed when the remote description is applied, and frames decode through it."""
    async with rtc.PeerConnection() as offerer, rtc.PeerConnection() as answerer:
        source = rtc.TrioVideoSource(fps=30, width=64, height=64)
        reply = rtc.TrioVideoSource(fps=30, width=64, height=64)
        try:
            offerer.add_track(source)
            offer = await offerer.create_offer()
            answer = await answerer.answer(offer.sdp, send_tracks=[reply])
            await offerer.apply_answer(answer.sdp)
            for pc in (offerer, answerer):
                receivers = [t.receiver for t in pc._pc.getTransceivers() if t.kind == "video"]
                assert receivers
                assert all(internals.installed_frame_buffer(r) for r in receivers)
            got: list[VideoFrame] = []
            done = trio.Event()

            def on_frame(frame: VideoFrame) -> None:
                got.append(frame)
                if len(got) >= 5:
                    done.set()

            async with trio.open_nursery() as nursery:
                with trio.fail_after(WAIT):
                    track = await answerer.tracks.receive()
                nursery.start_soon(track.receive_video, on_frame)
                for n in range(200):
                    source.push(_moving_frame(n))
                    with trio.move_on_after(1 / 30):
                        await done.wait()
                    if done.is_set():
                        break
                nursery.cancel_scope.cancel()
            assert len(got) >= 5
            (receiver,) = [t.receiver for t in answerer._pc.getTransceivers()]
            installed = internals.installed_frame_buffer(receiver)
            assert installed is not None
            assert installed.buffer is not None
            assert installed.buffer.frames_released >= 5
        finally:
            source.stop()
            reply.stop()
