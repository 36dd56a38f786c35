"""Security properties of the real server (issue #6, "Security"), each a test of its own.

Every test here runs the real server: :func:`scope_trio.server.serve` in-process (the real
relay, the real cloud manager, Hypercorn on a real port; logs captured by ``caplog``), or
``scope-trio serve`` as a process (:mod:`serve_process`) where the command line's own
plumbing and output are the point.

Already covered elsewhere, and not repeated here:

* ``tests/test_app.py`` (the app over Hypercorn with a fake relay):
  ``test_debug_route_is_404_when_disabled``, ``test_oversized_body_is_413`` (one small
  Content-Length body and one single-chunk chunked body), ``test_cors_is_off_by_default``,
  ``test_cors_allows_only_the_configured_origins`` (one origin, also on a 404), and
  ``test_api_key_never_appears_in_responses_or_logs`` (status, stats, events and a refused
  key, with the fake relay).
* ``tests/test_server.py``: ``test_non_loopback_bind_needs_allow_remote`` (``0.0.0.0`` by
  flag, a LAN address by ``SCOPE_HOST``), ``test_cli_with_allow_remote_binds_and_warns``,
  ``test_is_loopback``; ``test_settings_come_from_env_and_flags_win`` (the api key is not in
  the settings' repr).
* ``tests/test_fuzz_http.py``: after a 413 the connection is closed or usable, never stuck.

What this module adds: the debug route stays 404 with a live cloud session and never
touches it; the api key stays out of every response, header, event and log line of the real
server with the real relay streaming, through connect success, refusal, a media loss and
reconnect, and request errors, and out of the CLI's stdout and stderr at DEBUG level (key by
flag and by environment, a cloud that refuses it, a cloud that is not there); a key that
cannot be sent as a header is a 400 instead of an error message that quotes it; every body
route answers 413 over the limit, by Content-Length and by a many-chunk chunked body, and a
body at the limit is not a 413; CORS by the command line with several origins and with
``*``; the non-loopback guard for IPv6 and by environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import httpx
import pytest
import trio
from devcloud_client import eventually, running_devcloud
from serve_process import browser_session, serve_process, wait_connected

from scope_trio import rtc
from scope_trio.cli import serve_main
from scope_trio.cloud.manager import CloudSettings
from scope_trio.dev.devcloud import ws_url
from scope_trio.http.app import MAX_POSTED_SECRETS, MIB, PIPELINE_NOT_LOADED, Redactor
from scope_trio.server import ServerConfig, serve

pytestmark = pytest.mark.system  # run on the pin-matrix ends only: see noxfile.py

KEY = "sk-SECSENTINEL-4b7e2d90aa"
WRONG_KEY = "sk-SECSENTINEL-WRONG-17c3"
SENTINEL = "SECSENTINEL"
"""In every key above: no fragment of a key may appear anywhere."""
BAD_HEADER_KEYS = [
    f"{KEY}\n",
    f"{KEY}\r",
    f"{KEY}\r\nX-Injected: 1",
    f"{KEY[:10]}\x00{KEY[10:]}",
    f" {KEY} ",
    f"{KEY}\ud800",
]
"""Keys that cannot be an HTTP header value (a key pasted from a CRLF file ends in "\\r")."""
DISCARD_WS = "ws://127.0.0.1:9/ws"
"""A signaling URL where nothing answers (the discard port, on loopback)."""
LIMIT_DETAIL = f"Request body too large (limit {MIB} bytes)"
REMOTE_WARNING = "reachable from other machines"


# ---------------------------------------------------------------------------- helpers


@dataclass
class Recorder:
    """Every response body and header the client saw, and every event-stream byte."""

    seen: list[str] = field(default_factory=list)

    async def __call__(self, response: httpx.Response) -> None:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            await response.aread()
            self.seen.append(response.text)
        self.seen.extend(f"{name}: {value}" for name, value in response.headers.items())

    def text(self) -> str:
        return "\n".join(self.seen)


def assert_no_key(text: str, *keys: str) -> None:
    for key in (*keys, SENTINEL, json.dumps(KEY)[1:-1]):
        assert key not in text, f"{key!r} leaked:\n" + "\n".join(
            line for line in text.splitlines() if SENTINEL in line
        )


@asynccontextmanager
async def serving(config: ServerConfig) -> AsyncIterator[str]:
    """The real server in-process for the block; yields its URL. Stops it gracefully."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve, config, shutdown_trigger=stop.wait))
        try:
            yield url
        finally:
            stop.set()


