"""The HTTP API (CONTRACT section 1) as a Quart-Trio app: :func:`create_app`.

The app is a thin translation layer: it validates request bodies with pydantic, calls the
:class:`~scope_trio.cloud.CloudManager` or the browser relay, and turns their results and
exceptions into the contract's status codes and ``{"detail": ...}`` bodies. It owns no state
of its own beyond the start time, the shutdown signal and the secrets to redact.

Decisions where the contract is silent (each is tested):

* Every request-body problem is **400** with ``detail`` naming the field
  (``"sdp: Field required"``; several problems joined by ``"; "``): invalid JSON, a body that
  is not an object, a missing or mistyped field. Scope's FastAPI answered 422 for schema
  errors; the contract asks for 400 ("Malformed SDP: 400, never 500"), and one status for all
  body errors is simpler for clients. The Content-Type is not checked (a JSON body is parsed
  whatever it says), so clients that forget the header still work.
* A body larger than ``max_body_bytes`` is **413** (checked on ``Content-Length`` before
  routing, and while reading a chunked body).
* Unknown path: 404 ``{"detail": "Not Found"}``; wrong method: 405 ``{"detail": "Method Not
  Allowed"}`` (FastAPI's words). The debug route, when disabled, says ``"Not found"`` as Scope.
* Any await that could hang has a deadline (:data:`ROUTE_TIMEOUT`); running out is **504**.
* The relay raising :class:`~scope_trio.cloud.link.CloudLinkError` or
  :class:`~scope_trio.core.supervisor.SupervisorError` while starting the cloud session is **502**.
* ``GET /api/v1/webrtc/ice-servers`` without a cloud link answers ``{"iceServers": []}``: the
  browser talks to this server, normally over loopback, and the machine may be offline.
* Beyond Scope: ``GET /api/v1/cloud/events`` (Server-Sent Events of CloudStatus),
  ``GET /api/v1/config`` (what the status page needs to know), ``GET /openapi.json``,
  ``GET /metrics`` (Prometheus, :mod:`scope_trio.ops.metrics`) and the status page at ``/``.

The api key never leaves: :class:`CloudSettings` and pydantic's ``SecretStr`` keep it out of
reprs, and every JSON body and event the app writes passes through :class:`Redactor`, which
replaces any key it has seen with ``***``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
)
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from quart import Response, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException, NotFound

from scope_trio import __version__
from scope_trio.cloud.link import CloudLinkError
from scope_trio.cloud.manager import CloudManager, NotConnectedError
from scope_trio.core.session import JsonTooDeepError, loads_json
from scope_trio.core.supervisor import SupervisorError
from scope_trio.ops import logs
from scope_trio.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from scope_trio.ops.metrics import ServerMetrics

__all__ = [
    "MIB",
    "ROUTE_TIMEOUT",
    "BrowserRelay",
    "Redactor",
    "ScopeApp",
    "create_app",
    "openapi_document",
]

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
ROUTE_TIMEOUT = 60.0
"""Upper bound on any one request's work (connect/teardown/offer/proxy); past it: 504."""
ICE_SERVERS_TIMEOUT = 10.0
SSE_KEEPALIVE = 15.0
MAX_POSTED_SECRETS = 32
"""How many api keys posted to ``/api/v1/cloud/connect`` the response redactor remembers."""
FAST_REQUESTS = 8
"""How many requests answered from memory run at once (see ``_HTTPConnection``)."""
BODY_DRAIN_TIMEOUT = 2.0
"""How long an answered request's unread body may take to arrive (see ``_Api.finish_body``)."""
PIPELINE_NOT_LOADED = "Pipeline not loaded. Please load pipeline first."
NOT_CONNECTED_PIPELINE = "Not connected to cloud. Connect to cloud before using the pipeline API."

ModelT = TypeVar("ModelT", bound=BaseModel)


