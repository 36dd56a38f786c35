"""``scope-trio devcloud``: a local stand-in for the cloud GPU runner.

It speaks the CONTRACT section-2 signaling protocol on ``/ws`` (one JSON WebSocket), answers
offers with a real aiortc peer connection that sends every received video frame back through
a pipeline (``passthrough`` or ``invert``), records parameter updates from the ``parameters``
data channel, and offers a control API for fault injection (``POST /control/faults``,
``GET /control/state``) on the same port. Tests, benchmarks and the server's embedded default
all use it in-process through :func:`serve_devcloud`.

Ownership (everything is owned by a nursery):

* Hypercorn owns one task per WebSocket; that task owns the connection's peer connections
  (:class:`_CloudSession`) in its own nursery, as on the real runner, where a signaling
  connection is one runner session. When the WebSocket ends for any reason its peer
  connections are closed, shielded and under a deadline.
* Stopping the server (cancelling :func:`serve_devcloud` or firing its shutdown trigger)
  therefore closes every peer connection before :func:`serve_devcloud` returns.
* A bad message never ends a WebSocket: it is answered with ``error`` (carrying the
  ``request_id`` when there is one), and the connection goes on.

Hostile mode (``DevCloudConfig.hostile``, ``--hostile``, or the ``hostile`` fault for a
while) surrounds every message the devcloud sends after ``ready`` with a burst of garbage
(:data:`HOSTILE_KINDS`): non-JSON, binary frames, unknown types, replies to requests never
made, wrong request ids, the api key echoed back. The ``garbage`` fault sends any of
:data:`GARBAGE_KINDS` at once (huge ones included), and ``malform`` gives the next replies
of one type the right ``request_id`` and the wrong shape. ``withhold_ready`` keeps ``ready`` from the next connections; ``send_error`` sends an
unsolicited ``error`` (e.g. ``MAX_DURATION_EXCEEDED``) and then closes.

Deviations from the real runner, on purpose: messages before ``set_user_id`` are answered
unless ``require_user_id`` is set; ICE servers are always an empty list (loopback); the media
pipelines are trivial and run on the event loop thread.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hmac
import itertools
import json
import logging
import math
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import hypercorn.trio
import trio
from av import VideoFrame
from hypercorn.config import Config as HypercornConfig
from quart import Response, Websocket, request, websocket
from quart_trio import QuartTrio

from scope_trio import rtc

__all__ = [
    "GARBAGE_KINDS",
    "MALFORMABLE_REPLIES",
    "PIPELINES",
    "DevCloud",
    "DevCloudConfig",
    "create_app",
    "invert_frame",
    "main",
    "serve_devcloud",
    "ws_url",
]

logger = logging.getLogger(__name__)

PIPELINES = ("passthrough", "invert")
"""Pipelines the devcloud can load: the first of ``pipeline_ids`` in a load request is used."""

CLOSE_ACCESS_DENIED = 4003
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
SESSION_CLOSE_TIMEOUT = 5.0
"""Bound on closing one peer connection (shielded), so a shutdown always finishes."""

_INVERT_TABLE = bytes(range(255, -1, -1))


@dataclass(frozen=True)
class DevCloudConfig:
    """How to run the devcloud. ``port=0`` binds an ephemeral port (see the started URL)."""

    host: str = "127.0.0.1"
    port: int = 0
    pipeline: str = "passthrough"
    """Pipeline loaded at start; ``POST /api/v1/pipeline/load`` switches it."""
    api_key: str | None = None
    """When set, ``/ws`` requires the header ``Authorization: Key <api_key>``."""
    require_user_id: bool = False
    """Like the real runner: ignore every message until ``set_user_id`` succeeded."""
    denied_user_ids: frozenset[str] = frozenset()
    """``set_user_id`` with one of these gets ``ACCESS_DENIED`` and close 4003."""
    load_seconds: float = 0.0
    """How long a pipeline load stays ``loading`` before it is ``loaded``."""
    graceful_timeout: float = 2.0
    """Hypercorn's bound on draining connections at shutdown."""
    connect_deadline: float = 30.0
    """A peer connection not connected this long after its answer is closed. aioice's
    answering side waits for a nomination without a deadline of its own: an offerer that
    gave up mid-ICE (a stop while connecting) would otherwise leave a session "checking"
    until its WebSocket ends."""
    hostile: bool = False
    """Surround every message sent after ``ready`` with garbage (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINES:
            raise ValueError(f"unknown pipeline {self.pipeline!r}; known: {', '.join(PIPELINES)}")


def ws_url(base_url: str) -> str:
    """The signaling URL for a devcloud base URL (``http://host:port`` → ``ws://host:port/ws``)."""
    return base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/ws"


def invert_frame(frame: VideoFrame) -> VideoFrame:
    """Every pixel inverted in RGB (255 - value per channel), as a new ``rgb24`` frame.

    Uses ``bytes.translate`` on the packed plane (no numpy: it is not installed with av).
    """
    rgb = frame.reformat(format="rgb24")
    out = VideoFrame(width=rgb.width, height=rgb.height, format="rgb24")
    source, target = rgb.planes[0], out.planes[0]
    data = bytes(source)
    if source.line_size == target.line_size:
        target.update(data.translate(_INVERT_TABLE))
    else:  # pragma: no cover - same width and format give the same line size in practice
        row = 3 * rgb.width
        rows = bytearray(target.buffer_size)
        for y in range(rgb.height):
            start = y * source.line_size
            rows[y * target.line_size : y * target.line_size + row] = data[
                start : start + row
            ].translate(_INVERT_TABLE)
        target.update(bytes(rows))
    return out


@dataclass
class _Faults:
    """Injected faults; times are ``time.monotonic()`` deadlines."""

    refuse_offers: int = 0
    stall_offers: int = 0
    stall_media_until: float = -math.inf
    blackhole_all_until: float = -math.inf
    withhold_ready: int = 0
    hostile_until: float = -math.inf
    malform: dict[str, int] = field(default_factory=dict)
    """Reply type → how many of the next replies of that type get the wrong shape."""
    latency: float = 0.0
    """Seconds every session datagram is held in each direction, until ``latency_until``."""
    latency_until: float = -math.inf

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "refuse_offers": self.refuse_offers,
            "stall_offers": self.stall_offers,
            "stall_media_seconds": max(0.0, self.stall_media_until - now),
            "blackhole_all_seconds": max(0.0, self.blackhole_all_until - now),
            "withhold_ready": self.withhold_ready,
            "hostile_seconds": max(0.0, self.hostile_until - now),
            "malform": {kind: count for kind, count in self.malform.items() if count > 0},
            "latency_seconds": max(0.0, self.latency_until - now),
        }


