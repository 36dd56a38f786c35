"""CloudManager against the real dev cloud: link faults, re-link, media resume, teardown.

Real WebSockets, real aiortc, real clock; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from av import VideoFrame
from devcloud_client import eventually, live_peer_connections

from scope_trio import rtc
from scope_trio.cloud.manager import CloudManager, CloudSettings, LinkPolicy, NotConnectedError
from scope_trio.cloud.media import VideoInput
from scope_trio.core.supervisor import Phase
from scope_trio.dev.devcloud import DevCloudConfig, serve_devcloud, ws_url


def trio_task_count() -> int:
    """Trio tasks in this run, except the dev cloud's (it is the other side, in-process)."""

    def walk(task: trio.lowlevel.Task) -> int:
        if "serve_devcloud" in task.name:
            return 0
        children = (child for nursery in task.child_nurseries for child in nursery.child_tasks)
        return 1 + sum(walk(child) for child in children)

    return walk(trio.lowlevel.current_root_task())


def asyncio_task_count() -> int:
    loop = asyncio.get_event_loop_policy().get_event_loop()
    return sum(1 for task in asyncio.all_tasks(loop) if not task.done())


@dataclass
class Rig:
    manager: CloudManager
    http: httpx.AsyncClient
    frames: trio.MemoryReceiveChannel[VideoFrame]
    frames_send: trio.MemorySendChannel[VideoFrame]
    video: VideoInput

    async def control(self, action: str, **fields: Any) -> None:
        response = await self.http.post("/control/faults", json={"action": action, **fields})
        assert response.status_code == 200, response.text

    async def cloud_state(self) -> dict[str, Any]:
        response = await self.http.get("/control/state")
        result: dict[str, Any] = response.json()
        return result

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        with trio.fail_after(20):
            return await self.manager.wait_until(predicate)

    async def fresh_frame(self) -> VideoFrame:
        while True:
            try:
                self.frames.receive_nowait()
            except trio.WouldBlock:
                break
        with trio.fail_after(10):
            return await self.frames.receive()


@asynccontextmanager
async def rig(link_policy: LinkPolicy | None = None) -> AsyncIterator[Rig]:
    saved = rtc.tune_ice_consent()
    try:
        async with rtc.open_loop(), trio.open_nursery() as outer:
            base_url = await outer.start(partial(serve_devcloud, DevCloudConfig()))
            settings = CloudSettings(ws_url=ws_url(base_url))
            async with (
                httpx.AsyncClient(base_url=base_url) as http,
                CloudManager.open(
                    settings,
                    link_policy=link_policy or LinkPolicy(delay=0.2),
                    link_options={"connect_backoff": (0.2, 0.4)},
                ) as manager,
                trio.open_nursery() as nursery,
            ):
                video = VideoInput()
                send, receive = trio.open_memory_channel[VideoFrame](math.inf)

                async def produce() -> None:
                    frame = rtc.black_frame(64, 48)
                    while True:
                        video.push(frame)
                        await trio.sleep(1 / 30)

                nursery.start_soon(produce)
                r = Rig(manager, http, receive, send, video)
                try:
                    yield r
                finally:
                    await manager.disconnect()
                    nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    finally:
        rtc.tune_ice_consent(saved.interval, saved.failures, saved.rto)


async def connect_with_media(r: Rig, params: dict[str, Any]) -> None:
    status = await r.manager.connect()
    assert status["connecting"] is True
    assert status["connected"] is False
    await r.until(lambda s: s["connected"])
    await r.manager.start_media(params, video_input=r.video, on_frame=r.frames_send.send_nowait)
    await r.fresh_frame()


async def test_connect_reports_connecting_then_connected() -> None:
    async with rig() as r:
        status = await r.manager.connect()
        assert (status["connected"], status["connecting"]) == (False, True)
        assert status["connect_stage"] == "Connecting to cloud..."
        status = await r.until(lambda s: s["connected"])
        assert status["connecting"] is False
        assert status["connection_id"]
        assert status["credentials_configured"] is True
        assert status["stats"]["api_requests_sent"] == 0
        assert status["error"] is None


async def test_connect_without_any_cloud_configured_is_refused() -> None:
    async with CloudManager.open(CloudSettings()) as manager:
        with pytest.raises(ValueError, match="SCOPE_CLOUD_APP_ID"):
            await manager.connect()
        assert manager.status()["credentials_configured"] is False
        with pytest.raises(NotConnectedError):
            await manager.api("GET", "/api/v1/pipeline/status")


