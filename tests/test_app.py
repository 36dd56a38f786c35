"""The HTTP API over real Hypercorn, the real CloudManager and the in-process dev cloud.

Browser sessions go to a fake relay (the HTTP mapping of the offer routes is what is tested
here; the real relay has its own end-to-end tests). Every wait has a deadline.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx
import pytest
import trio

import scope_trio
from scope_trio import rtc
from scope_trio.cloud.link import CloudLinkClosedError, CloudRequestTimeoutError
from scope_trio.cloud.manager import CloudManager, CloudSettings, LinkPolicy, NotConnectedError
from scope_trio.cloud.media import VideoInput
from scope_trio.config import ServerConfig
from scope_trio.core.supervisor import StartFailedError
from scope_trio.dev.devcloud import DevCloudConfig, serve_devcloud, ws_url
from scope_trio.http.app import MIB, PIPELINE_NOT_LOADED, ROUTES, ScopeApp
from scope_trio.http.routes.pipeline import NOT_LOADED
from scope_trio.server import open_server

SENTINEL_KEY = "sk-SENTINEL-8f2c1e0b9a"
OTHER_KEY = "sk-OTHER-SENTINEL-77aa01"
OFFER_SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


class FakeRelay:
    """Implements the BrowserRelay protocol; records calls; errors on demand."""

    def __init__(self) -> None:
        self.offers: list[tuple[str, str, Mapping[str, Any] | None, str | None]] = []
        self.live: dict[str, list[Mapping[str, Any]]] = {}
        self.offer_error: BaseException | None = None
        self.closed_all = 0

    async def offer(
        self,
        sdp: str,
        sdp_type: str,
        initial_parameters: Mapping[str, Any] | None = None,
        *,
        user_id: str | None = None,
    ) -> dict[str, str]:
        await trio.lowlevel.checkpoint()
        self.offers.append((sdp, sdp_type, initial_parameters, user_id))
        if self.offer_error is not None:
            raise self.offer_error
        if not sdp.startswith("v=0"):
            raise ValueError("not an SDP offer")
        session_id = f"session-{len(self.offers)}"
        self.live[session_id] = []
        return {"sdp": "v=0 answer", "type": "answer", "sessionId": session_id}

    async def add_candidates(
        self, session_id: str, candidates: Sequence[Mapping[str, Any]]
    ) -> None:
        await trio.lowlevel.checkpoint()
        received = self.live[session_id]
        for candidate in candidates:
            if not str(candidate["candidate"]).startswith("candidate:"):
                raise ValueError("bad candidate")
        received.extend(candidates)

    async def close(self, session_id: str) -> None:
        await trio.lowlevel.checkpoint()
        del self.live[session_id]

    async def close_all(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closed_all += 1
        self.live.clear()

    def sessions(self) -> dict[str, dict[str, Any]]:
        return {sid: {"state": "connected", "candidates": len(c)} for sid, c in self.live.items()}


@dataclass
class Server:
    http: httpx.AsyncClient
    manager: CloudManager
    relay: FakeRelay
    app: ScopeApp
    cloud: httpx.AsyncClient | None
    bodies: list[str] = field(default_factory=list)

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        with trio.fail_after(20):
            return await self.manager.wait_until(predicate)

    async def connected(self) -> dict[str, Any]:
        response = await self.http.post("/api/v1/cloud/connect")
        assert response.status_code == 200, response.text
        return await self.until(lambda s: s["connected"])


@asynccontextmanager
async def running(
    *,
    cloud: DevCloudConfig | None = DevCloudConfig(),  # noqa: B008 - frozen dataclass
    api_key: str | None = None,
    debug_endpoints: bool = True,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = MIB,
    sse_keepalive: float = 15.0,
) -> AsyncIterator[Server]:
    relay = FakeRelay()

    @asynccontextmanager
    async def fake_relay(manager: CloudManager, config: ServerConfig) -> AsyncIterator[FakeRelay]:
        yield relay

    async with trio.open_nursery() as outer:
        settings = CloudSettings()
        cloud_http: httpx.AsyncClient | None = None
        if cloud is not None:  # the cloud is outside the server under test
            base = await outer.start(_serve_cloud, cloud)
            settings = CloudSettings(ws_url=ws_url(base), api_key=api_key)
            cloud_http = httpx.AsyncClient(base_url=base, timeout=10)
        config = ServerConfig(
            port=0,
            cloud=settings,
            embedded_devcloud=False,
            debug_endpoints=debug_endpoints,
            cors_origins=tuple(cors_origins),
            max_body_bytes=max_body_bytes,
            graceful_timeout=1.0,
            relink=LinkPolicy(delay=0.2),
            link={"connect_backoff": (0.2, 0.4)},
        )
        bodies: list[str] = []

        async def record(response: httpx.Response) -> None:
            if not response.headers.get("content-type", "").startswith("text/event"):
                await response.aread()
                bodies.append(response.text)
                bodies.extend(f"{k}: {v}" for k, v in response.headers.items())

        async with open_server(
            config, relay_factory=fake_relay, sse_keepalive=sse_keepalive
        ) as server:
            http = httpx.AsyncClient(
                base_url=server.url, timeout=10, event_hooks={"response": [record]}
            )
            async with http:
                yield Server(http, server.manager, relay, server.app, cloud_http, bodies)
        if cloud_http is not None:
            await cloud_http.aclose()
        outer.cancel_scope.cancel()


async def _serve_cloud(config: DevCloudConfig, *, task_status: trio.TaskStatus[str]) -> None:
    """An in-process dev cloud in a trio-asyncio loop of its own (the server opens another)."""
    async with rtc.open_loop():
        await serve_devcloud(config, task_status=task_status)


class EventStream:
    """A minimal SSE client on a raw socket (h11), reading the exact wire format.

    (httpx's line iterators nest async generators that are finalised by the garbage
    collector when a stream is abandoned, which ``filterwarnings = error`` rightly rejects.)
    """

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self._stream = stream
        self._conn = conn
        self._buffer = ""
        self._ended = False
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self.comments: list[str] = []

    async def _event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self._stream.receive_some()
            self._conn.receive_data(data)  # b"" marks the end of the connection

    async def read_head(self) -> None:
        with trio.fail_after(10):
            event = await self._event()
        assert isinstance(event, h11.Response), event
        self.status_code = event.status_code
        self.headers = {k.decode().lower(): v.decode() for k, v in event.headers}

    async def next(self, timeout: float = 10) -> dict[str, Any] | None:  # noqa: ASYNC109
        """The next event's JSON; None when the stream ended."""
        with trio.fail_after(timeout):
            while True:
                if "\n\n" in self._buffer:
                    block, self._buffer = self._buffer.split("\n\n", 1)
                    data = []
                    for line in block.split("\n"):
                        if line.startswith(":"):
                            self.comments.append(line)
                        elif line.startswith("data: "):
                            data.append(line[len("data: ") :])
                    if data:
                        parsed: dict[str, Any] = json.loads("\n".join(data))
                        return parsed
                    continue
                if self._ended:
                    return None
                event = await self._event()
                if isinstance(event, h11.Data):
                    self._buffer += bytes(event.data).decode()
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    self._ended = True

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Events up to and including the first that satisfies ``predicate``."""
        seen = []
        while True:
            event = await self.next()
            assert event is not None, "the stream ended early"
            seen.append(event)
            if predicate(event):
                return seen


@asynccontextmanager
async def event_stream(http: httpx.AsyncClient) -> AsyncIterator[EventStream]:
    """``GET /api/v1/cloud/events`` on its own connection; closing it is a client disconnect."""
    url = http.base_url
    assert url.host
    assert url.port
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(url.host, url.port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target="/api/v1/cloud/events",
            headers=[("Host", f"{url.host}:{url.port}"), ("Accept", "text/event-stream")],
        )
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        events = EventStream(stream, conn)
        await events.read_head()
        yield events


# ---------------------------------------------------------------------------- basics


async def test_health() -> None:
    async with running() as s:
        response = await s.http.get("/health")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "healthy"
        assert body["version"] == scope_trio.__version__
        assert isinstance(body["server_start_time"], float)
        assert "T" in body["timestamp"]
        assert isinstance(body["git_commit"], str)
        assert body["git_commit"]


async def test_status_page_and_assets_are_served() -> None:
    async with running(debug_endpoints=False) as s:
        page = await s.http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "/api/v1/cloud/events" in page.text
        for asset in ("/static/app.js", "/static/style.css"):
            response = await s.http.get(asset)
            assert response.status_code == 200, asset
        script = (await s.http.get("/static/app.js")).text
        for used in ("/api/v1/webrtc/offer", "parameters", "getUserMedia", "captureStream"):
            assert used in script
        config = (await s.http.get("/api/v1/config")).json()
        assert config == {"version": scope_trio.__version__, "debug_endpoints": False}


async def test_unknown_route_and_wrong_method_are_json_errors() -> None:
    async with running() as s:
        missing = await s.http.get("/api/v1/nope")
        assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})
        wrong = await s.http.delete("/health")
        assert (wrong.status_code, wrong.json()) == (405, {"detail": "Method Not Allowed"})


# ---------------------------------------------------------------------------- cloud


async def test_connect_returns_at_once_then_connects_and_disconnect_tears_down() -> None:
    async with running() as s:
        response = await s.http.post("/api/v1/cloud/connect")
        assert response.status_code == 200
        status = response.json()
        assert (status["connected"], status["connecting"]) == (False, True)
        await s.until(lambda st: st["connected"])
        status = (await s.http.get("/api/v1/cloud/status")).json()
        assert status["connected"] is True
        assert status["connection_id"]
        assert status["stats"]["api_requests_sent"] == 0
        response = await s.http.post("/api/v1/cloud/disconnect")
        assert response.status_code == 200
        status = response.json()
        assert status["connected"] is False
        assert status["webrtc_connected"] is False
        assert status["app_id"] is None
        assert status["connecting"] is False
        assert s.relay.closed_all == 1, "browser sessions end with their cloud"


async def test_connect_with_no_cloud_configured_is_400() -> None:
    async with running(cloud=None) as s:
        response = await s.http.post("/api/v1/cloud/connect", json={})
        assert response.status_code == 400
        assert "SCOPE_CLOUD_APP_ID" in response.json()["detail"]
        status = (await s.http.get("/api/v1/cloud/status")).json()
        assert status["credentials_configured"] is False
        assert status["connecting"] is False


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"app_id": 5}, "app_id: Input should be a valid string"),
        ([1, 2], "body: expected a JSON object"),
        ("{not json", "body: invalid JSON"),
    ],
    ids=["wrong-type", "not-an-object", "not-json"],
)
async def test_connect_body_errors_are_400_naming_the_field(body: Any, detail: str) -> None:
    async with running() as s:
        content = body if isinstance(body, str) else json.dumps(body)
        response = await s.http.post(
            "/api/v1/cloud/connect",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["detail"].startswith(detail)
        assert s.manager.status()["connecting"] is False


async def test_stats_include_webrtc_stats() -> None:
    async with running() as s:
        await s.connected()
        await s.http.post("/api/v1/webrtc/offer", json={"sdp": OFFER_SDP, "type": "offer"})
        body = (await s.http.get("/api/v1/cloud/stats")).json()
        assert body["connected"] is True
        assert body["stats"]["uptime_seconds"] >= 0
        assert body["webrtc_stats"]["sessions"] == {
            "session-1": {"state": "connected", "candidates": 0}
        }
        assert body["webrtc_stats"]["cloud_session"]["phase"] == "idle"


async def test_debug_route_is_404_when_disabled() -> None:
    async with running(debug_endpoints=False) as s:
        await s.connected()
        response = await s.http.post("/api/v1/cloud/debug/disconnect-webrtc")
        assert (response.status_code, response.json()) == (404, {"detail": "Not found"})


async def test_debug_route_without_a_cloud_session_is_400() -> None:
    async with running(debug_endpoints=True) as s:
        response = await s.http.post("/api/v1/cloud/debug/disconnect-webrtc")
        assert (response.status_code, response.json()) == (400, {"detail": "WebRTC not connected"})
        await s.connected()
        response = await s.http.post("/api/v1/cloud/debug/disconnect-webrtc")
        assert (response.status_code, response.json()) == (400, {"detail": "WebRTC not connected"})


# ---------------------------------------------------------------------------- webrtc


async def test_ice_servers_are_local_when_not_connected_and_the_clouds_when_connected() -> None:
    async with running() as s:
        response = await s.http.get("/api/v1/webrtc/ice-servers")
        assert (response.status_code, response.json()) == (200, {"iceServers": []})
        await s.connected()
        link = s.manager.link
        assert link is not None
        response = await s.http.get("/api/v1/webrtc/ice-servers")
        assert (response.status_code, response.json()) == (200, {"iceServers": []})
        assert link.stats.successful["get_ice_servers"] == 1, "asked the cloud"


async def test_ice_servers_fall_back_to_the_local_list_when_the_cloud_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As Scope: this route never fails; the browser talks to this server anyway."""
    async with running() as s:
        await s.connected()

        async def closed(*args: Any, **kwargs: Any) -> dict[str, Any]:
            await trio.lowlevel.checkpoint()
            raise CloudLinkClosedError(1006, "connection lost")

        monkeypatch.setattr(s.manager.link, "request", closed)
        response = await s.http.get("/api/v1/webrtc/ice-servers")
        assert (response.status_code, response.json()) == (200, {"iceServers": []})


