"""The signaling link to the cloud: one WebSocket speaking Scope's JSON protocol.

``async with connect_cloud_link(config) as link:`` connects (with retries), waits for the
cloud's ``ready``, registers the user id, and yields a :class:`CloudLink` whose receive loop
and heartbeat run in a nursery the context manager owns. Leaving the block closes the link
and returns only once its socket is closed and every task it started has ended.

What the link guarantees:

* every request gets an answer, an error, or a timeout: an ``error`` reply fails it at once
  (:class:`CloudRequestError`), and when the link ends for any reason every pending request
  fails immediately with :class:`CloudLinkClosedError` carrying the close code and reason;
* a dead path is noticed: a ``ping`` request every ``ping_interval`` that gets no ``pong``
  within ``pong_timeout`` closes the link with the reason "heartbeat timeout";
* the cloud cannot crash it: non-JSON text, binary frames, unknown message types and replies
  to unknown requests are logged and ignored;
* the api key travels only in the ``Authorization`` header: it is kept out of every repr,
  log line and exception message this module produces.

The protocol itself is described in ``docs/cloud-protocol.md``; the URL rule and the
deadlines live in :mod:`~scope_trio.cloud.link_config`, the errors in
:mod:`~scope_trio.cloud.link_errors`. This module is the link alone, and stays one piece
(~750 lines) because its receive loop, heartbeat, pending requests and close-reason rules
share one state and are only correct together.

Close reasons: the first cause recorded wins (an intentional :meth:`CloudLink.aclose`, a
heartbeat timeout, or the transport closing). When the cloud sends an unsolicited ``error``
and then closes, the error's text is the better reason and wins over the close frame's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import ssl
import urllib.parse
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket

from scope_trio.cloud.link_config import LinkConfig, cloud_ws_url, safe_url
from scope_trio.cloud.link_errors import (
    CloudAccessDeniedError,
    CloudConnectError,
    CloudLinkClosedError,
    CloudLinkError,
    CloudReadyTimeoutError,
    CloudRequestError,
    CloudRequestTimeoutError,
    as_connect_error,
    clip,
)
from scope_trio.ops import logs

__all__ = [
    "CloudAccessDeniedError",
    "CloudConnectError",
    "CloudLink",
    "CloudLinkClosedError",
    "CloudLinkError",
    "CloudReadyTimeoutError",
    "CloudRequestError",
    "CloudRequestTimeoutError",
    "LinkConfig",
    "LinkStats",
    "cloud_ws_url",
    "connect_cloud_link",
]

logger = logging.getLogger(__name__)
cloud_logger = logging.getLogger("scope.cloud")
"""Where the cloud's own log lines (``logs`` messages) are re-logged."""

ACCESS_DENIED = "ACCESS_DENIED"

CLOSE_NORMAL = 1000
CLOSE_ABNORMAL = 1006
"""Recorded when the link ended without a close frame (TCP lost, heartbeat timeout)."""
CLOSE_INTERNAL_ERROR = 1011

STAGE_CONNECTING = "Connecting to cloud..."
STAGE_TICK_SECONDS = 1.0
"""How often the "Starting cloud server... (Ns)" stage is refreshed while waiting for ready."""

_LOG_LEVEL_RE = re.compile(r" - (DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL) - ")
_LOG_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "FATAL": logging.CRITICAL,
}


# --------------------------------------------------------------------------- the link


@dataclass
class LinkStats:
    """Counters for one link. ``sent``/``successful`` are keyed by request type."""

    sent: Counter[str] = field(default_factory=Counter)
    successful: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    messages_received: int = 0
    established_at: float | None = None
    """``trio.current_time()`` when ``ready`` (and ``user_id_set``) arrived."""


