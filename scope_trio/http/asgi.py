"""ASGI plumbing of the HTTP API: the app class, the connection wrapper, limits, CORS, errors.

Everything here is about HTTP mechanics, not about any one route:

* :class:`ScopeApp`: Quart-Trio plus the shutdown signal, the redactor and the limiter of
  requests answered from memory.
* :class:`_HTTPConnection`: Quart-Trio's per-request handler minus a cancellation that
  strands keep-alive connections, plus that limiter (each workaround explained there).
* :class:`Plumbing`: the body limit (413), draining unread bodies, ``{"detail": ...}`` error
  bodies for every failure, and JSON body parsing into pydantic models (400 naming the field).
* :class:`Cors`: off unless origins are configured.
* :class:`Redactor`: every JSON body and event the app writes passes through it, so an api
  key posted to ``/api/v1/cloud/connect`` never comes back out.
* :func:`deadline`: a route's await that could hang becomes a 504 when it runs out.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
)
from pydantic import BaseModel, ValidationError
from quart import Response, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException, NotFound

from scope_trio.core.session import JsonTooDeepError, loads_json

__all__ = [
    "BODY_DRAIN_TIMEOUT",
    "FAST_REQUESTS",
    "MAX_POSTED_SECRETS",
    "MIB",
    "ROUTE_TIMEOUT",
    "ApiError",
    "Cors",
    "Plumbing",
    "Redactor",
    "ScopeApp",
    "deadline",
]

logger = logging.getLogger("scope_trio.http.app")

MIB = 1024 * 1024
ROUTE_TIMEOUT = 60.0
"""Upper bound on any one request's work (connect/teardown/offer); past it: 504."""
MAX_POSTED_SECRETS = 32
"""How many api keys posted to ``/api/v1/cloud/connect`` the response redactor remembers."""
FAST_REQUESTS = 8
"""How many requests answered from memory run at once (see ``_HTTPConnection``)."""
BODY_DRAIN_TIMEOUT = 2.0
"""How long an answered request's unread body may take to arrive (see ``Plumbing.finish_body``)."""

ModelT = TypeVar("ModelT", bound=BaseModel)


class ApiError(Exception):
    """Becomes the response ``{"detail": detail}`` with ``status``."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


@dataclass
class Redactor:
    """Replaces every api key it was told about with ``***`` in outgoing text.

    The first key added (the configured one, if any) is kept for good; of the keys posted to
    ``/api/v1/cloud/connect`` since, the latest :data:`MAX_POSTED_SECRETS` are, so a client
    posting key after key cannot make every response slower without bound. A key older than
    that is in no state any more: only the current link's key can appear in a status.
    """

    secrets: dict[str, None] = field(default_factory=dict)
    """Insertion-ordered: the configured key first, then the posted ones, oldest first."""

    def add(self, secret: str | None) -> None:
        if not secret or len(secret) < 4:  # a 1-3 character "key" would mangle every body
            return
        self.secrets.pop(secret, None)
        self.secrets[secret] = None
        while len(self.secrets) > 1 + MAX_POSTED_SECRETS:
            oldest_posted = list(self.secrets)[1]
            del self.secrets[oldest_posted]

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


_FROM_MEMORY = frozenset(
    {
        "/",
        "/status",
        "/health",
        "/openapi.json",
        "/api/v1/config",
        "/api/v1/cloud/status",
        "/api/v1/cloud/stats",
        "/api/v1/logs/tail",  # Scope's frontend polls it every 2 s from page load
    }
)


class _HTTPConnection(TrioASGIHTTPConnection):
    """Quart-Trio's handler of one HTTP request, minus a cancellation that strands connections.

    Quart-Trio cancels the request's task when Hypercorn says ``http.disconnect``. Hypercorn
    says it from inside that task's own last ``send`` when it answered a request whose body
    it had not received yet (a 404, 405 or 413 decided from the headers alone), on its way to
    closing the connection: the cancellation lands in Hypercorn's close, the connection stays
    open but dead, and the client's next request on it waits forever (found by
    ``tests/test_fuzz_http.py``). Once the whole response has been handed over there is
    nothing left to cancel, so a disconnect after that point is not passed on; the request's
    task ends on its own right after.

    Also: at most :data:`FAST_REQUESTS` of the GETs answered from memory (status, stats,
    health, ...) run at once; the others wait, parked, for a turn. Trio runs every runnable
    task once per scheduling batch, so 200 clients polling back to back made each batch
    long enough to starve the relay: delivered fps fell to 4 % and a cloud reconnect did not
    finish in 10 s (``benchmarks/load.py``, flood). Waiting requests cost the batch nothing.
    ``/health`` counts as answered from memory only while it is not forwarded to the cloud.
    """

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        app = self.app
        assert isinstance(app, ScopeApp)
        if self.scope["method"] in ("GET", "HEAD") and app.from_memory(self.scope["path"]):
            async with app.fast_requests:
                await self._handle(receive, send)
        else:
            await self._handle(receive, send)

    async def _handle(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        sent = False

        async def send_response(message: ASGISendEvent) -> None:
            nonlocal sent
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                sent = True  # before the send: the disconnect arrives during it
            await send(message)

        async def receive_messages() -> ASGIReceiveEvent:
            message = await receive()
            if message["type"] == "http.disconnect" and sent:
                await trio.sleep_forever()  # cancelled when the request's task ends
            return message

        await super().__call__(receive_messages, send_response)


class ScopeApp(QuartTrio):
    """QuartTrio plus the one signal the server gives it: :meth:`begin_shutdown`."""

    asgi_http_class = _HTTPConnection
    stopping: trio.Event
    fast_requests: trio.CapacityLimiter
    redact: Redactor
    debug_endpoints: bool
    health_forwarded: Any
    """A callable: True while ``/health`` is answered by the cloud (not from memory)."""

    def begin_shutdown(self) -> None:
        """End every open event stream now, so the server can drain without waiting."""
        self.stopping.set()

    def from_memory(self, path: str) -> bool:
        """Routes that answer at once, from state in this process (no cloud request, no wait)."""
        if path == "/health":
            return not self.health_forwarded()
        return path in _FROM_MEMORY or path.startswith("/static/")

    async def send_static_file(self, filename: str) -> Response:
        """Quart's, except that a name the filesystem refuses to look up (a component over
        255 bytes: ENAMETOOLONG) is a 404 like any other missing file, not a 500."""
        try:
            return await super().send_static_file(filename)
        except OSError:
            raise NotFound from None

    def json_response(self, payload: Any, status: int = 200) -> Response:
        """``payload`` as JSON with the api key redacted."""
        text = self.redact(json.dumps(payload))
        return Response(text, status=status, content_type="application/json")


def describe(exc: ValidationError) -> str:
    """``"field.path: message"`` for each problem, joined by ``"; "``."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{loc}: {error['msg']}")
    return "; ".join(parts)


