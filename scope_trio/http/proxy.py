"""The cloud proxy: routes of Scope's API that the cloud answers while it is connected.

A route that carries a :class:`Forward` is forwarded over the signaling link as one ``api``
request while the link is up, and answered by its local handler otherwise. The table of
those routes lives with the route groups (``ROUTES``); this module holds the mechanics, one
implementation for all of them:

* the request: ``{type: "api", method, path, body?}``. ``path`` is the request's path with
  its raw query string appended unchanged; ``body`` is the request's JSON for POST, PATCH and
  PUT (as the client sent it, after validation; omitted when it is not JSON), never for GET
  and DELETE. The link's deadline is the route's timeout (Scope's, per route).
* the answer (:func:`answer`): a cloud status >= 400 is passed through with the cloud's
  ``detail`` (else its ``error``, else ``Cloud request failed``); a binary answer
  (``_base64_content``) becomes a file download with its content type and file name; any
  other answer is the cloud's ``data`` with status 200.
* failures are **502** ``Cloud request failed: <reason>``: the link went down, the cloud sent
  an ``error`` instead of an answer, or no answer came within the timeout
  (``Request timeout after 30.0s``, Scope's words).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from quart import Response, request

from scope_trio.cloud.link import CloudLinkError, CloudRequestTimeoutError
from scope_trio.cloud.manager import CloudManager, NotConnectedError
from scope_trio.http.asgi import ApiError, ScopeApp, deadline, parse_body, read_json
from scope_trio.http.openapi import Forward

__all__ = ["Forward", "answer", "forward", "forwarding_view"]

logger = logging.getLogger(__name__)

DEADLINE_MARGIN = 5.0
"""The route's own deadline is the link's plus this (the link's expiry is the one seen)."""


Prepare = Callable[..., Awaitable[tuple[str, Any]]]
Finish = Callable[[Any], Any]


def forwarding_view(
    app: ScopeApp,
    manager: CloudManager,
    method: str,
    spec: Forward,
    local: Callable[..., Awaitable[Response]],
    *,
    request_model: Any = None,
    request_required: bool = True,
    prepare: Prepare | None = None,
    finish: Finish | None = None,
) -> Callable[..., Awaitable[Response]]:
    """The view of a forwarded route: validate, then forward while connected, else ``local``."""

    async def view(**params: Any) -> Response:
        raw: Any = None
        validated = False
        if request_model is not None:
            _, raw = await parse_body(request_model, optional=not request_required)
            validated = True
        for name in spec.required_query:
            if not request.args.get(name):
                raise ApiError(400, f"{name}: query parameter required")
        if not manager.link_state.connected:
            return await local(**params)
        path = request.path
        if request.query_string:
            path += "?" + request.query_string.decode("latin-1")
        body: Any = None
        if spec.body == "json":
            if validated:
                body = raw
            else:
                try:
                    _, body = await read_json()
                except ApiError:
                    body = None  # not JSON: sent without a body, as Scope does
        if prepare is not None:
            path, body = await prepare(path, body, **params)
        try:
            return await forward(
                app,
                manager,
                method=method,
                path=path,
                body=body,
                timeout=spec.timeout,
                finish=finish,
            )
        except ApiError:
            if spec.fallback_local:
                return await local(**params)
            raise

    return view


async def forward(
    app: ScopeApp,
    manager: CloudManager,
    *,
    method: str,
    path: str,
    body: Any,
    timeout: float,
    finish: Finish | None = None,
) -> Response:
    """Send one ``api`` request and turn the cloud's answer into the HTTP answer."""
    try:
        with deadline("the cloud request", timeout + DEADLINE_MARGIN):
            status, reply = await manager.api(method, path, body, timeout=timeout)
    except NotConnectedError:
        raise ApiError(502, "Cloud request failed: Not connected to cloud") from None
    except CloudRequestTimeoutError as exc:
        detail = f"Cloud request failed: Request timeout after {exc.timeout:.1f}s"
        raise ApiError(502, detail) from None
    except CloudLinkError as exc:
        raise ApiError(502, f"Cloud request failed: {exc}") from None
    return answer(app, reply, status=status, what=f"{method} {path}", finish=finish)


def answer(
    app: ScopeApp,
    reply: Mapping[str, Any],
    *,
    status: int | None,
    what: str,
    finish: Finish | None = None,
) -> Response:
    """The HTTP answer for the cloud's ``api_response`` (see the module docstring)."""
    if status is None:
        shown = repr(reply.get("status"))[:80]
        logger.warning("the cloud answered %s with no valid status: %s", what, shown)
        raise ApiError(502, f"Cloud request failed: the reply has no valid status: {shown}")
    data = reply.get("data")
    if status >= 400:
        detail: Any = None
        if isinstance(data, dict):
            detail = data.get("detail")
        elif isinstance(data, str):
            detail = data
        if not detail:
            detail = reply.get("error") or "Cloud request failed"
        raise ApiError(status, detail)
    binary = _binary(reply)
    if binary is not None:
        return binary
    if data is None:
        data = {}
    if finish is not None:
        data = finish(data)
    return app.json_response(data)


def _binary(reply: Mapping[str, Any]) -> Response | None:
    """A file answer when the reply (or its ``data``) carries ``_base64_content``."""
    holder: Mapping[str, Any] = reply
    data = reply.get("data")
    if "_base64_content" not in reply and isinstance(data, dict) and "_base64_content" in data:
        holder = data
    encoded = holder.get("_base64_content")
    if encoded is None:
        return None
    try:
        content = base64.b64decode(str(encoded), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(502, "Cloud request failed: the file in the reply is not base64") from None
    media_type = holder.get("media_type") or holder.get("_content_type") or "video/mp4"
    filename = holder.get("filename") or datetime.now().strftime("recording-%Y%m%d_%H%M%S.mp4")
    filename = str(filename).replace('"', "").replace("\r", "").replace("\n", "")
    response = Response(content, status=200, content_type=str(media_type))
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    response.headers["Content-Length"] = str(len(content))
    return response
