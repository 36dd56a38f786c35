"""Routes this server answers itself: hardware, OSC, input sources, API keys, logs.

This server runs no pipelines, has no GPU, no OSC server and no NDI/Spout/Syphon input, so
these routes answer what is true here, in the shapes Scope's frontend reads: no GPU, OSC
disabled (its event stream stays open with keepalives, so the frontend's ``EventSource``
does not reconnect in a loop), no input sources. While connected, the hardware info carries
the cloud GPU's memory (the output-sink flags stay local, as Scope's). API keys are kept in
memory only (an environment variable wins, as in Scope). The logs are this server's own,
from a bounded in-memory ring (:class:`scope_trio.ops.logring.LogRing`).
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from quart import Response, request

from scope_trio.http.asgi import ApiError, parse_body
from scope_trio.http.models import (
    ApiKeys,
    ErrorResponse,
    HardwareInfo,
    InputSources,
    KeyRequest,
    KeyResult,
    LogTail,
    OscPaths,
    OscSettingsRequest,
    OscStatus,
)
from scope_trio.http.openapi import Forward, Route
from scope_trio.http.routes.base import RouteGroup
from scope_trio.http.sse import keepalive_events, stream_response
from scope_trio.ops import logs

__all__ = ["KEY_SERVICES", "LocalRoutes"]

_ERR = ErrorResponse
MAX_TAIL_LINES = 1000
OSC_NOT_RUNNING = "OSC server not running (scope-trio has no OSC server)"
NO_INPUT_SOURCES = "scope-trio has no local input sources (NDI, Spout, Syphon)"
KEY_SERVICES: dict[str, dict[str, str]] = {
    "huggingface": {
        "name": "HuggingFace",
        "description": "Token for downloading models from Hugging Face",
        "env_var": "HF_TOKEN",
        "key_url": "https://huggingface.co/settings/tokens",
        "saved": "HuggingFace token saved",
        "removed": "HuggingFace token removed",
    },
    "civitai": {
        "name": "CivitAI",
        "description": "Token for downloading LoRAs from CivitAI",
        "env_var": "CIVITAI_API_TOKEN",
        "key_url": "https://civitai.com/user/account",
        "saved": "CivitAI token saved",
        "removed": "CivitAI token removed",
    },
}
NO_GPU: dict[str, Any] = {
    "vram_gb": None,
    "spout_available": False,
    "ndi_available": False,
    "syphon_available": False,
}
OSC_DOCS = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>OSC</title></head>
<body><h1>OSC</h1><p>scope-trio has no OSC server: pipeline parameters are sent on the
WebRTC data channel <code>parameters</code> instead.</p></body></html>
"""


def _int_arg(name: str, default: int, low: int, high: int | None = None) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected an integer, got {raw[:40]!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"{name}: must be {bound}")
    return value


