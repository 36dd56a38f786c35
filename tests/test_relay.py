"""Relay mode end to end: an aiortc "browser" ⇄ Relay ⇄ CloudManager ⇄ the dev cloud (invert).

Real aiortc on loopback, real WebSockets, real clock; every wait has a deadline. The browser
sends a half-white/half-black frame at 30 fps and judges what comes back by the brightness
of the two halves: inverted means the cloud processed it, black means nobody did.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from browser_peer import FPS, Browser, open_browser
from devcloud_client import eventually, live_peer_connections

from scope_trio import rtc
from scope_trio.cloud.manager import CloudManager, CloudSettings, LinkPolicy, NotConnectedError
from scope_trio.core.params import MAX_JSON_DEPTH
from scope_trio.core.supervisor import ReconnectPolicy
from scope_trio.dev.devcloud import DevCloudConfig, serve_devcloud, ws_url
from scope_trio.relay.relay import Relay
from scope_trio.rtc import raw

logger = logging.getLogger(__name__)


def browser(
    relay: Relay, params: dict[str, Any] | None = None
) -> AbstractAsyncContextManager[Browser]:
    """An aiortc peer acting as Scope's frontend, offering straight to ``relay``."""

    async def send_offer(sdp: str, sdp_type: str) -> dict[str, str]:
        return await relay.offer(sdp, sdp_type, params)

    return open_browser(send_offer)


@dataclass
class Rig:
    manager: CloudManager
    relay: Relay
    http: httpx.AsyncClient

    async def control(self, action: str, **fields: Any) -> None:
        response = await self.http.post("/control/faults", json={"action": action, **fields})
        assert response.status_code == 200, response.text

    async def cloud_state(self) -> dict[str, Any]:
        response = await self.http.get("/control/state")
        assert response.status_code == 200
        result: dict[str, Any] = response.json()
        return result

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        with trio.fail_after(20):
            return await self.manager.wait_until(predicate)

    async def connect(self) -> None:
        await self.manager.connect()
        await self.until(lambda s: s["connected"])


@asynccontextmanager
async def rig(
    *, connect: bool = True, policy: ReconnectPolicy | None = None, **relay_options: Any
) -> AsyncIterator[Rig]:
    saved = rtc.tune_ice_consent()
    try:
        async with rtc.open_loop(), trio.open_nursery() as outer:
            config = DevCloudConfig(pipeline="invert")
            base_url = await outer.start(partial(serve_devcloud, config))
            async with (
                httpx.AsyncClient(base_url=base_url) as http,
                CloudManager.open(
                    CloudSettings(ws_url=ws_url(base_url)),
                    policy=policy,
                    link_policy=LinkPolicy(delay=0.2),
                    link_options={"connect_backoff": (0.2, 0.4)},
                ) as manager,
                Relay.open(manager, fps=FPS, **relay_options) as relay,
            ):
                r = Rig(manager, relay, http)
                if connect:
                    await r.connect()
                yield r

                # Nothing leaks, whatever the test did: no peer connection on either side.
                async def all_closed() -> bool:
                    state = await r.cloud_state()
                    return state["peer_connections"] == 0 and live_peer_connections() == 0

                await eventually(all_closed)
            outer.cancel_scope.cancel()
        # A peer connection abandoned by a close that timed out leaks its sockets; collect
        # now, so the ResourceWarning fails THIS test rather than whichever runs gc next.
        gc.collect()
    finally:
        rtc.tune_ice_consent(saved.interval, saved.failures, saved.rto)


async def test_offer_answer_and_processed_frames_reach_the_browser() -> None:
    async with rig() as r, browser(r.relay, {"prompts": [{"text": "a fox", "weight": 1}]}) as b:
        seen = await b.inverted_frame()
        assert seen.inverted, f"not inverted: {seen}"
        stats = r.relay.sessions()
        assert list(stats) == [b.session_id]
        own = stats[b.session_id]
        assert own["current"] is True
        assert own["state"] == "connected"
        assert own["frames_from_browser"] > 0
        assert own["frames_from_cloud"] > 0
        assert own["cloud_error"] is None
        status = r.manager.status()
        assert status["webrtc_connected"] is True
        assert status["stats"]["frames_received_from_cloud"] > 0
        cloud = await r.cloud_state()
        assert len(cloud["sessions"]) == 1
        assert cloud["sessions"][0]["parameters"] == {"prompts": [{"text": "a fox", "weight": 1}]}