class Plumbing:
    """Request hooks and error handlers that every route shares."""

    def __init__(self, app: ScopeApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def install(self) -> None:
        app = self.app
        app.before_request(self.limit_body)
        app.after_request(self.finish_body)
        app.register_error_handler(ApiError, self.api_error)
        app.register_error_handler(HTTPException, self.http_error)
        app.register_error_handler(Exception, self.unexpected)

    async def limit_body(self) -> None:
        """413 before routing when ``Content-Length`` is over the limit. A chunked body has
        no length to check: it is read here, before any route runs (Quart raises the 413 as
        soon as it grows past the limit), so a route that ignores its body cannot take one
        over the limit either."""
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise ApiError(413, f"Request body too large (limit {self.max_body_bytes} bytes)")
        if length is None and "transfer-encoding" in request.headers:
            await request.get_data(cache=True)

    async def finish_body(self, response: Response) -> Response:
        """Read what the route left of the request body before the answer goes out.

        Hypercorn closes a keep-alive connection whose request body was not read by the
        time the response was complete (a 404/405, or a route that ignores its body), and a
        client that sends its next request on it sees a disconnect. The body is within
        ``max_body_bytes`` (or this is a 413, which is left to close the connection), so
        reading it is cheap; a body that does not arrive within ``BODY_DRAIN_TIMEOUT`` is
        left to that close too.
        """
        has_body = request.content_length or "transfer-encoding" in request.headers
        if has_body and response.status_code != 413:
            with trio.move_on_after(BODY_DRAIN_TIMEOUT), contextlib.suppress(HTTPException):
                await request.get_data(cache=True)
        return response

    async def api_error(self, exc: ApiError) -> Response:
        return self.app.json_response({"detail": exc.detail}, exc.status)

    async def http_error(self, exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            detail = f"Request body too large (limit {self.max_body_bytes} bytes)"
        else:
            detail = exc.name
        response = self.app.json_response({"detail": detail}, status)
        allowed = getattr(exc, "valid_methods", None)
        if status == 405 and allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    async def unexpected(self, exc: Exception) -> Response:
        logger.error(
            "unhandled error in %s %s: %s",
            request.method,
            request.path,
            self.app.redact(f"{type(exc).__name__}: {exc}"),
        )
        return self.app.json_response({"detail": "Internal server error"}, 500)


async def read_json() -> tuple[bool, Any]:
    """The request body as JSON: ``(present, value)``; 400 for invalid or too-deep JSON."""
    raw = await request.get_data(cache=True, as_text=False)
    if not raw.strip():
        return False, None
    try:
        return True, loads_json(raw)
    except JsonTooDeepError as exc:  # json.loads alone raised RecursionError: a 500
        raise ApiError(400, f"body: {exc}") from None
    except ValueError as exc:
        raise ApiError(400, f"body: invalid JSON ({exc})") from None


async def parse_body(model: type[ModelT], *, optional: bool = False) -> tuple[ModelT, Any]:
    """Validate the JSON body against ``model``; returns the model and the raw JSON."""
    present, data = await read_json()
    if not present:
        if not optional:
            raise ApiError(400, "body: a JSON object is required")
        data = {}
    if not isinstance(data, dict):
        raise ApiError(400, "body: expected a JSON object")
    try:
        return model.model_validate(data), data
    except ValidationError as exc:
        raise ApiError(400, describe(exc)) from None


@dataclass(frozen=True)
class Cors:
    """Off when ``origins`` is empty; otherwise answers preflights and tags responses."""

    origins: frozenset[str]

    def install(self, app: ScopeApp) -> None:
        app.before_request(self.preflight)
        app.after_request(self.decorate)

    def allowed(self, origin: str | None) -> bool:
        return bool(origin) and ("*" in self.origins or origin in self.origins)

    async def preflight(self) -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        if not self.allowed(request.headers.get("Origin")):
            return None  # Quart's automatic OPTIONS answers, without CORS headers
        response = Response("", status=204)
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
        requested = request.headers.get("Access-Control-Request-Headers")
        response.headers["Access-Control-Allow-Headers"] = requested or "Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
        return response

    async def decorate(self, response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is not None and self.allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
        return response


@contextlib.contextmanager
def deadline(what: str, seconds: float | None = None) -> Iterator[None]:
    """``trio.fail_after`` whose expiry becomes a 504 ``{"detail": "Timed out: ..."}``."""
    seconds = ROUTE_TIMEOUT if seconds is None else seconds
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise ApiError(504, f"Timed out: {what} took over {seconds:g} s") from None