class LocalRoutes(RouteGroup):
    ROUTES = (
        Route(
            "GET",
            "/api/v1/hardware/info",
            "hardware_info",
            "GPU memory (the cloud GPU's while connected) and the local output sinks",
            {200: HardwareInfo, 502: _ERR},
            forward=Forward(30.0, finish="local_sinks"),
        ),
        Route("GET", "/api/v1/osc/status", "osc_status", "OSC server status", {200: OscStatus}),
        Route(
            "PUT",
            "/api/v1/osc/settings",
            "osc_settings",
            "OSC settings (there is no OSC server)",
            {400: _ERR},
            OscSettingsRequest,
        ),
        Route("GET", "/api/v1/osc/paths", "osc_paths", "OSC addresses", {200: OscPaths}),
        Route(
            "GET",
            "/api/v1/osc/stream",
            "osc_stream",
            "Server-Sent Events of OSC commands (only keepalives: no OSC server)",
            {200: "text/event-stream"},
        ),
        Route("GET", "/api/v1/osc/docs", "osc_docs", "OSC reference page", {200: "text/html"}),
        Route(
            "GET",
            "/api/v1/input-sources",
            "input_sources",
            "Server-side video input sources (none)",
            {200: InputSources},
        ),
        Route(
            "GET",
            "/api/v1/input-sources/{source_type}/sources",
            "input_source_list",
            "Sources of one input type (no types are available)",
            {400: _ERR},
            query=("timeout_ms",),
        ),
        Route(
            "GET",
            "/api/v1/input-sources/{source_type}/sources/{identifier:path}/resolution",
            "input_source_resolution",
            "Resolution of one input source (no types are available)",
            {400: _ERR},
            query=("timeout_ms",),
        ),
        Route(
            "GET",
            "/api/v1/input-sources/{source_type}/sources/{identifier:path}/stream",
            "input_source_stream",
            "MJPEG preview of one input source (no types are available)",
            {400: _ERR},
            query=("fps",),
        ),
        Route("GET", "/api/v1/keys", "keys", "API keys of downloads services", {200: ApiKeys}),
        Route(
            "PUT",
            "/api/v1/keys/{service_id}",
            "key_set",
            "Store an API key (in memory, for this run)",
            {200: KeyResult, 400: _ERR, 404: _ERR, 409: _ERR},
            KeyRequest,
        ),
        Route(
            "DELETE",
            "/api/v1/keys/{service_id}",
            "key_delete",
            "Remove a stored API key",
            {200: KeyResult, 404: _ERR, 409: _ERR},
        ),
        Route(
            "GET",
            "/api/v1/logs/current",
            "logs_current",
            "This server's recent log as a text file",
            {200: "text/plain"},
        ),
        Route(
            "GET",
            "/api/v1/logs/tail",
            "logs_tail",
            "The newest log lines; pass back `offset` as `since_offset` for what came since",
            {200: LogTail, 400: _ERR},
            query=("lines", "since_offset"),
        ),
    )

    # ------------------------------------------------------------------ hardware

    async def hardware_info(self) -> Response:
        return self.ctx.json(NO_GPU)

    def local_sinks(self, data: Any) -> Any:
        """The cloud's ``vram_gb``; the output-sink flags are this machine's (none)."""
        vram = data.get("vram_gb") if isinstance(data, dict) else None
        if isinstance(vram, bool) or not isinstance(vram, (int, float)):
            vram = None
        return {**NO_GPU, "vram_gb": vram}

    # ------------------------------------------------------------------ OSC

    async def osc_status(self) -> Response:
        return self.ctx.json(
            {
                "enabled": False,
                "listening": False,
                "port": None,
                "host": None,
                "log_all_messages": False,
            }
        )

    async def osc_settings(self) -> Response:
        await parse_body(OscSettingsRequest)
        raise ApiError(400, OSC_NOT_RUNNING)

    async def osc_paths(self) -> Response:
        return self.ctx.json({"active": [], "available": [], "active_pipeline_ids": []})

    async def osc_stream(self) -> Response:
        return stream_response(keepalive_events(self.ctx.app.stopping, self.ctx.sse_keepalive))

    async def osc_docs(self) -> Response:
        return Response(OSC_DOCS, content_type="text/html; charset=utf-8")

    # ------------------------------------------------------------------ input sources

    async def input_sources(self) -> Response:
        return self.ctx.json({"input_sources": []})

    def _no_source_type(self, source_type: str) -> ApiError:
        return ApiError(
            400, f"Input source type '{source_type}' is not available: {NO_INPUT_SOURCES}"
        )

    async def input_source_list(self, source_type: str) -> Response:
        raise self._no_source_type(source_type)

    async def input_source_resolution(self, source_type: str, identifier: str) -> Response:
        raise self._no_source_type(source_type)

    async def input_source_stream(self, source_type: str, identifier: str) -> Response:
        raise self._no_source_type(source_type)

    # ------------------------------------------------------------------ keys

    def _key_info(self, service_id: str, spec: dict[str, str]) -> dict[str, Any]:
        from_env = bool(os.environ.get(spec["env_var"]))
        stored = service_id in self.ctx.keys
        return {
            "id": service_id,
            "name": spec["name"],
            "description": spec["description"],
            "is_set": from_env or stored,
            "source": "env_var" if from_env else "stored" if stored else None,
            "env_var": spec["env_var"],
            "key_url": spec["key_url"],
        }

    async def keys(self) -> Response:
        return self.ctx.json(
            {"keys": [self._key_info(sid, spec) for sid, spec in KEY_SERVICES.items()]}
        )

    def _service(self, service_id: str) -> dict[str, str]:
        spec = KEY_SERVICES.get(service_id)
        if spec is None:
            raise ApiError(404, f"Unknown service: {service_id}")
        if os.environ.get(spec["env_var"]):
            raise ApiError(
                409, f"The {spec['name']} token comes from {spec['env_var']}; change it there"
            )
        return spec

    async def key_set(self, service_id: str) -> Response:
        body, _ = await parse_body(KeyRequest)
        spec = self._service(service_id)
        self.ctx.keys[service_id] = body.value
        self.ctx.app.redact.add(body.value)
        logs.add_secret(body.value)
        return self.ctx.json({"success": True, "message": spec["saved"]})

    async def key_delete(self, service_id: str) -> Response:
        spec = self._service(service_id)
        if self.ctx.keys.pop(service_id, None) is None:
            raise ApiError(404, f"No stored {spec['name']} token")
        return self.ctx.json({"success": True, "message": spec["removed"]})

    # ------------------------------------------------------------------ logs

    async def logs_current(self) -> Response:
        text = self.ctx.log_ring.text()
        response = Response(text, content_type="text/plain; charset=utf-8")
        name = datetime.now().strftime("scope-trio-%Y-%m-%d_%H-%M-%S.txt")
        response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return response

    async def logs_tail(self) -> Response:
        lines = _int_arg("lines", 200, 1, MAX_TAIL_LINES)
        since = _int_arg("since_offset", 0, 0)
        picked, offset = self.ctx.log_ring.tail(lines, since)
        return self.ctx.json({"lines": picked, "offset": offset})