async def test_data_channel_json_becomes_a_parameter_update() -> None:
    async with rig() as r, browser(r.relay, {"prompts": ["a"], "noise_scale": 0.5}) as b:
        await b.inverted_frame()
        b.channel.send("not json")
        b.channel.send("[1, 2]")
        b.channel.send('{"noise_scale": NaN}')  # JSON to Python, not to the cloud: refused
        # Nested past the parser's recursion limit (RecursionError ended the session once),
        # and past MAX_JSON_DEPTH without it: both refused, nothing else happens.
        b.channel.send('{"a":' * 5000 + "1" + "}" * 5000)
        b.channel.send('{"a":' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1))
        b.channel.send(json.dumps({"noise_scale": 0.9, "reset_cache": True}))

        async def updated() -> bool:
            sessions = (await r.cloud_state())["sessions"]
            return bool(sessions) and sessions[0]["parameters"].get("noise_scale") == 0.9

        await eventually(updated)
        params = (await r.cloud_state())["sessions"][0]["parameters"]
        assert params == {"prompts": ["a"], "noise_scale": 0.9, "reset_cache": True}
        own = r.relay.sessions()[b.session_id]
        assert (own["parameter_messages"], own["parameter_errors"]) == (6, 5)
        await b.inverted_frame()  # the bad messages broke nothing


@pytest.mark.parametrize("fault", ["simulate_media_loss", "close_pc", "drop_ws"])
async def test_cloud_loss_holds_the_last_frame_and_resumes_on_the_same_browser_pc(
    fault: str,
) -> None:
    # Scope's 1 s before the first reconnect: the default's immediate attempt ends the
    # outage too soon (~50 ms) to judge the hold.
    scope = ReconnectPolicy(immediate_first_attempt=False)
    async with rig(policy=scope) as r, browser(r.relay, {"noise_scale": 0.3}) as b:
        await b.inverted_frame()
        sid, pc = b.session_id, b.pc

        def cloud_frames() -> int:
            count: int = r.relay.sessions()[sid]["frames_from_cloud"]
            return count

        t_fault = trio.current_time()
        if fault == "simulate_media_loss":
            await r.manager.simulate_media_loss()
        else:
            await r.control(fault)
        await r.until(lambda s: not s["webrtc_connected"])
        t_lost = trio.current_time()
        lost_at_count = cloud_frames()
        await r.until(lambda s: s["webrtc_connected"])

        async def resumed() -> bool:
            await trio.lowlevel.checkpoint()
            return cloud_frames() > lost_at_count

        await eventually(resumed, poll=0.005)
        t_resumed = trio.current_time()
        await b.inverted_frame()

        outage = [s for s in b.seen if t_lost <= s.at <= t_resumed]
        duration = t_resumed - t_lost
        rate = len(outage) / duration
        logger.warning(
            "%s: loss seen after %.3f s; cloud frames resumed %.3f s after the fault; "
            "browser got %d frames in the %.3f s outage (%.1f fps)",
            fault,
            t_lost - t_fault,
            t_resumed - t_fault,
            len(outage),
            duration,
            rate,
        )
        assert duration > 0.15, "the outage was too short to judge the hold"
        assert len(outage) >= 0.5 * FPS * duration, f"browser starved: {rate:.1f} fps"
        assert all(s.inverted for s in outage), "the hold sent something else than the last frame"
        assert r.relay.sessions()[sid]["held_frames"] > 0
        # The same browser peer connection throughout: never renegotiated, never left
        # "connected", one track only, one relay session.
        assert b.pc is pc
        assert pc.connectionState == "connected"
        assert b.states_after_connect == []
        with pytest.raises(trio.WouldBlock):
            b.events.tracks.receive_nowait()
        assert list(r.relay.sessions()) == [sid]
        assert r.manager.supervisor.status.sessions_started >= 2
        cloud = await r.cloud_state()
        assert cloud["sessions"][0]["parameters"] == {"noise_scale": 0.3}


async def test_bad_requests_are_client_errors_and_leave_nothing_open() -> None:
    async with rig(connect=False) as r:
        baseline = live_peer_connections()
        offerer = raw.new_peer_connection([])
        offerer.addTrack(rtc.TrioVideoSource(idle_timeout=None))
        offer = await raw.create_offer(offerer)
        await raw.close_peer_connection(offerer)
        with pytest.raises(NotConnectedError):
            await r.relay.offer(offer.sdp, "offer")

        await r.connect()
        with pytest.raises(ValueError, match="SDP"):
            await r.relay.offer("garbage", "offer")
        with pytest.raises(ValueError, match="SDP"):
            await r.relay.offer("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", "offer")
        with pytest.raises(ValueError, match="offer"):
            await r.relay.offer(offer.sdp, "answer")
        with pytest.raises(ValueError, match="initialParameters"):
            await r.relay.offer(offer.sdp, "offer", {"noise_scale": math.nan})
        data_only = raw.new_peer_connection([])
        data_only.createDataChannel("parameters")
        data_offer = await raw.create_offer(data_only)
        await raw.close_peer_connection(data_only)
        with pytest.raises(ValueError, match="no video"):
            await r.relay.offer(data_offer.sdp, "offer")

        with pytest.raises(KeyError):
            await r.relay.add_candidates("no-such-session", [])
        with pytest.raises(KeyError):
            await r.relay.close("no-such-session")
        assert r.relay.sessions() == {}
        assert live_peer_connections() == baseline

        async with browser(r.relay) as b:
            with pytest.raises(ValueError, match="candidate"):
                await r.relay.add_candidates(b.session_id, [{"candidate": "garbage"}])
            with pytest.raises(ValueError, match="candidate"):
                await r.relay.add_candidates(b.session_id, [{"sdpMid": "0"}])
            with pytest.raises(ValueError, match="list"):
                await r.relay.add_candidates(b.session_id, "candidate:1")  # type: ignore[arg-type]
            await r.relay.add_candidates(
                b.session_id,
                [
                    {
                        "candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host",
                        "sdpMid": "0",
                        "sdpMLineIndex": 0,
                    },
                    {"candidate": "", "sdpMid": "0"},  # end of candidates
                ],
            )
            await b.inverted_frame()  # none of it disturbed the session