class BrowserRelay(Protocol):
    """What the routes need from :class:`scope_trio.relay.relay.Relay` (browser sessions)."""

    async def offer(
        self,
        sdp: str,
        sdp_type: str,
        initial_parameters: Mapping[str, Any] | None = None,
        *,
        user_id: str | None = None,
    ) -> dict[str, str]:
        """Answer a browser offer: ``{"sdp", "type": "answer", "sessionId"}``.

        Raises NotConnectedError without a cloud link, ValueError for a malformed SDP.
        """
        ...

    async def add_candidates(
        self, session_id: str, candidates: Sequence[Mapping[str, Any]]
    ) -> None:
        """Raises KeyError for an unknown session, ValueError for a bad candidate."""
        ...

    async def close(self, session_id: str) -> None:
        """Raises KeyError for an unknown session."""
        ...

    async def close_all(self) -> None: ...

    def sessions(self) -> dict[str, dict[str, Any]]: ...


# --------------------------------------------------------------------------- request models


class ConnectRequest(BaseModel):
    """``POST /api/v1/cloud/connect``: every field optional (defaults from the environment)."""

    app_id: str | None = None
    api_key: SecretStr | None = None
    user_id: str | None = None


class PromptItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: str
    weight: float = 1.0


class Parameters(BaseModel):
    """Pipeline parameters; keys beyond these are passed through unchanged."""

    model_config = ConfigDict(extra="allow")

    prompts: list[PromptItem] | None = None
    noise_scale: float | None = None
    denoising_step_list: list[int] | None = None
    input_mode: str | None = None


class OfferRequest(BaseModel):
    """``POST /api/v1/webrtc/offer``."""

    sdp: str
    type: Literal["offer"]
    initialParameters: Parameters | None = None  # the contract's field name
    user_id: str | None = None
    connection_id: str | None = None
    connection_info: dict[str, Any] | None = None


class IceCandidateInit(BaseModel):
    candidate: str
    sdpMid: str | None = None  # the contract's field name
    sdpMLineIndex: int | None = None  # the contract's field name


class CandidatesRequest(BaseModel):
    """``PATCH /api/v1/webrtc/offer/{session_id}``."""

    candidates: list[IceCandidateInit]


class PipelineLoadRequest(BaseModel):
    """``POST /api/v1/pipeline/load`` (validated here, then passed to the cloud verbatim)."""

    model_config = ConfigDict(extra="allow")

    pipeline_ids: list[str] = Field(min_length=1)
    load_params: dict[str, Any] | None = None


# -------------------------------------------------------------------------- response models
# Used for the OpenAPI document only: responses are built from the manager's dicts.


class ErrorResponse(BaseModel):
    detail: str


class HealthResponse(BaseModel):
    status: Literal["healthy"]
    timestamp: str
    server_start_time: float
    version: str
    git_commit: str


class CloudStats(BaseModel):
    uptime_seconds: float
    webrtc_offers_sent: int
    webrtc_offers_successful: int
    webrtc_ice_candidates_sent: int
    api_requests_sent: int
    api_requests_successful: int
    frames_sent_to_cloud: int
    frames_received_from_cloud: int


class CloudStatus(BaseModel):
    connected: bool
    connecting: bool
    error: str | None
    connect_stage: str | None
    webrtc_connected: bool
    webrtc_error: str | None
    webrtc_reconnecting: bool
    app_id: str | None
    connection_id: str | None
    credentials_configured: bool
    last_close_code: int | None
    last_close_reason: str | None
    stats: CloudStats | None


class WebRTCStats(BaseModel):
    sessions: dict[str, dict[str, Any]]
    """Browser sessions of the relay, by session id."""
    cloud_session: dict[str, Any]
    """The cloud media supervisor: phase, attempts, sessions started and lost."""


class CloudStatusWithStats(CloudStatus):
    webrtc_stats: WebRTCStats


class IceServer(BaseModel):
    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


class IceServersResponse(BaseModel):
    iceServers: list[IceServer]  # the contract's field name


class OfferAnswer(BaseModel):
    sdp: str
    type: Literal["answer"]
    sessionId: str  # the contract's field name


class PipelineStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["not_loaded", "loading", "loaded", "error"]
    pipeline_id: str | None = None
    load_params: dict[str, Any] | None = None
    error: str | None = None
    loading_stage: str | None = None


class ServerInfo(BaseModel):
    version: str
    debug_endpoints: bool


# -------------------------------------------------------------------------------- helpers


class ApiError(Exception):
    """Becomes the response ``{"detail": detail}`` with ``status``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
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


def _describe(exc: ValidationError) -> str:
    """``"field.path: message"`` for each problem, joined by ``"; "``."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{loc}: {error['msg']}")
    return "; ".join(parts)