class _PendingRequest:
    """One request waiting for its reply; completed exactly once by the receive loop."""

    __slots__ = ("done", "error", "reply", "request_type")

    def __init__(self, request_type: str) -> None:
        self.request_type = request_type
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None
        self.error: CloudLinkError | None = None

    def complete(self, reply: dict[str, Any]) -> None:
        if self.done.is_set():
            return
        if reply.get("type") == "error":
            self.error = CloudRequestError(
                self.request_type,
                str(reply.get("error") or reply.get("message") or "unknown error"),
                code=_opt_str(reply.get("code")),
                detail=reply.get("detail"),
            )
        else:
            self.reply = reply
        self.done.set()

    def fail(self, error: CloudLinkError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class CloudLink:
    """One established signaling connection to the cloud.

    Obtained from :func:`connect_cloud_link`, which owns the tasks that keep it alive; usable
    from any task until it closes. Once closed it stays closed: reconnecting means a new link.
    """

    def __init__(self, config: LinkConfig, *, on_stage: Callable[[str], None] | None) -> None:
        self._config = config
        self._on_stage = on_stage
        self._url = config.url
        self._safe_url = safe_url(self._url)
        self._stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._pending: dict[str, _PendingRequest] = {}
        self._task_scope = trio.CancelScope(shield=True)  # see _run
        self._run_scope = trio.CancelScope()  # cancelled to stop establishing or serving
        self._settled = trio.Event()  # established, or failed to establish
        self._established = False
        self._failure: CloudConnectError | None = None
        self._finished = trio.Event()
        self._close_code: int | None = None
        self._close_reason: str | None = None
        self._closing = False
        self._close_frame: tuple[int, str | None] = (CLOSE_NORMAL, None)
        self._close_wait = config.close_timeout
        self._error_reason: str | None = None
        self.connection_id: str | None = None
        """The id the cloud gave this connection in its ``ready`` message."""
        self.error_code: str | None = None
        """``code`` of the last unsolicited ``error`` (``ACCESS_DENIED``, ``MAX_DURATION_EXCEEDED``)."""
        self.stats = LinkStats()

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open" if self._established else "connecting"
        return f"<CloudLink {self._safe_url} {state} connection_id={self.connection_id!r}>"

    # ----------------------------------------------------------------- public surface

    @property
    def config(self) -> LinkConfig:
        return self._config

    @property
    def closed(self) -> bool:
        """True once the link has ended (requests fail from then on); see :meth:`wait_closed`."""
        return self._closing

    @property
    def close_code(self) -> int | None:
        """WebSocket close code of the end of this link (1006 if lost without a close frame)."""
        return self._close_code

    @property
    def close_reason(self) -> str | None:
        """Why the link ended: an ``error`` message just before the close, else the close
        frame's reason, else a description such as "heartbeat timeout"."""
        return self._close_reason

    @property
    def uptime(self) -> float:
        """Seconds since the link was established (0 before)."""
        if self.stats.established_at is None:
            return 0.0
        return trio.current_time() - self.stats.established_at

    async def wait_closed(self) -> None:
        """Return once the link has ended and its socket is closed."""
        await self._finished.wait()

    async def request(
        self,
        msg_type: str,
        fields: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- every request has a default deadline
    ) -> dict[str, Any]:
        """Send ``{type: msg_type, **fields, request_id}`` and return the matching reply.

        The deadline (``timeout``, default ``request_timeout``) covers sending and waiting.
        Raises :class:`CloudRequestError` as soon as the cloud answers with ``error``,
        :class:`CloudLinkClosedError` as soon as the link ends, and
        :class:`CloudRequestTimeoutError` when the deadline passes.
        """
        fields = dict(fields or {})
        if "type" in fields or "request_id" in fields:
            raise ValueError("'type' and 'request_id' are set by CloudLink.request")
        if timeout is None:
            timeout = self._config.request_timeout
        request_id = uuid.uuid4().hex
        text = json.dumps({"type": msg_type, **fields, "request_id": request_id})
        if self._closing:
            raise CloudLinkClosedError(self._close_code, self._close_reason)
        pending = self._pending[request_id] = _PendingRequest(msg_type)
        self.stats.sent[msg_type] += 1
        try:
            with trio.move_on_after(timeout):
                await self._send(text, msg_type, timeout)
                await pending.done.wait()
            if not pending.done.is_set():
                raise CloudRequestTimeoutError(msg_type, timeout)
            if pending.error is not None:
                raise pending.error
        except BaseException:
            self.stats.failed[msg_type] += 1
            raise
        finally:
            del self._pending[request_id]
        assert pending.reply is not None
        self.stats.successful[msg_type] += 1
        return pending.reply

    async def _send(self, text: str, msg_type: str, limit: float) -> None:
        """Send one frame whole, or close the link.

        The send is shielded: cancelling a half-written frame would corrupt the stream for
        every other request, so a caller's cancellation waits for the (normally instant)
        send. A send that cannot finish within ``limit`` seconds means the path is stuck: the
        link is closed, which fails every pending request. A send on a closed WebSocket
        is left to the receive loop, which fails pending requests with the close reason.
        """
        ws = self._ws
        assert ws is not None  # a link is handed out only once connected
        with trio.move_on_after(limit, shield=True) as scope:
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.send_message(text)
        if scope.cancelled_caught:
            self._close_wait = 0.0  # no close handshake through a stuck stream
            self._begin_close(
                CLOSE_ABNORMAL,
                f"sending {msg_type!r} did not finish within {limit:g} s",
                frame=(CLOSE_INTERNAL_ERROR, "send timeout"),
            )

    async def aclose(self) -> None:
        """Close the link on purpose (code 1000). Idempotent; safe while cancelled.

        Fails pending requests at once, then returns when the close handshake is done and
        the socket closed; the teardown gets about ``2 * close_timeout``, then is cut short.
        """
        self._begin_close(
            CLOSE_NORMAL, "closed by client", frame=(CLOSE_NORMAL, "closed by client")
        )
        # Teardown is bounded by close_timeout twice (close handshake, then the socket).
        with trio.move_on_after(2 * self._config.close_timeout + 0.5, shield=True):
            await self._finished.wait()
        if not self._finished.is_set():
            logger.warning(
                "cloud link %s: teardown overran its deadline",
                self._safe_url,
                extra=logs.ids(connection_id=self.connection_id),
            )
            self._task_scope.cancel()  # cancels through the shield in _run

    # ----------------------------------------------------------------- life of the link

    async def _run(self) -> None:
        """The link's one task: establish, serve until closed, tear down. Never raises;
        failures become ``_failure`` or the close reason.

        Shielded from outside cancellation, which reaches it only through :meth:`aclose`
        (the owner always calls it, also when cancelled): that keeps trio-websocket's reader
        alive for the close handshake, so the cloud gets a proper close frame and answer
        even when the owner is being cancelled. Every step after ``aclose`` is bounded.
        """
        with self._task_scope:
            try:
                # trio-websocket's reader task lives in this inner nursery, so whatever it
                # raises (a rejected handshake, a protocol error) ends up in the handler
                # below instead of crashing the owner's nursery.
                async with trio.open_nursery() as ws_nursery:
                    try:
                        with self._run_scope:
                            await self._establish(ws_nursery)
                            self._established = True
                            self.stats.established_at = trio.current_time()
                            self._settled.set()
                            logger.info(
                                "cloud link up: %s (connection_id=%s)",
                                self._safe_url,
                                self.connection_id,
                            )
                            if self._config.ping_interval is not None:
                                ws_nursery.start_soon(self._heartbeat, self._config.ping_interval)
                            await self._serve()
                    finally:
                        with trio.move_on_after(self._close_wait, shield=True):
                            await self._close_websocket()
                        ws_nursery.cancel_scope.cancel()
            except Exception as exc:  # includes the ExceptionGroup from the nursery
                error = _pick_error(exc)
                if not self._established and self._failure is None:
                    self._failure = as_connect_error(error, self._safe_url)
                elif not isinstance(error, CloudLinkError):
                    logger.exception("cloud link failed unexpectedly", exc_info=error)
                    self._record_close(CLOSE_INTERNAL_ERROR, f"internal error: {error!r}")
            finally:
                with trio.move_on_after(self._close_wait, shield=True):
                    await self._close_stream()
                self._finish()

    def _finish(self) -> None:
        if self._failure is None and not self._established:
            self._failure = CloudConnectError(
                "connecting to the cloud was abandoned", retryable=False
            )
        if self._failure is not None:
            if self._close_code is not None and self._failure.close_code is None:
                self._failure.close_code = self._close_code
                self._failure.close_reason = self._close_reason
            self._record_close(self._close_code, self._close_reason or str(self._failure))
        else:
            self._record_close(CLOSE_ABNORMAL, "link ended")
        self._settled.set()
        self._finished.set()
        if self._established:
            logger.info("cloud link closed (code %s): %s", self._close_code, self._close_reason)

    async def _wait_established(self) -> None:
        """Return once the link is established; raise its CloudConnectError if it is not."""
        await self._settled.wait()
        if self._failure is not None:
            raise self._failure

    async def _establish(self, ws_nursery: trio.Nursery) -> None:
        cfg = self._config
        try:
            with trio.fail_after(cfg.connect_timeout):
                self._ws = await self._open_websocket(ws_nursery)
        except trio.TooSlowError:
            raise CloudConnectError(
                f"timed out after {cfg.connect_timeout:g} s connecting to {self._safe_url}",
                retryable=True,
            ) from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise CloudConnectError(
                f"could not connect to {self._safe_url}: {_describe(exc)}", retryable=True
            ) from exc

        message = await self._wait_ready(self._ws)
        if message.get("type") == "error":
            self._remember_error(message)
            if message.get("code") == ACCESS_DENIED:
                await self._await_server_close(self._ws)
        if message.get("type") != "ready":
            raise _unexpected_first_message(message)
        self.connection_id = _opt_str(message.get("connection_id"))
        logs.bind_connection(self.connection_id)  # this task, and the heartbeat it starts
        if cfg.user_id:
            await self._set_user_id(self._ws, cfg.user_id)

    async def _open_websocket(self, nursery: trio.Nursery) -> trio_websocket.WebSocketConnection:
        """Open TCP (and TLS) ourselves, then run the WebSocket handshake over it.

        Owning the stream is what lets us close the socket when the SERVER closes:
        trio-websocket's client waits for the server's TCP close and never closes its stream
        itself in that case, leaking it (docs/stack-notes.md).
        """
        parts = urllib.parse.urlsplit(self._url)
        host = parts.hostname
        if not host:
            raise CloudConnectError(f"no host in cloud URL {self._safe_url}", retryable=False)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        if secure:
            ssl_stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=ssl.create_default_context(), https_compatible=True
            )
            self._stream = ssl_stream
            # trio-websocket would hide a TLS failure behind a connect timeout: surface it.
            await ssl_stream.do_handshake()
        else:
            self._stream = await trio.open_tcp_stream(host, port)
        host_header = f"[{host}]" if ":" in host else host
        if port not in (80, 443):
            host_header += f":{port}"
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers: list[tuple[bytes, bytes]] = []
        if self._config.api_key:
            headers.append((b"Authorization", f"Key {self._config.api_key}".encode()))
        return await trio_websocket.wrap_client_stream(
            nursery, self._stream, host_header, resource, extra_headers=headers
        )

    async def _wait_ready(self, ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
        """Return the cloud's first message, reporting the seconds waited each tick."""
        started = trio.current_time()
        deadline = started + self._config.ready_timeout
        while True:
            now = trio.current_time()
            if now >= deadline:
                raise CloudReadyTimeoutError(self._config.ready_timeout)
            ticks = int((now - started) / STAGE_TICK_SECONDS)
            _report_stage(
                self._on_stage, f"Starting cloud server... ({int(ticks * STAGE_TICK_SECONDS)}s)"
            )
            with trio.move_on_at(min(deadline, started + (ticks + 1) * STAGE_TICK_SECONDS)):
                raw = await self._receive_before_ready(ws, "waiting for 'ready'")
                return _parse_first(raw)

    async def _set_user_id(self, ws: trio_websocket.WebSocketConnection, user_id: str) -> None:
        timeout = self._config.request_timeout
        with trio.move_on_after(timeout):
            try:
                await ws.send_message(json.dumps({"type": "set_user_id", "user_id": user_id}))
            except trio_websocket.ConnectionClosed as exc:
                raise self._closed_before_ready(exc, "sending set_user_id") from None
            while True:
                message = _parse(await self._receive_before_ready(ws, "waiting for user_id_set"))
                msg_type = message.get("type") if message is not None else None
                if message is None or msg_type is None:
                    continue
                if msg_type == "user_id_set":
                    return
                if msg_type == "logs":
                    _relog(message)
                elif msg_type == "error" and message.get("request_id") is not None:
                    # set_user_id carries no request_id: this answers something else.
                    logger.warning(
                        "ignoring 'error' for request_id %s while waiting for user_id_set",
                        clip(repr(message.get("request_id"))),
                    )
                elif msg_type == "error":
                    self._remember_error(message)
                    text = _error_text(message)
                    if message.get("code") == ACCESS_DENIED:
                        await self._await_server_close(ws)
                        raise CloudAccessDeniedError(
                            f"the cloud denied access for this user: {text}",
                            close_code=self._close_code,
                            close_reason=self._close_reason,
                        )
                    raise CloudConnectError(
                        f"the cloud rejected set_user_id: {text}", retryable=True
                    )
                else:
                    logger.debug("ignoring %r while waiting for user_id_set", msg_type)
        raise CloudConnectError(
            f"no reply to set_user_id from the cloud within {timeout:g} s", retryable=True
        )

    async def _await_server_close(self, ws: trio_websocket.WebSocketConnection) -> None:
        """After ACCESS_DENIED the cloud closes (4003): give it a moment so the close code
        is recorded, then go on either way."""
        with trio.move_on_after(min(1.0, self._config.request_timeout)):
            while True:
                try:
                    await ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    self._record_transport_close(exc.reason)
                    return

    async def _receive_before_ready(
        self, ws: trio_websocket.WebSocketConnection, doing: str
    ) -> str | bytes:
        try:
            raw = await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise self._closed_before_ready(exc, doing) from None
        self.stats.messages_received += 1
        return self._redact(raw)

    def _redact(self, raw: str | bytes) -> str | bytes:
        """``raw`` with our api key replaced by ``***``. Whatever the cloud says is quoted in
        logs, errors and the status; a cloud that echoes the key back must not put it there."""
        key = self._config.api_key
        if key and len(key) >= 4 and isinstance(raw, str) and key in raw:
            return raw.replace(key, "***")
        return raw

    def _closed_before_ready(
        self, exc: trio_websocket.ConnectionClosed, doing: str
    ) -> CloudConnectError:
        self._record_transport_close(exc.reason)
        if self._error_reason is not None and ACCESS_DENIED in self._error_reason:
            return CloudAccessDeniedError(
                f"the cloud denied access: {self._error_reason}",
                close_code=self._close_code,
                close_reason=self._close_reason,
            )
        return CloudConnectError(
            f"the cloud closed the connection while {doing} "
            f"(code {self._close_code}): {self._close_reason}",
            retryable=True,
            close_code=self._close_code,
            close_reason=self._close_reason,
        )

    async def _serve(self) -> None:
        """Dispatch messages until the WebSocket closes."""
        ws = self._ws
        assert ws is not None
        while True:
            try:
                raw = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                self._record_transport_close(exc.reason)
                return
            self.stats.messages_received += 1
            self._dispatch(self._redact(raw))

    def _dispatch(self, raw: str | bytes) -> None:
        message = _parse(raw)
        if message is None:
            return
        msg_type = message.get("type")
        request_id = message.get("request_id")
        if request_id is not None:
            pending = self._pending.get(request_id) if isinstance(request_id, str) else None
            if pending is not None:
                pending.complete(message)
            else:
                logger.warning(
                    "ignoring %r for unknown request_id %s (late reply to a request that "
                    "timed out?)",
                    msg_type,
                    clip(repr(request_id)),
                )
            return
        if msg_type == "logs":
            _relog(message)
        elif msg_type == "error":
            self._remember_error(message)
            logger.warning("cloud reported an error: %s", self._error_reason)
        else:
            logger.debug("ignoring unsolicited cloud message of type %s", clip(repr(msg_type)))

    async def _heartbeat(self, interval: float) -> None:
        """Ping every ``interval``; a missing pong means the path is dead: close the link."""
        pong_timeout = self._config.pong_timeout
        while True:
            await trio.sleep(interval)
            try:
                await self.request("ping", timeout=pong_timeout)
            except CloudRequestTimeoutError:
                reason = f"heartbeat timeout: no pong within {pong_timeout:g} s"
                logger.warning("cloud link %s: %s", self._safe_url, reason)
                # Do not wait long for a close handshake on a path that is already dead.
                self._close_wait = min(self._close_wait, pong_timeout)
                self._begin_close(
                    CLOSE_ABNORMAL, reason, frame=(CLOSE_INTERNAL_ERROR, "heartbeat timeout")
                )
                return
            except CloudRequestError as exc:
                logger.warning("cloud answered ping with an error: %s", exc)
            except CloudLinkClosedError:
                return

    # ----------------------------------------------------------------- closing

    def _begin_close(self, code: int, reason: str, *, frame: tuple[int, str | None]) -> None:
        if not self._closing:
            self._close_frame = frame
        self._record_close(code, reason)
        self._run_scope.cancel()

    def _record_transport_close(self, reason: trio_websocket.CloseReason | None) -> None:
        # A plain int: trio-websocket gives a CloseReason IntEnum for the codes it knows.
        code = int(reason.code) if reason is not None else CLOSE_ABNORMAL
        if reason is not None and reason.reason:
            text = str(self._redact(reason.reason))
        elif reason is not None:
            text = reason.name.lower().replace("_", " ")
        else:
            text = "connection lost"
        self._record_close(code, self._error_reason or text)

    def _record_close(self, code: int | None, reason: str) -> None:
        """Record why the link ended (first cause wins) and fail every pending request."""
        if self._closing:
            return
        self._closing = True
        self._close_code = code
        self._close_reason = reason
        for pending in self._pending.values():
            pending.fail(CloudLinkClosedError(code, reason))

    def _remember_error(self, message: Mapping[str, Any]) -> None:
        self._error_reason = _error_text(message)
        self.error_code = _opt_str(message.get("code"))

    async def _close_websocket(self) -> None:
        if self._ws is not None:
            code, reason = self._close_frame
            await self._ws.aclose(code, reason)

    async def _close_stream(self) -> None:
        if self._stream is not None:
            # TLS close_notify on a dead connection fails, but the socket is closed anyway.
            with contextlib.suppress(trio.BrokenResourceError):
                await self._stream.aclose()


# --------------------------------------------------------------------------- entry point


@asynccontextmanager
async def connect_cloud_link(
    config: LinkConfig, *, on_stage: Callable[[str], None] | None = None
) -> AsyncIterator[CloudLink]:
    """Establish a signaling link, retrying transient failures, and keep it up in the block.

    Each attempt: connect (``connect_timeout``; ``Authorization: Key ...`` when an api key is
    set), wait for ``ready`` (``ready_timeout``), send ``set_user_id`` when a user id is set.
    Refused connections, timeouts, and closes before ready are retried up to
    ``connect_attempts`` times with ``connect_backoff`` pauses; access denied is not.
    ``on_stage`` hears progress: "Connecting to cloud...", "Starting cloud server... (Ns)"
    every second, "Retrying connection (attempt N/M)...".

    Raises :class:`CloudConnectError` (or a subclass) when no attempt succeeded. Exceptions
    from the block propagate unchanged (never wrapped in an ExceptionGroup). On exit the link
    is closed and its tasks have ended.
    """
    attempts = config.connect_attempts
    _report_stage(on_stage, STAGE_CONNECTING)
    for attempt in range(1, attempts + 1):
        entered = False
        try:
            async with _open_link(config, on_stage=on_stage) as link:
                entered = True
                yield link
        except CloudConnectError as exc:
            if entered or not exc.retryable or attempt == attempts:
                raise
            delay = config.backoff_before(attempt + 1)
            logger.warning(
                "cloud connect attempt %d/%d failed: %s; retrying in %g s",
                attempt,
                attempts,
                exc,
                delay,
            )
            # Reported before the pause, and kept while the next attempt connects.
            _report_stage(on_stage, f"Retrying connection (attempt {attempt + 1}/{attempts})...")
            await trio.sleep(delay)
        else:
            return


@asynccontextmanager
async def _open_link(
    config: LinkConfig, *, on_stage: Callable[[str], None] | None
) -> AsyncIterator[CloudLink]:
    """One attempt. The link's task runs in a nursery owned here; errors from establishing
    and from the caller's block are re-raised after the nursery has closed, unwrapped."""
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        link = CloudLink(config, on_stage=on_stage)
        nursery.start_soon(link._run)
        try:
            await link._wait_established()
            yield link
        except (trio.Cancelled, GeneratorExit):
            raise  # these belong to trio and to the generator protocol: never hold them back
        except BaseException as exc:  # re-raised below, outside the nursery, unwrapped
            error = exc
        finally:
            await link.aclose()
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error


# --------------------------------------------------------------------------- helpers


def _report_stage(on_stage: Callable[[str], None] | None, stage: str) -> None:
    """Tell the caller about progress; a failing callback is logged, never fatal."""
    if on_stage is None:
        return
    try:
        on_stage(stage)
    except Exception:
        logger.exception("on_stage callback failed")


def _parse(raw: str | bytes) -> dict[str, Any] | None:
    """The JSON object in a text frame, or None (logged) for anything else."""
    if isinstance(raw, bytes):
        logger.warning("ignoring binary frame from the cloud (%d bytes)", len(raw))
        return None
    try:
        message = json.loads(raw)
    except ValueError:
        logger.warning("ignoring non-JSON message from the cloud: %s", clip(repr(raw)))
        return None
    if not isinstance(message, dict):
        logger.warning("ignoring non-object JSON from the cloud: %s", clip(repr(raw)))
        return None
    return message


def _parse_first(raw: str | bytes) -> dict[str, Any]:
    """Parse the first message; anything but a JSON object is a protocol error."""
    if isinstance(raw, bytes):
        raise CloudConnectError(
            f"expected 'ready' from the cloud, got a binary frame ({len(raw)} bytes)",
            retryable=False,
        )
    try:
        message = json.loads(raw)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise CloudConnectError(
            f"expected 'ready' from the cloud, got {clip(repr(raw))}", retryable=False
        )
    return message


def _unexpected_first_message(message: Mapping[str, Any]) -> CloudConnectError:
    msg_type = message.get("type")
    if msg_type == "error":
        text = _error_text(message)
        if message.get("code") == ACCESS_DENIED:
            return CloudAccessDeniedError(f"the cloud denied access: {text}")
        return CloudConnectError(
            f"expected 'ready' from the cloud, got an error: {text}", retryable=True
        )
    return CloudConnectError(
        f"expected 'ready' from the cloud, got {clip(repr(msg_type))}: {clip(json.dumps(message))}",
        retryable=False,
    )


def _relog(message: Mapping[str, Any]) -> None:
    lines = message.get("lines")
    if not isinstance(lines, list):
        logger.warning("ignoring 'logs' message without a list of lines")
        return
    for line in lines:
        text = str(line)
        match = _LOG_LEVEL_RE.search(text)
        level = _LOG_LEVELS[match.group(1)] if match else logging.INFO
        cloud_logger.log(level, "%s", text)


def _error_text(message: Mapping[str, Any]) -> str:
    text = str(message.get("error") or message.get("message") or "unknown error")
    code = message.get("code")
    if code:
        text += f" ({code})"
    detail = message.get("detail")
    if isinstance(detail, str) and detail and detail not in text:
        text += f": {detail}"
    return clip(text)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        text += f" ({cause})"
    return text


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, without naming the group type
    (``BaseExceptionGroup`` is not a builtin on Python 3.10)."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple):
        for sub in inner:
            yield from _leaves(sub)
    else:
        yield exc


def _pick_error(exc: BaseException) -> BaseException:
    """The most telling exception out of a group: ours first, then the library's."""
    leaves = [leaf for leaf in _leaves(exc) if not isinstance(leaf, trio.Cancelled)]
    for wanted in (CloudLinkError, trio_websocket.HandshakeError):
        for leaf in leaves:
            if isinstance(leaf, wanted):
                return leaf
    return leaves[0] if leaves else exc
