"""A hostile dev cloud: garbage on the signaling WebSocket, against the real stack.

The dev cloud's hostile mode and its ``garbage`` / ``malform`` faults send non-JSON text,
binary frames, unknown types, replies to requests never made, wrong and unhashable
request_ids, replies with the right request_id and the wrong shape, the api key echoed back,
and messages far over trio-websocket's 1 MiB limit, interleaved with real traffic. With the
real CloudManager, Relay and HTTP API (:mod:`fault_rig`) each test checks that the link logs
what happened in a clear line and survives (requests still work, media still flows), or
closes with a clear error and is re-established; that no nursery crashed (the manager's
owner nursery is alive and a fresh connect works); and that no log line, response or event
contains the api key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from devcloud_client import eventually
from fault_rig import Browser, Stack, browser, open_stack, recovery_problems, status_problems

from scope_trio.dev.devcloud import HOSTILE_KINDS, DevCloudConfig

pytestmark = pytest.mark.system  # run on the pin-matrix ends only: see noxfile.py

KEY = "sk-HOSTILE-SENTINEL-5c0ffee"
INITIAL = {"prompts": [{"text": "a fox", "weight": 1.0}], "noise_scale": 0.3}
MIB = 1024 * 1024
TOO_BIG = "Exceeded maximum message size: 1048576 bytes"
"""trio-websocket's own close reason: its ``max_message_size`` defaults to 1 MiB."""


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Everything logged, at every level; after the test, the api key in none of it."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    leaked = [r.getMessage() for r in caplog.records if KEY in r.getMessage()]
    assert not leaked, f"the api key was logged: {leaked[:3]}"
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], "hostility is logged as a warning, never as a crash"


def hostile(**config: object) -> DevCloudConfig:
    return DevCloudConfig(pipeline="invert", api_key=KEY, **config)  # type: ignore[arg-type]