async def test_offer_passes_the_session_description_to_the_relay() -> None:
    async with running() as s:
        params = {"prompts": [{"text": "a cat", "weight": 1.0}], "noise_scale": 0.4, "extra": 1}
        response = await s.http.post(
            "/api/v1/webrtc/offer",
            json={
                "sdp": OFFER_SDP,
                "type": "offer",
                "initialParameters": params,
                "user_id": "u1",
                "connection_id": "c1",
                "connection_info": {"agent": "test"},
            },
        )
        assert response.status_code == 200
        assert response.json() == {"sdp": "v=0 answer", "type": "answer", "sessionId": "session-1"}
        assert s.relay.offers == [(OFFER_SDP, "offer", params, "u1")]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"type": "offer"}, "sdp: Field required"),
        ({"sdp": OFFER_SDP}, "type: Field required"),
        ({"sdp": OFFER_SDP, "type": "answer"}, "type: Input should be 'offer'"),
        ({"sdp": 12, "type": "offer"}, "sdp: Input should be a valid string"),
        (
            {"sdp": OFFER_SDP, "type": "offer", "initialParameters": {"prompts": [{"w": 1}]}},
            "initialParameters.prompts.0.text: Field required",
        ),
    ],
    ids=["no-sdp", "no-type", "answer", "sdp-not-str", "bad-prompt"],
)
async def test_offer_validation_is_400_naming_the_field(body: Any, detail: str) -> None:
    async with running() as s:
        response = await s.http.post("/api/v1/webrtc/offer", json=body)
        assert (response.status_code, response.json()) == (400, {"detail": detail})
        assert s.relay.offers == []


