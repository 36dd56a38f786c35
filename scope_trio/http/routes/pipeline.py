"""Pipeline routes: load, status, the pipeline catalogue, model downloads, workflows, restart.

All of them are forwarded to the cloud while connected (the ``forward`` of each route, with
Scope's timeouts). Not connected, this server has no local GPU and so no pipelines: status is
``not_loaded``, the catalogue is empty, and what would need a pipeline is a 400 that says so.
"""

from __future__ import annotations

from typing import Any

from quart import Response

from scope_trio.http.asgi import parse_body
from scope_trio.http.models import (
    ErrorResponse,
    Message,
    ModelsDownloadRequest,
    ModelsStatus,
    PipelineLoadRequest,
    PipelineSchemas,
    PipelineStatus,
    WorkflowRequest,
    WorkflowResolution,
)
from scope_trio.http.openapi import Forward, Route
from scope_trio.http.routes.base import RouteGroup, needs_cloud, not_supported

__all__ = ["NOT_LOADED", "PipelineRoutes"]

_ERR = ErrorResponse
_FWD_ERRORS = {400: _ERR, 502: _ERR}
NOT_LOADED: dict[str, Any] = {
    "status": "not_loaded",
    "pipeline_id": None,
    "load_params": None,
    "loaded_lora_adapters": None,
    "error": None,
    "loading_stage": None,
}


class PipelineRoutes(RouteGroup):
    ROUTES = (
        Route(
            "POST",
            "/api/v1/pipeline/load",
            "pipeline_load",
            "Load a pipeline in the cloud; loading goes on in the background",
            {200: Message, **_FWD_ERRORS},
            PipelineLoadRequest,
            forward=Forward(60.0, "json"),
        ),
        Route(
            "GET",
            "/api/v1/pipeline/status",
            "pipeline_status",
            "Pipeline status (not_loaded while not connected)",
            {200: PipelineStatus, 502: _ERR},
            forward=Forward(30.0, finish="status_defaults"),
        ),
        Route(
            "GET",
            "/api/v1/pipelines/schemas",
            "pipeline_schemas",
            "The pipelines available, with their schemas (none while not connected)",
            {200: PipelineSchemas, 502: _ERR},
            forward=Forward(30.0),
        ),
        Route(
            "GET",
            "/api/v1/models/status",
            "models_status",
            "Whether a pipeline's models are downloaded",
            {200: ModelsStatus, **_FWD_ERRORS},
            query=("pipeline_id",),
            forward=Forward(30.0, required_query=("pipeline_id",)),
        ),
        Route(
            "POST",
            "/api/v1/models/download",
            "models_download",
            "Start downloading a pipeline's models (in the cloud)",
            {200: Message, **_FWD_ERRORS},
            ModelsDownloadRequest,
            forward=Forward(60.0, "json"),
        ),
        Route(
            "POST",
            "/api/v1/workflow/resolve",
            "workflow_resolve",
            "Check a workflow's pipelines, plugins and LoRAs against what is installed",
            {200: WorkflowResolution, **_FWD_ERRORS},
            WorkflowRequest,
            forward=Forward(30.0, "json"),
        ),
        Route(
            "POST",
            "/api/v1/restart",
            "restart",
            "Restart the cloud server (not this one)",
            {200: Message, **_FWD_ERRORS},
            forward=Forward(30.0, "json"),
        ),
    )

    async def pipeline_load(self) -> Response:
        raise needs_cloud("Loading a pipeline")

    async def pipeline_status(self) -> Response:
        return self.ctx.json(NOT_LOADED)

    def status_defaults(self, data: Any) -> Any:
        """Every field of the status, as Scope's response model fills in its defaults."""
        return {**NOT_LOADED, **data} if isinstance(data, dict) else data

    async def pipeline_schemas(self) -> Response:
        return self.ctx.json({"pipelines": {}})

    async def models_status(self) -> Response:
        return self.ctx.json({"downloaded": False, "progress": None})

    async def models_download(self) -> Response:
        raise needs_cloud("Downloading models")

    async def workflow_resolve(self) -> Response:
        body, _ = await parse_body(WorkflowRequest)
        items = [
            {
                "kind": "pipeline",
                "name": pipeline.pipeline_id,
                "status": "missing",
                "detail": "no pipelines run locally; connect to the cloud to use this workflow",
                "action": None,
                "can_auto_resolve": False,
            }
            for pipeline in body.pipelines
        ]
        warnings = ["Not connected to the cloud: scope-trio has no local pipelines."]
        return self.ctx.json({"can_apply": not items, "items": items, "warnings": warnings})

    async def restart(self) -> Response:
        raise not_supported(
            "Restarting over the API",
            "restart the scope-trio process itself (this API restarts only the cloud server, "
            "while connected)",
        )