async def read_events(url: str, into: bytearray, *, task_status: Any) -> None:
    """``GET /api/v1/cloud/events`` on a raw socket, every byte kept, until the server ends
    the stream (its shutdown does)."""
    parsed = httpx.URL(url)
    assert parsed.port is not None
    stream = await trio.open_tcp_stream(parsed.host, parsed.port)
    async with stream:
        await stream.send_all(b"GET /api/v1/cloud/events HTTP/1.1\r\nHost: x\r\n\r\n")
        task_status.started()
        while chunk := await stream.receive_some():
            into.extend(chunk)


async def status_until(
    http: httpx.AsyncClient, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the status (it lives in the server) under a deadline until ``predicate``."""
    status: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal status
        status = (await http.get("/api/v1/cloud/status")).json()
        return predicate(status)

    await eventually(check, timeout=20)
    return status


# ---------------------------------------------------------------------------- debug routes


async def test_the_debug_route_is_404_with_a_live_cloud_session_and_touches_nothing() -> None:
    async with (
        rtc.open_loop(),
        serving(ServerConfig(port=0, debug_endpoints=False)) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        assert (await http.get("/api/v1/config")).json()["debug_endpoints"] is False
        await http.post("/api/v1/cloud/connect")
        await wait_connected(http)
        async with browser_session(http) as browser:
            before = (await http.get("/api/v1/cloud/stats")).json()
            assert before["webrtc_connected"] is True
            for body in (None, b"{}", b"junk"):
                response = await http.post("/api/v1/cloud/debug/disconnect-webrtc", content=body)
                assert (response.status_code, response.json()) == (404, {"detail": "Not found"})
            after = (await http.get("/api/v1/cloud/stats")).json()
            assert after["webrtc_connected"] is True
            assert after["webrtc_stats"]["cloud_session"] == before["webrtc_stats"]["cloud_session"]
            assert after["webrtc_stats"]["cloud_session"]["sessions_lost"] == 0
            await browser.inverted_frame()


async def test_the_debug_route_is_404_when_the_environment_sets_it_empty() -> None:
    """``SCOPE_DEBUG_ENDPOINTS`` must be non-empty: an empty value is "off", as in Scope."""
    async with (
        serve_process(env={"SCOPE_DEBUG_ENDPOINTS": ""}) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as http,
    ):
        response = await http.post("/api/v1/cloud/debug/disconnect-webrtc")
        assert (response.status_code, response.json()) == (404, {"detail": "Not found"})
        assert (await http.get("/api/v1/config")).json()["debug_endpoints"] is False
    assert served.returncode == 0, served.log


# ---------------------------------------------------------------------------- the api key


async def test_the_api_key_never_leaves_the_real_server(caplog: pytest.LogCaptureFixture) -> None:
    """Every response body, header, event and log line (DEBUG, every library) while the
    real relay streams: connect, a refused key, a media loss and its recovery, errors."""
    caplog.set_level(logging.DEBUG)
    recorder = Recorder()
    events = bytearray()
    async with rtc.open_loop(), running_devcloud(api_key=KEY, pipeline="invert") as cloud:
        cloud_settings = CloudSettings(ws_url=ws_url(cloud), api_key=KEY)
        config = ServerConfig(port=0, cloud=cloud_settings, debug_endpoints=True)
        async with trio.open_nursery() as readers, serving(config) as url:
            await readers.start(read_events, url, events)
            hooks = {"response": [recorder]}
            async with httpx.AsyncClient(base_url=url, timeout=20, event_hooks=hooks) as http:
                connect = await http.post("/api/v1/cloud/connect", json={"user_id": "u1"})
                assert connect.status_code == 200, connect.text
                await wait_connected(http)
                for path in (
                    "/api/v1/cloud/status",
                    "/openapi.json",
                    "/api/v1/config",
                    "/api/v1/webrtc/ice-servers",
                    "/api/v1/pipeline/status",
                    "/health",
                    "/",
                ):
                    assert (await http.get(path)).status_code == 200, path
                async with browser_session(http) as browser:
                    assert (await http.get("/api/v1/cloud/stats")).status_code == 200
                    lost = await http.post("/api/v1/cloud/debug/disconnect-webrtc")
                    assert lost.status_code == 200, lost.text
                    await status_until(http, lambda s: s["webrtc_reconnecting"])
                    await status_until(http, lambda s: s["webrtc_connected"])
                    await browser.inverted_frame()
                    assert (await http.get("/api/v1/cloud/stats")).status_code == 200
                # Request errors of every kind.
                await http.get("/nope")
                await http.delete("/health")
                too_big = await send_oversized(
                    url, "POST", "/api/v1/webrtc/offer", 2 * MIB, chunked=True
                )
                recorder.seen.append(json.dumps(too_big))
                await http.post("/api/v1/webrtc/offer", json={"sdp": "v=0", "type": "offer"})
                await http.post("/api/v1/pipeline/load", json={"pipeline_ids": ["nope"]})
                await http.post("/api/v1/cloud/connect", json={"api_key": 5})
                # A key the cloud refuses: the error is shown, the key is not.
                refused = await http.post("/api/v1/cloud/connect", json={"api_key": WRONG_KEY})
                assert refused.status_code == 200
                failed = await status_until(http, lambda s: not s["connecting"])
                assert failed["error"]
                assert not failed["connected"]
                # Back with the configured key, then a clean disconnect.
                await http.post("/api/v1/cloud/connect")
                await wait_connected(http)
                assert (await http.post("/api/v1/cloud/disconnect")).status_code == 200
            readers.cancel_scope.deadline = trio.current_time() + 20  # the server ends it
    assert events.count(b"data: {") >= 5, "the stream saw the changes"
    assert len(recorder.seen) >= 50
    assert "Access denied" in recorder.text(), "the refusal itself was visible"
    assert_no_key(recorder.text() + events.decode() + caplog.text, KEY, WRONG_KEY)


async def test_a_key_that_cannot_be_a_header_is_a_400_not_an_error_that_quotes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found while reviewing the connect path: a key with a control character or an edge
    space made the HTTP layer fail with an error quoting the header, escaped
    (``Illegal header value b'Key sk-...\\\\n'``), which no redaction of the key matched:
    it went into ``error``, the status, the event stream and the log. Now it is refused."""
    caplog.set_level(logging.DEBUG)
    recorder = Recorder()
    async with rtc.open_loop(), running_devcloud(api_key=KEY, pipeline="invert") as cloud:
        config = ServerConfig(port=0, cloud=CloudSettings(ws_url=ws_url(cloud)))
        hooks = {"response": [recorder]}
        async with (
            serving(config) as url,
            httpx.AsyncClient(base_url=url, timeout=20, event_hooks=hooks) as http,
        ):
            for key in BAD_HEADER_KEYS:
                body = json.dumps({"api_key": key}).encode()  # a lone surrogate as JSON escapes
                response = await http.post("/api/v1/cloud/connect", content=body)
                assert response.status_code == 400, (key, response.text)
                assert "printable ASCII" in response.json()["detail"]
                status = (await http.get("/api/v1/cloud/status")).json()
                assert (status["connecting"], status["error"]) == (False, None)
            connect = await http.post("/api/v1/cloud/connect", json={"api_key": KEY})
            assert connect.status_code == 200, "a good key still connects"
            await wait_connected(http)
    assert_no_key(recorder.text() + caplog.text, KEY, *BAD_HEADER_KEYS)


def test_the_response_redactor_keeps_the_configured_key_and_is_bounded() -> None:
    """Every key posted to /api/v1/cloud/connect is redacted from responses, but a client
    posting key after key must not make every response scan a list without bound: the
    configured key stays, and the latest MAX_POSTED_SECRETS posted ones."""
    redact = Redactor()
    redact.add(KEY)
    redact.add("abc")  # too short to redact safely: ignored
    posted = [f"sk-posted-{n:04d}" for n in range(MAX_POSTED_SECRETS + 10)]
    for key in posted:
        redact.add(key)
    assert len(redact.secrets) == 1 + MAX_POSTED_SECRETS
    assert redact(f"{KEY} {posted[-1]} {posted[10]}") == "*** *** ***"
    assert redact(posted[9]) == posted[9], "the oldest posted ones are forgotten"
    assert redact("abc") == "abc"


async def test_the_cli_never_prints_the_api_key() -> None:
    """``scope-trio serve`` at DEBUG: the key by flag against a cloud that needs it (success,
    a refused key, a request error), and by environment against a cloud that is not there."""
    recorder = Recorder()
    hooks = {"response": [recorder]}
    async with running_devcloud(api_key=KEY, pipeline="invert") as cloud:
        flags = ("--cloud-ws-url", ws_url(cloud), "--cloud-api-key", KEY, "--log-level", "DEBUG")
        async with (
            serve_process(*flags, "--debug-endpoints") as served,
            httpx.AsyncClient(base_url=served.url, timeout=20, event_hooks=hooks) as http,
        ):
            await http.post("/api/v1/cloud/connect")
            await wait_connected(http)
            for path in ("/api/v1/cloud/stats", "/api/v1/webrtc/ice-servers", "/openapi.json"):
                assert (await http.get(path)).status_code == 200
            assert (await http.post("/api/v1/cloud/debug/disconnect-webrtc")).status_code == 400
            await http.post("/api/v1/cloud/connect", json={"api_key": WRONG_KEY})
            refused = await status_until(http, lambda s: not s["connecting"])
            assert refused["error"]
    env = {"SCOPE_CLOUD_API_KEY": KEY, "SCOPE_CLOUD_WS_URL": DISCARD_WS}
    async with (
        serve_process("--log-level", "DEBUG", env=env) as unreachable,
        httpx.AsyncClient(base_url=unreachable.url, timeout=20, event_hooks=hooks) as http,
    ):
        await http.post("/api/v1/cloud/connect")
        failed = await status_until(http, lambda s: not s["connecting"])
        assert failed["error"]
        assert "could not connect" in failed["error"]
    for process in (served, unreachable):
        assert process.returncode == 0, process.log
        assert "DEBUG" in process.log, "the log really was at DEBUG"
    assert "Access denied" in recorder.text()
    assert_no_key(served.output + unreachable.output + recorder.text(), KEY, WRONG_KEY)


# ---------------------------------------------------------------------------- body size


BODY_ROUTES = [
    ("POST", "/api/v1/cloud/connect"),
    ("POST", "/api/v1/webrtc/offer"),
    ("PATCH", "/api/v1/webrtc/offer/some-session"),
    ("POST", "/api/v1/pipeline/load"),
    ("GET", "/api/v1/cloud/status"),  # a route without a body is no way around the limit
]


async def send_oversized(
    url: str, method: str, path: str, size: int, *, chunked: bool
) -> tuple[int, dict[str, Any]]:
    """Send a ``size``-byte body (64 KiB chunks, or one Content-Length body) on a raw
    connection, reading the answer while sending: the server answers a 413 before the
    body ends and then closes. (httpx would abandon its own request-body generator there,
    which ``filterwarnings = error`` rightly fails.)"""
    parsed = httpx.URL(url)
    assert parsed.port is not None
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "x"), ("Content-Type", "application/json")]
    headers.append(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size)))
    status, body = 0, b""
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream(parsed.host, parsed.port)
        async with stream, trio.open_nursery() as nursery:

            async def send() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(
                        conn.send(h11.Request(method=method, target=path, headers=headers))
                    )
                    for start in range(0, size, 64 * 1024):
                        data = b" " * min(64 * 1024, size - start)
                        await stream.send_all(conn.send(h11.Data(data=data)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))

            nursery.start_soon(send)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        conn.receive_data(await stream.receive_some())
                    except trio.BrokenResourceError:
                        conn.receive_data(b"")
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            nursery.cancel_scope.cancel()
    return status, json.loads(body) if body else {}