def _git_commit() -> str:
    """The commit of the source tree this package runs from, or ``"unknown"``."""
    package_dir = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=package_dir,
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 2:
        return "unknown"
    top, commit = lines
    # Only if this package is part of that checkout (not some unrelated parent repository).
    if not package_dir.is_relative_to(Path(top).resolve()):
        return "unknown"
    return commit


_FROM_MEMORY = frozenset(
    {
        "/",
        "/health",
        "/openapi.json",
        "/api/v1/config",
        "/api/v1/cloud/status",
        "/api/v1/cloud/stats",
    }
)


def _from_memory(path: str) -> bool:
    """Routes that answer at once, from state in this process (no cloud request, no wait)."""
    return path in _FROM_MEMORY or path.startswith("/static/")


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
    """

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        app = self.app
        assert isinstance(app, ScopeApp)
        if self.scope["method"] in ("GET", "HEAD") and _from_memory(self.scope["path"]):
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

    def begin_shutdown(self) -> None:
        """End every open event stream now, so the server can drain without waiting."""
        self.stopping.set()

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


# ------------------------------------------------------------------------------------ app


@dataclass(frozen=True)
class _Route:
    """One route: registered on the app and documented in the OpenAPI document alike."""

    method: str
    path: str  # OpenAPI style: {param}
    handler: str  # the _Api method serving it
    summary: str
    responses: Mapping[int, type[BaseModel] | str]
    request: type[BaseModel] | None = None
    request_required: bool = True

    @property
    def rule(self) -> str:
        return self.path.replace("{", "<").replace("}", ">")

    @property
    def operation_id(self) -> str:
        name = self.path.strip("/").translate(str.maketrans("/-", "__", "{}"))
        return f"{self.method.lower()}_{name or 'index'}"


_ERR = ErrorResponse
ROUTES: tuple[_Route, ...] = (
    _Route("GET", "/health", "health", "Health check", {200: HealthResponse}),
    _Route(
        "POST",
        "/api/v1/cloud/connect",
        "connect",
        "Start connecting to the cloud in the background; returns at once (connecting)",
        {200: CloudStatus, 400: _ERR},
        ConnectRequest,
        request_required=False,
    ),
    _Route(
        "POST",
        "/api/v1/cloud/disconnect",
        "disconnect",
        "Disconnect from the cloud (returns after a complete teardown)",
        {200: CloudStatus},
    ),
    _Route("GET", "/api/v1/cloud/status", "status", "Cloud status", {200: CloudStatus}),
    _Route(
        "GET",
        "/api/v1/cloud/stats",
        "stats",
        "Cloud status plus WebRTC session stats",
        {200: CloudStatusWithStats},
    ),
    _Route(
        "GET",
        "/api/v1/cloud/events",
        "events",
        "Server-Sent Events: `data: <CloudStatus JSON>` now and on every change",
        {200: "text/event-stream"},
    ),
    _Route(
        "POST",
        "/api/v1/cloud/debug/disconnect-webrtc",
        "debug_disconnect",
        "Debug: force-close the cloud peer connection (needs SCOPE_DEBUG_ENDPOINTS)",
        {200: CloudStatus, 400: _ERR, 404: _ERR},
    ),
    _Route(
        "GET",
        "/api/v1/webrtc/ice-servers",
        "ice_servers",
        "ICE servers for the browser: the cloud's while connected",
        {200: IceServersResponse, 502: _ERR},
    ),
    _Route(
        "POST",
        "/api/v1/webrtc/offer",
        "offer",
        "Answer a browser WebRTC offer (relayed to the cloud)",
        {200: OfferAnswer, 400: _ERR, 502: _ERR},
        OfferRequest,
    ),
    _Route(
        "PATCH",
        "/api/v1/webrtc/offer/{session_id}",
        "add_candidates",
        "Add trickled ICE candidates to a browser session",
        {204: "No Content", 400: _ERR, 404: _ERR},
        CandidatesRequest,
    ),
    _Route(
        "DELETE",
        "/api/v1/webrtc/offer/{session_id}",
        "close_session",
        "Close a browser session (and its cloud session)",
        {204: "No Content", 404: _ERR},
    ),
    _Route(
        "POST",
        "/api/v1/pipeline/load",
        "pipeline_load",
        "Load a pipeline (proxied to the cloud; its status and body are passed through)",
        {200: "application/json", 400: _ERR, 502: _ERR, 503: _ERR},
        PipelineLoadRequest,
    ),
    _Route(
        "GET",
        "/api/v1/pipeline/status",
        "pipeline_status",
        "Pipeline status (proxied to the cloud)",
        {200: PipelineStatus, 502: _ERR, 503: _ERR},
    ),
    _Route("GET", "/api/v1/config", "config", "Server settings for the UI", {200: ServerInfo}),
    _Route("GET", "/openapi.json", "openapi", "This document", {200: "application/json"}),
    _Route(
        "GET",
        "/metrics",
        "metrics",
        "Prometheus metrics (text format 0.0.4); 404 when the server keeps none",
        {200: "text/plain", 404: _ERR},
    ),
    _Route("GET", "/", "index", "The status page", {200: "text/html"}),
)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of :data:`ROUTES`, with schemas from the pydantic models."""
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def response(status: int, body: type[BaseModel] | str) -> dict[str, Any]:
        if isinstance(body, str) and "/" not in body:
            return {"description": body}
        content = (
            {body: {}} if isinstance(body, str) else {"application/json": {"schema": ref(body)}}
        )
        return {"description": "Error" if status >= 400 else "OK", "content": content}

    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.operation_id,
            "responses": {str(s): response(s, body) for s, body in route.responses.items()},
        }
        if "{session_id}" in route.path:
            operation["parameters"] = [
                {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        if route.request is not None:
            operation["requestBody"] = {
                "required": route.request_required,
                "content": {"application/json": {"schema": ref(route.request)}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "scope-trio", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def create_app(
    manager: CloudManager,
    relay: BrowserRelay,
    *,
    debug_endpoints: bool,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = MIB,
    sse_keepalive: float = SSE_KEEPALIVE,
    metrics: ServerMetrics | None = None,
) -> ScopeApp:
    """The HTTP API over ``manager`` and ``relay`` (see the module docstring).

    ``cors_origins``: origins allowed cross-origin (``"*"``: any); empty disables CORS.
    ``metrics`` is served at ``GET /metrics`` (404 without); its owner runs its observer.
    Call :meth:`ScopeApp.begin_shutdown` before stopping the server, to end event streams.
    """
    app = ScopeApp(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.stopping = trio.Event()
    app.fast_requests = trio.CapacityLimiter(FAST_REQUESTS)
    app.redact = Redactor()
    app.redact.add(manager.settings.api_key)
    app.debug_endpoints = debug_endpoints
    api = _Api(
        app,
        manager,
        relay,
        max_body_bytes=max_body_bytes,
        sse_keepalive=sse_keepalive,
        metrics=metrics,
    )
    cors = _Cors(frozenset(cors_origins))
    app.before_request(api.limit_body)
    app.before_request(cors.preflight)
    app.after_request(cors.decorate)
    app.after_request(api.finish_body)
    app.register_error_handler(ApiError, api.api_error)
    app.register_error_handler(HTTPException, api.http_error)
    app.register_error_handler(Exception, api.unexpected)
    for route in ROUTES:
        app.add_url_rule(
            route.rule,
            endpoint=route.handler,
            view_func=getattr(api, route.handler),
            methods=[route.method],
        )
    return app


@dataclass(frozen=True)
class _Cors:
    """Off when ``origins`` is empty; otherwise answers preflights and tags responses."""

    origins: frozenset[str]

    def allowed(self, origin: str | None) -> bool:
        return bool(origin) and ("*" in self.origins or origin in self.origins)

    async def preflight(self) -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        if not self.allowed(request.headers.get("Origin")):
            return None  # Quart's automatic OPTIONS answers, without CORS headers
        response = Response("", status=204)
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, PATCH, DELETE, OPTIONS"
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


class _Api:
    """The route handlers (named in :data:`ROUTES`) and the error handlers."""

    def __init__(
        self,
        app: ScopeApp,
        manager: CloudManager,
        relay: BrowserRelay,
        *,
        max_body_bytes: int,
        sse_keepalive: float,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.app = app
        self.manager = manager
        self.relay = relay
        self.max_body_bytes = max_body_bytes
        self.sse_keepalive = sse_keepalive
        self.started_at = time.time()
        self.git_commit = _git_commit()
        self.openapi_doc = openapi_document()
        self.server_metrics = metrics

    def json(self, payload: Any, status: int = 200) -> Response:
        return self.app.json_response(payload, status)

    # ------------------------------------------------------------------ plumbing

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
        return self.json({"detail": exc.detail}, exc.status)

    async def http_error(self, exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            detail = f"Request body too large (limit {self.max_body_bytes} bytes)"
        else:
            detail = exc.name
        response = self.json({"detail": detail}, status)
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
        return self.json({"detail": "Internal server error"}, 500)

    async def parse_body(
        self, model: type[ModelT], *, optional: bool = False
    ) -> tuple[ModelT, Any]:
        """Validate the JSON body against ``model``; returns the model and the raw JSON."""
        raw = await request.get_data(cache=True, as_text=False)
        data: Any = {}
        if raw.strip():
            try:
                data = loads_json(raw)
            except JsonTooDeepError as exc:  # json.loads alone raised RecursionError: a 500
                raise ApiError(400, f"body: {exc}") from None
            except ValueError as exc:
                raise ApiError(400, f"body: invalid JSON ({exc})") from None
        elif not optional:
            raise ApiError(400, "body: a JSON object is required")
        if not isinstance(data, dict):
            raise ApiError(400, "body: expected a JSON object")
        try:
            return model.model_validate(data), data
        except ValidationError as exc:
            raise ApiError(400, _describe(exc)) from None

    # ------------------------------------------------------------------ plain routes

    async def health(self) -> Response:
        return self.json(
            {
                "status": "healthy",
                "timestamp": datetime.now(timezone.utc).isoformat(),
                "server_start_time": self.started_at,
                "version": __version__,
                "git_commit": self.git_commit,
            }
        )

    async def index(self) -> Response:
        response = await self.app.send_static_file("index.html")
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def openapi(self) -> Response:
        return self.json(self.openapi_doc)

    async def metrics(self) -> Response:
        if self.server_metrics is None:
            raise ApiError(404, "Not found")
        text = self.app.redact((await self.server_metrics.render()).decode())
        return Response(text, content_type=METRICS_CONTENT_TYPE)

    async def config(self) -> Response:
        return self.json({"version": __version__, "debug_endpoints": self.app.debug_endpoints})

    # ------------------------------------------------------------------ cloud

    async def connect(self) -> Response:
        body, _ = await self.parse_body(ConnectRequest, optional=True)
        api_key = body.api_key.get_secret_value() if body.api_key is not None else None
        self.app.redact.add(api_key)
        logs.add_secret(api_key)
        try:
            with _deadline("connect"):
                status = await self.manager.connect(
                    app_id=body.app_id, api_key=api_key, user_id=body.user_id
                )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return self.json(status)

    async def disconnect(self) -> Response:
        with _deadline("disconnect"):
            # A complete teardown: browser sessions in relay mode end with their cloud.
            await self.relay.close_all()
            status = await self.manager.disconnect()
        return self.json(status)

    async def status(self) -> Response:
        return self.json(self.manager.status())

    async def stats(self) -> Response:
        status = self.manager.status()
        status["webrtc_stats"] = {
            "sessions": self.relay.sessions(),
            "cloud_session": self.manager.supervisor.status.as_dict(),
        }
        return self.json(status)

    async def events(self) -> Response:
        response = Response(
            _status_events(self.manager, self.app.stopping, self.app.redact, self.sse_keepalive),
            content_type="text/event-stream",
        )
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None  # a stream, not a slow response: no RESPONSE_TIMEOUT
        return response

    async def debug_disconnect(self) -> Response:
        if not self.app.debug_endpoints:
            raise ApiError(404, "Not found")
        try:
            with _deadline("debug disconnect"):
                await self.manager.simulate_media_loss()
        except NotConnectedError:
            raise ApiError(400, "WebRTC not connected") from None
        return self.json(self.manager.status())

    # ------------------------------------------------------------------ webrtc

    async def ice_servers(self) -> Response:
        link = self.manager.link
        if link is None:
            return self.json({"iceServers": []})
        try:
            reply = await link.request("get_ice_servers", timeout=ICE_SERVERS_TIMEOUT)
        except CloudLinkError as exc:
            raise ApiError(502, f"Cloud request failed: {exc}") from None
        data = reply.get("data")
        servers = data.get("iceServers") if isinstance(data, dict) else None
        if not isinstance(servers, list):
            raise ApiError(502, "Cloud request failed: the cloud sent no iceServers list")
        return self.json({"iceServers": servers})

    async def offer(self) -> Response:
        body, _ = await self.parse_body(OfferRequest)
        params = None
        if body.initialParameters is not None:
            params = body.initialParameters.model_dump(exclude_unset=True)
        try:
            with _deadline("the offer"):
                answer = await self.relay.offer(body.sdp, body.type, params, user_id=body.user_id)
        except NotConnectedError:
            raise ApiError(400, PIPELINE_NOT_LOADED) from None
        except ValueError as exc:
            raise ApiError(400, f"Invalid offer: {exc}") from None
        except CloudLinkError as exc:
            raise ApiError(502, f"Cloud request failed: {exc}") from None
        except SupervisorError as exc:
            raise ApiError(502, f"Cloud session failed: {exc}") from None
        return self.json(answer)

    async def add_candidates(self, session_id: str) -> Response:
        body, _ = await self.parse_body(CandidatesRequest)
        candidates = [c.model_dump() for c in body.candidates]
        try:
            with _deadline("adding ICE candidates"):
                await self.relay.add_candidates(session_id, candidates)
        except KeyError:
            raise ApiError(404, f"Session {session_id} not found") from None
        except ValueError as exc:
            raise ApiError(404, f"Invalid ICE candidate: {exc}") from None
        return Response("", status=204)

    async def close_session(self, session_id: str) -> Response:
        try:
            with _deadline("closing the session"):
                await self.relay.close(session_id)
        except KeyError:
            raise ApiError(404, f"Session {session_id} not found") from None
        return Response("", status=204)

    # ------------------------------------------------------------------ pipeline (proxied)

    async def pipeline_load(self) -> Response:
        _, raw = await self.parse_body(PipelineLoadRequest)
        return await self._proxy("POST", "/api/v1/pipeline/load", raw)

    async def pipeline_status(self) -> Response:
        return await self._proxy("GET", "/api/v1/pipeline/status")

    async def _proxy(self, method: str, path: str, body: Any = None) -> Response:
        try:
            with _deadline("the cloud request"):
                status, data = await self.manager.api(method, path, body)
        except NotConnectedError:
            raise ApiError(503, NOT_CONNECTED_PIPELINE) from None
        except CloudLinkError as exc:
            raise ApiError(502, f"Cloud request failed: {exc}") from None
        if status >= 400 and not isinstance(data, dict):
            data = {"detail": str(data) if data is not None else f"Cloud returned {status}"}
        return self.json(data, status)


@contextlib.contextmanager
def _deadline(what: str, seconds: float | None = None) -> Iterator[None]:
    """``trio.fail_after`` whose expiry becomes a 504 ``{"detail": "Timed out: ..."}``."""
    seconds = ROUTE_TIMEOUT if seconds is None else seconds
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise ApiError(504, f"Timed out: {what} took over {seconds:g} s") from None


async def _status_events(
    manager: CloudManager,
    stopping: trio.Event,
    redact: Callable[[str], str],
    keepalive: float,
) -> AsyncIterator[bytes]:
    """CloudStatus as SSE: the current one first, then one per change until ``stopping``.

    Versions make it lossless: a change between two reads is seen by the next
    ``wait_change``. Changes that land while an event is being written are coalesced into
    the next event (each event is the status when it is read). A comment line goes out
    after ``keepalive`` seconds without a change. When the client disconnects, Quart-Trio
    cancels the request, and with it this generator.
    """
    version = manager.version
    yield _sse(redact(json.dumps(manager.status())))
    while not stopping.is_set():
        with trio.move_on_after(keepalive) as quiet:
            await _wait_change_or_stop(manager, version, stopping)
        if stopping.is_set():
            return
        if quiet.cancelled_caught:
            yield b": keep-alive\n\n"
            continue
        version = manager.version
        yield _sse(redact(json.dumps(manager.status())))


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


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()
