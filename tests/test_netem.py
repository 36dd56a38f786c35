"""The network emulator (scope_trio.dev.netem) measured through itself.

Pure parts (the impairment model, the SDP rewrite) run without sockets or clocks, with a
statistical bound that a broken model cannot meet. The relay is then measured over real UDP
sockets on loopback: the bounds that involve time have a floor that only an applied delay can
reach and a generous ceiling. Last, real aiortc peers connect through it (directly, and
through the signaling proxy to a real dev cloud) and the counters show their media.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import socket
import statistics
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
import trio_websocket
from aiortc import RTCPeerConnection
from devcloud_client import fault, open_signaling, running_devcloud, start_media

from scope_trio import rtc
from scope_trio.dev.devcloud import ws_url
from scope_trio.dev.netem import (
    Addr,
    GilbertElliott,
    Impairment,
    Link,
    Netem,
    open_netem,
    relayable,
    rewrite,
    serve_signaling_proxy,
)
from scope_trio.dev.netem.__main__ import command, impairment
from scope_trio.rtc import raw, tracks

WAIT = 10.0

# ------------------------------------------------------------------ the impairment model


def _binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


def test_random_loss_rate_is_within_a_binomial_bound() -> None:
    link = Link(Impairment(loss=0.05), random.Random(1))
    n = 20_000
    lost = sum(link.admit(i * 0.001, 100) == "loss" for i in range(n))
    low, high = _binomial_bounds(n, 0.05)
    assert low <= lost <= high
    assert link.counters.dropped_loss == lost
    assert link.counters.datagrams_in == n


def _bursts(outcomes: list[bool]) -> list[int]:
    runs, current = [], 0
    for lost in outcomes:
        if lost:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def test_gilbert_elliott_loses_the_rate_asked_in_bursts_of_the_length_asked() -> None:
    chain = GilbertElliott.from_rate(0.02, mean_burst=4)
    assert chain.mean_loss == pytest.approx(0.02)
    bursty = Link(Impairment(burst=chain), random.Random(2))
    flat = Link(Impairment(loss=0.02), random.Random(3))
    n = 200_000
    bursty_lost = [bursty.admit(0.0, 1) == "burst" for _ in range(n)]
    flat_lost = [flat.admit(0.0, 1) == "loss" for _ in range(n)]
    assert sum(bursty_lost) / n == pytest.approx(0.02, rel=0.2)
    assert statistics.mean(_bursts(bursty_lost)) == pytest.approx(4.0, rel=0.15)
    # The same rate without the chain comes in bursts of ~1: the chain is what makes bursts.
    assert statistics.mean(_bursts(flat_lost)) < 1.1


def test_jitter_gives_each_datagram_its_own_delay_so_later_ones_overtake() -> None:
    def releases(reorder: bool) -> list[float]:
        link = Link(Impairment(delay=0.05, jitter=0.02, reorder=reorder), random.Random(4))
        out = []
        for i in range(500):
            decision = link.admit(i * 0.002, 1)
            assert not isinstance(decision, str)
            out.append(decision[1])
        return out

    jittered = releases(True)
    overtaken = sum(b < a for a, b in itertools.pairwise(jittered))
    assert overtaken > 50
    arrivals = [i * 0.002 for i in range(500)]
    delays = [r - a for r, a in zip(jittered, arrivals, strict=True)]
    assert min(delays) >= 0.03 - 1e-9
    assert max(delays) <= 0.07 + 1e-9
    in_order = releases(False)
    assert in_order == sorted(in_order)


def test_blackout_drops_everything_until_it_ends() -> None:
    link = Link(Impairment(), random.Random(5))
    link.blackout_until = 1.0
    assert link.admit(0.5, 1) == "blackout"
    assert not isinstance(link.admit(1.0, 1), str)
    assert link.counters.snapshot()["dropped"] == 1


# ------------------------------------------------------------------ SDP rewriting

OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "m=video 48639 UDP/TLS/RTP/SAVPF 97",
        "c=IN IP4 192.0.2.2",
        "a=mid:0",
        "a=candidate:a1 1 udp 2130706431 192.0.2.2 48639 typ host",
        "a=candidate:a2 1 udp 2130706431 fd00::2 59725 typ host",
        "a=candidate:a3 1 udp 1694498815 203.0.113.9 40000 typ srflx raddr 192.0.2.2 rport 48639"
        " generation 0",
        "a=candidate:a4 1 tcp 1518280447 192.0.2.2 9 typ host tcptype active",
        "a=candidate:a5 1 udp 2130706431 3f1c2b.local 50000 typ host",
        "a=end-of-candidates",
        "m=application 55664 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 192.0.2.2",
        "a=mid:1",
        "a=candidate:b1 1 udp 2130706431 192.0.2.2 55664 typ host",
        "a=end-of-candidates",
        "",
    ]
)


def test_an_sdp_with_direct_candidates_becomes_relay_only() -> None:
    endpoints = relayable(OFFER)
    assert endpoints == [
        Addr("192.0.2.2", 48639),
        Addr("203.0.113.9", 40000),
        Addr("192.0.2.2", 55664),
    ]
    mapping = {e: Addr("127.0.0.1", 20000 + i) for i, e in enumerate(endpoints)}
    out = rewrite(OFFER, mapping)
    candidates = [line for line in out.split("\r\n") if line.startswith("a=candidate:")]
    assert candidates == [
        "a=candidate:a1 1 udp 2130706431 127.0.0.1 20000 typ host",
        "a=candidate:a3 1 udp 1694498815 127.0.0.1 20001 typ host generation 0",
        "a=candidate:b1 1 udp 2130706431 127.0.0.1 20002 typ host",
    ]
    for real in ("192.0.2.2", "203.0.113.9", "fd00::2", ".local", "48639", "55664"):
        assert real not in out
    assert "m=video 20000 " in out
    assert "m=application 20002 " in out
    assert out.endswith("\r\n")
    # An endpoint the mapping lacks is removed, never passed through.
    assert "a=candidate" not in rewrite(OFFER, {})


# ------------------------------------------------------------------ the relay, real sockets


@dataclass
class Peer:
    """A UDP socket of one side; keeps (sequence number, sent at, received at) of arrivals."""

    sock: trio.socket.SocketType
    addr: Addr
    got: list[tuple[int, float, float]] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)

    async def receive(self) -> None:
        while True:
            data, _ = await self.sock.recvfrom(2048)
            seq, sent = struct.unpack("!Id", data[:12])
            self.got.append((seq, sent, trio.current_time()))
            self.arrived.set()
            self.arrived = trio.Event()

    async def send(self, to: Addr, seq: int, size: int = 200) -> None:
        payload = struct.pack("!Id", seq, trio.current_time())
        await self.sock.sendto(payload.ljust(size, b"\0"), to)

    async def wait_for(self, count: int, timeout: float = WAIT) -> None:  # noqa: ASYNC109
        with trio.fail_after(timeout):
            while len(self.got) < count:
                await self.arrived.wait()


@dataclass
class Path:
    netem: Netem
    server: Peer
    cloud: Peer
    to_cloud: Addr
    """Where the server sends to reach the cloud (the cloud's mirror)."""
    to_server: Addr


async def _peer(nursery: trio.Nursery) -> Peer:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    peer = Peer(sock, Addr(*sock.getsockname()[:2]))
    nursery.start_soon(peer.receive)
    return peer


@asynccontextmanager
async def udp_path(**netem: Any) -> AsyncIterator[Path]:
    """A server socket and a cloud socket that know each other only through the relay."""
    async with open_netem(seed=7, **netem) as emulator, trio.open_nursery() as nursery:
        server, cloud = await _peer(nursery), await _peer(nursery)
        session = await emulator.open_session()
        to_server = await session.add_endpoint(server.addr, "server")
        to_cloud = await session.add_endpoint(cloud.addr, "cloud")
        assert {to_server, to_cloud}.isdisjoint({server.addr, cloud.addr})
        try:
            yield Path(emulator, server, cloud, to_cloud, to_server)
        finally:
            nursery.cancel_scope.cancel()
            server.sock.close()
            cloud.sock.close()


async def _send_spaced(peer: Peer, to: Addr, count: int, spacing: float, first: int = 0) -> None:
    for seq in range(first, first + count):
        await peer.send(to, seq)
        await trio.sleep(spacing)


async def test_added_delay_is_measured_through_the_relay_per_direction() -> None:
    async with udp_path(up=Impairment(delay=0.12)) as path:
        await _send_spaced(path.server, path.to_cloud, 10, 0.005)
        await _send_spaced(path.cloud, path.to_server, 10, 0.005)
        await path.cloud.wait_for(10)
        await path.server.wait_for(10)
        up = [received - sent for _, sent, received in path.cloud.got]
        down = [received - sent for _, sent, received in path.server.got]
        # The floor cannot be reached without the delay; the ceiling is generous (load).
        assert min(up) >= 0.12
        assert statistics.median(up) < 0.12 + 0.25
        assert statistics.median(down) < 0.12  # the other direction is not delayed
        snap = path.netem.snapshot()
        assert snap["up"]["forwarded"] == 10
        assert snap["down"]["forwarded"] == 10
        assert snap["up"]["dropped"] == snap["down"]["dropped"] == 0


async def test_loss_rate_over_many_datagrams_is_within_a_statistical_bound() -> None:
    n, p = 600, 0.2
    async with udp_path(up=Impairment(loss=p)) as path:
        await _send_spaced(path.server, path.to_cloud, n, 0)
        await _settled(path.netem, n)
        counters = path.netem.links["up"].counters
        await path.cloud.wait_for(counters.forwarded)
        assert counters.datagrams_in == n
        low, high = _binomial_bounds(n, p)
        assert low <= counters.dropped_loss <= high
        assert len(path.cloud.got) == counters.forwarded == n - counters.dropped_loss
        lost = set(range(n)) - {seq for seq, _, _ in path.cloud.got}
        assert len(lost) == counters.dropped_loss


async def test_jitter_reorders_and_the_counter_agrees_with_the_receiver() -> None:
    n = 200
    async with udp_path(up=Impairment(delay=0.03, jitter=0.025)) as path:
        await _send_spaced(path.server, path.to_cloud, n, 0.001)
        await path.cloud.wait_for(n)
        order = [seq for seq, _, _ in path.cloud.got]
        assert sorted(order) == list(range(n))
        late, highest = 0, -1
        for seq in order:
            if seq < highest:
                late += 1
            highest = max(highest, seq)
        assert late > 0
        assert path.netem.links["up"].counters.reordered == late


async def test_blackout_both_ways_then_one_way_then_restore() -> None:
    async with udp_path() as path:
        path.netem.blackout()
        await _send_spaced(path.server, path.to_cloud, 5, 0)
        await _send_spaced(path.cloud, path.to_server, 5, 0)
        snap = await _settled(path.netem, 10)
        assert snap["up"]["dropped_blackout"] == snap["down"]["dropped_blackout"] == 5
        path.netem.restore()
        path.netem.blackout("up")  # server -> cloud dead, cloud -> server alive
        await _send_spaced(path.server, path.to_cloud, 5, 0, first=5)
        await _send_spaced(path.cloud, path.to_server, 5, 0, first=5)
        await path.server.wait_for(5)
        snap = await _settled(path.netem, 20)
        assert snap["up"]["dropped_blackout"] == 10
        assert snap["down"]["forwarded"] == 5
        assert path.cloud.got == []
        path.netem.restore()
        await _send_spaced(path.server, path.to_cloud, 1, 0, first=10)
        await path.cloud.wait_for(1)
        assert path.cloud.got[0][0] == 10


async def _settled(netem: Netem, arrived: int, queued: int = 0) -> dict[str, Any]:
    """The snapshot once ``arrived`` datagrams have been counted in and none waits (with
    ``max_queued`` reached, once the queue holds ``queued``)."""
    with trio.fail_after(WAIT):
        while True:
            snap = netem.snapshot()
            total = snap["up"]["datagrams_in"] + snap["down"]["datagrams_in"]
            decided = sum(snap[d]["forwarded"] + snap[d]["dropped"] for d in ("up", "down"))
            if total >= arrived and snap["queued"] == queued and decided + queued == total:
                return snap
            await trio.sleep(0.001)


async def test_a_blip_ends_and_datagrams_flow_again() -> None:
    async with udp_path() as path:
        ends = path.netem.blip(150)
        seq = 0
        with trio.fail_after(WAIT):
            while not any(sent >= ends for _, sent, _ in path.cloud.got):
                await path.server.send(path.to_cloud, seq)
                seq += 1
                await trio.sleep(0.005)
        counters = path.netem.links["up"].counters
        assert counters.dropped_blackout > 0
        # Nothing sent during the blip arrived; what came through was sent after it.
        assert all(sent >= ends - 0.15 - 0.01 for _, sent, _ in path.cloud.got)
        assert min(received for _, _, received in path.cloud.got) >= ends


async def test_a_blackout_of_existing_sessions_spares_a_new_one() -> None:
    async with udp_path() as path, trio.open_nursery() as nursery:
        path.netem.blackout(scope="existing")
        await _send_spaced(path.server, path.to_cloud, 3, 0)
        server2, cloud2 = await _peer(nursery), await _peer(nursery)
        fresh = await path.netem.open_session()
        await fresh.add_endpoint(server2.addr, "server")
        to_cloud2 = await fresh.add_endpoint(cloud2.addr, "cloud")
        await _send_spaced(server2, to_cloud2, 3, 0)
        await cloud2.wait_for(3)
        assert path.cloud.got == []
        assert path.netem.links["up"].counters.dropped_blackout == 3
        nursery.cancel_scope.cancel()
        for peer in (server2, cloud2):
            peer.sock.close()


async def test_a_datagram_sent_before_its_sdp_was_seen_is_held_not_dropped() -> None:
    """An answerer's first ICE check leaves before the proxy has seen its answer: the relay
    holds it until that answer names its source, as a real network would just deliver it."""
    async with (
        open_netem(seed=7, up=Impairment(delay=0.05)) as emulator,
        trio.open_nursery() as nursery,
    ):
        server, cloud, stranger = [await _peer(nursery) for _ in range(3)]
        session = await emulator.open_session()
        to_server = await session.add_endpoint(server.addr, "server")  # the offer
        await cloud.send(to_server, 1)  # from an address no SDP has named yet
        await stranger.send(to_server, 2)  # one that will never be named
        await trio.sleep(0.2)
        assert server.got == []
        await session.add_endpoint(cloud.addr, "cloud")  # the answer passes the proxy
        await server.wait_for(1)
        assert [seq for seq, _, _ in server.got] == [1]
        with trio.move_on_after(1.2):  # the hold bound (1 s) passes for the stranger
            await server.wait_for(2, timeout=math.inf)
        await session.add_endpoint(stranger.addr, "cloud")  # too late: dropped
        assert [seq for seq, _, _ in server.got] == [1]
        assert emulator.snapshot()["unknown_source"] == 1
        nursery.cancel_scope.cancel()
        for peer in (server, cloud, stranger):
            peer.sock.close()


async def test_the_queue_is_bounded_and_sessions_retire() -> None:
    async with udp_path(up=Impairment(delay=5.0), max_queued=10, max_sessions=2) as path:
        await _send_spaced(path.server, path.to_cloud, 30, 0)
        snap = await _settled(path.netem, 30, queued=10)
        assert snap["queued"] == 10
        assert snap["up"]["dropped_overflow"] == 20
        first = path.netem.sessions[0]
        await path.netem.open_session()
        await path.netem.open_session()  # a third: the oldest retires, its sockets close
        with trio.fail_after(WAIT):
            await first.closed.wait()
        assert first not in path.netem.sessions
        assert all(ep.sock.fileno() == -1 for ep in first.endpoints)


# ------------------------------------------------------------------ real aiortc peers


def _remote_of_selected_pair(pc: RTCPeerConnection) -> Addr:
    """The remote address ICE nominated (aioice internals, test-only)."""
    transport = pc.getTransceivers()[0].receiver.transport.transport
    pair = next(iter(transport._connection._nominated.values()))
    return Addr(pair.remote_candidate.host, pair.remote_candidate.port)


async def test_real_aiortc_peers_connect_only_through_the_relay(aio_loop: object) -> None:
    async with open_netem(seed=1, up=Impairment(delay=0.01)) as netem:
        offerer, answerer = raw.new_peer_connection([]), raw.new_peer_connection([])
        try:
            source = rtc.TrioVideoSource(fps=30)
            offerer.addTrack(source)
            events = raw.PeerEvents(answerer)
            session = await netem.open_session()
            offer = await raw.create_offer(offerer)
            seen_offer = await session.rewrite_offer(offer.sdp)
            answer = await raw.answer_offer(answerer, seen_offer)
            seen_answer = await session.rewrite_answer(answer.sdp)
            await raw.apply_answer(offerer, seen_answer)
            mirrors = {ep.mirror for ep in session.endpoints}
            assert set(relayable(seen_offer)) | set(relayable(seen_answer)) <= mirrors
            frames = 0
            got = trio.Event()

            def on_frame(frame: object) -> None:
                nonlocal frames
                frames += 1
                if frames >= 10:
                    got.set()

            async with trio.open_nursery() as nursery:
                with trio.fail_after(WAIT):
                    track = await events.tracks.receive()
                nursery.start_soon(tracks.receive_video, track, on_frame)
                with trio.fail_after(WAIT):
                    await got.wait()
                nursery.cancel_scope.cancel()
            assert _remote_of_selected_pair(offerer) in mirrors
            assert _remote_of_selected_pair(answerer) in mirrors
            snap = netem.snapshot()
            assert snap["up"]["forwarded"] > 10  # video, STUN, DTLS
            assert snap["down"]["forwarded"] > 0  # STUN, DTLS, RTCP
            assert snap["unknown_source"] == 0
        finally:
            await raw.close_peer_connection(offerer)
            await raw.close_peer_connection(answerer)


async def test_the_signaling_proxy_forces_a_dev_cloud_session_through_the_relay(
    aio_loop: object,
) -> None:
    async with (
        running_devcloud(pipeline="passthrough") as cloud_url,
        open_netem(seed=2) as netem,
        trio.open_nursery() as nursery,
    ):
        proxy_url = await nursery.start(partial(serve_signaling_proxy, netem, ws_url(cloud_url)))
        async with open_signaling(proxy_url) as signaling, trio.open_nursery() as media:
            client = await start_media(signaling, media)
            try:
                with trio.fail_after(WAIT):
                    for _ in range(10):
                        await client.next_frame()
                remote = client.pc.remoteDescription.sdp
                (session,) = netem.sessions
                mirrors = {ep.mirror for ep in session.endpoints}
                assert relayable(remote)
                assert set(relayable(remote)) <= mirrors
                assert _remote_of_selected_pair(client.pc) in mirrors
                snap = netem.snapshot()
                assert snap["up"]["forwarded"] > 10
                assert snap["down"]["forwarded"] > 10
                # Everything goes through the relay: a blackout stops the frames.
                netem.blackout()
                client.drain()
                with trio.move_on_after(1.0):
                    await client.next_frame()  # at most one already in aiortc's pipeline
                    await client.next_frame()
                    pytest.fail("frames kept arriving through a blacked-out relay")
            finally:
                media.cancel_scope.cancel()
                await raw.close_peer_connection(client.pc)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ the command line


async def test_the_command_line_controls_change_the_emulator() -> None:
    assert impairment(["delay=50", "jitter=20", "loss=1", "burst=2/4"]) == Impairment(
        delay=0.05, jitter=0.02, loss=0.01, burst=GilbertElliott.from_rate(0.02, 4)
    )
    with pytest.raises(ValueError, match="unknown setting"):
        impairment(["bandwidth=1"])
    async with open_netem() as netem:
        assert command(netem, "set up delay=80 loss=2")["ok"]
        assert netem.links["up"].impairment == Impairment(delay=0.08, loss=0.02)
        assert netem.links["down"].impairment == Impairment()
        command(netem, "blackout down")
        assert netem.snapshot()["blackout"] == {"up": False, "down": True}
        command(netem, "restore")
        command(netem, "blip 500")
        assert netem.snapshot()["blackout"] == {"up": True, "down": True}
        assert command(netem, "stats")["up"]["datagrams_in"] == 0
        with pytest.raises(ValueError, match="unknown command"):
            command(netem, "explode")


async def test_the_emulator_runs_as_a_process_and_answers_on_stdin() -> None:
    script = b"set both delay=10\nstats\n"
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "scope_trio.dev.netem",
            "--upstream",
            "ws://127.0.0.1:9/ws",
            "--exit-on-eof",
        ],
        stdin=script,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0, result.stderr.decode()
    assert lines[0].startswith("netem: signaling proxy on ws://127.0.0.1:")
    assert json.loads(lines[1]) == {"ok": True, "set": "both"}
    stats = json.loads(lines[2])
    assert stats["impairment"]["up"]["delay"] == stats["impairment"]["down"]["delay"] == 0.01


