"""The HTTP-style API the dev cloud answers over the signaling link (``api`` messages).

A request is ``{"type": "api", "request_id", "method", "path", "body"?}``; ``path`` may
carry a query string. The answer is ``{"type": "api_response", "request_id", "status"}``
plus ``data`` (the JSON body) when ``status < 400``, or ``error`` (the detail text) otherwise.
A binary answer (a recording) is a ``data`` object with ``_base64_content``,
``_content_type`` and ``_content_length``.

One route table (:data:`ROUTES`) drives it: a path no route matches answers 404, a path
some route matches with another method 405. ``docs/devcloud.md`` lists every route with
the shapes it answers.
"""

from __future__ import annotations

import base64
import datetime
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import scope_trio
from scope_trio.dev.devcloud.pipelines import PIPELINES, pipeline_schemas

if TYPE_CHECKING:
    from scope_trio.dev.devcloud.protocol import DevCloud

__all__ = ["ROUTES", "ApiRequest", "call"]

Result = tuple[int, dict[str, Any]]
"""``(HTTP status, JSON body)``; a body for a status >= 400 has a ``detail``."""


@dataclass(frozen=True)
class ApiRequest:
    """One ``api`` message, parsed: the path without its query, the query, the body."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    body: Any

    def query_value(self, key: str) -> str | None:
        values = self.query.get(key)
        return values[0] if values else None


Handler = Callable[["DevCloud", ApiRequest, "re.Match[str]"], Awaitable[Result]]


def _error(status: int, detail: str) -> Result:
    return status, {"detail": detail}


async def call(cloud: DevCloud, method: str, path: Any, body: Any) -> Result:
    """Route one request; never raises for bad input (answers 4xx instead)."""
    if not isinstance(path, str):
        return _error(404, "Not found")
    split = urllib.parse.urlsplit(path)
    request = ApiRequest(
        method=method.upper(),
        path=split.path,
        query=urllib.parse.parse_qs(split.query),
        body=body,
    )
    path_matched = False
    for route_method, pattern, handler in ROUTES:
        match = pattern.fullmatch(request.path)
        if match is None:
            continue
        path_matched = True
        if route_method == request.method:
            return await handler(cloud, request, match)
    if path_matched:
        return _error(405, "Method not allowed")
    return _error(404, "Not found")


# -- server ------------------------------------------------------------------------------


async def _health(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    # Local naive time with microseconds, as the real runner answers.
    return 200, {
        "status": "healthy",
        "timestamp": datetime.datetime.now().isoformat(timespec="microseconds"),
        "server_start_time": cloud.started_at,
        "version": scope_trio.__version__,
        "git_commit": "unknown (dev cloud)",
    }


async def _hardware(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    return 200, {
        "vram_gb": cloud.config.vram_gb,
        "spout_available": False,
        "ndi_available": False,
        "syphon_available": False,
    }


# -- pipelines -----------------------------------------------------------------------------


async def _schemas(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    return 200, {"pipelines": pipeline_schemas()}


async def _pipeline_status(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    return 200, cloud.pipeline_status_body()


async def _pipeline_load(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    body = request.body
    if not isinstance(body, dict):
        return _error(422, "body must be an object with pipeline_ids")
    ids = body.get("pipeline_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return _error(422, "pipeline_ids must be a non-empty list of strings")
    if not ids:
        return _error(400, "pipeline_ids must be provided and cannot be empty")
    if ids[0] not in PIPELINES:
        return _error(400, f"Unknown pipeline: {ids[0]}")
    load_params = body.get("load_params")
    cloud.load_pipeline(ids[0], load_params if isinstance(load_params, dict) else None)
    return 200, {"message": "Pipeline loading initiated successfully"}


def _known_pipeline(pipeline_id: Any) -> Result | None:
    """None when ``pipeline_id`` names a pipeline here, else the error to answer."""
    if not isinstance(pipeline_id, str) or not pipeline_id:
        return _error(422, "pipeline_id is required")
    if pipeline_id not in PIPELINES:
        return _error(404, f"Unknown pipeline: {pipeline_id}")
    return None


async def _models_status(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    error = _known_pipeline(request.query_value("pipeline_id"))
    return error or (200, {"downloaded": True, "progress": None})


async def _models_download(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    body = request.body if isinstance(request.body, dict) else {}
    pipeline_id = body.get("pipeline_id")
    if pipeline_id == "":
        return _error(400, "pipeline_id must not be empty")
    error = _known_pipeline(pipeline_id)
    if error is not None:
        return error
    return 200, {"message": f"Models for {pipeline_id} are already downloaded"}


async def _workflow_resolve(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    """Each pipeline of the workflow is ``ok`` if this cloud has it, else ``missing``; every
    LoRA is ``missing`` (there are none here, and none can be installed)."""
    body = request.body if isinstance(request.body, dict) else {}
    pipelines = body.get("pipelines")
    if not isinstance(pipelines, list):
        return _error(422, "pipelines must be a list")
    items: list[dict[str, Any]] = []
    for entry in pipelines:
        if not isinstance(entry, dict) or not isinstance(entry.get("pipeline_id"), str):
            return _error(422, "each pipeline needs a pipeline_id")
        known = entry["pipeline_id"] in PIPELINES
        items.append(
            {
                "kind": "pipeline",
                "name": entry["pipeline_id"],
                "status": "ok" if known else "missing",
                "detail": None if known else "not available on the dev cloud",
                "action": None,
                "can_auto_resolve": False,
            }
        )
        for lora in entry.get("loras") or []:
            name = lora.get("filename") if isinstance(lora, dict) else None
            items.append(
                {
                    "kind": "lora",
                    "name": str(name),
                    "status": "missing",
                    "detail": "the dev cloud has no LoRAs",
                    "action": None,
                    "can_auto_resolve": False,
                }
            )
    can_apply = all(item["status"] == "ok" for item in items)
    return 200, {"can_apply": can_apply, "items": items, "warnings": []}


# -- LoRAs, plugins, assets ------------------------------------------------------------------


async def _loras(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    return 200, {"lora_files": []}


async def _lora_install(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    return _error(400, "The dev cloud cannot install LoRAs: it downloads nothing")


async def _lora_delete(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    return _error(404, f"LoRA file '{urllib.parse.unquote(match['name'])}' not found")


async def _plugins(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    return 200, {"plugins": [], "total": 0, "failed_plugins": []}


async def _plugin_install(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    return _error(403, "Plugin installation is not allowed on the dev cloud")


async def _plugin_delete(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    return _error(404, f"Plugin '{urllib.parse.unquote(match['name'])}' not found")


async def _assets(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    kind = request.query_value("type")
    if kind not in (None, "image", "video"):
        return _error(422, "type must be 'image' or 'video'")
    return 200, {"assets": []}


# -- recordings ------------------------------------------------------------------------------


async def _recording(cloud: DevCloud, request: ApiRequest, match: re.Match[str]) -> Result:
    """The session's recording so far as an MP4 (base64 in ``data``); recording goes on
    into a new file. 413 when the file is larger than ``max_recording_bytes`` (it would not
    fit a signaling message); that file is then gone."""
    session_id = match["session_id"]
    session = cloud.sessions.get(session_id)
    if session is None:
        return _error(404, f"Session {session_id} not found")
    if not session.recording and session.recorder.pending_frames == 0:
        return _error(404, f"Recording not available for session {session_id}")
    content = await session.recorder.take()
    if content is None:
        return _error(404, "Recording file not available")
    limit = cloud.config.max_recording_bytes
    if len(content) > limit:
        return _error(
            413,
            f"Recording too large to send over the signaling link "
            f"({len(content)} bytes; limit {limit}); download more often",
        )
    return 200, {
        "_base64_content": base64.b64encode(content).decode("ascii"),
        "_content_type": "video/mp4",
        "_content_length": len(content),
    }


def _route(method: str, path: str, handler: Handler) -> tuple[str, re.Pattern[str], Handler]:
    """``{name}`` in ``path`` matches one path segment, captured as ``name``."""
    return method, re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)), handler


ROUTES: list[tuple[str, re.Pattern[str], Handler]] = [
    _route("GET", "/health", _health),
    _route("GET", "/api/v1/hardware/info", _hardware),
    _route("GET", "/api/v1/pipelines/schemas", _schemas),
    _route("GET", "/api/v1/pipeline/status", _pipeline_status),
    _route("POST", "/api/v1/pipeline/load", _pipeline_load),
    _route("GET", "/api/v1/models/status", _models_status),
    _route("POST", "/api/v1/models/download", _models_download),
    _route("POST", "/api/v1/workflow/resolve", _workflow_resolve),
    _route("GET", "/api/v1/loras", _loras),
    _route("POST", "/api/v1/loras", _lora_install),
    _route("DELETE", "/api/v1/loras/{name}", _lora_delete),
    _route("GET", "/api/v1/plugins", _plugins),
    _route("POST", "/api/v1/plugins", _plugin_install),
    _route("DELETE", "/api/v1/plugins/{name}", _plugin_delete),
    _route("GET", "/api/v1/assets", _assets),
    _route("GET", "/api/v1/recordings/{session_id}", _recording),
]
"""Every route: (method, path pattern, handler). Order matters only for readability."""