def messages(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


def assert_garbage_was_logged(caplog: pytest.LogCaptureFixture) -> None:
    """One clear line per kind of garbage (the link's logger)."""
    warnings = messages(caplog, "scope_trio.cloud.link", logging.WARNING)
    debug = messages(caplog, "scope_trio.cloud.link", logging.DEBUG)
    for wanted in (
        "ignoring non-JSON message from the cloud: 'this is not JSON {'",
        "ignoring binary frame from the cloud (",
        "ignoring non-object JSON from the cloud: '[1, 2, 3]'",
        "ignoring 'answer' for unknown request_id 'not-",
        "ignoring 'pong' for unknown request_id ['not', 'hashable']",
        "ignoring 'api_response' for unknown request_id",
        "ignoring 'error' for unknown request_id",
        "ignoring 'logs' message without a list of lines",
    ):
        assert any(line.startswith(wanted) for line in warnings), f"no line like {wanted!r}"
    assert any("'mystery'" in line for line in debug)
    assert any("'ready'" in line for line in debug)
    assert any("your key was Key ***" in line for line in warnings), "the echo, redacted"


def assert_truthful(s: Stack) -> None:
    for snapshot in [*s.snapshots, *s.sse.events]:
        assert not status_problems(snapshot), snapshot


async def assert_still_usable(s: Stack) -> None:
    """Requests through the link work; the owner nursery is alive; a fresh connect works."""
    status = await s.api.get("/api/v1/pipeline/status")
    assert (status.status_code, status.json()["status"]) == (200, "loaded")
    ice = await s.api.get("/api/v1/webrtc/ice-servers")
    assert (ice.status_code, ice.json()) == (200, {"iceServers": []})
    assert s.owner_alive
    await s.api.post("/api/v1/cloud/disconnect")
    await s.connect()
    assert s.owner_alive


async def streaming(s: Stack, b: Browser) -> None:
    await b.inverted_frame()

    async def one_cloud_session() -> bool:
        return (await s.cloud_state())["peer_connections"] == 1

    await eventually(one_cloud_session)


async def test_hostile_mode_around_every_message(logs: pytest.LogCaptureFixture) -> None:
    """Every message after ``ready`` comes wrapped in a burst of every kind of garbage
    (:data:`HOSTILE_KINDS`): the link, the user id, the pipeline load, the media session
    and parameter updates all work through it, the link never drops, and every kind of
    garbage is named in one clear log line."""
    async with open_stack(devcloud=hostile(hostile=True), api_key=KEY) as s:
        response = await s.api.post("/api/v1/cloud/connect", json={"user_id": "user-1"})
        assert response.status_code == 200, response.text
        connected = await s.until(lambda st: st["connected"] or not st["connecting"])
        assert connected["connected"], connected["error"]
        load = await s.api.post("/api/v1/pipeline/load", json={"pipeline_ids": ["invert"]})
        assert load.status_code == 200, load.text
        async with browser(s.api, INITIAL) as b:
            await streaming(s, b)
            b.send({"noise_scale": 0.9})

            async def updated() -> bool:
                sessions = (await s.cloud_state())["sessions"]
                return bool(sessions) and sessions[0]["parameters"]["noise_scale"] == 0.9

            await eventually(updated)
            await b.inverted_frame()
            status = s.manager.status()
            assert status["connection_id"] == connected["connection_id"], "never re-linked"
            assert s.manager.supervisor.status.sessions_lost == 0
        assert_garbage_was_logged(logs)
        assert_truthful(s)
        assert all(KEY not in str(event) for event in s.sse.events)
        await assert_still_usable(s)


async def test_garbage_burst_mid_stream_changes_nothing(logs: pytest.LogCaptureFixture) -> None:
    async with open_stack(devcloud=hostile(), api_key=KEY) as s:
        first = await s.connect()
        async with browser(s.api, INITIAL) as b:
            await streaming(s, b)
            result = await s.fault("garbage", kinds=list(HOSTILE_KINDS) * 3)
            assert result["affected"] == 1
            ping = await s.manager.link.request("ping")  # type: ignore[union-attr]
            assert ping["type"] == "pong"  # answered after the whole burst
            await b.inverted_frame()
            status = s.manager.status()
            assert (status["connected"], status["webrtc_connected"]) == (True, True)
            assert status["connection_id"] == first["connection_id"]
            assert s.manager.supervisor.status.sessions_lost == 0
        assert_garbage_was_logged(logs)
        assert_truthful(s)
        await assert_still_usable(s)


async def test_malformed_replies_fail_their_request_and_nothing_else(
    logs: pytest.LogCaptureFixture,
) -> None:
    """The right request_id, the wrong shape: ``ice_servers`` whose ``iceServers`` is not a
    list, an ``answer`` without ``sdp``, an ``api_response`` whose status is not a number.
    Each fails the one request it answers, with a clear reason; a reconnect goes on to the
    next attempt (backoff 0.1 s here instead of Scope's 1 s) and connects."""
    async with open_stack(devcloud=hostile(), api_key=KEY) as s:
        await s.connect()
        async with browser(s.api, INITIAL) as b:
            await streaming(s, b)
            started = s.manager.supervisor.status.sessions_started
            await s.fault("malform", reply="ice_servers", count=1)
            await s.fault("malform", reply="answer", count=1)
            await s.fault("close_pc")
            await s.until(
                lambda st: (
                    st["webrtc_connected"]
                    and s.manager.supervisor.status.sessions_started > started
                )
            )
            failures = [
                line
                for line in messages(logs, "scope_trio.core.supervisor", logging.WARNING)
                if line.startswith("reconnect attempt")
            ]
            assert failures == [
                "reconnect attempt 1/3 failed: the cloud's ice_servers reply is not a list "
                "of objects",
                "reconnect attempt 2/3 failed: the cloud's answer lacks 'sdp' or 'sessionId'",
            ]
            await b.inverted_frame()
            ice = await s.api.get("/api/v1/webrtc/ice-servers")
            assert ice.status_code == 200

            await s.fault("malform", reply="ice_servers", count=1)
            ice = await s.api.get("/api/v1/webrtc/ice-servers")
            assert (ice.status_code, ice.json()) == (200, {"iceServers": []}), "as Scope: no error"
            assert "the cloud sent no iceServers list; using none" in messages(
                logs, "scope_trio.http.routes.webrtc", logging.WARNING
            )
            await s.fault("malform", reply="api_response", count=1)
            status = await s.api.get("/api/v1/pipeline/status")
            assert status.status_code == 502
            assert status.json() == {
                "detail": "Cloud request failed: the reply has no valid status: 'two hundred'"
            }
            assert (await s.api.get("/api/v1/pipeline/status")).status_code == 200
            assert s.manager.status()["webrtc_connected"]
        assert_truthful(s)
        await assert_still_usable(s)


@pytest.mark.parametrize(
    ("kind", "size"),
    [("huge_text", 2 * MIB), ("huge_text", 16 * MIB), ("huge_binary", 2 * MIB)],
    ids=["text-2MiB", "text-16MiB", "binary-2MiB"],
)
async def test_a_message_over_the_limit_closes_the_link_clearly_and_it_is_relinked(
    kind: str, size: int, logs: pytest.LogCaptureFixture
) -> None:
    """Over trio-websocket's 1 MiB ``max_message_size`` the client closes the WebSocket
    itself with 1009 and that reason: a clear close, not a crash. The manager re-links
    (pause 0.1 s here instead of 1 s) and media resumes on the same browser pc."""
    async with open_stack(devcloud=hostile(), api_key=KEY) as s:
        first = await s.connect()
        async with browser(s.api, INITIAL) as b:
            await streaming(s, b)
            mark = len(s.snapshots)
            await s.fault("garbage", kinds=[kind], size=size)
            lost = await s.until(lambda st: not st["connected"])
            assert lost["connecting"] is True, "re-linking"
            assert (lost["last_close_code"], lost["last_close_reason"]) == (1009, TOO_BIG)
            back = await s.until(lambda st: st["connected"] and st["webrtc_connected"])
            assert back["connection_id"] != first["connection_id"]
            assert back["error"] is None
            await b.inverted_frame()
            assert b.pc.connectionState == "connected"
            assert b.states_after_connect == []
            for snapshot in s.snapshots[mark:]:
                if not snapshot["webrtc_connected"]:
                    assert not recovery_problems(snapshot), snapshot
        ended = messages(logs, "scope_trio.cloud.manager", logging.WARNING)
        assert f"cloud link ended: code 1009, {TOO_BIG}" in ended
        assert_truthful(s)
        await assert_still_usable(s)


async def test_a_big_message_under_the_limit_is_just_ignored(
    logs: pytest.LogCaptureFixture,
) -> None:
    async with open_stack(devcloud=hostile(), api_key=KEY) as s:
        first = await s.connect()
        await s.fault("garbage", kinds=["huge_text"], size=MIB - 100)
        pong = await s.manager.link.request("ping")  # type: ignore[union-attr]
        assert pong["type"] == "pong"
        assert s.manager.status()["connection_id"] == first["connection_id"]
        assert any(
            "'mystery'" in line for line in messages(logs, "scope_trio.cloud.link", logging.DEBUG)
        )
        await assert_still_usable(s)


async def test_the_key_echoed_in_a_close_reason_and_an_error_is_not_shown(
    logs: pytest.LogCaptureFixture,
) -> None:
    """A cloud that quotes the client's key back in its ``error`` and close frame: the
    status, the events and the logs show the reason with the key redacted."""
    async with open_stack(devcloud=hostile(), api_key=KEY) as s:
        await s.connect()
        await s.fault("send_error", error=f"bad key Key {KEY}", code="ACCESS_DENIED", close=4003)
        final = await s.until(lambda st: not st["connected"] and not st["connecting"])
        assert KEY not in str(final)
        assert final["last_close_code"] == 4003
        assert "bad key Key ***" in (final["error"] or "")
        await s.sse.until(lambda e: not e["connected"] and not e["connecting"])
        assert all(KEY not in str(event) for event in s.sse.events)
        response = await s.api.get("/api/v1/cloud/status")
        assert KEY not in response.text