@pytest.mark.parametrize(
    ("error", "status", "detail"),
    [
        (NotConnectedError("no link"), 400, PIPELINE_NOT_LOADED),
        (ValueError("no m= line"), 400, "Invalid offer: no m= line"),
        (CloudRequestTimeoutError("offer", 10), 502, "Cloud request failed: no reply"),
        (StartFailedError("refused"), 502, "Cloud session failed: refused"),
    ],
    ids=["not-connected", "malformed-sdp", "cloud-timeout", "start-failed"],
)
async def test_offer_errors_map_to_the_contract(
    error: BaseException, status: int, detail: str
) -> None:
    async with running() as s:
        s.relay.offer_error = error
        response = await s.http.post("/api/v1/webrtc/offer", json={"sdp": "x", "type": "offer"})
        assert response.status_code == status
        assert response.json()["detail"].startswith(detail)


async def test_a_hung_relay_is_a_504_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("scope_trio.http.asgi.ROUTE_TIMEOUT", 0.3)
    async with running() as s:

        async def hang(*args: Any, **kwargs: Any) -> dict[str, str]:
            await trio.sleep_forever()
            raise AssertionError  # pragma: no cover

        monkeypatch.setattr(s.relay, "offer", hang)
        response = await s.http.post("/api/v1/webrtc/offer", json={"sdp": "v=0", "type": "offer"})
        assert response.status_code == 504
        assert response.json() == {"detail": "Timed out: the offer took over 0.3 s"}


