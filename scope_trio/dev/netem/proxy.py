"""The signaling proxy: puts the relay into the media path of a real server and cloud.

``scope-trio serve --cloud-ws-url <proxy>`` connects here; every connection opens its own
connection to the upstream cloud URL (the ``Authorization`` header passes through) and the
two are joined message for message, with three rewrites that force the media through the
relay of :mod:`.relay`:

* any JSON object from the server carrying an ``sdp`` (the ``offer``) opens a relay session
  and its candidates are replaced with the session's mirrors of the server's endpoints; the
  session is remembered under the message's ``request_id``;
* any JSON object from the cloud carrying an ``sdp`` (the ``answer``) is rewritten with the
  session of its ``request_id`` (mirrors of the cloud's endpoints); an answer to no known
  offer loses every candidate, so no direct path can ever leak through; the answer's
  ``sessionId`` is remembered for trickled candidates; an ``error`` reply to an offer retires
  its session;
* a trickled ``icecandidate`` from the server is rewritten the same way; one the relay
  cannot carry (IPv6, TCP, mDNS) is acknowledged by the proxy itself and not forwarded.

Everything else, unparseable text and binary messages included, passes through unchanged.
When one side closes, the other is closed with the same code and reason (an abnormal close,
1005/1006, becomes 1011). The signaling path itself is not impaired: a blackout applies to
the media datagrams, as when a UDP path (a NAT binding, a Wi-Fi handover) dies while TCP
connections survive or reconnect.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections import OrderedDict
from functools import partial
from typing import Any

import trio
import trio_websocket

from .relay import Netem, Session

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
MAX_PENDING_OFFERS = 64
_UNSENDABLE_CODES = (1005, 1006, 1015)


class _Connection:
    """One server connection joined to its own upstream connection."""

    def __init__(
        self,
        netem: Netem,
        server: trio_websocket.WebSocketConnection,
        cloud: trio_websocket.WebSocketConnection,
    ) -> None:
        self.netem = netem
        self.server = server
        self.cloud = cloud
        self.by_request: OrderedDict[Any, Session] = OrderedDict()
        self.by_cloud_session: OrderedDict[Any, Session] = OrderedDict()

    async def from_server(self, raw: str | bytes) -> str | bytes | None:
        message = _object(raw)
        if message is None:
            return raw
        if isinstance(message.get("sdp"), str):
            opened = await self.netem.open_session()
            message["sdp"] = await opened.rewrite_offer(message["sdp"])
            self.by_request[message.get("request_id")] = opened
            while len(self.by_request) > MAX_PENDING_OFFERS:
                self.by_request.popitem(last=False)
            return json.dumps(message)
        candidate = message.get("candidate")
        if message.get("type") == "icecandidate" and isinstance(candidate, dict):
            text = candidate.get("candidate")
            known = self.by_cloud_session.get(message.get("sessionId"))
            if not isinstance(text, str) or not text or known is None:
                return raw  # end of candidates, or the cloud answers it with an error
            rewritten = await known.rewrite_candidate(text, "server")
            if rewritten is None:
                ack: dict[str, Any] = {"type": "icecandidate_ack", "status": "ok"}
                ack["request_id"] = message.get("request_id")
                await self.server.send_message(json.dumps(ack))
                return None
            candidate["candidate"] = rewritten
            return json.dumps(message)
        return raw

    async def from_cloud(self, raw: str | bytes) -> str | bytes | None:
        message = _object(raw)
        if message is None:
            return raw
        request_id = message.get("request_id")
        if isinstance(message.get("sdp"), str):
            session = self.by_request.pop(request_id, None)
            if session is None:
                logger.warning("netem: an sdp for no known offer; removing its candidates")
                from . import sdp as sdp_text  # noqa: PLC0415 - only on this odd path

                message["sdp"] = sdp_text.rewrite(message["sdp"], {})
            else:
                message["sdp"] = await session.rewrite_answer(message["sdp"])
                self.by_cloud_session[message.get("sessionId")] = session
                while len(self.by_cloud_session) > MAX_PENDING_OFFERS:
                    self.by_cloud_session.popitem(last=False)
            return json.dumps(message)
        if message.get("type") == "error" and request_id in self.by_request:
            self.by_request.pop(request_id).close()
        return raw


def _object(raw: str | bytes) -> dict[str, Any] | None:
    if not isinstance(raw, str):
        return None
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


async def _pump(
    source: trio_websocket.WebSocketConnection,
    sink: trio_websocket.WebSocketConnection,
    transform: Any,
    done: trio.CancelScope,
) -> None:
    try:
        while True:
            out = await transform(await source.get_message())
            if out is not None:
                await sink.send_message(out)
    except trio_websocket.ConnectionClosed as exc:
        code = exc.reason.code if exc.reason is not None else 1000
        reason = (exc.reason.reason if exc.reason is not None else None) or ""
        if code in _UNSENDABLE_CODES:
            code, reason = 1011, reason or "netem: the other side went away"
        # Not shielded: the other pump cancels this wait once the close reply arrives (a
        # trio-websocket client would otherwise wait for the server to end TCP as well).
        with trio.move_on_after(CLOSE_TIMEOUT):
            await source.aclose()
            await sink.aclose(code, reason)
    finally:
        done.cancel()


async def _handle(netem: Netem, upstream: str, request: trio_websocket.WebSocketRequest) -> None:
    headers = [(k, v) for k, v in request.headers if k.lower() == b"authorization"]
    server = await request.accept()
    parts = urllib.parse.urlsplit(upstream)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stream: trio.SocketStream | None = None
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        logger.warning("netem: upstream %s unreachable: %s", upstream, exc)
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await server.aclose(1011, "netem: upstream unreachable")
        return
    try:
        async with trio.open_nursery() as nursery:
            # We own the TCP stream: trio-websocket's client leaks it when the server closes.
            cloud = await trio_websocket.wrap_client_stream(
                nursery, stream, f"{host}:{port}", resource, extra_headers=headers
            )
            joined = _Connection(netem, server, cloud)
            done = nursery.cancel_scope
            nursery.start_soon(_pump, server, cloud, joined.from_server, done)
            nursery.start_soon(_pump, cloud, server, joined.from_cloud, done)
    except Exception:  # one broken connection must not take the proxy (its nursery) down
        logger.exception("netem: signaling connection to %s failed", upstream)
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await server.aclose(1011, "netem: upstream connection failed")
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await server.aclose()
            await stream.aclose()


async def serve_signaling_proxy(
    netem: Netem,
    upstream: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the proxy until cancelled; reports its ``ws://host:port/ws`` URL once listening.

    Each connection runs in the proxy's own nursery: cancelling this closes them all.
    """
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                partial(_handle, netem, upstream),
                host,
                port,
                None,
                handler_nursery=nursery,
                max_message_size=4 * 1024 * 1024,
            )
        )
        task_status.started(f"ws://{host}:{server.port}/ws")
