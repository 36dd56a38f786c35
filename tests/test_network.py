"""Issue 12's profiles, short: the real media path through the network emulator.

The supervisor drives real :class:`CloudMediaSession` peers over a real signaling link to a
real dev cloud, and every media datagram between them crosses :mod:`scope_trio.dev.netem`
(its signaling proxy rewrites the candidates, so no direct path exists). Each test checks a
recovery path by what it is (no session lost, the loss's kind, a rebuild that did not wait),
never by how fast it was: the timings are in ``benchmarks/network.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import httpx
import pytest
import trio
from av import VideoFrame
from devcloud_client import rgb_frame

from scope_trio import rtc
from scope_trio.cloud.link import LinkConfig, connect_cloud_link
from scope_trio.cloud.media import CloudMediaSession, MediaConfig, MediaStats, VideoInput
from scope_trio.core.events import AttemptStarted, Lost, SupervisorEvent
from scope_trio.core.session import LossKind
from scope_trio.core.supervisor import ReconnectPolicy, SessionSupervisor, SupervisorStatus
from scope_trio.dev.devcloud import DevCloudConfig, serve_devcloud, ws_url
from scope_trio.dev.netem import Impairment, Netem, open_netem, serve_signaling_proxy

pytestmark = pytest.mark.system

WIDTH, HEIGHT = 128, 96
RTT100 = Impairment(delay=0.05)
"""100 ms round trip, nothing lost: the path of the fault profiles."""


@dataclass
class Net:
    supervisor: SessionSupervisor
    netem: Netem
    stats: MediaStats
    cloud: httpx.AsyncClient
    frames: trio.MemoryReceiveChannel[VideoFrame]
    events: list[SupervisorEvent] = field(default_factory=list)

    async def until(
        self,
        predicate: Callable[[SupervisorStatus], bool],
        timeout: float = 20,  # noqa: ASYNC109
    ) -> SupervisorStatus:
        with trio.fail_after(timeout):
            return await self.supervisor.wait_until(predicate)

    async def frames_after(self, moment: float, count: int = 5) -> None:
        """Wait for ``count`` frames that arrive after ``moment`` (the stream is live)."""
        got = 0
        with trio.fail_after(15):
            while got < count:
                await self.frames.receive()
                if trio.current_time() >= moment:
                    got += 1

    def losses(self) -> list[LossKind]:
        return [e.loss.kind for e in self.events if isinstance(e, Lost)]


@asynccontextmanager
async def through_netem(
    path: Impairment, policy: ReconnectPolicy | None = None
) -> AsyncIterator[Net]:
    """A supervisor streaming through the emulator (``path`` both ways), connected and live."""
    saved = rtc.tune_ice_consent(**dataclasses.asdict(rtc.FAST_CONSENT))
    try:
        async with (
            rtc.open_loop(),
            open_netem(up=path, down=path, seed=12) as netem,
            trio.open_nursery() as outer,
        ):
            config = DevCloudConfig(pipeline="passthrough")
            cloud_url = await outer.start(partial(serve_devcloud, config))
            proxy = await outer.start(partial(serve_signaling_proxy, netem, ws_url(cloud_url)))
            async with (
                connect_cloud_link(LinkConfig(ws_url=proxy, request_timeout=10)) as link,
                httpx.AsyncClient(base_url=cloud_url) as cloud,
                trio.open_nursery() as nursery,
            ):
                video = VideoInput()
                stats = MediaStats()
                send, receive = trio.open_memory_channel[VideoFrame](math.inf)

                def factory() -> CloudMediaSession:
                    return CloudMediaSession(
                        link,
                        video_input=video,
                        on_frame=send.send_nowait,
                        config=MediaConfig(),
                        stats=stats,
                    )

                async def produce() -> None:
                    while True:
                        video.push(rgb_frame(WIDTH, HEIGHT, 255, 0))
                        await trio.sleep(1 / 30)

                nursery.start_soon(produce)
                supervisor = SessionSupervisor(nursery, factory, policy)
                net = Net(supervisor, netem, stats, cloud, receive)
                supervisor.subscribe(net.events.append)
                try:
                    await supervisor.start({})
                    await net.frames_after(trio.current_time())
                    yield net
                finally:
                    await supervisor.stop()
                    nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    finally:
        rtc.tune_ice_consent(saved.interval, saved.failures, saved.rto)


HEALTHY_SECONDS = 60.0


async def test_no_false_loss_in_a_minute_at_100_ms_rtt_with_jitter_and_1_percent_loss() -> None:
    lossy = Impairment(delay=0.05, jitter=0.02, loss=0.01)
    async with through_netem(lossy) as net:
        start = net.stats.frames_received_from_cloud
        with trio.move_on_after(HEALTHY_SECONDS):
            status = await net.until(lambda s: s.sessions_lost > 0, timeout=math.inf)
            pytest.fail(f"a healthy session was lost: {status.last_loss_reason}")
        status = net.supervisor.status
        assert (status.sessions_started, status.sessions_lost) == (1, 0)
        # frames kept coming the whole minute (30 fps sent; a third is plenty for "flowing")
        assert net.stats.frames_received_from_cloud - start >= HEALTHY_SECONDS * 10
        snap = net.netem.snapshot()
        assert snap["up"]["dropped_loss"] > 0
        assert snap["down"]["dropped_loss"] > 0


async def test_a_300_ms_blip_is_survived_in_place_and_a_keyframe_requested() -> None:
    async with through_netem(RTT100) as net:
        back = net.netem.blip(300)
        await net.frames_after(back)
        assert net.stats.path_returns >= 1, "the return of the path was seen"
        status = net.supervisor.status
        assert (status.sessions_started, status.sessions_lost) == (1, 0)
        assert net.losses() == []


async def test_a_rebuilt_sessions_pictures_reach_the_user_before_its_channel_opens() -> None:
    """At 100 ms RTT the parameters channel opens ~0.3 s after DTLS (SCTP's handshakes);
    the cloud's frames flow a round trip after DTLS and are delivered at once."""
    async with through_netem(RTT100) as net:
        response = await net.cloud.post("/control/faults", json={"action": "close_pc"})
        assert response.status_code == 200, response.text
        await net.until(lambda s: s.webrtc_reconnecting)
        while True:  # what the lost session delivered before it was lost
            try:
                net.frames.receive_nowait()
            except trio.WouldBlock:
                break
        with trio.fail_after(10):
            await net.frames.receive()  # the rebuilt session's first picture
        status = net.supervisor.status
        assert not status.webrtc_connected, "the channel opened before the first picture"
        await net.until(lambda s: s.webrtc_connected)


async def test_a_round_trip_that_grows_fivefold_is_no_loss() -> None:
    """aiortc's round-trip estimate follows a slower path over several reports, so the first
    reports after the growth look starved by it: the cloud's video, still arriving, says the
    direction lives. The growth comes in 20 ms steps (no inbound silence to hint at a blip)."""
    async with through_netem(RTT100) as net:
        for one_way in range(70, 270, 20):  # 100 ms → 500 ms round trip over ~1 s
            net.netem.configure("both", Impairment(delay=one_way / 1000, reorder=False))
            await trio.sleep(0.1)
        with trio.move_on_after(8):  # several receiver reports, the estimate catches up
            status = await net.until(lambda s: s.sessions_lost > 0, timeout=math.inf)
            pytest.fail(f"a healthy session was lost: {status.last_loss_reason}")
        assert net.losses() == []
        assert net.stats.slower_path_reports >= 1, "no report looked starved: not the case"
        await net.frames_after(trio.current_time())


async def test_a_dead_server_to_cloud_direction_is_its_own_loss_kind() -> None:
    async with through_netem(RTT100) as net:
        net.netem.blackout("up", None, "existing")  # the new session finds a working path
        await net.until(lambda s: s.webrtc_reconnecting)
        assert net.losses() == [LossKind.UPLINK_DEAD]
        await net.until(lambda s: s.webrtc_connected)
        await net.frames_after(trio.current_time())


async def test_a_clean_loss_is_rebuilt_by_an_attempt_that_starts_at_once() -> None:
    # A backoff this long would outlast the test's deadlines: only the immediate first
    # attempt of the default policy can recover in time.
    policy = ReconnectPolicy(base_delay=60.0, max_delay=60.0)
    async with through_netem(RTT100, policy) as net:
        response = await net.cloud.post("/control/faults", json={"action": "close_pc"})
        assert response.status_code == 200, response.text
        status = await net.until(lambda s: s.sessions_started == 2 and s.webrtc_connected)
        assert status.attempt == 1
        (lost,) = [e for e in net.events if isinstance(e, Lost)]
        (started,) = [e for e in net.events if isinstance(e, AttemptStarted)]
        assert lost.loss.kind in (LossKind.TRACK_ENDED, LossKind.PEER_CONNECTION_CLOSED)
        assert started.attempt == 1
        assert started.at - lost.at < policy.base_delay, "no backoff before attempt 1"
        await net.frames_after(trio.current_time())
