"""The real stack for fault tests: dev cloud ⇄ CloudManager + Relay ⇄ HTTP API ⇄ "browser".

:func:`open_stack` runs the real server, assembled by ``scope_trio.server.open_server`` as
``scope-trio serve`` assembles it (CloudManager, the real Relay, the real HTTP app on
Hypercorn on a real port, the real shutdown order), with small policies a test passes in
through its ``ServerConfig``, against a dev cloud that is either in-process or a separate
process (:class:`DevCloudProcess`, killable with SIGKILL). While the block runs it records
every CloudStatus three ways:

* ``sse``: the events of ``GET /api/v1/cloud/events`` read off the wire (coalesced, as every
  client sees them);
* ``snapshots``: ``CloudManager.status()`` after every ``wait_change`` (below HTTP, finer);
* ``phases``: every ``SupervisorStatus`` from ``supervisor.watch()`` (lossless, in order).

:class:`Browser` is an aiortc peer acting as Scope's frontend through the HTTP API: it offers
via ``POST /api/v1/webrtc/offer``, sends a half-white/half-black pattern at 30 fps and sends
parameter updates on its ``parameters`` data channel.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import trio
from browser_peer import Browser, http_browser
from devcloud_client import eventually, live_peer_connections

from scope_trio import rtc
from scope_trio.cloud.manager import CloudManager, CloudSettings, LinkPolicy
from scope_trio.cloud.media import MediaConfig
from scope_trio.config import ServerConfig
from scope_trio.core.supervisor import LOST_PREFIX, ReconnectPolicy, SupervisorStatus
from scope_trio.dev.devcloud import DevCloudConfig, serve_devcloud, ws_url
from scope_trio.relay.relay import Relay
from scope_trio.server import open_server

logger = logging.getLogger(__name__)

FPS = 30.0
DEADLINE = 20.0
"""Bound on any one wait (real media on a loaded 2-core machine)."""

# Small policies: Scope's defaults (1-2-4 s backoff, 10 s attempts, 30 s/180 s link
# deadlines) only add waiting here; each test that depends on one says which it shrinks.
FAST_RECONNECT = ReconnectPolicy(
    base_delay=0.1, max_delay=0.4, attempt_timeout=2.0, close_timeout=2.0
)
FAST_LINK = LinkPolicy(delay=0.1)
FAST_LINK_OPTIONS: dict[str, Any] = {
    "connect_backoff": (0.1, 0.2),
    "ready_timeout": 2.0,
    "request_timeout": 5.0,
}
FAST_MEDIA = MediaConfig(
    stall_timeout=1.0, stall_recovery_timeout=0.5, first_frame_timeout=3.0, request_timeout=5.0
)


def free_port() -> int:
    """A TCP port that was free a moment ago (for a process that must keep its port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# CloudStatus invariants


def status_problems(s: Mapping[str, Any], *, link_errors: Iterable[str] = ()) -> list[str]:
    """What is untruthful about one CloudStatus snapshot (empty when nothing is).

    ``link_errors`` are regexes the link's own error may match in this test (anything else
    in ``error`` must be the WebRTC error).
    """
    problems = []
    if s["connected"] and s["connecting"]:
        problems.append("connected and connecting at once")
    if s["webrtc_connected"] and not s["connected"]:
        problems.append("webrtc_connected without the link connected")
    if s["webrtc_connected"] and s["webrtc_reconnecting"]:
        problems.append("webrtc_connected and webrtc_reconnecting at once")
    if s["webrtc_connected"] and s["webrtc_error"] is not None:
        problems.append("webrtc_connected with a webrtc_error")
    if s["webrtc_reconnecting"] and not str(s["webrtc_error"] or "").startswith(f"{LOST_PREFIX}: "):
        problems.append("reconnecting without 'Remote inference connection lost: ...'")
    error, webrtc_error = s["error"], s["webrtc_error"]
    if error != webrtc_error and not any(re.search(p, error or "") for p in link_errors):
        problems.append("error is neither the link's error nor webrtc_error")
    if webrtc_error is not None and error is None:
        problems.append("a webrtc_error the plain 'error' field hides")
    if s["connected"] != (s["connection_id"] is not None):
        problems.append("connection_id without a link, or a link without one")
    if s["connected"] != (s["stats"] is not None):
        problems.append("stats without a link, or a link without them")
    return problems


def recovery_problems(s: Mapping[str, Any]) -> list[str]:
    """What would mislead a UI in a snapshot taken while a recovery is under way."""
    problems = []
    if not s["connected"] and not s["connecting"] and s["error"] is None:
        problems.append("not connected, not connecting, no error in the middle of a recovery")
    if not s["webrtc_connected"] and not s["webrtc_reconnecting"] and s["webrtc_error"] is None:
        problems.append("media neither connected nor reconnecting, no webrtc_error, mid-recovery")
    if s["webrtc_error"] is not None and not s["webrtc_error"].startswith(f"{LOST_PREFIX}: "):
        problems.append("mid-recovery webrtc_error is not 'Remote inference connection lost: ...'")
    return problems


def link_state(s: Mapping[str, Any]) -> str:
    if s["connected"]:
        return "up"
    return "connecting" if s["connecting"] else "down"


def collapse(items: Iterable[str]) -> str:
    """``items`` with repeats in a row merged, joined by spaces (for regex expectations)."""
    out: list[str] = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return " ".join(out)


# --------------------------------------------------------------------------------------------
# The SSE stream, read off the wire


class EventRecorder:
    """Reads ``GET /api/v1/cloud/events`` on a raw socket (h11) into ``events``.

    (httpx's line iterators nest async generators that the garbage collector finalises when a
    stream is abandoned, which ``filterwarnings = error`` rightly rejects.)
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.ended = False
        self._arrived = trio.Event()

    async def run(self, host: str, port: int, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="GET",
                target="/api/v1/cloud/events",
                headers=[("Host", f"{host}:{port}"), ("Accept", "text/event-stream")],
            )
            await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            buffer = ""
            started = False
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some())
                    continue
                if isinstance(event, h11.Response):
                    assert event.status_code == 200, event
                    continue
                if isinstance(event, h11.Data):
                    buffer += bytes(event.data).decode()
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        data = [
                            line[len("data: ") :]
                            for line in block.split("\n")
                            if line.startswith("data: ")
                        ]
                        if data:
                            self.events.append(json.loads("\n".join(data)))
                            self._arrived.set()
                            self._arrived = trio.Event()
                            if not started:
                                started = True
                                task_status.started()
                    continue
                self.ended = True  # EndOfMessage, ConnectionClosed
                self._arrived.set()
                return

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event from the whole stream so far or later satisfying ``predicate``."""
        seen = 0
        with trio.fail_after(DEADLINE):
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                assert not self.ended, "the event stream ended"
                await self._arrived.wait()


# --------------------------------------------------------------------------------------------
# The dev cloud as a process


class DevCloudProcess:
    """``python -m scope_trio devcloud --port PORT`` as a child process, killable and
    restartable on the same port. Use it through :func:`devcloud_process`, which reaps it
    whatever happens."""

    def __init__(self, port: int, log: Path, *args: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log = log
        self._args = args
        self.proc: trio.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        assert self.proc is None or self.proc.returncode is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPE_")}
        env["PYTHONUNBUFFERED"] = "1"
        command = [sys.executable, "-m", "scope_trio", "devcloud", "--port", str(self.port)]
        with self._log.open("a") as log:
            self.proc = await trio.lowlevel.open_process(
                [*command, "--pipeline", "invert", *self._args],
                stdout=log,
                stderr=log,
                env=env,
            )
        self.starts += 1

        async def healthy() -> bool:
            assert self.proc is not None
            assert self.proc.returncode is None, f"devcloud exited: {self.output()}"
            try:
                async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
                    return (await http.get("/health")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(healthy, timeout=DEADLINE, poll=0.05)  # its state lives elsewhere

    async def kill(self) -> None:
        """SIGKILL, then reap: no chance to close anything."""
        assert self.proc is not None
        self.proc.kill()
        with trio.fail_after(10):
            await self.proc.wait()

    async def reap(self) -> None:
        """Kill if still running and wait, even while cancelled."""
        if self.proc is None:
            return
        with trio.move_on_after(10, shield=True):
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()

    def output(self) -> str:
        return self._log.read_text(errors="replace")


@asynccontextmanager
async def devcloud_process(log: Path, *args: str) -> AsyncIterator[DevCloudProcess]:
    """A started :class:`DevCloudProcess` on a fixed free port; always reaped on exit."""
    process = DevCloudProcess(free_port(), log, *args)
    try:
        await process.start()
        yield process
    finally:
        await process.reap()


# --------------------------------------------------------------------------------------------
# The browser


def browser(
    api: httpx.AsyncClient, params: Mapping[str, Any]
) -> AbstractAsyncContextManager[Browser]:
    """A connected :class:`Browser` whose offer went through ``POST /api/v1/webrtc/offer``."""
    return http_browser(api, params, deadline=DEADLINE)


# --------------------------------------------------------------------------------------------
# The stack


@dataclass
class Stack:
    manager: CloudManager
    relay: Relay
    api: httpx.AsyncClient
    """The scope-trio HTTP API."""
    cloud: httpx.AsyncClient
    """The dev cloud's control API."""
    sse: EventRecorder
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    phases: list[SupervisorStatus] = field(default_factory=list)
    phase_times: list[float] = field(default_factory=list)
    """``trio.current_time()`` when each of ``phases`` was seen."""
    in_process_cloud: bool = True
    owner_alive: bool = True
    """False once the manager's owner nursery was cancelled (something crashed in it)."""

    async def fault(self, action: str, **fields: Any) -> dict[str, Any]:
        response = await self.cloud.post("/control/faults", json={"action": action, **fields})
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def cloud_state(self) -> dict[str, Any]:
        response = await self.cloud.get("/control/state")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        with trio.fail_after(DEADLINE):
            return await self.manager.wait_until(predicate)

    async def connect(self) -> dict[str, Any]:
        response = await self.api.post("/api/v1/cloud/connect")
        assert response.status_code == 200, response.text
        assert response.json()["connecting"] is True
        return await self.until(lambda s: s["connected"])

    async def our_peer_connections(self) -> int:
        """Live peer connections on our side (the in-process dev cloud's not counted)."""
        ours = live_peer_connections()
        if self.in_process_cloud:
            ours -= (await self.cloud_state())["peer_connections"]
        return ours


async def _record_snapshots(stack: Stack) -> None:
    manager = stack.manager
    while True:
        version = manager.version
        stack.snapshots.append(manager.status())
        await manager.wait_change(version)


async def _record_phases(stack: Stack) -> None:
    async with stack.manager.supervisor.watch(buffer=4096) as changes:
        async for status in changes:
            stack.phases.append(status)
            stack.phase_times.append(trio.current_time())


@asynccontextmanager
async def open_stack(
    *,
    devcloud: DevCloudConfig | str | None = None,
    policy: ReconnectPolicy = FAST_RECONNECT,
    link_policy: LinkPolicy = FAST_LINK,
    link_options: Mapping[str, Any] | None = None,
    media: MediaConfig = FAST_MEDIA,
    api_key: str | None = None,
) -> AsyncIterator[Stack]:
    """The stack (see the module docstring) for the block; leak-checked on a clean exit.

    ``devcloud`` is a config for an in-process dev cloud (default: ``invert``) or the base
    URL of one running elsewhere. ICE consent is tuned fast for the block (as ``serve``
    does): the media session's path-silence signal sees a silent path in ~1 s, consent in ~8 s.
    """
    options = {**FAST_LINK_OPTIONS, **(link_options or {})}
    async with trio.open_nursery() as outer:
        # The cloud is outside the server under test, as in production: in-process here
        # (its own trio-asyncio loop) or a separate process the test may kill.
        if isinstance(devcloud, str):
            cloud_url, in_process = devcloud, False
        else:
            cloud_config = devcloud or DevCloudConfig(pipeline="invert")
            cloud_url, in_process = await outer.start(_serve_cloud, cloud_config), True
        config = ServerConfig(
            port=0,
            debug_endpoints=True,
            graceful_timeout=1.0,
            relay_fps=FPS,
            cloud=CloudSettings(ws_url=ws_url(cloud_url), api_key=api_key),
            reconnect=policy,
            relink=link_policy,
            link=options,
            media=media,
        )
        async with (
            httpx.AsyncClient(base_url=cloud_url, timeout=10) as cloud,
            open_server(config) as server,
            trio.open_nursery() as nursery,
        ):
            base = httpx.URL(server.url)
            assert base.host
            assert base.port
            assert isinstance(server.relay, Relay)
            sse = EventRecorder()
            api = httpx.AsyncClient(base_url=server.url, timeout=DEADLINE)
            stack = Stack(
                server.manager, server.relay, api, cloud, sse, in_process_cloud=in_process
            )

            async def canary() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    stack.owner_alive = False

            nursery.start_soon(canary)
            nursery.start_soon(_record_snapshots, stack)
            nursery.start_soon(_record_phases, stack)
            async with api, trio.open_nursery() as readers:
                await readers.start(sse.run, base.host, base.port)
                yield stack
                readers.cancel_scope.cancel()
            nursery.cancel_scope.cancel()

        # Nothing leaks, whatever the test did: no peer connection on either side.
        async with httpx.AsyncClient(base_url=cloud_url, timeout=10) as cloud:

            async def all_closed() -> bool:
                pcs = live_peer_connections()
                if not in_process:
                    return pcs == 0
                state = (await cloud.get("/control/state")).json()
                return pcs == 0 and state["peer_connections"] == 0

            await eventually(all_closed)
        outer.cancel_scope.cancel()
    # A peer connection abandoned by a close that timed out leaks its sockets: collect
    # now, so the ResourceWarning fails THIS test rather than whichever runs gc next.
    gc.collect()


async def _serve_cloud(config: DevCloudConfig, *, task_status: trio.TaskStatus[str]) -> None:
    """An in-process dev cloud in a trio-asyncio loop of its own (the server opens another)."""
    async with rtc.open_loop():
        await serve_devcloud(config, task_status=task_status)


def reconnect_stages(snapshots: Iterable[Mapping[str, Any]]) -> list[str]:
    """The distinct ``connect_stage`` values, in order of first appearance."""
    stages: list[str] = []
    for s in snapshots:
        stage = s["connect_stage"]
        if stage is not None and stage not in stages:
            stages.append(stage)
    return stages