async def test_every_route_answers_413_over_the_limit_and_not_at_it() -> None:
    async with serve_process() as served:
        for method, path in BODY_ROUTES:
            for chunked in (False, True):
                answer = await send_oversized(served.url, method, path, 2 * MIB, chunked=chunked)
                assert answer == (413, {"detail": LIMIT_DETAIL}), (path, chunked, answer)
        async with httpx.AsyncClient(base_url=served.url, timeout=20) as http:
            sdp = "v=0" + " " * (MIB - 100)
            body = json.dumps({"sdp": sdp, "type": "offer"}).encode()
            assert len(body) <= MIB
            at_limit = await http.post("/api/v1/webrtc/offer", content=body)
            assert (at_limit.status_code, at_limit.json()) == (400, {"detail": PIPELINE_NOT_LOADED})
            assert (await http.get("/health")).status_code == 200
    assert served.returncode == 0, served.log


# ---------------------------------------------------------------------------- CORS


def _cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


async def _preflight(http: httpx.AsyncClient, origin: str) -> httpx.Response:
    return await http.options(
        "/api/v1/webrtc/offer",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-scope",
        },
    )


async def test_cors_is_off_by_default_on_the_real_server() -> None:
    async with (
        serving(ServerConfig(port=0)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        for origin in ("http://localhost:5173", "null", "http://evil.example"):
            simple = await http.get("/api/v1/cloud/status", headers={"Origin": origin})
            assert simple.status_code == 200
            assert _cors_headers(simple) == {}
            preflight = await _preflight(http, origin)
            assert _cors_headers(preflight) == {}
            posted = await http.post(
                "/api/v1/webrtc/offer",
                json={"sdp": "v=0", "type": "offer"},
                headers={"Origin": origin},
            )
            assert _cors_headers(posted) == {}


async def test_cors_origins_from_the_command_line() -> None:
    allowed = ["http://localhost:5173", "http://127.0.0.1:3000"]
    flags = [arg for origin in allowed for arg in ("--cors-origin", origin)]
    async with (
        serve_process(*flags) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as http,
    ):
        for origin in allowed:
            simple = await http.get("/api/v1/cloud/status", headers={"Origin": origin})
            assert simple.headers["access-control-allow-origin"] == origin
            assert "Origin" in simple.headers["vary"]
            assert "access-control-allow-credentials" not in simple.headers
            preflight = await _preflight(http, origin)
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == origin
            methods = {
                m.strip() for m in preflight.headers["access-control-allow-methods"].split(",")
            }
            assert {"GET", "POST", "PATCH", "DELETE"} <= methods
            assert preflight.headers["access-control-allow-headers"] == "content-type, x-scope"
        for other in ("http://localhost:5174", "http://evil.example", "null"):
            assert _cors_headers(await http.get("/health", headers={"Origin": other})) == {}
            assert _cors_headers(await _preflight(http, other)) == {}
    assert served.returncode == 0, served.log


async def test_cors_star_allows_any_origin() -> None:
    async with (
        serving(ServerConfig(port=0, cors_origins=("*",))) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        for origin in ("http://a.example", "http://localhost:1"):
            simple = await http.get("/health", headers={"Origin": origin})
            assert simple.headers["access-control-allow-origin"] == origin
            preflight = await _preflight(http, origin)
            assert (preflight.status_code, preflight.headers["access-control-allow-origin"]) == (
                204,
                origin,
            )
        assert _cors_headers(await http.get("/health")) == {}, "no Origin, no CORS headers"


# ---------------------------------------------------------------------------- binding


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["--host", "::"], {}), (["--host", "[::]"], {}), ([], {"SCOPE_HOST": "0.0.0.0"})],
    ids=["ipv6-any", "ipv6-any-bracketed", "env-any"],
)
def test_any_non_loopback_bind_is_refused_without_allow_remote(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve_main(argv, env) == 2
    out, err = capsys.readouterr()
    assert "--allow-remote" in err
    assert "http://" not in out, "nothing was served"


async def test_a_non_loopback_bind_from_the_environment_warns_and_loopback_does_not() -> None:
    async with serve_process("--allow-remote", env={"SCOPE_HOST": "0.0.0.0"}) as remote:
        port = httpx.URL(remote.url).port
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200
    warnings = [line for line in remote.log.splitlines() if REMOTE_WARNING in line]
    assert len(warnings) == 1, remote.log
    assert "WARNING" in warnings[0]
    assert "0.0.0.0" in warnings[0]
    async with serve_process("--host", "localhost") as local:
        assert re.match(r"http://(localhost|127\.0\.0\.1):\d+", local.url), local.url
    assert REMOTE_WARNING not in local.log
    for process in (remote, local):
        assert process.returncode == 0, process.log
