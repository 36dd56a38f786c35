"""``serve()`` in-process and ``scope-trio serve`` as a real process: startup, embedded dev
cloud, shutdown order and bounds, signals, the loopback guard, settings from env and flags."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from browser_peer import http_browser

from scope_trio import rtc
from scope_trio.cli import serve_main
from scope_trio.cloud.manager import CloudManager, CloudSettings
from scope_trio.dev.fakes import NoRelay
from scope_trio.http.app import PIPELINE_NOT_LOADED
from scope_trio.server import ServerConfig, is_loopback, serve

URL_LINE = re.compile(r"open (http://\S+) in your browser")


async def poll_status(http: httpx.AsyncClient, key: str) -> dict[str, Any]:
    with trio.fail_after(20):
        while True:
            status: dict[str, Any] = (await http.get("/api/v1/cloud/status")).json()
            if status[key]:
                return status
            await trio.sleep(0.05)


async def test_serve_without_a_cloud_uses_the_embedded_dev_cloud() -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve, ServerConfig(port=0), shutdown_trigger=stop.wait))
        assert url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            health = await http.get("/health")
            assert health.json()["status"] == "healthy"
            status = (await http.get("/api/v1/cloud/status")).json()
            assert status["credentials_configured"] is True, "the embedded cloud is configured"
            offer = await http.post("/api/v1/webrtc/offer", json={"sdp": "v=0", "type": "offer"})
            assert (offer.status_code, offer.json()) == (400, {"detail": PIPELINE_NOT_LOADED})
            connect = await http.post("/api/v1/cloud/connect")
            assert connect.json()["connecting"] is True
            status = await poll_status(http, "connected")
            assert status["connection_id"]
            pipeline = await http.get("/api/v1/pipeline/status")
            assert pipeline.json()["status"] == "loaded"
        started = trio.current_time()
        stop.set()
    assert trio.current_time() - started < 5, "graceful shutdown is prompt"


class RecordingRelay(NoRelay):
    """A relay whose ``close_all`` checks that the HTTP server is still up at that moment."""

    def __init__(self, manager: CloudManager, url: list[str], log: list[str]) -> None:
        self.manager = manager
        self.url = url
        self.log = log

    async def close_all(self) -> None:
        self.log.append(f"close_all (cloud connected={self.manager.status()['connected']})")
        async with httpx.AsyncClient(base_url=self.url[0], timeout=5) as http:
            response = await http.get("/health")
        self.log.append(f"http still serving: {response.status_code}")


async def test_shutdown_closes_sessions_and_cloud_before_the_server() -> None:
    stop = trio.Event()
    url: list[str] = []
    log: list[str] = []
    config = ServerConfig(port=0)

    @asynccontextmanager
    async def factory(manager: CloudManager, config: ServerConfig) -> AsyncIterator[RecordingRelay]:
        yield RecordingRelay(manager, url, log)

    async with trio.open_nursery() as nursery:
        url.append(
            await nursery.start(
                partial(serve, config, shutdown_trigger=stop.wait, relay_factory=factory)
            )
        )
        async with httpx.AsyncClient(base_url=url[0], timeout=10) as http:
            await http.post("/api/v1/cloud/connect")
            await poll_status(http, "connected")
            # An open event stream must not hold the shutdown up.
            async with http.stream("GET", "/api/v1/cloud/events") as events:
                assert events.status_code == 200
                started = trio.current_time()
                stop.set()
                with trio.fail_after(5):
                    await events.aread()  # ends because the server ends it
    assert trio.current_time() - started < 5
    assert log == ["close_all (cloud connected=True)", "http still serving: 200"]


async def test_serve_cancelled_still_closes_within_its_bound() -> None:
    with trio.move_on_after(30) as guard:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve, ServerConfig(port=0)))
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                await http.post("/api/v1/cloud/connect")
                await poll_status(http, "connected")
            started = trio.current_time()
            nursery.cancel_scope.cancel()
    assert not guard.cancelled_caught
    assert trio.current_time() - started < 5


async def test_a_browser_streams_through_the_http_api_with_the_real_relay() -> None:
    """HTTP offer → the real relay → the embedded dev cloud → frames back to the "browser";
    a simulated cloud loss recovers without renegotiating; DELETE ends the session."""
    stop = trio.Event()
    config = ServerConfig(port=0, debug_endpoints=True)
    async with rtc.open_loop(), trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve, config, shutdown_trigger=stop.wait))
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            await http.post("/api/v1/cloud/connect")
            await poll_status(http, "connected")
            params = {"prompts": [{"text": "a fox", "weight": 1}]}
            async with http_browser(http, params, deadline=20) as browser:
                await browser.inverted_frame()
                await poll_status(http, "webrtc_connected")
                stats = (await http.get("/api/v1/cloud/stats")).json()
                assert browser.session_id in stats["webrtc_stats"]["sessions"]
                lost = await http.post("/api/v1/cloud/debug/disconnect-webrtc")
                assert lost.status_code == 200
                with trio.fail_after(20):
                    while True:
                        stats = (await http.get("/api/v1/cloud/stats")).json()
                        cloud = stats["webrtc_stats"]["cloud_session"]
                        if stats["webrtc_connected"] and cloud["sessions_started"] == 2:
                            break
                        await trio.sleep(0.05)
                await browser.inverted_frame()  # frames keep flowing into the same track
                assert browser.pc.connectionState == "connected", "never renegotiated"
                closed = await http.delete(f"/api/v1/webrtc/offer/{browser.session_id}")
                assert closed.status_code == 204
        stop.set()


# ---------------------------------------------------------------------------- settings


def test_settings_come_from_env_and_flags_win() -> None:
    env = {
        "SCOPE_HOST": "127.0.0.2",
        "SCOPE_PORT": "9001",
        "SCOPE_CLOUD_APP_ID": "me/app",
        "SCOPE_CLOUD_API_KEY": "k-123456",
        "SCOPE_DEBUG_ENDPOINTS": "1",
    }
    config = ServerConfig.from_env(env)
    assert (config.host, config.port, config.debug_endpoints) == ("127.0.0.2", 9001, True)
    assert config.cloud == CloudSettings(app_id="me/app", api_key="k-123456")
    assert "k-123456" not in repr(config)
    assert not config.embedded_cloud
    flags = ServerConfig.from_env(env, host="::1", port=8123, debug_endpoints=None)
    assert (flags.host, flags.port, flags.debug_endpoints) == ("::1", 8123, True)
    assert ServerConfig.from_env({"SCOPE_DEBUG_ENDPOINTS": ""}).debug_endpoints is False
    assert ServerConfig.from_env({}).embedded_cloud


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("127.0.0.5", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.4", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["--host", "0.0.0.0"], {}), ([], {"SCOPE_HOST": "192.168.1.4"})],
    ids=["flag", "env"],
)
def test_non_loopback_bind_needs_allow_remote(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve_main(argv, env) == 2
    err = capsys.readouterr().err
    assert "not a loopback address" in err
    assert "--allow-remote" in err


def test_bad_port_setting_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main([], {"SCOPE_PORT": "eighty"}) == 2
    assert "bad setting" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the process


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"no output within {timeout} s")
    return proc.stdout.readline()


def _start(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "scope_trio", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(),
    )
    try:
        line = _read_line(proc, 30)
    except BaseException:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    return proc, line


def _stop(proc: subprocess.Popen[str], signum: int) -> tuple[float, str, str]:
    started = time.monotonic()
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    return time.monotonic() - started, out, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_serves_and_exits_cleanly_on_a_signal(signum: int) -> None:
    proc, line = _start()
    match = URL_LINE.search(line)
    assert match, line
    assert "embedded dev cloud" in line
    url = match.group(1)
    try:
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.json()["status"] == "healthy"
        connect = httpx.post(f"{url}/api/v1/cloud/connect", timeout=10)
        assert connect.status_code == 200
        deadline = time.monotonic() + 20
        while not httpx.get(f"{url}/api/v1/cloud/status", timeout=10).json()["connected"]:
            assert time.monotonic() < deadline, "connected to the embedded dev cloud"
            time.sleep(0.05)
    finally:
        elapsed, out, err = _stop(proc, signum)
    assert proc.returncode == 0, err
    assert elapsed < 8, f"shut down in {elapsed:.1f} s"
    assert out == "", "exactly one line on stdout"
    assert "Traceback" not in err
    assert "shutting down" in err


def test_cli_with_allow_remote_binds_and_warns() -> None:
    proc, line = _start("--host", "0.0.0.0", "--allow-remote", "--log-level", "warning")
    try:
        match = URL_LINE.search(line)
        assert match, line
        port = match.group(1).rsplit(":", 1)[1]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        _elapsed, _out, err = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
    assert "reachable from other machines" in err


def test_cli_with_a_cloud_configured_does_not_start_the_dev_cloud() -> None:
    proc, line = _start("--cloud-ws-url", "ws://127.0.0.1:9/ws", "--debug-endpoints")
    try:
        assert "embedded dev cloud" not in line
        match = re.search(r"serving on (http://\S+);", line)
        assert match, line
        config = httpx.get(f"{match.group(1)}/api/v1/config", timeout=10).json()
        assert config["debug_endpoints"] is True
    finally:
        _elapsed, _out, err = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