async def test_malformed_sdp_is_400_never_500() -> None:
    async with running() as s:
        response = await s.http.post(
            "/api/v1/webrtc/offer", json={"sdp": "garbage", "type": "offer"}
        )
        assert response.status_code == 400
        assert response.json() == {"detail": "Invalid offer: not an SDP offer"}


async def test_candidates_and_close() -> None:
    async with running() as s:
        answer = await s.http.post("/api/v1/webrtc/offer", json={"sdp": OFFER_SDP, "type": "offer"})
        sid = answer.json()["sessionId"]
        good = {"candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMid": "0"}
        response = await s.http.patch(f"/api/v1/webrtc/offer/{sid}", json={"candidates": [good]})
        assert (response.status_code, response.content) == (204, b"")
        assert s.relay.live[sid][0]["sdpMLineIndex"] is None
        response = await s.http.patch("/api/v1/webrtc/offer/nope", json={"candidates": [good]})
        assert (response.status_code, response.json()) == (
            404,
            {"detail": "Session nope not found"},
        )
        bad = {"candidates": [{"candidate": "garbage"}]}
        response = await s.http.patch(f"/api/v1/webrtc/offer/{sid}", json=bad)
        assert response.status_code == 404
        assert response.json() == {"detail": "Invalid ICE candidate: bad candidate"}
        response = await s.http.patch(f"/api/v1/webrtc/offer/{sid}", json={"candidates": [{}]})
        assert response.status_code == 400
        assert response.json() == {"detail": "candidates.0.candidate: Field required"}
        response = await s.http.delete(f"/api/v1/webrtc/offer/{sid}")
        assert (response.status_code, response.content) == (204, b"")
        response = await s.http.delete(f"/api/v1/webrtc/offer/{sid}")
        assert response.status_code == 404