async def test_the_proxy_passes_the_clouds_close_code_and_reason_on(aio_loop: object) -> None:
    async with (
        running_devcloud() as cloud_url,
        open_netem() as netem,
        trio.open_nursery() as nursery,
    ):
        proxy_url = await nursery.start(partial(serve_signaling_proxy, netem, ws_url(cloud_url)))
        async with open_signaling(proxy_url) as signaling:
            pong = await signaling.request("ping")
            assert pong["type"] == "pong"
            await fault(cloud_url, "close_ws", code=4001, reason="max duration")
            with trio.fail_after(WAIT), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await signaling.receive()
            assert closed.value.reason.code == 4001
            assert closed.value.reason.reason == "max duration"
        nursery.cancel_scope.cancel()


async def test_an_upstream_that_fails_closes_one_connection_not_the_proxy(
    aio_loop: object,
) -> None:
    async with running_devcloud() as cloud_url, open_netem() as netem:
        for upstream in ("ws://127.0.0.1:9/ws", cloud_url.replace("http", "ws") + "/nowhere"):
            async with trio.open_nursery() as nursery:
                proxy_url = await nursery.start(partial(serve_signaling_proxy, netem, upstream))
                for _ in range(2):  # the proxy survives the first failure
                    async with open_signaling(proxy_url, expect_ready=False) as signaling:
                        with (
                            trio.fail_after(WAIT),
                            pytest.raises(trio_websocket.ConnectionClosed) as closed,
                        ):
                            await signaling.receive()
                        assert closed.value.reason.code == 1011
                nursery.cancel_scope.cancel()


async def test_a_mirror_binds_loopback_for_an_address_not_of_this_host() -> None:
    async with open_netem() as netem:
        session = await netem.open_session()
        mirror = await session.add_endpoint(Addr("203.0.113.9", 40000), "server")
        assert mirror.host == "127.0.0.1"
        assert mirror.port > 0