GARBAGE_KINDS = (
    "text",
    "binary",
    "array",
    "no_type",
    "unknown_type",
    "wrong_request_id",
    "unhashable_request_id",
    "unrequested_reply",
    "unrequested_error",
    "bad_logs",
    "ready_again",
    "echo_key",
    "huge_text",
    "huge_binary",
)
"""What the ``garbage`` fault can send; ``echo_key`` quotes the configured api key back
(a hostile cloud that repeats the client's secret), the ``huge_*`` kinds are ``size`` bytes."""

HOSTILE_KINDS = tuple(kind for kind in GARBAGE_KINDS if not kind.startswith("huge_"))
"""What hostile mode cycles through around real traffic (nothing huge)."""

MALFORMABLE_REPLIES = ("answer", "ice_servers", "api_response")
"""Reply types the ``malform`` fault can give the wrong shape (keeping the request_id)."""

DEFAULT_HUGE_SIZE = 2 * 1024 * 1024
"""``size`` of the huge garbage kinds unless given: twice trio-websocket's 1 MiB limit."""


def garbage_frame(
    kind: str, *, size: int = DEFAULT_HUGE_SIZE, api_key: str | None = None
) -> str | bytes:
    """One frame of garbage of ``kind`` (one of :data:`GARBAGE_KINDS`)."""
    nobody = uuid.uuid4().hex  # a request id nobody sent
    messages: dict[str, Any] = {
        "text": "this is not JSON {",
        "binary": b"\x00\xff\x00 binary noise \x80",
        "array": "[1, 2, 3]",
        "no_type": {"hello": "world"},
        "unknown_type": {"type": "mystery", "payload": {"nested": [1, 2]}},
        "wrong_request_id": {
            "type": "answer",
            "request_id": f"not-{nobody}",
            "sdp": "v=0",
            "sdp_type": "answer",
            "sessionId": "nobody",
        },
        "unhashable_request_id": {"type": "pong", "request_id": ["not", "hashable"]},
        "unrequested_reply": {
            "type": "api_response",
            "request_id": nobody,
            "status": 200,
            "data": {},
        },
        "unrequested_error": {"type": "error", "request_id": nobody, "error": "no such request"},
        "bad_logs": {"type": "logs", "lines": "not a list"},
        "ready_again": {"type": "ready", "connection_id": "again"},
        "echo_key": f"not JSON either; your key was Key {api_key}",
        "huge_text": {"type": "mystery", "blob": "x" * size},
        "huge_binary": b"\x00" * size,
    }
    if kind not in messages:
        raise ValueError(f"unknown garbage kind {kind!r}; known: {', '.join(GARBAGE_KINDS)}")
    message = messages[kind]
    return message if isinstance(message, (str, bytes)) else json.dumps(message)


def _malformed(reply: Mapping[str, Any]) -> dict[str, Any]:
    """``reply`` with its request_id and type kept and its shape broken."""
    kind, request_id = reply.get("type"), reply.get("request_id")
    broken: dict[str, Any] = {"type": kind, "request_id": request_id}
    if kind == "answer":
        broken["sessionId"] = reply.get("sessionId")  # and no sdp
    elif kind == "ice_servers":
        broken.update(data={"iceServers": "stun:not-a-list"}, status=200)
    elif kind == "api_response":
        broken.update(status="two hundred", data=["not", "an", "object"])
    return broken