async def test_oversized_body_is_413() -> None:
    async with running(max_body_bytes=1024) as s:
        big = {"sdp": "v=0" + "x" * 2000, "type": "offer"}
        response = await s.http.post("/api/v1/webrtc/offer", json=big)
        assert response.status_code == 413
        assert response.json() == {"detail": "Request body too large (limit 1024 bytes)"}

        async def chunked() -> AsyncIterator[bytes]:
            yield json.dumps(big).encode()

        response = await s.http.post("/api/v1/webrtc/offer", content=chunked())
        assert response.status_code == 413
        assert s.relay.offers == []
        response = await s.http.post(
            "/api/v1/webrtc/offer", json={"sdp": OFFER_SDP, "type": "offer"}
        )
        assert response.status_code == 200, "a body under the limit still works"


# ---------------------------------------------------------------------------- pipeline


async def test_pipeline_routes_answer_locally_when_not_connected() -> None:
    """Status is Scope's local answer (a 503 put an error toast on every page load of
    Scope's UI); a load cannot work without the cloud and says why."""
    async with running() as s:
        response = await s.http.get("/api/v1/pipeline/status")
        assert response.status_code == 200
        assert response.json()["status"] == "not_loaded"
        response = await s.http.post("/api/v1/pipeline/load", json={"pipeline_ids": ["invert"]})
        assert response.status_code == 400
        assert "needs the cloud" in response.json()["detail"]
        response = await s.http.post("/api/v1/pipeline/load", json={"pipeline_ids": []})
        assert response.status_code == 400, "validated before anything else, as Scope"
        assert response.json()["detail"].startswith("pipeline_ids:")


async def test_pipeline_routes_pass_the_clouds_status_and_body_through() -> None:
    async with running() as s:
        await s.connected()
        response = await s.http.get("/api/v1/pipeline/status")
        assert response.status_code == 200
        assert response.json() == {
            **NOT_LOADED,  # every field, as Scope's response model fills them in
            "status": "loaded",
            "pipeline_id": "passthrough",
            "load_params": None,
            "loaded_lora_adapters": [],
            "error": None,
            "loading_stage": None,
        }
        load = {"pipeline_ids": ["invert"], "load_params": {"height": 512}}
        response = await s.http.post("/api/v1/pipeline/load", json=load)
        assert response.status_code == 200
        assert response.json() == {"message": "Pipeline loading initiated successfully"}
        status = (await s.http.get("/api/v1/pipeline/status")).json()
        assert status == {
            **NOT_LOADED,
            "status": "loaded",
            "pipeline_id": "invert",
            "load_params": {"height": 512},
            "loaded_lora_adapters": [],
            "error": None,
            "loading_stage": None,
        }
        response = await s.http.post("/api/v1/pipeline/load", json={"pipeline_ids": ["nope"]})
        assert (response.status_code, response.json()) == (
            400,
            {"detail": "Unknown pipeline: nope"},
        )
        response = await s.http.post("/api/v1/pipeline/load", json={"pipeline_ids": []})
        assert response.status_code == 400
        assert response.json()["detail"].startswith("pipeline_ids: List should have at least 1")
        assert s.manager.status()["stats"]["api_requests_sent"] == 4


