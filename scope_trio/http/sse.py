"""Server-Sent Event streams: CloudStatus changes, and a keepalive-only stream.

Both end when the app's ``stopping`` event is set (:meth:`ScopeApp.begin_shutdown`), so the
server can drain without waiting for clients to leave, and when the client disconnects
(Quart-Trio cancels the request, and with it the generator).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import trio
from quart import Response

from scope_trio.cloud.manager import CloudManager

__all__ = ["keepalive_events", "sse", "status_events", "stream_response"]

KEEPALIVE = b": keep-alive\n\n"


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def stream_response(body: AsyncIterator[bytes]) -> Response:
    """A ``text/event-stream`` response with no response timeout and no proxy buffering."""
    response = Response(body, content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None  # a stream, not a slow response: no RESPONSE_TIMEOUT
    return response


async def status_events(
    manager: CloudManager,
    stopping: trio.Event,
    redact: Callable[[str], str],
    keepalive: float,
) -> AsyncIterator[bytes]:
    """CloudStatus as SSE: the current one first, then one per change until ``stopping``.

    Versions make it lossless: a change between two reads is seen by the next
    ``wait_change``. Changes that land while an event is being written are coalesced into
    the next event (each event is the status when it is read). A comment line goes out
    after ``keepalive`` seconds without a change.
    """
    version = manager.version
    yield sse(redact(json.dumps(manager.status())))
    while not stopping.is_set():
        with trio.move_on_after(keepalive) as quiet:
            await _wait_change_or_stop(manager, version, stopping)
        if stopping.is_set():
            return
        if quiet.cancelled_caught:
            yield KEEPALIVE
            continue
        version = manager.version
        yield sse(redact(json.dumps(manager.status())))


async def keepalive_events(stopping: trio.Event, keepalive: float) -> AsyncIterator[bytes]:
    """A stream with no events: a comment every ``keepalive`` seconds until ``stopping``.

    For event sources that exist in Scope's API but have nothing to report here (OSC), so
    that a client's ``EventSource`` stays open instead of reconnecting in a loop.
    """
    yield KEEPALIVE  # sends the headers now: the client sees the stream open
    while True:
        with trio.move_on_after(keepalive):
            await stopping.wait()
        if stopping.is_set():
            return
        yield KEEPALIVE


async def _wait_change_or_stop(manager: CloudManager, seen: int, stopping: trio.Event) -> None:
    """Return once the status changed past version ``seen``, or ``stopping`` is set."""
    async with trio.open_nursery() as nursery:

        async def change() -> None:
            await manager.wait_change(seen)
            nursery.cancel_scope.cancel()

        async def stop() -> None:
            await stopping.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(change)
        nursery.start_soon(stop)