class _ProtocolError(Exception):
    """A request the devcloud answers with ``error`` (message is the ``error`` text)."""


class _CloudSession:
    """One answered offer: a peer connection echoing video through the current pipeline."""

    def __init__(
        self, cloud: DevCloud, pc: rtc.RTCPeerConnection, initial: Mapping[str, Any]
    ) -> None:
        self.cloud = cloud
        self.id = uuid.uuid4().hex
        self.pc = pc
        self.events = rtc.PeerEvents(pc)
        self.source = rtc.TrioVideoSource(idle_timeout=None)
        self.parameters: dict[str, Any] = dict(initial)
        self.close_requested = trio.Event()
        self.blackhole_until = -math.inf
        self.frames_in = 0
        self.frames_out = 0

    def blackholed(self) -> bool:
        until = max(self.blackhole_until, self.cloud.faults.blackhole_all_until)
        return time.monotonic() < until

    def latency(self) -> float:
        """Seconds to hold each datagram (the ``latency`` fault), 0 for none."""
        faults = self.cloud.faults
        return faults.latency if time.monotonic() < faults.latency_until else 0.0

    async def run(self) -> None:
        """Echo media and record parameters until closed (by either side or a fault).

        Always closes the peer connection before returning, even when cancelled.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tracks, nursery)
                nursery.start_soon(self._channels, nursery)
                nursery.start_soon(self._watch_state, nursery.cancel_scope)
                await self.close_requested.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.source.stop()
            await rtc.close_peer_connection(self.pc, SESSION_CLOSE_TIMEOUT)
            self.cloud.sessions.pop(self.id, None)
            logger.info("devcloud session %s closed", self.id)

    async def _watch_state(self, scope: trio.CancelScope) -> None:
        deadline = self.cloud.config.connect_deadline
        state: str | None = None
        with trio.move_on_after(deadline):
            state = await self.events.wait_state("connected", "closed", "failed")
        if state is None:
            logger.warning(
                "devcloud session %s: not connected within %g s; closing it", self.id, deadline
            )
        else:
            if state == "connected":
                state = await self.events.wait_state("closed", "failed")
            logger.info("devcloud session %s: connection %s", self.id, state)
        scope.cancel()

    async def _tracks(self, nursery: trio.Nursery) -> None:
        async for track in self.events.tracks:
            if track.kind == "video":
                nursery.start_soon(rtc.receive_video, track, self._on_frame)
            else:
                nursery.start_soon(_drain, track)

    async def _channels(self, nursery: trio.Nursery) -> None:
        async for remote in self.events.channels:
            if remote.channel.label == "parameters":
                nursery.start_soon(self._parameters, remote.messages)

    async def _parameters(self, messages: trio.MemoryReceiveChannel[str | bytes]) -> None:
        async for message in messages:
            try:
                update = json.loads(message)
            except ValueError:
                logger.warning("devcloud: parameters message is not JSON: %.80r", message)
                continue
            if not isinstance(update, dict):
                logger.warning("devcloud: parameters message is not an object: %.80r", message)
                continue
            self.parameters.update(update)
            self.cloud.record_parameters(update)

    def _on_frame(self, frame: VideoFrame) -> None:
        self.frames_in += 1
        self.cloud.frames_in += 1
        if time.monotonic() < self.cloud.faults.stall_media_until:
            return
        out = invert_frame(frame) if self.cloud.pipeline == "invert" else frame
        self.source.push(out)
        self.frames_out += 1
        self.cloud.frames_out += 1


async def _drain(track: rtc.MediaStreamTrack) -> None:
    """Consume a track we do not process, so aiortc's queue for it does not grow."""
    with contextlib.suppress(rtc.MediaStreamError):
        while True:
            await rtc.aio(track.recv)


_Outgoing = tuple[list[str | bytes], tuple[int, str] | None]
"""Frames a fault sends on one WebSocket, then the close (code, reason) to follow, if any."""