async def test_pipeline_transport_failure_is_502(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running() as s:
        await s.connected()

        async def timeout(*args: Any, **kwargs: Any) -> tuple[int, Any]:
            await trio.lowlevel.checkpoint()
            raise CloudRequestTimeoutError("api", 30)

        monkeypatch.setattr(s.manager, "api", timeout)
        response = await s.http.get("/api/v1/pipeline/status")
        assert response.status_code == 502
        assert response.json() == {"detail": "Cloud request failed: Request timeout after 30.0s"}


async def test_pipeline_request_on_a_dropped_link_is_502_or_503() -> None:
    """A real transport failure: the cloud drops the WebSocket while requests are in flight."""
    async with running() as s:
        await s.connected()
        assert s.cloud is not None
        statuses: list[int] = []
        answered = trio.Event()

        async def hammer() -> None:
            for _ in range(40):
                response = await s.http.get("/api/v1/pipeline/status")
                statuses.append(response.status_code)
                answered.set()
                if response.status_code != 200:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hammer)
            with trio.fail_after(10):
                await answered.wait()  # requests are flowing before the link drops
            await s.cloud.post("/control/faults", json={"action": "drop_ws"})
        assert set(statuses) <= {200, 502, 503}
        assert 500 not in statuses


# ---------------------------------------------------------------------------- events (SSE)


async def test_events_show_connecting_then_connected() -> None:
    async with running() as s, event_stream(s.http) as events:
        assert events.status_code == 200
        assert events.headers["content-type"].startswith("text/event-stream")
        assert events.headers["cache-control"] == "no-cache"
        first = await events.next()
        assert first is not None
        assert (first["connected"], first["connecting"]) == (False, False)
        await s.http.post("/api/v1/cloud/connect")
        seen = await events.until(lambda e: e["connected"])
        assert any(e["connecting"] and not e["connected"] for e in seen)
        assert seen[-1]["connecting"] is False


async def test_events_show_reconnecting_then_connected_after_a_simulated_loss() -> None:
    async with running(debug_endpoints=True) as s, trio.open_nursery() as producer:
        await s.connected()
        video = VideoInput()
        frames = trio.open_memory_channel[object](math.inf)

        async def produce() -> None:
            frame = rtc.black_frame(64, 48)
            while True:
                video.push(frame)
                await trio.sleep(1 / 30)

        producer.start_soon(produce)
        with trio.fail_after(20):
            await s.manager.start_media(
                {"prompts": [{"text": "a"}]}, video_input=video, on_frame=frames[0].send_nowait
            )
            await frames[1].receive()
        async with event_stream(s.http) as events:
            first = await events.next()
            assert first is not None
            assert first["webrtc_connected"] is True
            reply = await s.http.post("/api/v1/cloud/debug/disconnect-webrtc")
            assert reply.status_code == 200
            assert reply.json()["connected"] is True
            assert reply.json()["webrtc_reconnecting"] is True, "the reply already tells the truth"
            assert reply.json()["webrtc_connected"] is False
            lost = await events.until(lambda e: e["webrtc_reconnecting"])
            assert lost[-1]["webrtc_error"].startswith("Remote inference connection lost: ")
            assert lost[-1]["error"] == lost[-1]["webrtc_error"]
            back = await events.until(lambda e: e["webrtc_connected"])
            assert back[-1]["webrtc_reconnecting"] is False
            assert back[-1]["webrtc_error"] is None
        await s.manager.stop_media()
        producer.cancel_scope.cancel()


async def test_events_keep_alive_and_end_on_shutdown() -> None:
    async with running(sse_keepalive=0.2) as s, event_stream(s.http) as events:
        assert await events.next() is not None
        with trio.move_on_after(0.7):
            await events.next()
        assert events.comments, "a keep-alive comment within the quiet period"
        assert events.comments[0] == ": keep-alive"
        s.app.begin_shutdown()
        assert await events.next(timeout=2) is None, "the stream ends on shutdown"


def _task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        children = (c for nursery in task.child_nurseries for c in nursery.child_tasks)
        return 1 + sum(walk(child) for child in children)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


async def test_events_end_cleanly_when_the_client_goes_away() -> None:
    async with running() as s:
        await s.http.get("/health")  # the keep-alive connection exists before counting
        before = _task_count()
        async with event_stream(s.http) as events:
            assert await events.next() is not None
            assert _task_count() > before
        with trio.fail_after(5):
            while _task_count() > before:  # noqa: ASYNC110 - polling a count, not an event
                await trio.sleep(0.02)
        await s.http.post("/api/v1/cloud/connect")  # changes with no reader: nothing breaks
        await s.until(lambda st: st["connected"])