@pytest.mark.parametrize(
    "fault",
    [{"action": "drop_ws"}, {"action": "close_ws", "code": 1011, "reason": "runner restarted"}],
    ids=["drop_ws", "close_ws-1011"],
)
async def test_link_drop_is_relinked_and_media_resumes(fault: dict[str, Any]) -> None:
    async with rig() as r:
        await connect_with_media(r, {"prompts": ["a"], "noise_scale": 0.2})
        status, _ = await r.manager.api(
            "POST", "/api/v1/pipeline/load", {"pipeline_ids": ["invert"]}
        )
        assert status == 200
        first_id = r.manager.status()["connection_id"]
        seen: list[tuple[bool, bool]] = []

        async def record() -> None:
            version = r.manager.version
            while True:
                s = r.manager.status()
                seen.append((s["connected"], s["connecting"]))
                version = await r.manager.wait_change(version)

        async with trio.open_nursery() as watcher:
            watcher.start_soon(record)
            await r.control(**fault)
            lost = await r.until(lambda s: not s["connected"])
            assert lost["webrtc_connected"] is False
            r.manager.update_parameters({"noise_scale": 0.8})
            back = await r.until(lambda s: s["connected"] and s["webrtc_connected"])
            watcher.cancel_scope.cancel()
        assert (False, True) in seen, "connecting=true while the link was re-established"
        assert back["connection_id"] != first_id
        assert back["error"] is None
        assert back["stats"]["api_requests_sent"] == 1, "the pipeline load was replayed"
        assert (await r.cloud_state())["pipeline"] == "invert"
        await r.fresh_frame()
        sessions = (await r.cloud_state())["sessions"]
        assert len(sessions) == 1
        assert sessions[0]["parameters"] == {"prompts": ["a"], "noise_scale": 0.8}


async def test_close_4003_is_final_and_never_relinks() -> None:
    async with rig() as r:
        await connect_with_media(r, {})
        await r.control("close_ws", code=4003, reason="access denied")
        status = await r.until(lambda s: not s["connected"] and not s["connecting"])
        assert status["last_close_code"] == 4003
        assert status["error"] == "Cloud connection closed: access denied"
        assert r.manager.supervisor.status.phase is Phase.LINK_DOWN
        await trio.sleep(1)  # the window under test: 5x the 0.2 s relink delay, no relink
        assert (await r.cloud_state())["ws_connections"] == 0


async def test_flapping_link_gives_up_after_the_relink_budget() -> None:
    async with rig(LinkPolicy(max_relinks=2, window=60, delay=0.1)) as r:
        await r.manager.connect()
        for _ in range(3):
            await r.until(lambda s: s["connected"])
            await r.control("drop_ws")
            await r.until(lambda s: not s["connected"])
        status = await r.until(lambda s: not s["connecting"])
        assert status["error"] is not None
        assert "gave up after 2 reconnects" in status["error"]


async def test_disconnect_closes_everything_and_leaks_nothing() -> None:
    async with rig() as r:
        await r.cloud_state()  # open the control API's keep-alive connection first
        trio_before, asyncio_before = trio_task_count(), asyncio_task_count()
        pcs_before = live_peer_connections()
        await connect_with_media(r, {"a": 1})
        await r.control("close_pc")  # a loss and a recovery on the way
        await r.until(lambda s: s["webrtc_reconnecting"])
        await r.until(lambda s: s["webrtc_connected"])
        status = await r.manager.disconnect()
        assert status["connected"] is False
        assert status["webrtc_connected"] is False
        assert status["app_id"] is None

        async def all_closed() -> bool:
            state = await r.cloud_state()
            return state["ws_connections"] == 0 and state["peer_connections"] == 0

        await eventually(all_closed, timeout=15)
        assert live_peer_connections() == pcs_before
        assert trio_task_count() == trio_before
        assert asyncio_task_count() <= asyncio_before
        await trio.sleep(1.5)  # the window under test: well past the 0.2 s relink delay
        assert not r.manager.status()["connecting"], "an intentional disconnect never relinks"


async def test_parameter_updates_without_a_link_are_kept_for_the_relink() -> None:
    async with rig(LinkPolicy(delay=1.0)) as r:
        await connect_with_media(r, {"prompts": ["a"]})
        await r.control("drop_ws")
        await r.until(lambda s: not s["connected"])
        r.manager.update_parameters({"reset_cache": True, "prompts": ["b"]})
        await r.until(lambda s: s["webrtc_connected"])
        sessions = (await r.cloud_state())["sessions"]
        assert sessions[0]["parameters"] == {"prompts": ["b"], "reset_cache": True}


async def test_simulated_media_loss_takes_the_real_loss_path() -> None:
    async with rig() as r:
        with pytest.raises(NotConnectedError, match="WebRTC not connected"):
            await r.manager.simulate_media_loss()
        await connect_with_media(r, {"prompts": ["a"]})
        await r.manager.simulate_media_loss()
        lost = await r.until(lambda s: s["webrtc_reconnecting"])
        assert lost["webrtc_error"].startswith("Remote inference connection lost: ")
        assert lost["error"] == lost["webrtc_error"], "a UI showing only 'error' sees it too"
        await r.until(lambda s: s["webrtc_connected"])
        await r.fresh_frame()
        assert r.manager.supervisor.status.sessions_started == 2