class _WsConnection:
    """One signaling WebSocket: its identity, its sessions and its pending commands."""

    def __init__(self, ws: Websocket, noise: Callable[[], list[str | bytes]] | None = None) -> None:
        self.ws = ws
        self.connection_id = uuid.uuid4().hex[:8]
        self.user_id: str | None = None
        self.sessions: dict[str, _CloudSession] = {}
        self.commands_send, self.commands = trio.open_memory_channel[tuple[str, int, str]](math.inf)
        self.outbox_send, self.outbox = trio.open_memory_channel[_Outgoing](math.inf)
        self.send_lock = trio.Lock()
        self._noise = noise or list

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one message; in hostile mode with garbage around it (none before ``ready``)."""
        before = self._noise() if message.get("type") != "ready" else []
        await self.send_frames([*before, json.dumps(message), *self._noise()])

    async def send_frames(self, frames: Sequence[str | bytes]) -> None:
        """Send ``frames`` back to back: nothing else goes out between them."""
        async with self.send_lock:
            for frame in frames:
                # Two calls, so each has one type: quart 0.20 types send() with AnyStr.
                if isinstance(frame, bytes):
                    await self.ws.send(frame)
                else:
                    await self.ws.send(frame)


class DevCloud:
    """The devcloud's state and behaviour; :func:`create_app` serves it over HTTP/WebSocket.

    Devcloud-wide state and counters live here only (each session counts its own frames);
    ``GET /control/state`` is a snapshot derived from it.
    """

    background: trio.Nursery
    """Set by :func:`create_app` when serving starts: owns short background jobs (loads)."""

    def __init__(self, config: DevCloudConfig) -> None:
        self.config = config
        self.pipeline = config.pipeline
        self.pipeline_status = "loaded"
        self.load_params: dict[str, Any] | None = None
        self.faults = _Faults()
        self.connections: set[_WsConnection] = set()
        self.sessions: dict[str, _CloudSession] = {}
        self.offers = 0
        self.frames_in = 0
        self.frames_out = 0
        self.last_parameters: dict[str, Any] | None = None
        self.initial_parameters: dict[str, Any] | None = None
        self.parameter_updates = 0
        self._load_generation = 0
        self._noise_turns = itertools.count()

    # -- state --------------------------------------------------------------------------

    def record_parameters(self, update: dict[str, Any]) -> None:
        self.last_parameters = update
        self.parameter_updates += 1

    def state(self) -> dict[str, Any]:
        """A JSON snapshot for ``GET /control/state``."""
        return {
            "ws_connections": len(self.connections),
            "peer_connections": len(self.sessions),
            "offers": self.offers,
            "last_parameters": self.last_parameters,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "pipeline": self.pipeline,
            "pipeline_status": self.pipeline_status,
            "initial_parameters": self.initial_parameters,
            "parameter_updates": self.parameter_updates,
            "sessions": [
                {
                    "id": s.id,
                    "state": s.pc.connectionState,
                    "frames_in": s.frames_in,
                    "frames_out": s.frames_out,
                    "parameters": s.parameters,
                }
                for s in self.sessions.values()
            ],
            "faults": self.faults.snapshot(time.monotonic()),
        }

    # -- faults -------------------------------------------------------------------------

    def apply_fault(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Apply one ``POST /control/faults`` request; raises ValueError on a bad one.

        Returns ``{"ok": true, "action", "affected"}`` where ``affected`` counts the peer
        connections or WebSockets hit (or the offers to refuse/stall).
        """
        action = body.get("action")
        handler = self._fault_handlers.get(action) if isinstance(action, str) else None
        if handler is None:
            raise ValueError(f"unknown action {action!r}; known: {', '.join(self._fault_handlers)}")
        affected = handler(body, time.monotonic())
        logger.info("devcloud fault %s (affected %d)", action, affected)
        return {"ok": True, "action": action, "affected": affected}

    @property
    def _fault_handlers(self) -> dict[str, Callable[[Mapping[str, Any], float], int]]:
        return {
            "close_pc": self._fault_close_pc,
            "blackhole": self._fault_blackhole,
            "close_ws": self._fault_close_ws,
            "drop_ws": self._fault_drop_ws,
            "refuse_offers": self._fault_refuse_offers,
            "stall_offers": self._fault_stall_offers,
            "stall_media": self._fault_stall_media,
            "clear": self._fault_clear,
            "withhold_ready": self._fault_withhold_ready,
            "send_error": self._fault_send_error,
            "garbage": self._fault_garbage,
            "hostile": self._fault_hostile,
            "malform": self._fault_malform,
            "latency": self._fault_latency,
        }

    def _fault_close_pc(self, body: Mapping[str, Any], now: float) -> int:
        for session in self.sessions.values():
            session.close_requested.set()
        return len(self.sessions)

    def _fault_blackhole(self, body: Mapping[str, Any], now: float) -> int:
        seconds = _number(body, "seconds")
        scope = body.get("scope", "existing")
        if scope not in ("existing", "all"):
            raise ValueError("scope must be 'existing' or 'all'")
        for session in self.sessions.values():
            session.blackhole_until = now + seconds
        if scope == "all":
            self.faults.blackhole_all_until = now + seconds
        return len(self.sessions)

    def _fault_latency(self, body: Mapping[str, Any], now: float) -> int:
        """Hold every datagram of every session (existing and new) ``ms`` milliseconds in
        each direction for ``seconds``: the round trip grows by twice ``ms``, nothing is lost."""
        self.faults.latency = _number(body, "ms") / 1000
        self.faults.latency_until = now + _number(body, "seconds")
        return len(self.sessions)

    def _fault_close_ws(self, body: Mapping[str, Any], now: float) -> int:
        code = int(_number(body, "code", 1000))
        if not 1000 <= code <= 4999:
            raise ValueError("code must be a WebSocket close code (1000-4999)")
        reason = str(body.get("reason", ""))
        for connection in self.connections:
            connection.commands_send.send_nowait(("close_ws", code, reason))
        return len(self.connections)

    def _fault_drop_ws(self, body: Mapping[str, Any], now: float) -> int:
        for connection in self.connections:
            connection.commands_send.send_nowait(("drop_ws", 0, ""))
        return len(self.connections)

    def _fault_refuse_offers(self, body: Mapping[str, Any], now: float) -> int:
        self.faults.refuse_offers = int(_number(body, "count", 1))
        return self.faults.refuse_offers

    def _fault_stall_offers(self, body: Mapping[str, Any], now: float) -> int:
        self.faults.stall_offers = int(_number(body, "count", 1))
        return self.faults.stall_offers

    def _fault_stall_media(self, body: Mapping[str, Any], now: float) -> int:
        self.faults.stall_media_until = now + _number(body, "seconds")
        return len(self.sessions)

    def _fault_clear(self, body: Mapping[str, Any], now: float) -> int:
        self.faults = _Faults()
        for session in self.sessions.values():
            session.blackhole_until = -math.inf
        return 0

    def _fault_withhold_ready(self, body: Mapping[str, Any], now: float) -> int:
        self.faults.withhold_ready = int(_number(body, "count", 1))
        return self.faults.withhold_ready

    def _fault_send_error(self, body: Mapping[str, Any], now: float) -> int:
        """An unsolicited ``error`` on every WebSocket, then (unless ``close`` is null) a
        close with that code, as the real runner does at ``MAX_DURATION_EXCEEDED``."""
        error: dict[str, Any] = {"type": "error", "error": str(body.get("error", "Error (fault)"))}
        if body.get("code") is not None:
            error["code"] = str(body["code"])
        close: tuple[int, str] | None = None
        if body.get("close", CLOSE_NORMAL) is not None:
            code = int(_number(body, "close", CLOSE_NORMAL))
            if not 1000 <= code <= 4999:
                raise ValueError("close must be a WebSocket close code (1000-4999) or null")
            close = (code, str(body.get("reason", "")))
        for connection in self.connections:
            connection.outbox_send.send_nowait(([json.dumps(error)], close))
        return len(self.connections)

    def _fault_garbage(self, body: Mapping[str, Any], now: float) -> int:
        kinds = body.get("kinds", list(HOSTILE_KINDS))
        if not isinstance(kinds, list) or not all(k in GARBAGE_KINDS for k in kinds):
            raise ValueError(f"kinds must be a list of: {', '.join(GARBAGE_KINDS)}")
        size = int(_number(body, "size", DEFAULT_HUGE_SIZE))
        frames = [garbage_frame(k, size=size, api_key=self.config.api_key) for k in kinds]
        for connection in self.connections:
            connection.outbox_send.send_nowait((frames, None))
        return len(self.connections)

    def _fault_hostile(self, body: Mapping[str, Any], now: float) -> int:
        self.faults.hostile_until = now + _number(body, "seconds")
        return len(self.connections)

    def _fault_malform(self, body: Mapping[str, Any], now: float) -> int:
        reply = body.get("reply")
        if reply not in MALFORMABLE_REPLIES:
            raise ValueError(f"reply must be one of: {', '.join(MALFORMABLE_REPLIES)}")
        self.faults.malform[reply] = int(_number(body, "count", 1))
        return self.faults.malform[reply]

    def _noise(self) -> list[str | bytes]:
        """While hostile, one frame of every hostile kind, starting one kind further each
        time (so every kind comes right before and right after every kind of reply)."""
        hostile = self.config.hostile or time.monotonic() < self.faults.hostile_until
        if not hostile:
            return []
        turn = next(self._noise_turns) % len(HOSTILE_KINDS)
        kinds = HOSTILE_KINDS[turn:] + HOSTILE_KINDS[:turn]
        return [garbage_frame(kind, api_key=self.config.api_key) for kind in kinds]

    def _take_malformed(self, reply: dict[str, Any]) -> dict[str, Any]:
        """``reply``, or its malformed twin while the ``malform`` fault asks for one."""
        kind = reply.get("type")
        if not isinstance(kind, str) or self.faults.malform.get(kind, 0) <= 0:
            return reply
        self.faults.malform[kind] -= 1
        logger.info("devcloud: malforming the %s reply to %r", kind, reply.get("request_id"))
        return _malformed(reply)

    async def close_all_websockets(self, code: int, reason: str) -> None:
        """Ask every WebSocket to close with ``code``/``reason`` (graceful shutdown)."""
        for connection in self.connections:
            connection.commands_send.send_nowait(("close_ws", code, reason))

    # -- signaling ----------------------------------------------------------------------

    def _authorized(self, authorization: str | None) -> bool:
        if self.config.api_key is None:
            return True
        expected = f"Key {self.config.api_key}".encode()
        return hmac.compare_digest((authorization or "").encode(), expected)

    async def handle_websocket(self, ws: Websocket) -> None:
        """Serve one signaling WebSocket until it closes; its peer connections close with it."""
        await ws.accept()
        connection = _WsConnection(ws, self._noise)
        self.connections.add(connection)
        try:
            if not self._authorized(ws.headers.get("Authorization")):
                await connection.send(
                    {
                        "type": "error",
                        "code": "ACCESS_DENIED",
                        "error": "Access denied: bad api key",
                    }
                )
                await ws.close(CLOSE_ACCESS_DENIED, "Access denied")
                return
            withheld = self.faults.withhold_ready > 0
            if withheld:  # a cold start that never ends: the client's ready deadline fires
                self.faults.withhold_ready -= 1
                logger.info("devcloud: withholding 'ready' from %s", connection.connection_id)
            else:
                await connection.send({"type": "ready", "connection_id": connection.connection_id})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_commands, connection, nursery.cancel_scope)
                nursery.start_soon(self._run_outbox, connection)
                while True:
                    raw = await ws.receive()
                    if withheld:
                        logger.info("devcloud: ignoring a message sent before 'ready'")
                        continue
                    await self._dispatch(connection, raw, nursery)
        finally:
            self.connections.discard(connection)
            connection.commands_send.close()
            connection.outbox_send.close()

    async def _run_outbox(self, connection: _WsConnection) -> None:
        """Send what faults queued for this WebSocket, in order; a close ends it."""
        async for frames, close in connection.outbox:
            await connection.send_frames(frames)
            if close is not None:
                connection.commands_send.send_nowait(("close_ws", *close))
                return

    async def _run_commands(self, connection: _WsConnection, scope: trio.CancelScope) -> None:
        async for action, code, reason in connection.commands:
            if action == "close_ws":
                with contextlib.suppress(Exception):
                    await connection.ws.close(code, reason)
            else:
                _abort_tcp(connection.ws.scope)
            scope.cancel()
            return

    async def _dispatch(
        self, connection: _WsConnection, raw: str | bytes, nursery: trio.Nursery
    ) -> None:
        request_id: Any = None
        try:
            try:
                message = json.loads(raw)
            except ValueError as exc:
                raise _ProtocolError(f"Invalid JSON: {exc}") from exc
            if not isinstance(message, dict):
                raise _ProtocolError("Invalid message: expected a JSON object")
            request_id = message.get("request_id")
            kind = message.get("type")
            if self.config.require_user_id and connection.user_id is None and kind != "set_user_id":
                logger.info("devcloud: ignoring %r before set_user_id", kind)
                return
            reply = await self._handle(connection, kind, message, nursery)
        except _ProtocolError as exc:
            reply = {"type": "error", "error": str(exc)}
            if request_id is not None:
                reply["request_id"] = request_id
        except Exception as exc:
            logger.exception("devcloud: error handling a message")
            reply = {"type": "error", "error": f"Internal error: {type(exc).__name__}: {exc}"}
            if request_id is not None:
                reply["request_id"] = request_id
        if reply is not None:
            await connection.send(self._take_malformed(reply))

    async def _handle(
        self,
        connection: _WsConnection,
        kind: Any,
        message: dict[str, Any],
        nursery: trio.Nursery,
    ) -> dict[str, Any] | None:
        """The reply to one message (None: no reply now). Raises _ProtocolError → ``error``."""
        request_id = message.get("request_id")
        if kind == "set_user_id":
            return await self._set_user_id(connection, message, nursery)
        if kind == "offer":  # answered from its own task: the receive loop goes on
            nursery.start_soon(self._offer, connection, message, nursery)
            return None
        if kind == "icecandidate":
            return await self._icecandidate(connection, message)
        if kind == "api":
            return self._api(message)
        if kind == "ping":
            return {"type": "pong", "request_id": request_id}
        if kind == "get_ice_servers":
            return {
                "type": "ice_servers",
                "request_id": request_id,
                "data": {"iceServers": []},
                "status": 200,
            }
        raise _ProtocolError(f"Unknown message type: {kind}")

    async def _set_user_id(
        self, connection: _WsConnection, message: dict[str, Any], nursery: trio.Nursery
    ) -> dict[str, Any] | None:
        user_id = message.get("user_id")
        if isinstance(user_id, str) and user_id not in self.config.denied_user_ids:
            connection.user_id = user_id
            return {"type": "user_id_set", "user_id": user_id}
        await connection.send(
            {"type": "error", "code": "ACCESS_DENIED", "error": "Access denied: user"}
        )
        await connection.ws.close(CLOSE_ACCESS_DENIED, "Access denied")
        nursery.cancel_scope.cancel()
        return None

    async def _offer(
        self, connection: _WsConnection, message: dict[str, Any], nursery: trio.Nursery
    ) -> None:
        """Answer one offer, then run its session in the WebSocket's nursery."""
        self.offers += 1
        request_id = message.get("request_id")
        if self.faults.stall_offers > 0:
            self.faults.stall_offers -= 1
            logger.info("devcloud: stalling offer %r", request_id)
            return
        if self.faults.refuse_offers > 0:
            self.faults.refuse_offers -= 1
            await connection.send(
                {"type": "error", "request_id": request_id, "error": "Offer refused (fault)"}
            )
            return
        if self.faults.malform.get("answer", 0) > 0:  # before a session exists: none strays
            await connection.send(
                self._take_malformed({"type": "answer", "request_id": request_id})
            )
            return
        initial = message.get("initialParameters") or {}
        if not isinstance(initial, dict):
            initial = {}
        self.initial_parameters = dict(initial)
        pc = rtc.new_peer_connection([])
        session = _CloudSession(self, pc, initial)
        try:
            answer = await rtc.answer_offer(
                pc,
                message.get("sdp", ""),
                message.get("sdp_type", "offer"),
                send_tracks=[session.source],
            )
        except ValueError as exc:
            await rtc.close_peer_connection(pc, SESSION_CLOSE_TIMEOUT)
            await connection.send(
                {"type": "error", "request_id": request_id, "error": f"Offer failed: {exc}"}
            )
            return
        except BaseException:
            await rtc.close_peer_connection(pc, SESSION_CLOSE_TIMEOUT)
            raise
        rtc.install_datagram_filter(pc, session.blackholed, delay=session.latency)
        self.sessions[session.id] = session
        connection.sessions[session.id] = session
        nursery.start_soon(self._run_session, connection, session)
        await connection.send(
            {
                "type": "answer",
                "request_id": request_id,
                "sdp": answer.sdp,
                "sdp_type": answer.type,
                "sessionId": session.id,
            }
        )

    async def _run_session(self, connection: _WsConnection, session: _CloudSession) -> None:
        try:
            await session.run()
        finally:
            connection.sessions.pop(session.id, None)

    async def _icecandidate(
        self, connection: _WsConnection, message: dict[str, Any]
    ) -> dict[str, Any]:
        request_id = message.get("request_id")
        session_id = message.get("sessionId")
        session = connection.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise _ProtocolError(f"Unknown session for ICE candidate: {session_id!r}")
        try:
            candidate = rtc.parse_ice_candidate(message.get("candidate"))
            if candidate is None:
                return {
                    "type": "icecandidate_ack",
                    "request_id": request_id,
                    "status": "end_of_candidates",
                }
            await rtc.add_ice_candidate(session.pc, candidate)
        except ValueError as exc:
            raise _ProtocolError(f"ICE candidate failed: {exc}") from exc
        return {"type": "icecandidate_ack", "request_id": request_id, "status": "ok"}

    def _api(self, message: dict[str, Any]) -> dict[str, Any]:
        request_id = message.get("request_id")
        method = str(message.get("method", "GET")).upper()
        path = message.get("path")
        status, payload = self.api_call(method, path, message.get("body"))
        reply: dict[str, Any] = {"type": "api_response", "request_id": request_id, "status": status}
        if status >= 400:
            reply["error"] = payload.get("detail", "error")
        else:
            reply["data"] = payload
        return reply

    def api_call(self, method: str, path: Any, body: Any) -> tuple[int, dict[str, Any]]:
        """The proxied Scope HTTP API subset: returns ``(status, json body)``."""
        routes = {
            "/api/v1/pipeline/status": ("GET", self._pipeline_status),
            "/api/v1/pipeline/load": ("POST", self._pipeline_load),
        }
        route = routes.get(path) if isinstance(path, str) else None
        if route is None:
            return 404, {"detail": "Not found"}
        allowed, handler = route
        if method != allowed:
            return 405, {"detail": "Method not allowed"}
        return handler(body)

    def _pipeline_status(self, body: Any) -> tuple[int, dict[str, Any]]:
        status: dict[str, Any] = {"status": self.pipeline_status}
        if self.pipeline_status in ("loaded", "loading"):
            status["pipeline_id"] = self.pipeline
            status["load_params"] = self.load_params
        return 200, status

    def _pipeline_load(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict):
            return 422, {"detail": "body must be an object with pipeline_ids"}
        ids = body.get("pipeline_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            return 422, {"detail": "pipeline_ids must be a non-empty list of strings"}
        if ids[0] not in PIPELINES:
            return 400, {"detail": f"Unknown pipeline: {ids[0]}"}
        load_params = body.get("load_params")
        self._load(ids[0], load_params if isinstance(load_params, dict) else None)
        return 200, {"message": "Pipeline loading initiated successfully"}

    def _load(self, pipeline: str, load_params: dict[str, Any] | None) -> None:
        self.pipeline = pipeline
        self.load_params = load_params
        self._load_generation += 1
        if self.config.load_seconds <= 0:
            self.pipeline_status = "loaded"
            return
        self.pipeline_status = "loading"
        generation = self._load_generation

        async def finish() -> None:
            await trio.sleep(self.config.load_seconds)
            if self._load_generation == generation:
                self.pipeline_status = "loaded"

        self.background.start_soon(finish)


def _number(body: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{key!r} must be a non-negative number")
    return float(value)


def _abort_tcp(scope: Mapping[str, Any]) -> bool:
    """Shut down the TCP connection of an ASGI scope without a WebSocket close frame.

    The ASGI server gives the app no handle on its socket, so the socket is found by its
    addresses among the live trio socket streams. The peer sees EOF with no close frame
    (an abnormal closure, 1006). Returns False if the socket was not found.
    """
    client, server = scope.get("client"), scope.get("server")
    if not client or not server:
        return False
    wanted = ((server[0], server[1]), (client[0], client[1]))
    for obj in gc.get_objects():
        if not isinstance(obj, trio.SocketStream):
            continue
        try:
            local, peer = obj.socket.getsockname(), obj.socket.getpeername()
        except OSError:
            continue
        if ((local[0], local[1]), (peer[0], peer[1])) == wanted:
            with contextlib.suppress(OSError):
                obj.socket.shutdown(socket.SHUT_RDWR)
            return True
    logger.warning("devcloud: drop_ws found no socket for %s", client)
    return False


def create_app(cloud: DevCloud) -> QuartTrio:
    """The Quart-Trio app serving ``cloud``: ``/ws``, ``/health`` and ``/control/*``."""
    app = QuartTrio(__name__)

    @app.before_serving
    async def _start() -> None:
        cloud.background = app.nursery

    @app.websocket("/ws")
    async def _ws() -> None:
        proxy: Any = websocket  # a context-local proxy: hand the real object to our tasks
        await cloud.handle_websocket(proxy._get_current_object())

    @app.get("/health")
    async def _health() -> dict[str, Any]:
        return {"status": "healthy", "pipeline": cloud.pipeline}

    @app.get("/control/state")
    async def _state() -> dict[str, Any]:
        return cloud.state()

    @app.post("/control/faults")
    async def _faults() -> Response | dict[str, Any]:
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            return Response(json.dumps({"detail": "expected a JSON object"}), 400)
        try:
            return cloud.apply_fault(body)
        except ValueError as exc:
            return Response(json.dumps({"detail": str(exc)}), 400, content_type="application/json")

    return app


async def serve_devcloud(
    config: DevCloudConfig | None = None,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a devcloud until cancelled or ``shutdown_trigger`` returns.

    Reports the bound base URL (``http://127.0.0.1:PORT``) through ``task_status`` once it
    accepts connections; :func:`ws_url` gives the signaling URL. Opens its own trio-asyncio
    loop for its aiortc objects (nesting inside a caller's loop works), so it runs the same
    standalone and inside tests. On ``shutdown_trigger`` every WebSocket is closed with 1001
    first; on cancellation they are cut. Either way, every peer connection is closed
    (shielded, bounded) before this returns.
    """
    config = config or DevCloudConfig()
    cloud = DevCloud(config)
    app = create_app(cloud)
    hyper = HypercornConfig()
    hyper.bind = [f"{config.host}:{config.port}"]
    hyper.graceful_timeout = config.graceful_timeout
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger(
        "hypercorn.error"
    )  # the app's logging config, no extra handler

    async def on_shutdown() -> None:
        assert shutdown_trigger is not None
        await shutdown_trigger()
        await cloud.close_all_websockets(CLOSE_GOING_AWAY, "devcloud shutting down")

    async with rtc.open_loop(), trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(
                hypercorn.trio.serve,
                app,
                hyper,
                shutdown_trigger=on_shutdown if shutdown_trigger is not None else None,
            )
        )
        task_status.started(binds[0])


def main(argv: Sequence[str] | None = None) -> int:
    """``scope-trio devcloud --host --port --pipeline --api-key --hostile``: serve until a signal.

    Either signal shuts down gracefully: WebSockets get 1001, peer connections are closed.
    """
    parser = argparse.ArgumentParser(
        prog="scope-trio devcloud", description="A local stand-in for the cloud GPU runner."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--pipeline", choices=PIPELINES, default="passthrough")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Key <key>'")
    parser.add_argument("--require-user-id", action="store_true")
    parser.add_argument(
        "--hostile", action="store_true", help="surround every message with garbage (tests)"
    )
    args = parser.parse_args(argv)
    config = DevCloudConfig(
        host=args.host,
        port=args.port,
        pipeline=args.pipeline,
        api_key=args.api_key,
        require_user_id=args.require_user_id,
        hostile=args.hostile,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def stop_requested() -> None:
                async for signum in signals:
                    logger.info("devcloud: %s, shutting down", signal.Signals(signum).name)
                    return

            async with trio.open_nursery() as nursery:
                url = await nursery.start(
                    partial(serve_devcloud, config, shutdown_trigger=stop_requested)
                )
                print(f"devcloud listening on {url} (signaling: {ws_url(url)})", flush=True)

    trio.run(run)
    return 0