async def test_close_closes_browser_and_cloud_and_leaks_nothing() -> None:
    async with rig() as r:
        await r.cloud_state()  # the control API's keep-alive connection exists first
        baseline = live_peer_connections()
        async with browser(r.relay) as b:
            await b.inverted_frame()
            with trio.fail_after(15):
                await r.relay.close(b.session_id)
            assert r.relay.sessions() == {}
            assert r.manager.status()["webrtc_connected"] is False
            with trio.fail_after(5):
                await b.closed.wait()
            assert b.states_after_connect == ["closed"]

            async def cloud_closed() -> bool:
                count: int = (await r.cloud_state())["peer_connections"]
                return count == 0

            await eventually(cloud_closed)
            with pytest.raises(KeyError):
                await r.relay.close(b.session_id)
            with pytest.raises(KeyError):
                await r.relay.add_candidates(b.session_id, [])

        async def back_to_baseline() -> bool:
            await trio.lowlevel.checkpoint()
            return live_peer_connections() == baseline

        await eventually(back_to_baseline)


async def test_browser_disconnect_closes_its_session_and_the_cloud_session() -> None:
    async with rig() as r:
        async with browser(r.relay) as b:
            await b.inverted_frame()
            sid = b.session_id
        # The browser closed its peer connection when the block ended.

        async def all_gone() -> bool:
            state = await r.cloud_state()
            return sid not in r.relay.sessions() and state["peer_connections"] == 0

        await eventually(all_gone)
        assert r.manager.status()["webrtc_connected"] is False


async def test_a_second_offer_replaces_the_first() -> None:
    async with rig() as r, browser(r.relay, {"prompts": ["first"]}) as first:
        await first.inverted_frame()
        async with browser(r.relay, {"prompts": ["second"]}) as second:
            with trio.fail_after(5):
                await first.closed.wait()
            assert list(r.relay.sessions()) == [second.session_id]
            await second.inverted_frame()

            async def one_cloud_session() -> bool:
                return len((await r.cloud_state())["sessions"]) == 1

            await eventually(one_cloud_session)
            cloud = await r.cloud_state()
            assert cloud["sessions"][0]["parameters"] == {"prompts": ["second"]}
            assert r.manager.status()["webrtc_connected"] is True

            with trio.fail_after(15):
                await r.relay.close_all()
            assert r.relay.sessions() == {}
            with trio.fail_after(5):
                await second.closed.wait()
            assert r.manager.status()["webrtc_connected"] is False


async def test_a_browser_that_never_connects_is_given_up() -> None:
    async with rig(connect_timeout=1.0) as r:
        offerer = raw.new_peer_connection([])
        offerer.addTrack(rtc.TrioVideoSource(idle_timeout=None))
        try:
            offer = await raw.create_offer(offerer)
            answer = await r.relay.offer(offer.sdp, offer.type, {"a": 1})  # never applied
            sid = answer["sessionId"]
            assert sid in r.relay.sessions()

            async def given_up() -> bool:
                state = await r.cloud_state()
                return sid not in r.relay.sessions() and state["peer_connections"] == 0

            await eventually(given_up)
            assert r.manager.status()["webrtc_connected"] is False
        finally:
            await raw.close_peer_connection(offerer)


async def test_a_connected_session_outlives_the_connect_timeout() -> None:
    """Regression (found by benchmarks/api_load.py): the connect deadline also bounded the
    whole session, so every browser stream was cut 30 s after its answer."""
    async with rig(connect_timeout=1.0) as r, browser(r.relay, {"a": 1}) as b:
        await b.inverted_frame()
        await trio.sleep(2.5)  # the time under test: well past the 1 s connect deadline
        assert r.relay.sessions()[b.session_id]["state"] == "connected"
        assert r.manager.status()["webrtc_connected"] is True
        before = r.relay.sessions()[b.session_id]["frames_to_browser"]
        await b.inverted_frame()
        assert r.relay.sessions()[b.session_id]["frames_to_browser"] > before
