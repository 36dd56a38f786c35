"""The dev cloud's signaling side: one JSON WebSocket per runner session, and its state.

:class:`DevCloud` holds everything devcloud-wide (pipeline, faults, connections, sessions,
counters); ``GET /control/state`` is a snapshot of it. Each signaling WebSocket is served by
:meth:`DevCloud.handle_websocket` in the task Hypercorn gives it; that task owns the
connection's peer connections (:class:`~.media.CloudSession`) in its own nursery, as on the
real runner, where a signaling connection is one runner session. When the WebSocket ends for
any reason its peer connections are closed, shielded and under a deadline.

A bad message never ends a WebSocket: it is answered with ``error`` (carrying the
``request_id`` when there is one), and the connection goes on.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio
from quart import Websocket

from scope_trio.dev.devcloud import api
from scope_trio.dev.devcloud import faults as _faults
from scope_trio.dev.devcloud.config import (
    CLOSE_ACCESS_DENIED,
    DevCloudConfig,
)
from scope_trio.dev.devcloud.faults import FaultState, hostile_noise, malformed
from scope_trio.dev.devcloud.media import CloudSession, open_session

__all__ = ["DevCloud"]

logger = logging.getLogger("scope_trio.dev.devcloud")


LOADING_STAGES = ("Loading pipeline weights", "Warming up")
"""``loading_stage`` in the first and second half of a pipeline load."""


class _ProtocolError(Exception):
    """A request the devcloud answers with ``error`` (message is the ``error`` text)."""


_Outgoing = tuple[list[str | bytes], tuple[int, str] | None]
"""Frames a fault sends on one WebSocket, then the close (code, reason) to follow, if any."""


class _WsConnection:
    """One signaling WebSocket: its identity, its sessions and its pending commands."""

    def __init__(self, ws: Websocket, noise: Callable[[], list[str | bytes]] | None = None) -> None:
        self.ws = ws
        self.connection_id = uuid.uuid4().hex[:8]
        self.user_id: str | None = None
        self.sessions: dict[str, CloudSession] = {}
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
        self.loading_stage: str | None = None
        self.load_params: dict[str, Any] | None = None
        self.started_at = time.time()
        """Unix time this devcloud started (``server_start_time`` in ``/health``)."""
        self.faults = FaultState()
        self.connections: set[_WsConnection] = set()
        self.sessions: dict[str, CloudSession] = {}
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
                    "state": s.connection_state,
                    "frames_in": s.frames_in,
                    "frames_out": s.frames_out,
                    "frames_processed": s.frames_processed,
                    "paused": s.paused,
                    "recording": s.recording,
                    "frames_recorded": s.recorder.frames,
                    "parameters": s.parameters,
                }
                for s in self.sessions.values()
            ],
            "faults": self.faults.snapshot(time.monotonic()),
        }

    def apply_fault(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Apply one ``POST /control/faults`` request (see :mod:`.faults`); ValueError if bad."""
        return _faults.apply_fault(self, body)

    def _noise(self) -> list[str | bytes]:
        """While hostile, the garbage to send around one message (none otherwise)."""
        hostile = self.config.hostile or time.monotonic() < self.faults.hostile_until
        if not hostile:
            return []
        return hostile_noise(next(self._noise_turns), self.config.api_key)

    def _take_malformed(self, reply: dict[str, Any]) -> dict[str, Any]:
        """``reply``, or its malformed twin while the ``malform`` fault asks for one."""
        kind = reply.get("type")
        if not isinstance(kind, str) or self.faults.malform.get(kind, 0) <= 0:
            return reply
        self.faults.malform[kind] -= 1
        logger.info("devcloud: malforming the %s reply to %r", kind, reply.get("request_id"))
        return malformed(reply)

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
                _faults.abort_tcp(connection.ws.scope)
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
            return await self._api(message)
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
        try:
            session, sdp, sdp_type = await open_session(
                self, message.get("sdp", ""), message.get("sdp_type", "offer"), initial
            )
        except ValueError as exc:
            await connection.send(
                {"type": "error", "request_id": request_id, "error": f"Offer failed: {exc}"}
            )
            return
        self.sessions[session.id] = session
        connection.sessions[session.id] = session
        nursery.start_soon(self._run_session, connection, session)
        await connection.send(
            {
                "type": "answer",
                "request_id": request_id,
                "sdp": sdp,
                "sdp_type": sdp_type,
                "sessionId": session.id,
            }
        )

    async def _run_session(self, connection: _WsConnection, session: CloudSession) -> None:
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
            if not await session.add_candidate(message.get("candidate")):
                return {
                    "type": "icecandidate_ack",
                    "request_id": request_id,
                    "status": "end_of_candidates",
                }
        except ValueError as exc:
            raise _ProtocolError(f"ICE candidate failed: {exc}") from exc
        return {"type": "icecandidate_ack", "request_id": request_id, "status": "ok"}

    async def _api(self, message: dict[str, Any]) -> dict[str, Any]:
        request_id = message.get("request_id")
        method = str(message.get("method", "GET"))
        status, payload = await api.call(self, method, message.get("path"), message.get("body"))
        reply: dict[str, Any] = {"type": "api_response", "request_id": request_id, "status": status}
        if status >= 400:
            reply["error"] = payload.get("detail", "error")
        else:
            reply["data"] = payload
        return reply

    # -- pipeline ---------------------------------------------------------------------------

    def pipeline_status_body(self) -> dict[str, Any]:
        """``GET /api/v1/pipeline/status``: the pipeline, its load params and stage."""
        active = self.pipeline_status in ("loaded", "loading")
        return {
            "status": self.pipeline_status,
            "pipeline_id": self.pipeline if active else None,
            "load_params": self.load_params if active else None,
            "loaded_lora_adapters": [] if self.pipeline_status == "loaded" else None,
            "error": None,
            "loading_stage": self.loading_stage,
        }

    def load_pipeline(self, pipeline: str, load_params: dict[str, Any] | None) -> None:
        """Switch to ``pipeline`` at once (sessions use it from their next frame); the
        status reads ``loading`` for ``load_seconds``, in two named stages, then ``loaded``.
        A newer load supersedes an older one still in its stages."""
        self.pipeline = pipeline
        self.load_params = load_params
        self._load_generation += 1
        if self.config.load_seconds <= 0:
            self.pipeline_status, self.loading_stage = "loaded", None
            return
        generation = self._load_generation
        half = self.config.load_seconds / 2
        self.pipeline_status, self.loading_stage = "loading", LOADING_STAGES[0]

        async def stages() -> None:
            await trio.sleep(half)
            if self._load_generation == generation:
                self.loading_stage = LOADING_STAGES[1]
            await trio.sleep(half)
            if self._load_generation == generation:
                self.pipeline_status, self.loading_stage = "loaded", None

        self.background.start_soon(stages)
