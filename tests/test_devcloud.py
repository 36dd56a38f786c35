"""The devcloud: real Hypercorn on an ephemeral port, a trio-websocket client, real aiortc."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import av
import pytest
import trio
import trio_websocket
from av import VideoFrame
from devcloud_client import (
    MediaClient,
    Signaling,
    control,
    fault,
    luma_halves,
    mean_luma,
    open_signaling,
    rgb_frame,
    running_devcloud,
    start_media,
    state,
)

from scope_trio import rtc
from scope_trio.dev import devcloud
from scope_trio.dev.devcloud.pipelines import pattern_frame
from scope_trio.rtc import raw

# Generous: real media on a loaded 2-core machine.
DEADLINE = 20.0


@pytest.fixture
async def url(aio_loop: object) -> AsyncIterator[str]:
    async with running_devcloud() as base_url:
        yield base_url


@pytest.fixture
def fast_consent() -> object:
    """Fast ICE consent for the test (process-global, restored after): the server's, with
    three failures instead of six, so a silent path closes in ~4 s."""
    timing = dataclasses.replace(rtc.FAST_CONSENT, failures=3)
    original = rtc.tune_ice_consent(**dataclasses.asdict(timing))
    yield timing
    rtc.tune_ice_consent(**dataclasses.asdict(original))


async def wait_for_state(url: str, predicate: object, deadline: float = DEADLINE) -> dict:
    """Poll /control/state until ``predicate(state)`` holds (a control API has no events)."""
    assert callable(predicate)
    with trio.fail_after(deadline):
        while True:
            current = await state(url)
            if predicate(current):
                return current
            await trio.sleep(0.05)


async def inverted_frame(client: MediaClient) -> tuple[float, float]:
    """Wait for a frame showing the input pattern inverted (left white, right black)."""
    while True:
        left, right = luma_halves(await client.next_frame())
        if left > 200 and right < 55:
            return left, right


async def straight_frame(client: MediaClient) -> tuple[float, float]:
    """Wait for a frame showing the input pattern as sent (left black, right white)."""
    while True:
        left, right = luma_halves(await client.next_frame())
        if left < 55 and right > 200:
            return left, right


async def frames_stop(client: MediaClient, settle: float = 0.5, quiet: float = 1.0) -> None:
    """Assert no frame arrives during ``quiet`` seconds, after ``settle`` for in-flight ones."""
    await trio.sleep(settle)
    before = client.frames_received
    await trio.sleep(quiet)
    assert client.frames_received == before, "frames kept arriving"


async def close_reason(sig: Signaling) -> trio_websocket.CloseReason:
    """Read messages until the server ends the WebSocket; return how it ended."""

    async def receive_forever() -> None:
        while True:
            await sig.receive()

    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
        await receive_forever()
    assert closed.value.reason is not None
    return closed.value.reason


# --------------------------------------------------------------------------------------------
# Signaling


async def test_signaling_basics(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig:
            await sig.send({"type": "set_user_id", "user_id": "alice"})
            assert await sig.receive() == {"type": "user_id_set", "user_id": "alice"}
            reply = await sig.request("get_ice_servers")
            assert reply["type"] == "ice_servers"
            assert reply["data"] == {"iceServers": []}
            assert reply["status"] == 200
            assert (await sig.request("ping"))["type"] == "pong"
            reply = await sig.request("no_such_type")
            assert reply["type"] == "error"
            assert "no_such_type" in reply["error"]
            # Garbage never ends the connection: each gets an error, then business as usual.
            for raw in ("{not json", "[1, 2]", '"text"'):
                await sig.ws.send_message(raw)
                reply = await sig.receive()
                assert reply["type"] == "error"
                assert "request_id" not in reply
            await sig.ws.send_message(b"\x00binary")
            assert (await sig.receive())["type"] == "error"
            assert (await sig.request("ping"))["type"] == "pong"
            current = await state(url)
            assert current["ws_connections"] == 1


@pytest.mark.parametrize("key", [None, "wrong"])
async def test_api_key_rejected_with_4003(aio_loop: object, key: str | None) -> None:
    async with running_devcloud(api_key="sekrit") as base_url:
        with trio.fail_after(DEADLINE):
            async with open_signaling(base_url, key, expect_ready=False) as sig:
                error = await sig.receive()
                assert error["type"] == "error"
                assert error["code"] == "ACCESS_DENIED"
                assert "sekrit" not in json.dumps(error)
                assert (await close_reason(sig)).code == 4003
            async with open_signaling(base_url, "sekrit") as sig:
                assert (await sig.request("ping"))["type"] == "pong"


async def test_denied_user_and_require_user_id(aio_loop: object) -> None:
    async with running_devcloud(
        require_user_id=True, denied_user_ids=frozenset({"mallory"})
    ) as base_url:
        with trio.fail_after(DEADLINE):
            async with open_signaling(base_url) as sig:
                # Like the real runner: nothing is answered before set_user_id.
                await sig.send({"type": "ping", "request_id": "early"})
                with trio.move_on_after(0.5) as quiet:
                    await sig.receive()
                assert quiet.cancelled_caught
                await sig.send({"type": "set_user_id", "user_id": "alice"})
                assert (await sig.receive())["type"] == "user_id_set"
                assert (await sig.request("ping"))["type"] == "pong"
            async with open_signaling(base_url) as sig:
                await sig.send({"type": "set_user_id", "user_id": "mallory"})
                error = await sig.receive()
                assert (error["type"], error["code"]) == ("error", "ACCESS_DENIED")
                assert (await close_reason(sig)).code == 4003


async def test_pipeline_api(aio_loop: object) -> None:
    async with running_devcloud(load_seconds=1.0) as base_url:
        with trio.fail_after(DEADLINE):
            async with open_signaling(base_url) as sig:

                async def api(method: str, path: str, body: object = None) -> dict:
                    return await sig.request("api", method=method, path=path, body=body)

                reply = await api("GET", "/api/v1/pipeline/status")
                assert reply["type"] == "api_response"
                assert reply["status"] == 200
                assert reply["data"]["status"] == "loaded"
                assert reply["data"]["pipeline_id"] == "passthrough"
                body = {"pipeline_ids": ["invert"], "load_params": {"height": 512}}
                reply = await api("POST", "/api/v1/pipeline/load", body)
                assert reply["status"] == 200
                status = (await api("GET", "/api/v1/pipeline/status"))["data"]
                assert status == {
                    "status": "loading",
                    "pipeline_id": "invert",
                    "load_params": {"height": 512},
                    "loaded_lora_adapters": None,
                    "error": None,
                    "loading_stage": "Loading pipeline weights",
                }
                stages = [status["loading_stage"]]
                while status["status"] == "loading":
                    await trio.sleep(0.02)
                    status = (await api("GET", "/api/v1/pipeline/status"))["data"]
                    if status["loading_stage"] != stages[-1]:
                        stages.append(status["loading_stage"])
                assert stages == ["Loading pipeline weights", "Warming up", None]
                assert status == {
                    "status": "loaded",
                    "pipeline_id": "invert",
                    "load_params": {"height": 512},
                    "loaded_lora_adapters": [],
                    "error": None,
                    "loading_stage": None,
                }
                assert (await state(base_url))["pipeline"] == "invert"

                reply = await api("POST", "/api/v1/pipeline/load", {"pipeline_ids": ["nope"]})
                assert reply["status"] == 400
                assert "nope" in reply["error"]
                assert (await api("POST", "/api/v1/pipeline/load", {}))["status"] == 422
                reply = await api("POST", "/api/v1/pipeline/load", {"pipeline_ids": []})
                assert (reply["status"], reply["error"]) == (
                    400,
                    "pipeline_ids must be provided and cannot be empty",
                )
                assert (await api("POST", "/api/v1/pipeline/load", None))["status"] == 422
                assert (await api("DELETE", "/api/v1/pipeline/load"))["status"] == 405
                assert (await api("GET", "/api/v1/elsewhere"))["status"] == 404
                assert (await sig.request("api", path=7))["status"] == 404


async def _api(sig: Signaling, method: str, path: str, body: object = None) -> dict[str, Any]:
    """One ``api`` request; returns the ``api_response``."""
    fields: dict[str, Any] = {"method": method, "path": path}
    if body is not None:
        fields["body"] = body
    reply = await sig.request("api", **fields)
    assert reply["type"] == "api_response", reply
    return reply


async def _ok(sig: Signaling, method: str, path: str, body: object = None) -> Any:
    """The ``data`` of a 200 ``api_response``."""
    reply = await _api(sig, method, path, body)
    assert reply["status"] == 200, reply
    return reply["data"]


async def test_api_answers_what_the_frontend_reads(url: str) -> None:
    """Every read-only route Scope's frontend calls through the proxy, with the fields it
    reads; mutating routes that cannot work here answer a 4xx naming why."""
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig:
            schemas = (await _ok(sig, "GET", "/api/v1/pipelines/schemas"))["pipelines"]
            assert list(schemas) == ["passthrough", "invert", "pattern"]
            for pipeline_id, schema in schemas.items():
                assert schema["id"] == pipeline_id
                assert schema["default_mode"] in schema["supported_modes"]
                assert schema["requires_models"] is False
                assert schema["plugin_name"] is None
                assert schema["usage"] == []
                properties = schema["config_schema"]["properties"]
                assert properties["height"]["default"] >= schema["min_dimension"]
                assert properties["width"]["ui"]["is_load_param"] is True
            assert schemas["invert"]["supported_modes"] == ["video"]
            assert schemas["invert"]["supports_prompts"] is False
            assert "mode_defaults" not in schemas["invert"]
            pattern = schemas["pattern"]
            assert (pattern["default_mode"], pattern["supports_prompts"]) == ("text", True)
            assert pattern["mode_defaults"] == {"text": {"width": 320, "height": 240}}

            health = await _ok(sig, "GET", "/health?_t=123")
            assert health["status"] == "healthy"
            assert {"timestamp", "server_start_time", "version", "git_commit"} <= set(health)
            assert (await _ok(sig, "GET", "/health"))["server_start_time"] == health[
                "server_start_time"
            ]
            assert await _ok(sig, "GET", "/api/v1/hardware/info") == {
                "vram_gb": 24.0,
                "spout_available": False,
                "ndi_available": False,
                "syphon_available": False,
            }
            models = await _ok(sig, "GET", "/api/v1/models/status?pipeline_id=pattern")
            assert models == {"downloaded": True, "progress": None}
            reply = await _api(sig, "GET", "/api/v1/models/status?pipeline_id=nope")
            assert (reply["status"], reply["error"]) == (404, "Unknown pipeline: nope")
            assert (await _api(sig, "GET", "/api/v1/models/status"))["status"] == 422
            download = await _ok(sig, "POST", "/api/v1/models/download", {"pipeline_id": "invert"})
            assert "already downloaded" in download["message"]
            assert await _ok(sig, "GET", "/api/v1/loras") == {"lora_files": []}
            assert await _ok(sig, "GET", "/api/v1/plugins") == {
                "plugins": [],
                "total": 0,
                "failed_plugins": [],
            }
            assert await _ok(sig, "GET", "/api/v1/assets?type=image") == {"assets": []}
            assert (await _api(sig, "GET", "/api/v1/assets?type=audio"))["status"] == 422
            workflow = {
                "pipelines": [
                    {"pipeline_id": "invert", "source": {"type": "builtin"}, "loras": []},
                    {"pipeline_id": "longlive", "source": {"type": "builtin"}, "loras": []},
                ]
            }
            resolved = await _ok(sig, "POST", "/api/v1/workflow/resolve", workflow)
            assert resolved["can_apply"] is False
            assert [(i["name"], i["status"]) for i in resolved["items"]] == [
                ("invert", "ok"),
                ("longlive", "missing"),
            ]

            refused: list[tuple[str, str, object, int]] = [
                ("POST", "/api/v1/loras", {"url": "https://huggingface.co/x.safetensors"}, 400),
                ("DELETE", "/api/v1/loras/style%20a", None, 404),
                ("POST", "/api/v1/plugins", {"package": "evil"}, 403),
                ("DELETE", "/api/v1/plugins/nope", None, 404),
            ]
            for method, path, body, status in refused:
                reply = await _api(sig, method, path, body)
                assert reply["status"] == status, reply
                assert reply["error"]
                assert "data" not in reply
            reply = await _api(sig, "DELETE", "/api/v1/loras/style%20a")
            assert reply["error"] == "LoRA file 'style a' not found"
            assert (await _api(sig, "PUT", "/api/v1/loras"))["status"] == 405


async def test_offer_errors_keep_connection(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig:
            reply = await sig.request("offer", sdp="garbage", sdp_type="offer")
            assert reply["type"] == "error"
            assert "SDP" in reply["error"]
            reply = await sig.request(
                "icecandidate", sessionId="nope", candidate={"candidate": "x"}
            )
            assert reply["type"] == "error"
            assert (await sig.request("ping"))["type"] == "pong"
    assert (await state(url))["peer_connections"] == 0


async def test_an_offerer_that_never_connects_is_closed_after_the_connect_deadline(
    aio_loop: object,
) -> None:
    """An offerer that stops mid-ICE never tells the answering side: aioice waits for a
    nomination without a deadline, so the session stayed "checking" until its WebSocket
    ended (seen for 90 s and more in benchmarks/stop_latency.py). It is closed after
    ``connect_deadline``, while the WebSocket stays up."""
    async with running_devcloud(connect_deadline=0.5) as base:
        with trio.fail_after(DEADLINE):
            async with open_signaling(base) as sig:
                pc = raw.new_peer_connection([])
                try:
                    pc.addTrack(rtc.TrioVideoSource(idle_timeout=None))
                    offer = await raw.create_offer(pc)
                    reply = await sig.request("offer", sdp=offer.sdp, sdp_type=offer.type)
                    assert reply["type"] == "answer"  # never applied: ICE never completes
                    assert (await state(base))["peer_connections"] == 1
                    await wait_for_state(base, lambda s: s["peer_connections"] == 0)
                    assert (await sig.request("ping"))["type"] == "pong", "the link is untouched"
                finally:
                    await raw.close_peer_connection(pc)


# --------------------------------------------------------------------------------------------
# Media


async def test_media_invert_passthrough_and_parameters(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            client = await start_media(sig, nursery, {"prompts": [{"text": "a", "weight": 1}]})
            try:
                left, right = await straight_frame(client)
                print(f"passthrough: left {left:.0f} right {right:.0f}")
                reply = await sig.request(
                    "api",
                    method="POST",
                    path="/api/v1/pipeline/load",
                    body={"pipeline_ids": ["invert"]},
                )
                assert reply["status"] == 200
                left, right = await inverted_frame(client)
                print(f"invert: left {left:.0f} right {right:.0f}")

                await _wait_open(client)
                client.parameters.send(json.dumps({"noise_scale": 0.5}))
                client.parameters.send("not json")  # logged and ignored
                client.parameters.send(json.dumps({"prompts": [{"text": "b", "weight": 1}]}))
                current = await wait_for_state(url, lambda s: s["parameter_updates"] == 2)
                assert current["last_parameters"] == {"prompts": [{"text": "b", "weight": 1}]}
                assert current["initial_parameters"] == {"prompts": [{"text": "a", "weight": 1}]}
                assert current["peer_connections"] == 1
                assert current["offers"] == 1
                assert current["frames_in"] > 0
                assert current["frames_out"] > 0
                (session,) = current["sessions"]
                assert session["id"] == client.session_id
                assert session["parameters"] == {
                    "prompts": [{"text": "b", "weight": 1}],
                    "noise_scale": 0.5,
                }
            finally:
                await raw.close_peer_connection(client.pc)
                nursery.cancel_scope.cancel()
        # The client closed: the devcloud notices and forgets the session.
        await wait_for_state(url, lambda s: s["peer_connections"] == 0)


async def _wait_open(client: MediaClient) -> None:
    if client.parameters.readyState != "open":
        opened = trio.Event()
        client.parameters.on("open", opened.set)
        if client.parameters.readyState != "open":
            await opened.wait()


async def test_trickled_candidates(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            client = await start_media(sig, nursery)
            try:
                local = client.pc.localDescription
                assert local is not None
                line = next(x for x in local.sdp.splitlines() if x.startswith("a=candidate:"))
                candidate = {"candidate": line[2:], "sdpMid": "0", "sdpMLineIndex": 0}
                reply = await sig.request(
                    "icecandidate", sessionId=client.session_id, candidate=candidate
                )
                assert (reply["type"], reply["status"]) == ("icecandidate_ack", "ok")
                reply = await sig.request(
                    "icecandidate", sessionId=client.session_id, candidate=None
                )
                assert (reply["type"], reply["status"]) == ("icecandidate_ack", "end_of_candidates")
                reply = await sig.request(
                    "icecandidate",
                    sessionId=client.session_id,
                    candidate={"candidate": "candidate:garbage", "sdpMid": "0"},
                )
                assert reply["type"] == "error"
                assert "ICE candidate" in reply["error"]
            finally:
                await raw.close_peer_connection(client.pc)
                nursery.cancel_scope.cancel()


def test_pattern_frame_follows_the_prompt_and_moves() -> None:
    frame = pattern_frame("a red fox", 0.0, 64, 32)
    assert (frame.format.name, frame.width, frame.height) == ("rgb24", 64, 32)
    again = pattern_frame("a red fox", 0.0, 64, 32)
    assert bytes(frame.planes[0]) == bytes(again.planes[0]), "same prompt and time: same frame"
    later = pattern_frame("a red fox", 0.5, 64, 32)
    assert bytes(frame.planes[0]) != bytes(later.planes[0]), "the stripes move"
    other = pattern_frame("a blue whale", 0.0, 64, 32)
    assert bytes(frame.planes[0]) != bytes(other.planes[0]), "another prompt, another pattern"


def _distinct_prompts() -> tuple[str, str]:
    """Two prompts whose patterns differ clearly in mean luma (picked, not hoped for)."""
    words = [f"prompt {i}" for i in range(40)]
    lumas = {w: mean_luma(pattern_frame(w, 0.0, 160, 96)) for w in words}
    dark, bright = min(lumas, key=lumas.__getitem__), max(lumas, key=lumas.__getitem__)
    assert lumas[bright] - lumas[dark] > 80
    return dark, bright


async def _luma_near(client: MediaClient, target: float, tolerance: float = 25) -> VideoFrame:
    """Wait for a received frame whose mean luma is within ``tolerance`` of ``target``."""
    while True:
        frame = await client.next_frame()
        if abs(mean_luma(frame) - target) <= tolerance:
            return frame


@pytest.mark.parametrize("direction", ["recvonly", "sendrecv"])
async def test_pattern_pipeline_needs_no_input_video(url: str, direction: str) -> None:
    """A text-mode offer (a video transceiver with no track: ``recvonly``, or a browser's
    default ``sendrecv``) gets the prompt's pattern, at the load's size; a new prompt on
    the parameters channel changes it."""
    dark, bright = _distinct_prompts()
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            load = {"pipeline_ids": ["pattern"], "load_params": {"width": 160, "height": 96}}
            await _ok(sig, "POST", "/api/v1/pipeline/load", load)
            initial = {"prompts": [{"text": dark, "weight": 1.0}], "input_mode": "text"}
            client = await start_media(sig, nursery, initial, send_video=False, direction=direction)
            try:
                frame = await _luma_near(client, mean_luma(pattern_frame(dark, 0, 160, 96)))
                assert (frame.width, frame.height) == (160, 96)
                await _wait_open(client)
                client.parameters.send(json.dumps({"prompts": [{"text": bright, "weight": 1}]}))
                await _luma_near(client, mean_luma(pattern_frame(bright, 0, 160, 96)))
                (session,) = (await state(url))["sessions"]
                assert session["frames_in"] == 0, "nothing was sent to the cloud"
                assert session["frames_processed"] > 0
            finally:
                await raw.close_peer_connection(client.pc)
                nursery.cancel_scope.cancel()


async def _session(url: str) -> dict[str, Any]:
    (session,) = (await state(url))["sessions"]
    result: dict[str, Any] = session
    return result


async def test_paused_freezes_the_output_of_a_video_pipeline(url: str) -> None:
    """Paused, the pipeline processes nothing and the last output repeats: a changed input
    does not show until ``paused`` is false again."""
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            await _ok(sig, "POST", "/api/v1/pipeline/load", {"pipeline_ids": ["invert"]})
            client = await start_media(sig, nursery)
            try:
                await inverted_frame(client)  # input left black, right white
                await _wait_open(client)
                client.parameters.send(json.dumps({"paused": True}))
                await wait_for_state(url, lambda s: s["sessions"][0]["paused"])
                processed = (await _session(url))["frames_processed"]
                client.halves = (255, 0)  # the input flips...
                frames_in = (await _session(url))["frames_in"]
                await wait_for_state(url, lambda s: s["sessions"][0]["frames_in"] > frames_in + 10)
                client.drain()
                for _ in range(10):  # ...but the output still shows the old input, inverted
                    left, right = luma_halves(await client.next_frame())
                    assert left > 200, (left, right)
                    assert right < 55, (left, right)
                assert (await _session(url))["frames_processed"] == processed
                client.parameters.send(json.dumps({"paused": False}))
                await straight_frame(client)  # the flipped input, inverted
                assert (await _session(url))["frames_processed"] > processed
            finally:
                await raw.close_peer_connection(client.pc)
                nursery.cancel_scope.cancel()


async def test_paused_stops_the_pattern_but_not_the_track(url: str) -> None:
    """Paused, a text pipeline draws nothing new, yet frames keep flowing (the last one),
    so the receiver sees a still picture, not a stalled stream."""
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            load = {"pipeline_ids": ["pattern"], "load_params": {"width": 64, "height": 64}}
            await _ok(sig, "POST", "/api/v1/pipeline/load", load)
            client = await start_media(sig, nursery, {"paused": False}, send_video=False)
            try:
                await client.next_frame()
                await _wait_open(client)
                client.parameters.send(json.dumps({"paused": True}))
                await wait_for_state(url, lambda s: s["sessions"][0]["paused"])
                paused = await _session(url)
                received = client.frames_received
                await wait_for_state(
                    url, lambda s: s["sessions"][0]["frames_out"] > paused["frames_out"] + 10
                )
                assert (await _session(url))["frames_processed"] == paused["frames_processed"]
                while client.frames_received < received + 5:
                    await client.next_frame()
                client.parameters.send(json.dumps({"paused": False}))
                await wait_for_state(
                    url,
                    lambda s: s["sessions"][0]["frames_processed"] > paused["frames_processed"],
                )
            finally:
                await raw.close_peer_connection(client.pc)
                nursery.cancel_scope.cancel()


def _decode_mp4(content: bytes) -> list[VideoFrame]:
    with av.open(io.BytesIO(content)) as container:
        assert container.format.name.startswith("mov,mp4")
        return list(container.decode(video=0))


async def test_recording_downloads_as_a_real_mp4(url: str) -> None:
    """With ``recording`` on, the frames the session sends become an MP4, downloaded as a
    binary answer; the next download holds only what came after the first."""
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            await _ok(sig, "POST", "/api/v1/pipeline/load", {"pipeline_ids": ["invert"]})
            client = await start_media(sig, nursery, {"recording": True})
            try:
                await wait_for_state(url, lambda s: s["sessions"][0]["frames_recorded"] >= 20)
                path = f"/api/v1/recordings/{client.session_id}"
                data = await _ok(sig, "GET", path)
                assert data["_content_type"] == "video/mp4"
                content = base64.b64decode(data["_base64_content"])
                assert data["_content_length"] == len(content)
                frames = _decode_mp4(content)
                assert len(frames) >= 20
                assert (frames[0].width, frames[0].height) == (128, 128)
                left, right = luma_halves(frames[-1])
                assert left > 200, "the recording holds the inverted output"
                assert right < 55, "the recording holds the inverted output"
                recorded = (await _session(url))["frames_recorded"]
                await wait_for_state(
                    url, lambda s: s["sessions"][0]["frames_recorded"] >= recorded + 5
                )
                second = _decode_mp4(
                    base64.b64decode((await _ok(sig, "GET", path))["_base64_content"])
                )
                total = (await _session(url))["frames_recorded"]
                # Only what came after the first download, and from its own time zero.
                assert 5 <= len(second) <= total - len(frames)
                assert second[0].pts == 0

                reply = await _api(sig, "GET", "/api/v1/recordings/nope")
                assert (reply["status"], reply["error"]) == (404, "Session nope not found")
            finally:
                await raw.close_peer_connection(client.pc)
                nursery.cancel_scope.cancel()


async def test_no_recording_unless_asked(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            client = await start_media(sig, nursery)
            try:
                await straight_frame(client)
                reply = await _api(sig, "GET", f"/api/v1/recordings/{client.session_id}")
                assert reply["status"] == 404
                assert reply["error"] == f"Recording not available for session {client.session_id}"
                assert (await _session(url))["frames_recorded"] == 0
            finally:
                await raw.close_peer_connection(client.pc)
                nursery.cancel_scope.cancel()


async def test_a_recording_too_large_for_one_message_is_refused(aio_loop: object) -> None:
    async with running_devcloud(max_recording_bytes=100) as base_url:
        with trio.fail_after(DEADLINE):
            async with open_signaling(base_url) as sig, trio.open_nursery() as nursery:
                client = await start_media(sig, nursery, {"recording": True})
                try:
                    await wait_for_state(
                        base_url, lambda s: s["sessions"][0]["frames_recorded"] >= 5
                    )
                    reply = await _api(sig, "GET", f"/api/v1/recordings/{client.session_id}")
                    assert reply["status"] == 413
                    assert "limit 100" in reply["error"]
                finally:
                    await raw.close_peer_connection(client.pc)
                    nursery.cancel_scope.cancel()


def test_invert_frame_is_exact() -> None:
    frame = devcloud.invert_frame(rgb_frame(16, 8, 10, 200))
    assert frame.format.name == "rgb24"
    assert (frame.width, frame.height) == (16, 8)
    row = bytes(frame.planes[0])[: 3 * 16]
    assert row == bytes([245]) * 24 + bytes([55]) * 24


# --------------------------------------------------------------------------------------------
# Faults


async def _connected(url: str, sig: Signaling, nursery: trio.Nursery) -> MediaClient:
    client = await start_media(sig, nursery)
    await straight_frame(client)
    return client


async def test_fault_close_pc(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            client = await _connected(url, sig, nursery)
            result = await fault(url, "close_pc")
            assert result == {"ok": True, "action": "close_pc", "affected": 1}
            assert await client.events.wait_state("closed") == "closed"
            await wait_for_state(url, lambda s: s["peer_connections"] == 0)
            # The signaling connection survives and can negotiate again.
            assert (await sig.request("ping"))["type"] == "pong"
            await raw.close_peer_connection(client.pc)
            nursery.cancel_scope.cancel()


async def test_fault_blackhole_existing_detected_by_consent(url: str, fast_consent: object) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            client = await _connected(url, sig, nursery)
            started = time.monotonic()
            result = await fault(url, "blackhole", seconds=30, scope="existing")
            assert result["affected"] == 1
            await trio.sleep(0.5)  # frames already in flight
            before = client.frames_received
            assert await client.events.wait_state("closed") == "closed"
            detected = time.monotonic() - started
            print(f"blackhole detected by the client after {detected:.2f} s")
            assert client.frames_received == before
            assert detected < 8  # ~3.7 s with fast consent; loose for a loaded machine
            # No BYE reached the client, yet the devcloud side notices too.
            await wait_for_state(url, lambda s: s["peer_connections"] == 0)
            await raw.close_peer_connection(client.pc)
            nursery.cancel_scope.cancel()


async def test_fault_short_blackhole_then_media_resumes(url: str) -> None:
    """With default consent a 1.5 s outage is survivable: frames stop, then resume."""
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            client = await _connected(url, sig, nursery)
            await fault(url, "blackhole", seconds=1.5)
            await frames_stop(client, settle=0.3, quiet=0.8)
            assert client.pc.connectionState == "connected"
            client.drain()
            await straight_frame(client)  # the path is back
            await raw.close_peer_connection(client.pc)
            nursery.cancel_scope.cancel()


async def test_fault_blackhole_all_blocks_new_connections(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            assert (await fault(url, "blackhole", seconds=60, scope="all"))["affected"] == 0
            with trio.move_on_after(2) as blocked:
                await start_media(sig, nursery)
            assert blocked.cancelled_caught
            assert (await state(url))["faults"]["blackhole_all_seconds"] > 50
            await fault(url, "clear")
            # start_media closed its peer connection when cancelled; a new one connects.
            client = await _connected(url, sig, nursery)
            await raw.close_peer_connection(client.pc)
            nursery.cancel_scope.cancel()


async def test_fault_close_ws_code_and_reason(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            client = await _connected(url, sig, nursery)
            result = await fault(url, "close_ws", code=4321, reason="go away")
            assert result["affected"] == 1
            reason = await close_reason(sig)
            assert (reason.code, reason.reason) == (4321, "go away")
            # The connection's peer connections go with it.
            assert await client.events.wait_state("closed") == "closed"
            await wait_for_state(url, lambda s: s["ws_connections"] == 0)
            await raw.close_peer_connection(client.pc)
            nursery.cancel_scope.cancel()


async def test_fault_drop_ws_without_close_frame(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig:
            assert (await fault(url, "drop_ws"))["affected"] == 1
            reason = await close_reason(sig)
            assert reason.code == 1006  # abnormal closure: no close frame
        await wait_for_state(url, lambda s: s["ws_connections"] == 0)


async def offer_once(sig: Signaling) -> dict[str, Any]:
    """The dev cloud's reply to one real offer; our side is closed again at once."""
    pc = raw.new_peer_connection([])
    pc.addTransceiver("video")
    try:
        offer = await raw.create_offer(pc)
        return await sig.request("offer", sdp=offer.sdp, sdp_type="offer")
    finally:
        await raw.close_peer_connection(pc)