# ---------------------------------------------------------------------------- OpenAPI, CORS


async def test_openapi_documents_every_route() -> None:
    async with running() as s:
        response = await s.http.get("/openapi.json")
        assert response.status_code == 200
        doc = response.json()
        assert doc["openapi"].startswith("3.")
        registered = {
            (method, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule))
            for rule in s.app.url_map.iter_rules()
            if rule.endpoint not in ("static", "frontend")
            for method in rule.methods or ()
            if method not in ("HEAD", "OPTIONS")
        }
        documented = {
            (method.upper(), path) for path, ops in doc["paths"].items() for method in ops
        }
        assert registered == documented
        assert len(documented) == len(ROUTES)
        for method, path in [
            ("GET", "/health"),
            ("POST", "/api/v1/cloud/connect"),
            ("POST", "/api/v1/cloud/disconnect"),
            ("GET", "/api/v1/cloud/status"),
            ("GET", "/api/v1/cloud/stats"),
            ("POST", "/api/v1/cloud/debug/disconnect-webrtc"),
            ("GET", "/api/v1/webrtc/ice-servers"),
            ("POST", "/api/v1/webrtc/offer"),
            ("PATCH", "/api/v1/webrtc/offer/{session_id}"),
            ("DELETE", "/api/v1/webrtc/offer/{session_id}"),
            ("POST", "/api/v1/pipeline/load"),
            ("GET", "/api/v1/pipeline/status"),
            ("GET", "/api/v1/cloud/events"),
        ]:
            assert (method, path) in documented
        offer = doc["paths"]["/api/v1/webrtc/offer"]["post"]["requestBody"]
        ref = offer["content"]["application/json"]["schema"]["$ref"]
        schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert set(schema["required"]) == {"sdp", "type"}
        assert "initialParameters" in schema["properties"]


async def test_cors_is_off_by_default() -> None:
    async with running() as s:
        response = await s.http.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in response.headers
        preflight = await s.http.options(
            "/api/v1/webrtc/offer",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers


async def test_cors_allows_only_the_configured_origins() -> None:
    allowed = "http://localhost:5173"
    async with running(cors_origins=[allowed]) as s:
        response = await s.http.get("/api/v1/cloud/status", headers={"Origin": allowed})
        assert response.headers["access-control-allow-origin"] == allowed
        preflight = await s.http.options(
            "/api/v1/webrtc/offer",
            headers={
                "Origin": allowed,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == allowed
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert preflight.headers["access-control-allow-headers"] == "content-type"
        other = await s.http.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        error = await s.http.get("/nope", headers={"Origin": allowed})
        assert error.headers["access-control-allow-origin"] == allowed


# ---------------------------------------------------------------------------- secrets


async def test_api_key_never_appears_in_responses_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cloud = DevCloudConfig(api_key=SENTINEL_KEY)
    async with running(cloud=cloud, api_key=SENTINEL_KEY) as s:
        async with event_stream(s.http) as events:
            await events.next()
            await s.http.post("/api/v1/cloud/connect", json={"user_id": "u"})
            streamed = await events.until(lambda e: e["connected"])
        await s.http.get("/api/v1/cloud/status")
        await s.http.get("/api/v1/cloud/stats")
        await s.http.get("/api/v1/pipeline/status")
        await s.http.get("/api/v1/webrtc/ice-servers")
        # A wrong key: the cloud refuses it; the error must not quote the key either.
        refused = await s.http.post(
            "/api/v1/cloud/connect", json={"app_id": "x", "api_key": OTHER_KEY}
        )
        assert refused.status_code == 200
        failed = await s.until(lambda st: not st["connecting"])
        assert failed["error"]
        await s.http.get("/api/v1/cloud/status")
        await s.http.post("/api/v1/cloud/connect", json={"api_key": [OTHER_KEY]})
        await s.http.post("/api/v1/cloud/disconnect")
        everything = "\n".join([*s.bodies, json.dumps(streamed), caplog.text])
        assert len(s.bodies) >= 10
        assert SENTINEL_KEY not in everything
        assert OTHER_KEY not in everything
        assert "SENTINEL" not in everything
