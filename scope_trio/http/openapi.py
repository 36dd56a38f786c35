"""Routes as data, and the OpenAPI 3.1 document built from them.

Every route is one :class:`Route`: the app registers exactly these and the document lists
exactly these, so the two cannot drift (``tests/test_app.py`` checks it). Body and response
schemas come from the pydantic models and the CloudStatus dataclasses through pydantic's
``TypeAdapter``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import TypeAdapter

from scope_trio import __version__
from scope_trio.http.models import ErrorResponse

__all__ = ["Forward", "Route", "openapi_document"]

_PARAM = re.compile(r"\{(\w+)(?::path)?\}")


@dataclass(frozen=True)
class Forward:
    """How a route is forwarded to the cloud while connected (:mod:`scope_trio.http.proxy`)."""

    timeout: float = 30.0
    """Seconds to wait for the cloud's answer (Scope's per-route timeout)."""
    body: Literal["json", "none"] = "none"
    """Whether the request's JSON body goes along (POST/PATCH/PUT: ``json``)."""
    required_query: tuple[str, ...] = ()
    """Query parameters checked (400 when missing) before forwarding, as Scope's
    validation does."""
    prepare: str | None = None
    """A group method ``(path, body, **path_params) -> (path, body)`` that rewrites the
    request first (token injection, path resolution)."""
    finish: str | None = None
    """A group method ``(data) -> data`` applied to a successful JSON answer."""
    fallback_local: bool = False
    """On any failure, answer locally instead (``/health``: a liveness probe never fails
    because the cloud is slow)."""


@dataclass(frozen=True)
class Route:
    """One route: registered on the app and documented in the OpenAPI document alike.

    ``path`` is OpenAPI style (``{param}``; ``{param:path}`` for a parameter that may hold
    slashes). ``handler`` names the method of the route group (see
    :mod:`scope_trio.http.routes`) that serves it.
    """

    method: str
    path: str
    handler: str
    summary: str
    responses: Mapping[int, Any]
    """Status → a model class, a content type (``"text/html"``) or a description."""
    request: Any = None
    request_required: bool = True
    query: tuple[str, ...] = ()
    """Query parameters worth documenting."""
    forward: Forward | None = None
    """Set for a route the cloud answers while connected (:mod:`scope_trio.http.proxy`);
    ``handler`` then names the answer given while not connected."""

    @property
    def rule(self) -> str:
        """The Werkzeug rule: ``{name}`` → ``<name>``, ``{name:path}`` → ``<path:name>``."""

        def convert(match: re.Match[str]) -> str:
            name = match.group(1)
            return f"<path:{name}>" if match.group(0).endswith(":path}") else f"<{name}>"

        return _PARAM.sub(convert, self.path)

    @property
    def doc_path(self) -> str:
        """The path as OpenAPI writes it (``{name}`` only)."""
        return _PARAM.sub(lambda m: "{" + m.group(1) + "}", self.path)

    @property
    def params(self) -> list[str]:
        return _PARAM.findall(self.path)

    @property
    def operation_id(self) -> str:
        name = self.doc_path.strip("/").translate(str.maketrans("/-", "__", "{}"))
        return f"{self.method.lower()}_{name or 'index'}"


def openapi_document(routes: tuple[Route, ...]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``."""
    schemas: dict[str, Any] = {}

    def ref(model: Any) -> dict[str, str]:
        schema = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def response(status: int, body: Any) -> dict[str, Any]:
        if isinstance(body, str) and "/" not in body:
            return {"description": body}
        content = (
            {body: {}} if isinstance(body, str) else {"application/json": {"schema": ref(body)}}
        )
        return {"description": "Error" if status >= 400 else "OK", "content": content}

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        summary = route.summary
        if route.forward is not None:
            summary += f" (forwarded to the cloud while connected, {route.forward.timeout:g} s)"
        operation: dict[str, Any] = {
            "summary": summary,
            "operationId": route.operation_id,
            "responses": {str(s): response(s, body) for s, body in route.responses.items()},
        }
        if route.params and "404" not in operation["responses"]:
            # A parameter value the router cannot take (say, a control character) is a 404.
            operation["responses"]["404"] = response(404, ErrorResponse)
        if route.forward is not None:
            # While connected, the cloud's own error status is passed through.
            for status_range in ("4XX", "5XX"):
                operation["responses"][status_range] = response(400, ErrorResponse)
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in route.params
        ] + [
            {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
            for name in route.query
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.request is not None:
            operation["requestBody"] = {
                "required": route.request_required,
                "content": {"application/json": {"schema": ref(route.request)}},
            }
        paths.setdefault(route.doc_path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "scope-trio", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }
