"""Fault injection: what ``POST /control/faults`` can do to a running dev cloud.

Faults hit the signaling WebSockets (close, cut without a close frame, unsolicited errors,
garbage, malformed replies, a withheld ``ready``), the offers (refused, stalled) and the media
(closed, blackholed or delayed datagrams, stalled frames). ``clear`` undoes them all.

Hostile mode (``DevCloudConfig.hostile``, ``--hostile``, or the ``hostile`` fault for a while)
surrounds every message the devcloud sends after ``ready`` with a burst of garbage
(:data:`HOSTILE_KINDS`): non-JSON, binary frames, unknown types, replies to requests never
made, wrong request ids, the api key echoed back. The ``garbage`` fault sends any of
:data:`GARBAGE_KINDS` at once (huge ones included), and ``malform`` gives the next replies of
one type the right ``request_id`` and the wrong shape. ``withhold_ready`` keeps ``ready`` from
the next connections; ``send_error`` sends an unsolicited ``error`` (e.g.
``MAX_DURATION_EXCEEDED``) and then closes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from scope_trio.dev.devcloud.config import CLOSE_NORMAL

if TYPE_CHECKING:
    from scope_trio.dev.devcloud.protocol import DevCloud

__all__ = [
    "DEFAULT_HUGE_SIZE",
    "GARBAGE_KINDS",
    "HOSTILE_KINDS",
    "MALFORMABLE_REPLIES",
    "FaultState",
    "abort_tcp",
    "apply_fault",
    "garbage_frame",
    "hostile_noise",
    "malformed",
]

logger = logging.getLogger("scope_trio.dev.devcloud")


@dataclass
class FaultState:
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


def hostile_noise(turn: int, api_key: str | None) -> list[str | bytes]:
    """One frame of every hostile kind, starting ``turn`` kinds further (so over successive
    turns every kind comes right before and right after every kind of reply)."""
    turn %= len(HOSTILE_KINDS)
    kinds = HOSTILE_KINDS[turn:] + HOSTILE_KINDS[:turn]
    return [garbage_frame(kind, api_key=api_key) for kind in kinds]


def malformed(reply: Mapping[str, Any]) -> dict[str, Any]:
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


def _number(body: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{key!r} must be a non-negative number")
    return float(value)


def abort_tcp(scope: Mapping[str, Any]) -> bool:
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


# -- the fault handlers: (cloud, request body, now) -> how many things were affected ----------


def apply_fault(cloud: DevCloud, body: Mapping[str, Any]) -> dict[str, Any]:
    """Apply one ``POST /control/faults`` request; raises ValueError on a bad one.

    Returns ``{"ok": true, "action", "affected"}`` where ``affected`` counts the peer
    connections or WebSockets hit (or the offers to refuse/stall).
    """
    action = body.get("action")
    handler = _HANDLERS.get(action) if isinstance(action, str) else None
    if handler is None:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(_HANDLERS)}")
    affected = handler(cloud, body, time.monotonic())
    logger.info("devcloud fault %s (affected %d)", action, affected)
    return {"ok": True, "action": action, "affected": affected}


def _close_pc(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    for session in cloud.sessions.values():
        session.close_requested.set()
    return len(cloud.sessions)


def _blackhole(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    seconds = _number(body, "seconds")
    scope = body.get("scope", "existing")
    if scope not in ("existing", "all"):
        raise ValueError("scope must be 'existing' or 'all'")
    for session in cloud.sessions.values():
        session.blackhole_until = now + seconds
    if scope == "all":
        cloud.faults.blackhole_all_until = now + seconds
    return len(cloud.sessions)


def _latency(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    """Hold every datagram of every session (existing and new) ``ms`` milliseconds in
    each direction for ``seconds``: the round trip grows by twice ``ms``, nothing is lost."""
    cloud.faults.latency = _number(body, "ms") / 1000
    cloud.faults.latency_until = now + _number(body, "seconds")
    return len(cloud.sessions)


def _close_ws(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    code = int(_number(body, "code", 1000))
    if not 1000 <= code <= 4999:
        raise ValueError("code must be a WebSocket close code (1000-4999)")
    reason = str(body.get("reason", ""))
    for connection in cloud.connections:
        connection.commands_send.send_nowait(("close_ws", code, reason))
    return len(cloud.connections)


def _drop_ws(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    for connection in cloud.connections:
        connection.commands_send.send_nowait(("drop_ws", 0, ""))
    return len(cloud.connections)


def _refuse_offers(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    cloud.faults.refuse_offers = int(_number(body, "count", 1))
    return cloud.faults.refuse_offers


def _stall_offers(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    cloud.faults.stall_offers = int(_number(body, "count", 1))
    return cloud.faults.stall_offers


def _stall_media(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    cloud.faults.stall_media_until = now + _number(body, "seconds")
    return len(cloud.sessions)


def _clear(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    cloud.faults = FaultState()
    for session in cloud.sessions.values():
        session.blackhole_until = -math.inf
    return 0


def _withhold_ready(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    cloud.faults.withhold_ready = int(_number(body, "count", 1))
    return cloud.faults.withhold_ready


def _send_error(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
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
    for connection in cloud.connections:
        connection.outbox_send.send_nowait(([json.dumps(error)], close))
    return len(cloud.connections)


def _garbage(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    kinds = body.get("kinds", list(HOSTILE_KINDS))
    if not isinstance(kinds, list) or not all(k in GARBAGE_KINDS for k in kinds):
        raise ValueError(f"kinds must be a list of: {', '.join(GARBAGE_KINDS)}")
    size = int(_number(body, "size", DEFAULT_HUGE_SIZE))
    frames = [garbage_frame(k, size=size, api_key=cloud.config.api_key) for k in kinds]
    for connection in cloud.connections:
        connection.outbox_send.send_nowait((frames, None))
    return len(cloud.connections)


def _hostile(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    cloud.faults.hostile_until = now + _number(body, "seconds")
    return len(cloud.connections)


def _malform(cloud: DevCloud, body: Mapping[str, Any], now: float) -> int:
    reply = body.get("reply")
    if reply not in MALFORMABLE_REPLIES:
        raise ValueError(f"reply must be one of: {', '.join(MALFORMABLE_REPLIES)}")
    cloud.faults.malform[reply] = int(_number(body, "count", 1))
    return cloud.faults.malform[reply]


_HANDLERS: dict[str, Callable[[DevCloud, Mapping[str, Any], float], int]] = {
    "close_pc": _close_pc,
    "blackhole": _blackhole,
    "close_ws": _close_ws,
    "drop_ws": _drop_ws,
    "refuse_offers": _refuse_offers,
    "stall_offers": _stall_offers,
    "stall_media": _stall_media,
    "clear": _clear,
    "withhold_ready": _withhold_ready,
    "send_error": _send_error,
    "garbage": _garbage,
    "hostile": _hostile,
    "malform": _malform,
    "latency": _latency,
}
"""Every fault action, in the order ``unknown action`` errors list them."""
