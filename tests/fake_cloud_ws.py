"""A real WebSocket server on 127.0.0.1 that plays the cloud's side of the signaling protocol.

Each test gives :class:`FakeCloud` a *script*: an async function that receives one
:class:`FakeCloudConnection` per client connection and does whatever the cloud should do
(accept or reject, send ``ready`` or not, answer, misbehave, close, abort the TCP stream).
The server owns every socket it accepts and closes it when the script ends or the test
finishes, so tests stay free of ResourceWarnings.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
import trio_websocket

_CLIENT_GONE = (
    trio_websocket.ConnectionClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)

Script = Callable[["FakeCloudConnection"], Awaitable[None]]
Responder = Callable[[dict[str, Any]], "dict[str, Any] | None"]


class FakeCloudConnection:
    """The server side of one client connection."""

    def __init__(self, request: trio_websocket.WebSocketRequest, stream: trio.abc.Stream) -> None:
        self.request = request
        self.headers = {name.decode().lower(): value.decode() for name, value in request.headers}
        self.path = request.path
        self.received: list[dict[str, Any]] = []
        self.ws: trio_websocket.WebSocketConnection | None = None
        self.client_close: trio_websocket.CloseReason | None = None
        self._stream = stream

    async def accept(self) -> None:
        self.ws = await self.request.accept()

    async def reject(self, status: int) -> None:
        await self.request.reject(status, body=b"rejected by fake cloud")

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(message))

    async def send_raw(self, data: str | bytes) -> None:
        assert self.ws is not None
        await self.ws.send_message(data)

    async def send_ready(self, connection_id: str = "conn-1") -> None:
        await self.send({"type": "ready", "connection_id": connection_id})

    async def receive(self) -> dict[str, Any]:
        """The next JSON message from the client (recorded in ``received``)."""
        assert self.ws is not None
        message: dict[str, Any] = json.loads(await self.ws.get_message())
        self.received.append(message)
        return message

    async def serve(self, respond: Responder) -> None:
        """Answer each message with ``respond(message)`` (None: no answer) until the client
        closes; records the client's close reason."""
        assert self.ws is not None
        try:
            while True:
                message = await self.receive()
                reply = respond(message)
                if reply is not None:
                    await self.send(reply)
        except trio_websocket.ConnectionClosed as exc:
            self.client_close = exc.reason

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        assert self.ws is not None
        await self.ws.aclose(code, reason)

    async def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        await self._stream.aclose()


def _leaves(exc: BaseException) -> list[BaseException]:
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple):
        return [leaf for sub in inner for leaf in _leaves(sub)]
    return [exc]


def standard_reply(message: dict[str, Any]) -> dict[str, Any] | None:
    """What a healthy cloud answers: pong, user_id_set, and an echo for everything else."""
    msg_type = message.get("type")
    if msg_type == "ping":
        return {"type": "pong", "request_id": message["request_id"]}
    if msg_type == "set_user_id":
        return {"type": "user_id_set", "user_id": message["user_id"]}
    if "request_id" in message:
        return {"type": f"{msg_type}_reply", "request_id": message["request_id"], "echo": message}
    return None


async def healthy_cloud(conn: FakeCloudConnection) -> None:
    await conn.accept()
    await conn.send_ready()
    await conn.serve(standard_reply)


class FakeCloud:
    """Serves ``script`` for every connection; ``connections`` lists them in order."""

    def __init__(self, script: Script, port: int) -> None:
        self.script = script
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.connections: list[FakeCloudConnection] = []
        self.connected = trio.Event()

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(5):
                        request = await trio_websocket.wrap_server_stream(nursery, stream)
                    conn = FakeCloudConnection(request, stream)
                    self.connections.append(conn)
                    self.connected.set()
                    try:
                        await self.script(conn)
                    finally:
                        if conn.ws is not None:
                            # Short: a client that is already gone never answers the close.
                            with trio.move_on_after(0.2, shield=True):
                                await conn.ws.aclose()
                finally:
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            if not all(isinstance(leaf, _CLIENT_GONE) for leaf in _leaves(exc)):
                raise
            # The client went away mid-script: normal for a fake cloud.
        finally:
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def serve_fake_cloud(script: Script = healthy_cloud) -> AsyncIterator[FakeCloud]:
    """Run a fake cloud for the duration of the block."""
    async with trio.open_nursery() as nursery:
        cloud = FakeCloud(script, 0)
        listeners = await nursery.start(partial(trio.serve_tcp, cloud._handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        cloud.port = port
        cloud.url = f"ws://127.0.0.1:{port}/ws"
        yield cloud
        nursery.cancel_scope.cancel()