async def test_fault_refuse_offers(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            assert (await fault(url, "refuse_offers", count=1))["affected"] == 1
            reply = await offer_once(sig)
            assert reply["type"] == "error"
            assert reply["request_id"]
            client = await _connected(url, sig, nursery)  # only one was refused
            assert (await state(url))["offers"] == 2
            await raw.close_peer_connection(client.pc)
            nursery.cancel_scope.cancel()


async def test_fault_stall_offers(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            await fault(url, "stall_offers", count=1)
            pc = raw.new_peer_connection([])
            pc.addTransceiver("video")
            try:
                offer = await raw.create_offer(pc)
                with trio.move_on_after(1.5) as stalled:
                    await sig.request("offer", sdp=offer.sdp, sdp_type="offer")
                assert stalled.cancelled_caught
            finally:
                await raw.close_peer_connection(pc)
            assert (await state(url))["offers"] == 1
            client = await _connected(url, sig, nursery)
            await raw.close_peer_connection(client.pc)
            nursery.cancel_scope.cancel()


async def test_fault_stall_media(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            client = await _connected(url, sig, nursery)
            await fault(url, "stall_media", seconds=2.5)
            frames_in = (await state(url))["frames_in"]
            await frames_stop(client, settle=0.3, quiet=1.0)
            assert client.pc.connectionState == "connected"
            assert (await state(url))["frames_in"] > frames_in  # input still arrives
            client.drain()
            await straight_frame(client)  # output resumes after the stall
            await raw.close_peer_connection(client.pc)
            nursery.cancel_scope.cancel()


async def test_fault_clear(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig, trio.open_nursery() as nursery:
            await fault(url, "refuse_offers", count=5)
            await fault(url, "stall_media", seconds=60)
            assert (await fault(url, "clear"))["action"] == "clear"
            faults = (await state(url))["faults"]
            assert faults["refuse_offers"] == 0
            assert faults["stall_media_seconds"] == 0
            client = await _connected(url, sig, nursery)
            await raw.close_peer_connection(client.pc)
            nursery.cancel_scope.cancel()


async def test_fault_withhold_ready(url: str) -> None:
    with trio.fail_after(DEADLINE):
        assert (await fault(url, "withhold_ready", count=1))["affected"] == 1
        async with open_signaling(url, expect_ready=False) as sig:
            await sig.send({"type": "ping", "request_id": "before-ready"})
            with trio.move_on_after(0.5) as quiet:  # the window under test: nothing comes
                await sig.receive()
            assert quiet.cancelled_caught, "neither ready nor an answer before it"
            assert (await state(url))["faults"]["withhold_ready"] == 0
            async with open_signaling(url) as second:  # only one was withheld
                assert (await second.request("ping"))["type"] == "pong"


async def test_fault_send_error_then_close(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig:
            result = await fault(
                url, "send_error", code="MAX_DURATION_EXCEEDED", error="Too long", close=None
            )
            assert result["affected"] == 1
            error = await sig.receive()
            assert error == {"type": "error", "error": "Too long", "code": "MAX_DURATION_EXCEEDED"}
            assert (await sig.request("ping"))["type"] == "pong", "close=null: stays open"
            await fault(url, "send_error", code="MAX_DURATION_EXCEEDED", reason="bye")
            assert (await sig.receive())["code"] == "MAX_DURATION_EXCEEDED"
            reason = await close_reason(sig)
            assert (reason.code, reason.reason) == (1000, "bye")


async def test_fault_garbage_sends_every_kind(aio_loop: object) -> None:
    async with running_devcloud(api_key="sk-echo-me") as base_url:
        with trio.fail_after(DEADLINE):
            async with open_signaling(base_url, "sk-echo-me") as sig:
                kinds = list(devcloud.GARBAGE_KINDS)
                await fault(base_url, "garbage", kinds=kinds, size=3000)
                frames = [await sig.ws.get_message() for _ in kinds]
                by_kind = dict(zip(kinds, frames, strict=True))
                assert isinstance(by_kind["binary"], bytes)
                assert by_kind["huge_binary"] == b"\x00" * 3000
                assert len(by_kind["huge_text"]) > 3000
                assert "sk-echo-me" in by_kind["echo_key"]
                assert json.loads(by_kind["unhashable_request_id"])["request_id"] == [
                    "not",
                    "hashable",
                ]
                assert (await sig.request("ping"))["type"] == "pong", "garbage ends nothing"


async def test_hostile_mode_wraps_every_reply_in_garbage(aio_loop: object) -> None:
    async with running_devcloud(hostile=True) as base_url:
        with trio.fail_after(DEADLINE):
            async with open_signaling(base_url) as sig:  # ready comes first, unwrapped
                await sig.send({"type": "ping", "request_id": "p1"})
                frames: list[str | bytes] = []
                while True:
                    frame = await sig.ws.get_message()
                    if isinstance(frame, str) and '"request_id": "p1"' in frame:
                        break
                    frames.append(frame)
                kinds = len(devcloud.HOSTILE_KINDS)
                assert len(frames) == 2 * kinds, "after ready, then before the pong"
                assert any(isinstance(f, bytes) for f in frames)
                assert json.loads(frame) == {"type": "pong", "request_id": "p1"}
        assert (await fault(base_url, "clear"))["ok"]  # the config flag outlives a clear


async def test_fault_malform_keeps_the_request_id_and_breaks_the_shape(url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_signaling(url) as sig:
            await fault(url, "malform", reply="ice_servers", count=1)
            reply = await sig.request("get_ice_servers")
            assert reply["data"] == {"iceServers": "stun:not-a-list"}
            assert (await sig.request("get_ice_servers"))["data"] == {"iceServers": []}
            await fault(url, "malform", reply="api_response", count=1)
            reply = await sig.request("api", method="GET", path="/api/v1/pipeline/status")
            assert (reply["status"], reply["data"]) == ("two hundred", ["not", "an", "object"])
            await fault(url, "malform", reply="answer", count=1)
            assert (await state(url))["faults"]["malform"] == {"answer": 1}
            reply = await offer_once(sig)
            assert reply["type"] == "answer"
            assert "sdp" not in reply
            current = await state(url)
            assert current["peer_connections"] == 0, "no session strays behind it"
            assert current["faults"]["malform"] == {}


@pytest.mark.parametrize(
    "body",
    [
        {"action": "explode"},
        {"action": "garbage", "kinds": ["nope"]},
        {"action": "garbage", "kinds": "text"},
        {"action": "malform", "reply": "pong"},
        {"action": "send_error", "close": 5},
        {"action": "withhold_ready", "count": -1},
        {"action": "hostile"},
        {"action": "blackhole"},
        {"action": "blackhole", "seconds": 1, "scope": "some"},
        {"action": "close_ws", "code": 5},
        {"action": "stall_media", "seconds": -1},
        {"action": "refuse_offers", "count": "x"},
        [1],
    ],
)
async def test_bad_fault_requests(url: str, body: object) -> None:
    response = await control(url, "POST", "/control/faults", body)
    assert response.status_code == 400
    assert response.json()["detail"]


# --------------------------------------------------------------------------------------------
# Lifecycle


async def test_stopping_the_server_closes_peer_connections(aio_loop: object) -> None:
    server_scope = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[str]) -> None:
        with server_scope:
            await devcloud.serve_devcloud(task_status=task_status)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            base_url = await nursery.start(serve)
            async with open_signaling(base_url) as sig:
                client = await _connected(base_url, sig, nursery)
                server_scope.cancel()
                # Server gone: the client's peer connection closes, signaling ends.
                assert await client.events.wait_state("closed") == "closed"
                await close_reason(sig)
            await raw.close_peer_connection(client.pc)
            nursery.cancel_scope.cancel()


async def test_graceful_shutdown_sends_going_away(aio_loop: object) -> None:
    stop = trio.Event()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            config = devcloud.DevCloudConfig()
            base_url = await nursery.start(
                lambda task_status: devcloud.serve_devcloud(
                    config, shutdown_trigger=stop.wait, task_status=task_status
                )
            )
            async with open_signaling(base_url) as sig:
                stop.set()
                reason = await close_reason(sig)
                assert reason.code == 1001
        # serve_devcloud returned by itself: the nursery was not cancelled.


async def test_standalone_loop() -> None:
    """No caller loop (no aio_loop fixture): the devcloud opens its own; a client loop opened
    afterwards (a sibling, not a parent) talks to it over real UDP."""
    with trio.fail_after(DEADLINE):
        async with running_devcloud(pipeline="invert") as base_url:
            response = await control(base_url, "GET", "/health")
            assert response.json() == {"status": "healthy", "pipeline": "invert"}
            async with (
                rtc.open_loop(),
                open_signaling(base_url) as sig,
                trio.open_nursery() as nursery,
            ):
                client = await start_media(sig, nursery)
                await inverted_frame(client)
                await raw.close_peer_connection(client.pc)
                nursery.cancel_scope.cancel()
